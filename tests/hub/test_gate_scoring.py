"""The gate's scoring: both models' golden-set detections cached (next week's production is this
week's candidate), and a split candidate's two parts scored as the agents and the hub run them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from hub.gate import score_detections
from hub.gate_scoring import GateScorer
from models.bundle import load_bundle, write_bundle
from models.dataset_io import load_dataset

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "models" / "default"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Six frames of the sample video, labelled with the whole INT8 model's own boxes at 0.25."""
    from models.onnx_predict import OnnxPredictor

    root = tmp_path_factory.mktemp("golden")
    b = load_bundle(DEFAULT, roles=("onnx_int8",))
    names = list(b.manifest.classes)
    predict = OnnxPredictor(b.path("onnx_int8"))
    cap = cv2.VideoCapture(str(ROOT / "sample_data" / "line_1080p.mp4"))
    for d in ("images/val", "labels/val"):
        (root / d).mkdir(parents=True)
    n_boxes = 0
    for i in range(6):
        for _ in range(20):
            ok, frame = cap.read()
        assert ok
        h, w = frame.shape[:2]
        cv2.imwrite(str(root / "images/val" / f"f{i}.png"), frame)
        det = predict([frame], conf=0.25)[0]
        rows = [f"{int(c)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
                for (x1, y1, x2, y2), c in zip(det.boxes, det.class_ids, strict=True)]
        n_boxes += len(rows)
        (root / "labels/val" / f"f{i}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))
    cap.release()
    assert n_boxes > 0
    (root / "data.yaml").write_text(yaml.safe_dump({"path": str(root), "val": "images/val",
                                                    "names": dict(enumerate(names))}))
    return load_dataset(root, splits=["val"])


def _unsplit(tmp: Path) -> Path:
    prod = load_bundle(DEFAULT, roles=("onnx_fp32", "onnx_int8", "checkpoint"))
    m = prod.manifest
    write_bundle(tmp / "1.3.0", name=m.name, version="1.3.0", parent_version=m.version, classes=m.classes,
                 input_size=m.input_size, files={r: prod.path(r) for r in ("onnx_fp32", "onnx_int8", "checkpoint")},
                 preprocessing=m.preprocessing, postprocessing=m.postprocessing, quantization=m.quantization)
    return tmp / "1.3.0"


def _count_passes(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Each predict_many call's models (one list per pool of workers)."""
    import models.parallel_predict as pp

    calls: list[list[str]] = []
    real = pp.predict_many

    def counting(jobs: Any, **kw: Any) -> Any:
        calls.append([str(m) for m, _ in jobs])
        return real(jobs, **kw)

    monkeypatch.setattr(pp, "predict_many", counting)
    return calls


def test_golden_detections_cached_for_both_models(golden: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_passes(monkeypatch)
    cand = load_bundle(DEFAULT, roles=("onnx_int8",))
    prod_dir = tmp_path / "prod"
    shutil.copytree(DEFAULT, prod_dir)
    prod = load_bundle(prod_dir, roles=("onnx_int8",))  # another path, the same bytes
    scorer = GateScorer(tmp_path / "cache", workers=1)
    first = scorer.pair(golden, "golden-fp", cand, prod)
    # the candidate's detections were cached, and production's file has the same SHA-256: read back
    assert len(calls) == 1 and first[0].report.map50 > 0.9  # the labels are this model's own boxes
    assert first[1].report.map50 == first[0].report.map50
    again = scorer.pair(golden, "golden-fp", cand, prod)
    assert len(calls) == 1  # both read back
    assert [s.report.map50 for s in again] == [s.report.map50 for s in first]
    scorer.pair(golden, "another-golden-set", cand, prod)
    assert len(calls) == 2
    scorer.pair(golden, None, cand, prod)  # no key (the reviewed data): predicted every time
    assert len(calls) == 4


def test_score_all_runs_every_pass_in_one_pool(golden: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_passes(monkeypatch)
    cand = load_bundle(DEFAULT, roles=("onnx_int8",))
    scorer = GateScorer(tmp_path / "cache", workers=2)
    cold = scorer.score_all(golden, "golden-fp", cand, cand, reviewed=golden)
    # golden: candidate and production (same file, both missed the cache), split parts; reviewed: both
    assert len(calls) == 1 and len(calls[0]) == 5
    assert ["SplitModel" in m for m in calls[0]] == [False, False, False, False, True]  # the split parts last
    assert cold.split is not None and cold.new is not None
    # the same figures as the one-pass-at-a-time calls
    ref = GateScorer(tmp_path / "other-cache", workers=1)
    assert cold.golden[0].report.map50 == pytest.approx(ref.pair(golden, None, cand, cand)[0].report.map50, abs=1e-9)
    assert cold.split.report.map50 == pytest.approx(ref.split(golden, cand).report.map50, abs=1e-9)  # type: ignore[union-attr]
    assert cold.new[1].report.map50 == cold.golden[1].report.map50
    calls.clear()
    warm = scorer.score_all(golden, "golden-fp", cand, cand)  # golden read back: only the split parts run
    assert len(calls) == 1 and len(calls[0]) == 1 and "SplitModel" in calls[0][0]
    assert warm.new is None and warm.golden[0].report.map50 == cold.golden[0].report.map50
    unsplit = load_bundle(_unsplit(tmp_path), roles=("onnx_int8",))
    calls.clear()
    assert scorer.score_all(golden, "golden-fp", unsplit, cand).split is None
    assert calls == []  # the same model bytes: all read back, nothing to run


def test_prefetched_passes_are_taken_up_not_run_again(golden: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    from models.parallel_predict import ScoringPool

    calls = _count_passes(monkeypatch)
    cand = load_bundle(DEFAULT, roles=("onnx_int8",))
    assert GateScorer(tmp_path / "c0", workers=1).prefetch(golden, "golden-fp", cand, cand, golden) == 0  # no pool
    ref = GateScorer(tmp_path / "ref", workers=2).score_all(golden, "golden-fp", cand, cand, reviewed=golden)
    calls.clear()
    with ScoringPool(2) as pool:
        scorer = GateScorer(tmp_path / "c1", pool=pool)
        # golden: candidate and production (both missed the cache); reviewed: both
        assert scorer.prefetch(golden, "golden-fp", cand, cand, reviewed=golden) == 4
        got = scorer.score_all(golden, "golden-fp", cand, cand, reviewed=golden)
        assert len(calls) == 1 and len(calls[0]) == 1 and "SplitModel" in calls[0][0]  # only the split parts ran
        # queued for another golden set: not taken up, every pass runs
        calls.clear()
        scorer.prefetch(golden, "another-golden-set", cand, cand, reviewed=golden)
        with caplog.at_level("WARNING", logger="hub.gate_scoring"):
            scorer.score_all(golden, "a-third-golden-set", cand, cand, reviewed=golden)
        assert len(calls) == 1 and len(calls[0]) == 5
        assert "were for other models or data" in caplog.text  # a mismatch shows in the job's log
    for a, b in ((got.golden[0], ref.golden[0]), (got.golden[1], ref.golden[1]), (got.new[0], ref.new[0]),  # type: ignore[index]
                 (got.split, ref.split)):
        assert a.report.map50 == pytest.approx(b.report.map50, abs=1e-9)  # type: ignore[union-attr]
    assert scorer.cache.lookup(cand.path("onnx_int8"), "golden-fp", "val", 0.001, 0.7) is not None  # cached


def test_split_parts_scored_as_they_run(golden: Any, tmp_path: Path) -> None:
    from models.split_runtime import SplitEdgeRunner, SplitHubRunner, SplitPredictor

    cand = load_bundle(DEFAULT, roles=("onnx_int8",))
    scorer = GateScorer(tmp_path / "cache", workers=2)
    split = scorer.split(golden, cand)
    assert split is not None
    b = load_bundle(DEFAULT, roles=("split_edge_int8", "split_hub"))
    direct = SplitPredictor(SplitEdgeRunner(b.path("split_edge_int8")), SplitHubRunner(b.path("split_hub")),
                            tuple(b.manifest.input_size), multi_label=True)  # type: ignore[arg-type]
    frames = [s.read() for s in golden.split("val")]
    dets = [d.filter(0.001) for d in direct(frames, conf=0.001, iou=0.7)]
    expected = score_detections(golden, "val", dets, split.operating_conf)
    assert split.report.map50 == pytest.approx(expected.report.map50, abs=1e-6)
    assert split.operating_conf == float(cand.manifest.postprocessing.get("operating_conf"))
    whole = scorer.pair(golden, None, cand, cand)[0]
    assert split.report.map50 > whole.report.map50 - 0.2  # the same model, through the bottleneck
    assert np.isfinite(split.report.map50)
    assert scorer.split(golden, load_bundle(_unsplit(tmp_path), roles=("onnx_int8",))) is None
