"""Box metrics (Ultralytics port) and part-level metrics (models.metrics)."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest

from models.dataset_io import Part
from models.detections import Detections
from models.metrics import (
    IOU_THRESHOLDS,
    DetectionMetrics,
    ap_per_class,
    box_iou,
    choose_operating_threshold,
    compute_ap,
    match_predictions,
    part_level,
    part_scores,
    threshold_for_good_scores,
)


def det(rows: list[tuple[float, float, float, float, float, int]]) -> Detections:
    """Detections from (x1, y1, x2, y2, score, cls) rows."""
    a = np.array(rows, np.float32).reshape(-1, 6)
    return Detections(a[:, :4], a[:, 4], a[:, 5].astype(np.int32))


def labels(rows: list[tuple[int, float, float, float, float]]) -> np.ndarray:
    return np.array(rows, np.float32).reshape(-1, 5)


# ---------------------------------------------------------------------------- IoU / matching


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
        ([0, 0, 10, 10], [5, 0, 15, 10], 1 / 3),
        ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),
        ([0, 0, 10, 10], [2, 2, 4, 4], 0.04),
    ],
)
def test_box_iou(a, b, expected):
    assert box_iou(np.array([a]), np.array([b]))[0, 0] == pytest.approx(expected, abs=1e-6)


MATCH_CASES = [
    # (pred classes (by descending conf), true classes, iou (n_true, n_pred), expected correct matrix:
    #  one string per prediction, one char per IoU threshold 0.50 ... 0.95)
    pytest.param([0], [0], [[0.62]], ["1110000000"], id="iou-0.62-passes-3"),
    pytest.param([0], [0], [[0.99]], ["1111111111"], id="perfect"),
    pytest.param([1], [0], [[0.99]], ["0000000000"], id="wrong-class"),
    pytest.param([0], [0], [[0.4]], ["0000000000"], id="below-0.5"),
    pytest.param([0, 0], [0], [[0.9, 0.8]], ["1111111110", "0000000000"], id="first-claims-target"),
    # the first prediction misses 0.95, so the target is still free there for the second one
    pytest.param([0, 0], [0], [[0.9, 0.95]], ["1111111110", "0000000001"], id="claims-per-threshold"),
    pytest.param([0, 0], [0, 0], [[0.9, 0.0], [0.0, 0.7]], ["1111111110", "1111100000"], id="two-targets"),
    # per threshold the first prediction takes the best free target (0.96 one), the second gets the 0.7 one
    pytest.param([0, 0], [0, 0], [[0.96, 0.8], [0.7, 0.0]], ["1111111111", "0000000000"], id="greedy"),
    pytest.param([0, 1], [0, 1], [[0.82, 0.9], [0.9, 0.62]], ["1111111000", "1110000000"], id="class-aware"),
]  # fmt: skip


@pytest.mark.parametrize(("pred_cls", "true_cls", "iou", "expected"), MATCH_CASES)
def test_match_predictions_cases(pred_cls, true_cls, iou, expected):
    got = match_predictions(np.array(pred_cls), np.array(true_cls), np.array(iou, np.float32))
    np.testing.assert_array_equal(got, np.array([[c == "1" for c in row] for row in expected]))


def test_match_predictions_empty():
    assert match_predictions(np.zeros(0), np.array([0]), np.zeros((1, 0))).shape == (0, 10)
    assert not match_predictions(np.array([0, 1]), np.zeros(0), np.zeros((0, 2))).any()


# ---------------------------------------------------------------------------- AP, hand-computed


def run_metrics(images: list[tuple[Detections, np.ndarray]], nc: int = 4):
    dm = DetectionMetrics(nc)
    for d, lb in images:
        dm.update(d, lb)
    return dm.compute()


AP_CASES = [
    # (images [(detections, labels)], expected AP50 per class-with-targets, expected AP50-95, P, R)
    pytest.param(
        [(det([(0, 0, 10, 10, 0.9, 0), (20, 20, 40, 40, 0.8, 1)]),
          labels([(0, 0, 0, 10, 10), (1, 20, 20, 40, 40)])),
         (det([(5, 5, 25, 25, 0.7, 0)]), labels([(0, 5, 5, 25, 25)]))],
        [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], id="perfect",
    ),
    pytest.param(  # FP at 0.9, TP at 0.8: P/R curve [0, 0.5] / [0, 1] -> envelope 0.5 everywhere but r=0
        [(det([(50, 50, 60, 60, 0.9, 0), (0, 0, 10, 10, 0.8, 0)]), labels([(0, 0, 0, 10, 10)]))],
        [0.5], [0.5], [0.5], [1.0], id="higher-scored-false-positive",
    ),
    pytest.param(  # 2 of 4 objects found, perfectly: precision 1 up to recall 0.5, then nothing
        [(det([(0, 0, 10, 10, 0.9, 2), (20, 0, 30, 10, 0.6, 2)]),
          labels([(2, 0, 0, 10, 10), (2, 20, 0, 30, 10), (2, 40, 0, 50, 10), (2, 60, 0, 70, 10)]))],
        [0.5], [0.5], [1.0], [0.5], id="missed-objects",
    ),
    pytest.param(  # nothing predicted at all
        [(Detections.empty(), labels([(3, 0, 0, 10, 10)]))],
        [0.0], [0.0], [0.0], [0.0], id="no-predictions",
    ),
    pytest.param(  # predictions of a class with no targets do not add a row
        [(det([(0, 0, 10, 10, 0.9, 0), (0, 0, 10, 10, 0.95, 1)]), labels([(0, 0, 0, 10, 10)]))],
        [1.0], [1.0], [1.0], [1.0], id="class-without-targets-ignored",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("images", "ap50", "ap50_95", "p", "r"), AP_CASES)
def test_ap_hand_computed(images, ap50, ap50_95, p, r):
    res = run_metrics(images)
    # the 101-point grid puts half a grid step (0.005) of error on curves that drop at a grid point
    np.testing.assert_allclose(res.ap[:, 0], ap50, atol=0.006)
    np.testing.assert_allclose(res.ap.mean(1), ap50_95, atol=0.006)
    np.testing.assert_allclose(res.p, p, atol=0.01)
    np.testing.assert_allclose(res.r, r, atol=0.01)


def test_ap_localisation_quality():
    """IoU 0.62 counts at 0.50-0.60 only: AP50 = 1 and AP50-95 = 3/10 (less Ultralytics' 0.005 grid loss)."""
    res = run_metrics([(det([(0, 0, 10, 6.2, 0.9, 0)]), labels([(0, 0, 0, 10, 10)]))])
    assert res.ap[0, 0] == pytest.approx(0.995)  # a perfect curve scores 0.995 in Ultralytics too
    assert res.ap[0].mean() == pytest.approx(0.3 * 0.995)
    assert (res.ap[0, 3:] == 0).all()


@pytest.mark.parametrize(
    ("recall", "precision", "expected"),
    [
        ([1.0], [1.0], 0.995),  # the last grid point (recall 1) reads the 0 sentinel: half a step lost
        ([0.5, 1.0], [1.0, 0.5], 0.8725),  # 0.5 * 1 + trapezoid 0.5 * (1 + 0.5) / 2, less 0.0025
        ([0.25], [1.0], 0.245),  # precision 1 up to recall 0.25, then 0
        ([], [], 0.5),  # degenerate: sentinels only, a straight line from (0, 1) to (1, 0)
    ],
)
def test_compute_ap(recall, precision, expected):
    ap, mpre, mrec = compute_ap(np.array(recall), np.array(precision))
    assert ap == pytest.approx(expected, abs=1e-9)
    assert np.all(np.diff(mpre) <= 0)  # precision envelope is non-increasing
    assert mrec[0] == 0.0 and mrec[-1] == 1.0


# ---------------------------------------------------------------------------- vs Ultralytics


def random_split(rng: np.random.Generator, n_images: int, nc: int):
    """Per image: targets (M, 5) and noisy predictions (N, 6) in sorted-by-conf order."""
    out = []
    for _ in range(n_images):
        m = int(rng.integers(0, 8))
        xy = rng.uniform(0, 500, (m, 2))
        wh = rng.uniform(10, 120, (m, 2))
        tgt = np.concatenate([rng.integers(0, nc, (m, 1)), xy, xy + wh], 1).astype(np.float32)
        preds = []
        for t in tgt:  # jittered copies of targets, sometimes with the wrong class
            for _ in range(int(rng.integers(0, 3))):
                jitter = rng.normal(0, 0.12, 4) * np.r_[t[3] - t[1], t[4] - t[2], t[3] - t[1], t[4] - t[2]]
                cls = t[0] if rng.random() < 0.85 else rng.integers(0, nc)
                preds.append([*(t[1:] + jitter), rng.uniform(0.001, 1), cls])
        for _ in range(int(rng.integers(0, 6))):  # background false positives
            xy0 = rng.uniform(0, 500, 2)
            preds.append([*xy0, *(xy0 + rng.uniform(10, 100, 2)), rng.uniform(0.001, 1), rng.integers(0, nc)])
        p = np.array(preds, np.float32).reshape(-1, 6)
        p = p[np.argsort(-p[:, 4], kind="stable")]
        out.append((tgt, p))
    return out


@pytest.mark.parametrize(("seed", "n_images", "nc"), [(0, 40, 4), (1, 120, 4), (2, 60, 1), (3, 15, 7)])
def test_matches_ultralytics(seed, n_images, nc):
    pytest.importorskip("ultralytics")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import torch
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import ap_per_class as u_ap_per_class
    from ultralytics.utils.metrics import box_iou as u_box_iou

    fake_validator = types.SimpleNamespace(iouv=torch.linspace(0.5, 0.95, 10))
    ours_tp, ref_tp, confs, pcls, tcls = [], [], [], [], []
    for tgt, p in random_split(np.random.default_rng(seed), n_images, nc):
        iou = box_iou(tgt[:, 1:], p[:, :4])
        ref_iou = u_box_iou(torch.from_numpy(tgt[:, 1:]), torch.from_numpy(p[:, :4]))
        np.testing.assert_allclose(iou, ref_iou.numpy(), atol=1e-6)
        ours_tp.append(match_predictions(p[:, 5], tgt[:, 0], iou))
        if len(tgt) and len(p):
            ref = BaseValidator.match_predictions(
                fake_validator, torch.from_numpy(p[:, 5]), torch.from_numpy(tgt[:, 0]), ref_iou
            ).numpy()
        else:
            ref = np.zeros((len(p), 10), bool)
        ref_tp.append(ref)
        confs.append(p[:, 4])
        pcls.append(p[:, 5])
        tcls.append(tgt[:, 0])
    tp, rtp = np.concatenate(ours_tp), np.concatenate(ref_tp)
    np.testing.assert_array_equal(tp, rtp)
    assert tp[:, 0].sum() > 0  # the random split has true positives to score
    conf, pred_cls, target_cls = np.concatenate(confs), np.concatenate(pcls), np.concatenate(tcls)
    ours = ap_per_class(tp, conf, pred_cls, target_cls)
    ref = u_ap_per_class(tp, conf, pred_cls, target_cls, plot=False)
    assert len(ref) == len(ours)
    for name, a, b in zip(ours._fields, ours, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)
    assert 0 < ours.ap[:, 0].mean() < 1


def test_iou_thresholds_match_ultralytics():
    pytest.importorskip("torch")
    import torch

    np.testing.assert_array_equal(IOU_THRESHOLDS, torch.linspace(0.5, 0.95, 10).numpy())


# ---------------------------------------------------------------------------- part level


def part(box, defective, visible=1.0, product="bracket") -> Part:
    return Part(box=tuple(float(v) for v in box), product=product, defective=defective, visible=visible)


PARTS = [
    part((0, 0, 100, 100), True),  # defective, hit at 0.9
    part((200, 0, 300, 100), True),  # defective, hit at 0.3 only
    part((400, 0, 500, 100), False),  # good, false alarm at 0.6
    part((600, 0, 700, 100), False),  # good, clean
    part((800, 0, 900, 100), True, visible=0.4),  # barely visible: not counted
]
DETS = det([(40, 40, 60, 60, 0.9, 0), (240, 40, 260, 60, 0.3, 1), (430, 10, 470, 90, 0.6, 2),
            (690, 90, 750, 150, 0.95, 3)])  # fmt: skip  # last centre (720,120) lies outside every part


@pytest.mark.parametrize(
    ("parts", "dets", "conf", "expected"),
    [
        ([PARTS], [DETS], 0.25, {"recall": 1.0, "false_alarm_rate": 0.5, "caught": 2, "false_alarms": 1}),
        ([PARTS], [DETS], 0.5, {"recall": 0.5, "false_alarm_rate": 0.5, "caught": 1, "false_alarms": 1}),
        ([PARTS], [DETS], 0.7, {"recall": 0.5, "false_alarm_rate": 0.0, "caught": 1, "false_alarms": 0}),
        ([PARTS], [DETS], 0.95, {"recall": 0.0, "false_alarm_rate": 0.0, "caught": 0, "false_alarms": 0}),
        ([PARTS, None], [DETS, DETS], 0.25, {"n_defective": 2, "n_good": 2}),  # no sidecar: skipped
        ([PARTS, PARTS], [DETS, Detections.empty()], 0.25, {"recall": 0.5, "false_alarm_rate": 0.25}),
        ([[]], [DETS], 0.25, {"recall": 0.0, "false_alarm_rate": 0.0, "n_defective": 0, "n_good": 0}),
        # a centre exactly on the part edge counts as inside
        ([[part((0, 0, 10, 10), False)]], [det([(5, 5, 15, 15, 0.5, 0)])], 0.5, {"false_alarms": 1}),
    ],
)
def test_part_level(parts, dets, conf, expected):
    got = part_level(parts, dets, conf)
    assert {k: got[k] for k in expected} == expected
    assert set(got) >= {"recall", "false_alarm_rate", "n_defective", "n_good", "caught", "false_alarms"}


def test_part_scores_are_each_counted_parts_highest_score():
    defective, good = part_scores([PARTS], [DETS])
    assert defective.tolist() == pytest.approx([0.9, 0.3])  # the barely visible part is not counted
    assert good[0] == pytest.approx(0.6) and good[1] == -np.inf  # a clean good part: no score at all
    for far in (0.0, 0.5, 1.0):  # the release step's threshold, from the scores alone
        assert threshold_for_good_scores(good, far) == choose_operating_threshold([PARTS], [DETS], far)


def test_part_level_length_mismatch():
    with pytest.raises(ValueError, match="images"):
        part_level([PARTS], [DETS, DETS], 0.25)


def grid_of_good_parts(scores: list[float], n_clean: int) -> tuple[list[list[Part]], list[Detections]]:
    """One image per good part; a detection with the given score in the first len(scores) of them."""
    parts = [[part((0, 0, 10, 10), False)] for _ in range(len(scores) + n_clean)]
    dets = [det([(4, 4, 6, 6, s, 0)]) for s in scores] + [Detections.empty()] * n_clean
    return parts, dets


@pytest.mark.parametrize(
    ("scores", "n_clean", "target", "min_conf", "expected_far"),
    [
        ([0.9, 0.5, 0.2], 997, 0.003, 0.001, 0.003),  # 3 alarms allowed in 1000: lowest threshold
        ([0.9, 0.5, 0.2], 997, 0.002, 0.001, 0.002),  # must exclude the 0.2 alarm
        ([0.9, 0.5, 0.2], 997, 0.0, 0.001, 0.0),  # no alarm allowed: above 0.9
        ([0.9, 0.5, 0.2], 0, 0.5, 0.001, 1 / 3),  # 1 of 3 allowed
        ([], 10, 0.0, 0.05, 0.0),  # nothing fires: min_conf
    ],
)
def test_choose_operating_threshold(scores, n_clean, target, min_conf, expected_far):
    parts, dets = grid_of_good_parts(scores, n_clean)
    thr = choose_operating_threshold(parts, dets, target_far=target, min_conf=min_conf)
    assert thr >= min_conf
    far = part_level(parts, dets, thr)["false_alarm_rate"]
    assert far == pytest.approx(expected_far)
    assert far <= target + 1e-12
    # lowest such threshold: any lower candidate (the excluded score itself) breaks the target
    below = [float(np.float32(s)) for s in scores if np.float32(s) < thr]
    if below and thr > min_conf:
        assert part_level(parts, dets, max(below))["false_alarm_rate"] > target


def test_choose_operating_threshold_rejects_bad_target():
    with pytest.raises(ValueError, match="target_far"):
        choose_operating_threshold([PARTS], [DETS], target_far=1.5)
