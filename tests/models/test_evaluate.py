"""End-to-end evaluation (models.evaluate) and the onnxruntime predictor (models.onnx_predict)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import cv2
import numpy as np
import pytest

from models.dataset_io import YoloDataset, load_dataset
from models.detections import Detections
from models.evaluate import EvalReport, evaluate, evaluate_predictions
from models.onnx_predict import OnnxPredictor

W, H = 64, 48
PARTS_A = [
    {"box": [0, 0, 32, 48], "product": "bracket", "defective": True, "visible": 1.0},
    {"box": [32, 0, 64, 48], "product": "bracket", "defective": False, "visible": 1.0},
]
PARTS_B = [{"box": [0, 0, 64, 48], "product": "casing", "defective": False, "visible": 0.9}]

SPLIT = {
    "a": {"size": (W, H), "labels": "0 0.25 0.5 0.25 0.5\n", "parts": PARTS_A},
    "b": {"size": (W, H), "labels": "", "parts": PARTS_B},
    "c": {"size": (W, H), "labels": "1 0.5 0.5 0.5 0.5\n2 0.8 0.2 0.2 0.2\n"},
}


@pytest.fixture
def dataset(make_dataset) -> YoloDataset:
    return load_dataset(make_dataset({"test": SPLIT, "val": SPLIT}))


class OraclePredictor:
    """Returns each sample's ground truth (in order), optionally with extra boxes, for known answers."""

    def __init__(self, ds: YoloDataset, split: str, extra: dict[str, list] | None = None):
        self.samples: Iterator = iter(ds.split(split))
        self.extra = extra or {}

    def predict(self, frames: list[np.ndarray]) -> list[Detections]:
        out = []
        for frame in frames:
            s = next(self.samples)
            assert frame.shape == (s.height, s.width, 3)
            rows = [[*lb[1:], 0.9, lb[0]] for lb in s.labels] + self.extra.get(s.image_path.stem, [])
            a = np.array(rows, np.float32).reshape(-1, 6)
            out.append(Detections(a[:, :4], a[:, 4], a[:, 5].astype(np.int32)))
        return out


def test_evaluate_perfect_predictions(dataset):
    oracle = OraclePredictor(dataset, "test")
    rep = evaluate(oracle.predict, dataset, split="test", batch=2, progress=False)
    assert isinstance(rep, EvalReport)
    assert rep.n_images == 3 and rep.n_instances == 3
    assert rep.map50 == pytest.approx(0.995) and rep.map50_95 == pytest.approx(0.995)  # Ultralytics' ceiling
    assert rep.per_class["scratch"] == {
        "precision": pytest.approx(1.0), "recall": pytest.approx(1.0), "ap50": pytest.approx(0.995),
        "ap50_95": pytest.approx(0.995), "n_instances": 1,
    }  # fmt: skip
    assert rep.per_class["stain"]["ap50"] is None and rep.per_class["stain"]["n_instances"] == 0
    assert rep.part_level["recall"] == 1.0 and rep.part_level["false_alarm_rate"] == 0.0
    assert (rep.part_level["n_defective"], rep.part_level["n_good"]) == (1, 2)
    assert rep.seconds > 0
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["map50"] == pytest.approx(0.995) and d["per_class"]["stain"]["ap50"] is None


EXTRA_CASES = [
    # (extra detections per image stem [x1, y1, x2, y2, score, cls], operating_conf,
    #  expected part-level subset)
    pytest.param({"b": [[10, 10, 20, 20, 0.3, 3]]}, None, {"false_alarms": 1, "false_alarm_rate": 0.5},
                 id="fp-on-good-part-at-default-0.25"),
    pytest.param({"b": [[10, 10, 20, 20, 0.3, 3]]}, 0.5, {"false_alarms": 0, "recall": 1.0},
                 id="fp-below-operating-conf"),
    pytest.param({}, 0.95, {"caught": 0, "recall": 0.0}, id="operating-conf-above-all-scores"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "operating_conf", "expected"), EXTRA_CASES)
def test_evaluate_part_level(dataset, extra, operating_conf, expected):
    oracle = OraclePredictor(dataset, "test", extra=extra)
    rep = evaluate(oracle.predict, dataset, "test", operating_conf=operating_conf, progress=False)
    assert {k: rep.part_level[k] for k in expected} == expected
    assert rep.part_level["conf"] == (0.25 if operating_conf is None else operating_conf)


def test_extra_false_positive_lowers_map(dataset):
    extra = {"b": [[10, 10, 20, 20, 0.95, 0]]}  # a confident scratch on a background image
    rep = evaluate(OraclePredictor(dataset, "test", extra).predict, dataset, "test", progress=False)
    assert rep.per_class["scratch"]["ap50"] == pytest.approx(0.5, abs=0.006)
    assert rep.per_class["crack"]["ap50"] == pytest.approx(0.995)


def test_conf_and_iou_forwarded_or_filtered(dataset):
    seen = []

    def with_kwargs(frames, conf=None, iou=None):
        seen.append((conf, iou))
        return [Detections(np.array([[1, 1, 9, 9]]), np.array([0.0005]), np.array([0])) for _ in frames]

    rep = evaluate(with_kwargs, dataset, "test", conf=0.001, iou=0.6, progress=False)
    assert seen and all(s == (0.001, 0.6) for s in seen)
    assert rep.map50 == 0.0  # the 0.0005 boxes are below conf and filtered out


@pytest.mark.parametrize(
    ("split", "n_dets", "error"),
    [("train", 3, "unknown split 'train'"), ("test", 2, "3 samples in 'test' but 2 detections")],
)
def test_evaluate_predictions_errors(dataset, split, n_dets, error):
    with pytest.raises(ValueError, match=error):
        evaluate_predictions(dataset, split, [Detections.empty()] * n_dets)


def test_predict_must_return_one_result_per_frame(dataset):
    with pytest.raises(ValueError, match="returned 0 results for"):
        evaluate(lambda frames: [], dataset, "test", progress=False)


# ---------------------------------------------------------------------------- OnnxPredictor


def frames(rng: np.random.Generator) -> list[np.ndarray]:
    sizes = [(240, 400), (300, 300), (480, 200)]
    return [cv2.GaussianBlur(rng.integers(0, 255, (*s, 3), np.uint8), (0, 0), 3) for s in sizes]


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_onnx_predictor_reads_model(yolo_onnx, kind):
    pred = OnnxPredictor(yolo_onnx[kind], intra_op_threads=1, conf=0.001)
    assert pred.imgsz == (320, 320)
    assert pred.fixed_batch == (1 if kind == "fixed" else None)
    assert pred.names == ["scratch", "crack", "dent", "stain"]
    fs = frames(np.random.default_rng(0))
    batched = pred(fs)
    assert len(batched) == 3 and sum(len(d) for d in batched) > 0
    for f, d in zip(fs, batched, strict=True):  # batching does not change results
        (single,) = pred([f])
        np.testing.assert_allclose(single.boxes, d.boxes, atol=1e-2)
        assert (d.boxes[:, [0, 2]] <= f.shape[1]).all() and (d.boxes[:, [1, 3]] <= f.shape[0]).all()
    assert pred([]) == []


def test_onnx_fixed_and_dynamic_agree(yolo_onnx):
    a = OnnxPredictor(yolo_onnx["dynamic"], intra_op_threads=1)
    b = OnnxPredictor(yolo_onnx["fixed"], intra_op_threads=1)
    batch = np.random.default_rng(1).uniform(0, 1, (3, 3, 320, 320)).astype(np.float32)
    ra, rb = a.raw(batch), b.raw(batch)  # b loops over the batch of 1
    assert ra.shape == rb.shape == (3, 8, 2100)
    np.testing.assert_allclose(ra, rb, atol=1e-4)


def test_onnx_predictor_matches_ultralytics_predict(yolo_onnx):
    """Our letterbox + decode on the batch-1 model equals Ultralytics' own predictor on the same ONNX."""
    pytest.importorskip("ultralytics")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    ours = OnnxPredictor(yolo_onnx["fixed"], intra_op_threads=1, conf=0.001)
    ref_model = YOLO(str(yolo_onnx["fixed"]), task="detect")
    checked = 0
    for f in frames(np.random.default_rng(2)):
        (d,) = ours([f])
        r = ref_model.predict(f, conf=0.001, iou=0.7, imgsz=320, verbose=False)[0].boxes
        ref = np.concatenate([r.xyxy.numpy(), r.conf.numpy()[:, None], r.cls.numpy()[:, None]], 1)
        assert len(d) == len(ref)
        o = np.lexsort((d.boxes[:, 1], d.boxes[:, 0], d.class_ids, -d.scores))
        q = np.lexsort((ref[:, 1], ref[:, 0], ref[:, 5], -ref[:, 4]))
        np.testing.assert_allclose(d.boxes[o], ref[q, :4], atol=0.05)
        np.testing.assert_allclose(d.scores[o], ref[q, 4], rtol=1e-3)
        checked += len(d)
    assert checked > 0


def test_evaluate_with_onnx_predictor(yolo_onnx, dataset):
    pred = OnnxPredictor(yolo_onnx["dynamic"], intra_op_threads=1)
    rep = evaluate(pred, dataset, "val", batch=2, progress=False)
    assert rep.n_images == 3 and rep.conf == 0.001
    assert 0.0 <= rep.map50 <= 1.0 and set(rep.per_class) == set(dataset.names)
    json.dumps(rep.to_dict())
