"""Scoring passes over worker processes give what one process gives; the detection cache keeps them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.bundle import load_bundle
from models.dataset_io import Sample
from models.detections import Detections
from models.parallel_predict import DetectionCache, ScoringPool, default_workers, predict_many, predict_samples

MODEL = load_bundle(Path(__file__).resolve().parents[2] / "models" / "default", roles=("onnx_int8",)).path("onnx_int8")
SAMPLES_DIR = Path(__file__).resolve().parents[2] / "sample_data"


@pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (2, 1), (3, 1), (4, 2), (16, 8), (64, 8)])
def test_default_workers(cpus: int, expected: int) -> None:
    assert default_workers(cpus) == expected


def _samples(tmp: Path, n: int) -> list[Sample]:
    import cv2

    out = []
    for i in range(n):
        img = np.random.default_rng(i).integers(0, 255, (360, 640, 3), dtype=np.uint8)
        cv2.circle(img, (100 + 20 * i, 180), 30, (20, 20, 20), -1)
        p = tmp / f"{i}.jpg"
        cv2.imwrite(str(p), img)
        out.append(Sample(p, np.zeros((0, 5), np.float32), None, 640, 360))
    return out


def _same(a: list[Detections], b: list[Detections]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.boxes, y.boxes, atol=1e-3)
        np.testing.assert_allclose(x.scores, y.scores, atol=1e-5)
        np.testing.assert_array_equal(x.class_ids, y.class_ids)


@pytest.mark.slow
def test_two_workers_match_one_process(tmp_path: Path) -> None:
    samples = _samples(tmp_path, 20)  # 2 chunks of 16 and 4
    one = predict_samples(MODEL, samples, conf=0.001, workers=1)
    two = predict_samples(MODEL, samples, conf=0.001, workers=2)
    assert sum(len(d) for d in one) > 0  # the check below compares something
    _same(one, two)


@pytest.mark.slow
def test_many_jobs_in_one_pool_match_one_at_a_time(tmp_path: Path) -> None:
    from models.parallel_predict import SplitModel

    b = load_bundle(Path(__file__).resolve().parents[2] / "models" / "default", roles=("split_edge_int8", "split_hub"))
    split = SplitModel(b.path("split_edge_int8"), b.path("split_hub"), tuple(b.manifest.input_size))  # type: ignore[arg-type]
    samples = _samples(tmp_path, 20)
    jobs = [(MODEL, samples), (split, samples[:7]), (MODEL, samples[5:9])]  # chunks of unequal jobs interleave
    many = predict_many(jobs, conf=0.001, workers=2)
    assert [len(d) for d in many] == [20, 7, 4]
    for (model, part), got in zip(jobs, many, strict=True):
        _same(got, predict_samples(model, part, conf=0.001, workers=1))
    _same(many[2], many[0][5:9])
    assert predict_many([], workers=2) == []


@pytest.mark.slow
def test_a_pool_serves_several_calls_and_sees_a_model_file_written_again(tmp_path: Path) -> None:
    import os
    import shutil

    fp32 = load_bundle(MODEL.parent, roles=("onnx_fp32",)).path("onnx_fp32")
    samples = _samples(tmp_path, 20)
    model = tmp_path / "model.onnx"
    shutil.copyfile(fp32, model)
    with ScoringPool(2) as pool:
        first = predict_many([(model, samples)], conf=0.001, pool=pool)[0]
        shutil.copyfile(MODEL, tmp_path / "next.onnx")
        os.replace(tmp_path / "next.onnx", model)  # next week's model at the same path
        second = predict_many([(model, samples), (MODEL, samples[:3])], conf=0.001, pool=pool)
    _same(first, predict_samples(fp32, samples, conf=0.001, workers=1))
    _same(second[0], predict_samples(MODEL, samples, conf=0.001, workers=1))  # not the FP32 session kept
    _same(second[1], second[0][:3])
    assert not _equal(first, second[0])  # the two models differ: the check above could fail
    with pytest.raises(RuntimeError, match="closed"):
        predict_many([(model, samples)], pool=pool)


def _equal(a: list[Detections], b: list[Detections]) -> bool:
    try:
        _same(a, b)
    except AssertionError:
        return False
    return True


def test_cache_hit_and_unreadable_file(tmp_path: Path) -> None:
    cache = DetectionCache(tmp_path / "cache")
    dets = [Detections(np.array([[1, 2, 30, 40]], np.float32), np.array([0.9], np.float32), np.array([2])),
            Detections.empty(), Detections.empty(undecided=True)]
    calls: list[int] = []

    def compute() -> list[Detections]:
        calls.append(1)
        return dets

    first, hit1 = cache.get(MODEL, "golden-fp", "val", 0.001, 0.7, compute)
    second, hit2 = cache.get(MODEL, "golden-fp", "val", 0.001, 0.7, compute)
    assert (hit1, hit2, len(calls)) == (False, True, 1)
    _same(second, dets)
    assert [d.undecided for d in second] == [False, False, True]
    other, hit3 = cache.get(MODEL, "golden-fp", "val", 0.25, 0.7, compute)  # other settings: another entry
    assert not hit3 and len(calls) == 2
    path = cache.path(MODEL, "golden-fp", "val", 0.001, 0.7)
    path.write_bytes(b"truncated")
    again, hit4 = cache.get(MODEL, "golden-fp", "val", 0.001, 0.7, compute)
    assert not hit4 and len(calls) == 3
    _same(again, dets)


@pytest.mark.slow
def test_split_model_matches_the_split_predictor(tmp_path: Path) -> None:
    from models.parallel_predict import SplitModel
    from models.split_runtime import SplitEdgeRunner, SplitHubRunner, SplitPredictor

    b = load_bundle(Path(__file__).resolve().parents[2] / "models" / "default", roles=("split_edge_int8", "split_hub"))
    model = SplitModel(b.path("split_edge_int8"), b.path("split_hub"), tuple(b.manifest.input_size))  # type: ignore[arg-type]
    samples = _samples(tmp_path, 18)
    direct = SplitPredictor(SplitEdgeRunner(model.edge), SplitHubRunner(model.hub), model.imgsz, multi_label=True)
    expected = [d.filter(0.001) for d in direct([s.read() for s in samples], conf=0.001, iou=0.7)]
    assert sum(len(d) for d in expected) > 0
    _same(predict_samples(model, samples, conf=0.001, workers=1), expected)
    _same(predict_samples(model, samples, conf=0.001, workers=2), expected)
    import cv2

    cap = cv2.VideoCapture(str(SAMPLES_DIR / "line_1080p.mp4"))  # parts with defects: boxes of two classes
    frames = [cap.read()[1] for _ in range(4)]
    cap.release()
    single = SplitPredictor(SplitEdgeRunner(model.edge), SplitHubRunner(model.hub), model.imgsz)
    n_multi = sum(len(d) for d in direct(frames, conf=0.001, iou=0.7))
    assert n_multi > sum(len(d) for d in single(frames, conf=0.001, iou=0.7))  # multi_label reached the decoder


@pytest.mark.slow
def test_passes_queued_early_come_back_as_predict_many_gives_them(tmp_path: Path) -> None:
    from models.parallel_predict import predict_many_later

    samples = _samples(tmp_path, 20)
    with ScoringPool(2) as pool:
        pending = predict_many_later([(MODEL, samples), (MODEL, samples[:5])], conf=0.001, pool=pool)
        now = predict_many([(MODEL, samples[3:6])], conf=0.001, pool=pool)[0]  # queued behind, served all the same
        later = pending.result()
    assert [len(d) for d in later] == [20, 5]
    _same(later[0], predict_samples(MODEL, samples, conf=0.001, workers=1))
    _same(later[1], later[0][:5])
    _same(now, later[0][3:6])
    with pytest.raises(RuntimeError, match="closed"):
        predict_many_later([(MODEL, samples)], pool=pool)
