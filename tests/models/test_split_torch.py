"""The torch head runner (a GPU hub's ``heads.runtime: torch``), on this machine's CPU: its batched
GPU-style NMS equals :func:`models.processing.postprocess`, it agrees with the bundle's ONNX head,
and it refuses what does not fit. Uses the shipped bundle (models/default)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ultralytics")

from hub.core.config import ConfigError, build_config  # noqa: E402
from hub.heads import load_heads  # noqa: E402
from models.bundle import BundleError, load_bundle  # noqa: E402
from models.detections import Detections  # noqa: E402
from models.feature_codec import FeatureSpec  # noqa: E402
from models.processing import postprocess, preprocess_batch  # noqa: E402
from models.split_runtime import SplitEdgeRunner, SplitMismatchError  # noqa: E402
from models.split_torch import TorchSplitHub  # noqa: E402
from tests.conftest import sample_frames  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "default"


@pytest.fixture(scope="module")
def bundle() -> Any:
    return load_bundle(BUNDLE, roles=("split_edge_int8", "split_hub", "checkpoint", "split_bottleneck"))


@pytest.fixture(scope="module")
def codes(bundle: Any) -> np.ndarray:
    edge = SplitEdgeRunner(bundle.path("split_edge_int8"), version=bundle.manifest.version)
    batch, _ = preprocess_batch(sample_frames(0, 300, 5), tuple(bundle.manifest.input_size))
    return edge.run(batch)


@pytest.fixture(scope="module")
def torch_head() -> Any:
    return load_heads([BUNDLE], runtime="torch", device="cpu")[load_bundle(BUNDLE, roles=()).manifest.version]


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


def matched(src: Detections, ref: Detections) -> int:
    return sum(bool((ref.class_ids == c).any() and (_iou(b, ref.boxes[ref.class_ids == c]) >= 0.5).any())
               for b, c in zip(src.boxes, src.class_ids, strict=True))


@pytest.mark.parametrize(("conf", "iou", "max_det"), [(0.25, 0.7, 300), (0.05, 0.5, 300), (0.01, 0.7, 2)])
def test_batched_nms_equals_postprocess(torch_head: Any, codes: np.ndarray, conf: float, iou: float,
                                        max_det: int) -> None:
    runner = torch_head.runner
    rows = codes[::4]  # 15 frames spread over the 10 s of video
    want = postprocess(runner.run(rows), [None] * len(rows), conf=conf, iou=iou, max_det=max_det)
    got = runner.detect(rows, conf=conf, iou=iou, max_det=max_det)
    assert sum(len(d) for d in want) > 0, "the frames should hold candidates at this threshold"
    for w, g in zip(want, got, strict=True):
        assert len(g) == len(w) <= max_det
        order_w, order_g = np.argsort(-w.scores, kind="stable"), np.argsort(-g.scores, kind="stable")
        np.testing.assert_allclose(g.scores[order_g], w.scores[order_w], atol=1e-5)
        np.testing.assert_allclose(g.boxes[order_g], w.boxes[order_w], atol=1e-3)
        assert (g.class_ids[order_g] == w.class_ids[order_w]).all()


def test_a_batch_padded_to_its_bucket_answers_as_unpadded(torch_head: Any, codes: np.ndarray) -> None:
    """On a GPU a batch of 3 runs as 4 (one kernel set per bucket); the padding row never comes back
    and the 3 frames' boxes are the unpadded run's. The CPU has no buckets; set here to test the pad."""
    runner, rows = torch_head.runner, codes[:3]
    assert runner.batch_buckets == ()  # a CPU runs each batch as it is
    plain = runner.detect(rows, conf=0.05, iou=0.7, max_det=300)
    try:
        runner.batch_buckets = (1, 2, 4, 8)
        padded = runner.detect(rows, conf=0.05, iou=0.7, max_det=300)
        assert runner.run(rows).shape[0] == 3
    finally:
        runner.batch_buckets = ()
    assert len(padded) == 3 and sum(map(len, plain)) > 0
    for p, q in zip(plain, padded, strict=True):
        np.testing.assert_allclose(q.boxes, p.boxes, atol=1e-3)
        assert (q.class_ids == p.class_ids).all()


def test_torch_head_agrees_with_the_onnx_head(torch_head: Any, codes: np.ndarray) -> None:
    onnx_head = load_heads([BUNDLE], threads=2)[torch_head.version]
    a, b = onnx_head.detect(codes), torch_head.detect(codes)  # INT8 against FP32 weights of the same part
    n_a, n_b = sum(map(len, a)), sum(map(len, b))
    assert n_a >= 10 and n_b >= 10, (n_a, n_b)
    assert sum(matched(x, y) for x, y in zip(a, b, strict=True)) >= 0.8 * n_a
    assert sum(matched(y, x) for x, y in zip(a, b, strict=True)) >= 0.8 * n_b


def test_spec_other_than_the_manifest_is_refused(bundle: Any) -> None:
    spec = FeatureSpec.from_dict({**bundle.manifest.split["spec"], "channels": 16})
    with pytest.raises(SplitMismatchError, match="manifest says"):
        TorchSplitHub(bundle.path("checkpoint"), bundle.path("split_bottleneck"), spec,
                      version=bundle.manifest.version, imgsz=tuple(bundle.manifest.input_size), device="cpu")


def test_codes_of_another_shape_are_refused(torch_head: Any, codes: np.ndarray) -> None:
    with pytest.raises(SplitMismatchError, match="head expects"):
        torch_head.runner.run(codes[:, :, :-1])


def test_bundle_without_a_bottleneck_file_is_refused_for_torch(tmp_path: Path) -> None:
    dst = tmp_path / "b"
    shutil.copytree(BUNDLE, dst)
    (dst / "split_bottleneck.pt").unlink()
    assert load_heads([dst], threads=1)  # the ONNX head needs only split_hub
    with pytest.raises(BundleError, match="split_bottleneck"):
        load_heads([dst], runtime="torch", device="cpu")


def test_tampered_bottleneck_file_is_refused(tmp_path: Path) -> None:
    dst = tmp_path / "b"
    shutil.copytree(BUNDLE, dst)
    with open(dst / "split_bottleneck.pt", "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="split_bottleneck"):
        load_heads([dst], runtime="torch", device="cpu")


@pytest.mark.parametrize(("heads", "error"), [
    ({"runtime": "tensorrt"}, "heads.runtime"),
    ({"runtime": "torch", "device": "gpu"}, "heads.device"),
    ({"runtime": "torch", "half": "sometimes"}, "heads.half"),
])
def test_head_runtime_config_is_checked(heads: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace(".", r"\.")):
        build_config({"heads": {"bundles": [str(BUNDLE)], **heads}})
