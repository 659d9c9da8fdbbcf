"""Export + INT8 quantization of a tiny random-init YOLOv8n (imgsz 160) into a bundle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("ultralytics")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import cv2  # noqa: E402

from models import quantize as q  # noqa: E402
from models.bundle import BundleError, load_bundle  # noqa: E402
from models.checkpoint import make_dev_checkpoint  # noqa: E402
from models.export import TARGETS, build_bundle  # noqa: E402
from models.head_tail import find_head_tail  # noqa: E402
from models.onnx_meta import OnnxMetadataError, check_against_manifest, read_metadata  # noqa: E402
from models.processing import preprocess_batch  # noqa: E402
from models.quant_error import sensitivity  # noqa: E402
from models.taxonomy import DEFAULT_CLASSES  # noqa: E402

IMGSZ = 160


def _synthetic_images(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.full((240, 320, 3), int(rng.integers(60, 200)), np.uint8)
        for _ in range(4):
            c = tuple(int(v) for v in rng.integers(0, 255, 3))
            x, y = (int(v) for v in rng.integers(0, 300, 2))
            cv2.circle(img, (x, y % 240), int(rng.integers(5, 40)), c, -1)
            cv2.line(img, (x, 0), (int(rng.integers(0, 320)), 239), c, 2)
        cv2.imwrite(str(folder / f"{i:03d}.jpg"), img)


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("yolo_cfg")))
    root = tmp_path_factory.mktemp("export")
    ds = root / "ds"
    _synthetic_images(ds / "images" / "train", 10, seed=0)
    _synthetic_images(ds / "images" / "val", 3, seed=1)
    frames = q.load_frames(q.list_dataset_images(ds)[:4])
    ckpt = make_dev_checkpoint(root / "dev.pt", bn_frames=frames, imgsz=IMGSZ)
    manifest = build_bundle(
        ckpt, root / "bundle", ds, version="0.0.1", imgsz=IMGSZ, calib_images=6, sensitivity_frames=3
    )
    return {"root": root, "ds": ds, "ckpt": ckpt, "manifest": manifest, "dir": root / "bundle"}


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_export_table_order() -> None:
    assert [(t.name, t.role) for t in TARGETS] == [("onnx_fp32", "onnx_fp32"), ("onnx_int8", "onnx_int8")]


def test_bundle_manifest(built) -> None:
    b = load_bundle(built["dir"], roles=("onnx_fp32", "onnx_int8", "checkpoint"))
    m = b.manifest
    assert m == built["manifest"]
    assert m.classes == list(DEFAULT_CLASSES) and m.input_size == (IMGSZ, IMGSZ)
    assert set(m.files) == {"onnx_fp32", "onnx_int8", "checkpoint"}
    qz = m.quantization
    assert qz["format"] == "QDQ" and qz["per_channel"] is True
    assert (qz["activation_type"], qz["weight_type"]) == ("QUInt8", "QInt8")
    assert qz["calibration"]["images"] == 6 and qz["calibration"]["source"] == str(built["ds"])
    assert qz["detect_layer"] == "/model.22" and qz["excluded_reason"]
    assert 0 < qz["deltas"]["output_cosine"] <= 1 + 1e-6 and qz["deltas"]["frames"] == 3
    assert set(m.training["export_seconds"]) == {"onnx_fp32", "onnx_int8"}


def test_excluded_nodes_cover_yolov8_head(built) -> None:
    excluded = set(built["manifest"].quantization["excluded_nodes"])
    assert all(n.startswith("/model.22/") for n in excluded)
    for must in ("/model.22/dfl/Softmax", "/model.22/dfl/conv/Conv", "/model.22/Sigmoid"):
        assert must in excluded
    ops = {n.name: n.op_type for n in onnx.load(built["dir"] / "model_fp32.onnx").graph.node}
    tail_ops = {ops[n] for n in excluded if n in ops}
    assert {"Softmax", "Conv", "Sigmoid", "Concat", "Sub", "Add", "Div", "Mul"} <= tail_ops
    # branch convs (cv2.i.2 / cv3.i.2) are the quantized boundary, not excluded
    assert not any("/cv2." in n or "/cv3." in n for n in excluded)


@pytest.mark.parametrize("batch", [1, 2])
def test_int8_output_shape_matches_fp32(built, batch: int) -> None:
    frames = q.load_frames(q.list_dataset_images(built["ds"], "val")[:batch])
    x, _ = preprocess_batch(frames, IMGSZ)
    y32 = _run(built["dir"] / "model_fp32.onnx", x)
    y8 = _run(built["dir"] / "model_int8.onnx", x)
    anchors = sum((IMGSZ // s) ** 2 for s in (8, 16, 32))
    assert y32.shape == y8.shape == (batch, 4 + len(DEFAULT_CLASSES), anchors)
    assert np.isfinite(y8).all()
    assert float(y8[:, 4:].min()) >= 0 and float(y8[:, 4:].max()) <= 1  # sigmoid kept float


def test_excluded_nodes_stay_float(built) -> None:
    qz = built["manifest"].quantization
    g = onnx.load(built["dir"] / "model_int8.onnx").graph
    prod = {o: n for n in g.node for o in n.output}
    cons: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    nodes = {n.name: n for n in g.node}
    boundary = set(qz["branch_convs"])
    assert len(boundary) == 6
    missing = [n for n in qz["excluded_nodes"] if n not in nodes]
    assert not missing, f"excluded nodes not in the INT8 graph: {missing}"
    for name in qz["excluded_nodes"]:
        node = nodes[name]
        for out in node.output:  # nothing excluded feeds a QuantizeLinear
            assert all(c.op_type != "QuantizeLinear" for c in cons.get(out, [])), name
        for inp in node.input:  # a DQ input may only be the boundary conv's own output Q/DQ
            src = prod.get(inp)
            if src is not None and src.op_type == "DequantizeLinear":
                qn = prod.get(src.input[0])
                assert qn is not None and qn.op_type == "QuantizeLinear", name
                assert prod[qn.input[0]].name in boundary, f"{name} is fed by quantized {qn.input[0]}"
    # and the backbone really is quantized
    assert sum(n.op_type == "QuantizeLinear" for n in g.node) > 50


def test_metadata_embedded_and_consistent(built) -> None:
    m = built["manifest"]
    for role in ("onnx_fp32", "onnx_int8"):
        path = built["dir"] / m.files[role].path
        check_against_manifest(path, m)
        meta = read_metadata(path)
        assert meta["bundle_version"] == "0.0.1"
    fp32_q = read_metadata(built["dir"] / "model_fp32.onnx")["quantization"]
    int8_q = json.loads(read_metadata(built["dir"] / "model_int8.onnx")["quantization"])
    assert fp32_q == "none" and int8_q["excluded_nodes"] == m.quantization["excluded_nodes"]


def test_find_head_tail_derives_detect_layer(built) -> None:
    tail = find_head_tail(built["dir"] / "model_fp32.onnx")
    assert tail.detect_layer == "/model.22"
    assert all(n.startswith("/model.22/cv") and n.endswith(".2/Conv") for n in tail.branch_convs)


def test_sensitivity_identity_is_exact(built) -> None:
    frames = q.load_frames(q.list_dataset_images(built["ds"], "val")[:2])
    fp32 = built["dir"] / "model_fp32.onnx"
    s = sensitivity(fp32, fp32, frames)
    assert s["output_max_abs"] == 0 and s["topk_argmax_agree"] == 1.0
    assert s["cls_cosine"] == pytest.approx(1.0)


def test_truncated_onnx_in_bundle_names_file(built, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(built["dir"], copy)
    f = copy / "model_int8.onnx"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(BundleError, match="model_int8.onnx"):
        load_bundle(copy)
    with pytest.raises(OnnxMetadataError, match="model_int8.onnx"):
        read_metadata(f)


def test_calibration_selection_is_deterministic(built) -> None:
    a = q.select_calibration_images(built["ds"], 4)
    b = q.select_calibration_images(built["ds"], 4)
    assert a == b and len(set(a)) == 4
    assert all(p.parent.name == "train" for p in a)
    with pytest.raises(q.QuantizationError, match="no images"):
        q.list_dataset_images(built["root"] / "bundle")


def test_ultralytics_kept_offline(built) -> None:
    import ultralytics.utils.checks as uc

    assert os.environ["YOLO_OFFLINE"] == "1"
    assert uc.AUTOINSTALL is False and uc.ONLINE is False
    assert uc.check_requirements("surely-not-a-real-package-lineguard>=1") is False


def test_preprocess_failure_is_logged_not_fatal(built, tmp_path: Path, monkeypatch, caplog) -> None:
    import onnxruntime.quantization.shape_inference as si

    def boom(*a, **k):
        raise RuntimeError("shape inference exploded")

    monkeypatch.setattr(si, "quant_pre_process", boom)
    out = tmp_path / "int8.onnx"
    with caplog.at_level("WARNING", logger="models.quantize"):
        rep = q.quantize_int8(built["dir"] / "model_fp32.onnx", out, built["ds"], n_images=2)
    assert rep.preprocessed is False and "shape inference exploded" in rep.warnings[-1]
    assert "quant_pre_process failed" in caplog.text
    assert "/model.22/dfl/Softmax" in rep.excluded_nodes and out.stat().st_size > 0


def _qdq_params(path: Path) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer
            if i.name.endswith(("_scale", "_zero_point"))}


@pytest.fixture()
def calibration_runs(monkeypatch) -> list[int]:
    """The number of frames of each calibration run (quantize's batches, counted as they are read)."""
    runs: list[int] = []
    real = q.calibration_batches

    def counting(paths, imgsz, batch=q.CALIBRATION_BATCH):
        for x in real(paths, imgsz, batch):
            runs.append(len(x))
            yield x

    monkeypatch.setattr(q, "calibration_batches", counting)
    return runs


def test_minmax_ranges_match_onnxruntime_calibrator(built, tmp_path: Path, monkeypatch, calibration_runs) -> None:
    """models.calibration (8 frames per run here 4, reduced in threads) gives the QDQ parameters ONNX
    Runtime's own MinMaxCalibrater gives one frame per run (7 frames: batches of 4 and 3)."""
    import models.calibration as cal

    fp32 = built["dir"] / "model_fp32.onnx"
    monkeypatch.setattr(q, "CALIBRATION_BATCH", 4)
    monkeypatch.setattr(cal, "MIN_CPUS", 1)  # ours on any host (the build machine has 2 cores)
    q.quantize_int8(fp32, tmp_path / "ours.onnx", built["ds"], n_images=7)
    assert calibration_runs == [4, 3]  # ours only: quantize_static read the ranges instead of calibrating again
    ours = _qdq_params(tmp_path / "ours.onnx")
    monkeypatch.setattr(cal, "MIN_CPUS", 1 << 30)  # ONNX Runtime calibrates
    monkeypatch.setattr(q, "CALIBRATION_BATCH", 1)
    calibration_runs.clear()
    q.quantize_int8(fp32, tmp_path / "ort.onnx", built["ds"], n_images=7)
    assert calibration_runs == [1] * 7
    theirs = _qdq_params(tmp_path / "ort.onnx")
    assert ours.keys() == theirs.keys() and len(ours) > 20
    for k, v in theirs.items():
        np.testing.assert_allclose(ours[k], v, rtol=1e-5, err_msg=k)


@pytest.mark.parametrize(("cpus", "threaded"), [(1, False), (2, False), (7, False), (8, True), (64, True)])
def test_threaded_minmax_from_8_cores(cpus: int, threaded: bool) -> None:
    from models.calibration import use_threaded_minmax

    assert use_threaded_minmax(cpus) is threaded


def test_histogram_calibration_one_frame_per_run(built, tmp_path: Path, calibration_runs) -> None:
    """The histogram methods stack every run's arrays: they get one frame per run whatever the batch."""
    rep = q.quantize_int8(built["dir"] / "model_fp32.onnx", tmp_path / "p.onnx", built["ds"], n_images=5,
                          calibration_method="percentile")
    assert calibration_runs and set(calibration_runs) == {1} and sum(calibration_runs) % 5 == 0
    assert rep.calibration_method == "percentile" and (tmp_path / "p.onnx").stat().st_size > 0
