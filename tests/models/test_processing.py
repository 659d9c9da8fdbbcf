"""Letterbox mapping, NMS and YOLO output decoding (models.processing)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from models.processing import (
    LetterboxInfo,
    letterbox,
    nms,
    postprocess,
    preprocess_batch,
    scale_boxes_to_input,
    scale_boxes_to_original,
)

# ---------------------------------------------------------------------------- letterbox round trip


@pytest.mark.parametrize(
    ("frame_hw", "imgsz", "box"),
    [
        ((480, 640), 640, [10.0, 20.0, 300.0, 400.0]),
        ((720, 1280), 640, [0.0, 0.0, 1280.0, 720.0]),
        ((1080, 1920), 320, [100.5, 200.25, 1500.0, 1000.0]),
        ((333, 517), 640, [1.0, 2.0, 50.0, 60.0]),  # upscaled, odd sizes -> per-axis rounding
        ((640, 480), (384, 640), [5.0, 5.0, 470.0, 630.0]),  # rectangular model input
    ],
)
def test_letterbox_box_round_trip(frame_hw, imgsz, box):
    frame = np.zeros((*frame_hw, 3), np.uint8)
    boxed, info = letterbox(frame, imgsz)
    in_box = scale_boxes_to_input(np.array([box]), info)
    # the mapped box lies inside the resized (unpadded) content of the model input
    assert in_box[0, 0] >= info.pad_x - 1e-3 and in_box[0, 1] >= info.pad_y - 1e-3
    assert in_box[0, 2] <= boxed.shape[1] - info.pad_x + 1e-3
    assert in_box[0, 3] <= boxed.shape[0] - info.pad_y + 1e-3
    back = scale_boxes_to_original(in_box, info)
    np.testing.assert_allclose(back[0], box, atol=1e-3)


def test_letterbox_corners_hit_content_edges():
    """The frame's far corner maps to the last column/row of resized content, not the padding."""
    frame = np.zeros((480, 640, 3), np.uint8)
    boxed, info = letterbox(frame, 640)
    assert boxed.shape == (640, 640, 3)
    assert (info.pad_x, info.pad_y) == (0.0, 80.0)
    corner = scale_boxes_to_input(np.array([[0, 0, 640, 480]]), info)
    np.testing.assert_allclose(corner[0], [0, 80, 640, 560])


@pytest.mark.parametrize(
    ("box_in", "expected"),
    [
        ([-20.0, 60.0, 700.0, 600.0], [0.0, 0.0, 640.0, 480.0]),  # clipped to the frame
        ([100.0, 180.0, 200.0, 280.0], [100.0, 100.0, 200.0, 200.0]),
    ],
)
def test_scale_to_original_clips(box_in, expected):
    info = LetterboxInfo(scale=1.0, pad_x=0.0, pad_y=80.0, orig_w=640, orig_h=480)
    np.testing.assert_allclose(scale_boxes_to_original(np.array([box_in]), info)[0], expected)


def test_preprocess_batch_layout():
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[..., 2] = 255  # red in BGR
    batch, infos = preprocess_batch([frame, frame[:50]], 64)
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == np.float32
    assert batch[0, 0, 32, 32] == pytest.approx(1.0)  # RGB channel 0 is red
    assert batch[0, 2, 32, 32] == pytest.approx(0.0)
    assert batch[0, 0, 0, 0] == pytest.approx(114 / 255)  # padding
    assert infos[1].orig_h == 50 and infos[1].scale == pytest.approx(0.32)


# ---------------------------------------------------------------------------- NMS


def brute_force_nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep: list[int] = []
    for i in order:
        ok = True
        for k in keep:
            xx1, yy1 = max(boxes[i, 0], boxes[k, 0]), max(boxes[i, 1], boxes[k, 1])
            xx2, yy2 = min(boxes[i, 2], boxes[k, 2]), min(boxes[i, 3], boxes[k, 3])
            inter = max(xx2 - xx1, 0) * max(yy2 - yy1, 0)
            a_i = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
            a_k = (boxes[k, 2] - boxes[k, 0]) * (boxes[k, 3] - boxes[k, 1])
            if inter / (a_i + a_k - inter) > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def random_boxes(rng: np.random.Generator, n: int, span: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    xy = rng.uniform(0, span, (n, 2))
    wh = rng.uniform(5, 40, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.permutation(n).astype(np.float32) / n + 0.001  # distinct scores, no ties
    return boxes, scores


@pytest.mark.parametrize(
    ("seed", "n", "thr", "max_keep"),
    [(0, 1, 0.5, None), (1, 50, 0.5, None), (2, 300, 0.7, None), (3, 300, 0.3, None),
     (4, 400, 0.45, 10), (5, 2000, 0.7, 40)],
)  # fmt: skip
def test_nms_matches_brute_force(seed, n, thr, max_keep):
    rng = np.random.default_rng(seed)
    boxes, scores = random_boxes(rng, n)
    expected = brute_force_nms(boxes.astype(np.float64), scores, thr)
    if max_keep is not None:
        expected = expected[:max_keep]
    got = nms(boxes, scores, thr, max_keep=max_keep)
    assert got.tolist() == expected
    assert len(got) > (0 if n else -1)


@pytest.mark.parametrize(
    ("boxes", "scores", "thr", "expected"),
    [
        ([], [], 0.5, []),
        ([[0, 0, 10, 10], [0, 0, 10, 10]], [0.5, 0.9], 0.5, [1]),  # identical: the higher score wins
        ([[0, 0, 10, 10], [0, 0, 10, 10]], [0.5, 0.9], 1.0, [1, 0]),  # IoU 1 is not > 1
        ([[0, 0, 10, 10], [5, 0, 15, 10]], [0.9, 0.8], 0.3, [0]),  # IoU 1/3 > 0.3: suppressed
        ([[0, 0, 10, 10], [5, 0, 15, 10]], [0.9, 0.8], 0.34, [0, 1]),  # IoU 1/3 < 0.34: kept
        ([[0, 0, 10, 10], [20, 20, 30, 30]], [0.1, 0.2], 0.0, [1, 0]),  # disjoint boxes always survive
    ],
)
def test_nms_cases(boxes, scores, thr, expected):
    got = nms(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32), thr)
    assert got.tolist() == expected


# ---------------------------------------------------------------------------- postprocess


def make_raw(
    anchors: list[tuple[float, float, float, float, list[float]]], n_anchors: int = 50
) -> np.ndarray:
    """(1, 4 + nc, A) with the given (cx, cy, w, h, class scores) anchors first and zeros after."""
    nc = len(anchors[0][4])
    raw = np.zeros((1, 4 + nc, n_anchors), np.float32)
    raw[0, 2:4] = 1.0
    for i, (cx, cy, w, h, cls) in enumerate(anchors):
        raw[0, :4, i] = (cx, cy, w, h)
        raw[0, 4:, i] = cls
    return raw


IDENTITY = LetterboxInfo(scale=1.0, pad_x=0.0, pad_y=0.0, orig_w=640, orig_h=640)
HALF_PADDED = LetterboxInfo(scale=0.5, pad_x=0.0, pad_y=80.0, orig_w=1280, orig_h=960)

POSTPROCESS_CASES = [
    # (anchors, info, kwargs, expected [(x1, y1, x2, y2, score, cls)])
    pytest.param(
        [(100, 100, 20, 40, [0.1, 0.9, 0.0, 0.0])], IDENTITY, {},
        [(90, 80, 110, 120, 0.9, 1)], id="single-box-best-class",
    ),
    pytest.param(
        [(100, 100, 20, 20, [0.9, 0, 0, 0]), (101, 100, 20, 20, [0.8, 0, 0, 0])], IDENTITY, {},
        [(90, 90, 110, 110, 0.9, 0)], id="same-class-overlap-suppressed",
    ),
    pytest.param(
        [(100, 100, 20, 20, [0.9, 0, 0, 0]), (101, 100, 20, 20, [0, 0.8, 0, 0])], IDENTITY, {},
        [(90, 90, 110, 110, 0.9, 0), (91, 90, 111, 110, 0.8, 1)], id="class-aware-keeps-both",
    ),
    pytest.param(
        [(100, 100, 20, 20, [0.9, 0, 0, 0]), (101, 100, 20, 20, [0, 0.8, 0, 0])], IDENTITY,
        {"agnostic": True}, [(90, 90, 110, 110, 0.9, 0)], id="agnostic-suppresses",
    ),
    pytest.param(
        [(100, 100, 20, 20, [0.25, 0, 0, 0]), (300, 300, 20, 20, [0.2501, 0, 0, 0])], IDENTITY, {},
        [(290, 290, 310, 310, 0.2501, 0)], id="conf-is-strict",
    ),
    pytest.param(
        [(320, 320, 100, 100, [0, 0, 0.7, 0])], HALF_PADDED, {},
        [(540, 380, 740, 580, 0.7, 2)], id="undo-letterbox",
    ),
    pytest.param(
        [(5, 85, 20, 20, [0, 0, 0, 0.6])], HALF_PADDED, {},
        [(0, 0, 30, 30, 0.6, 3)], id="clip-to-frame",
    ),
    pytest.param(
        [(50 * i + 20, 50, 10, 10, [0.3 + 0.01 * i, 0, 0, 0]) for i in range(10)], IDENTITY, {"max_det": 3},
        [(50 * i + 15, 45, 50 * i + 25, 55, 0.3 + 0.01 * i, 0) for i in (9, 8, 7)], id="max-det-top-scores",
    ),
    pytest.param(
        [(100, 100, 20, 20, [0.6, 0.5, 0, 0])], IDENTITY, {"multi_label": True, "conf": 0.4},
        [(90, 90, 110, 110, 0.6, 0), (90, 90, 110, 110, 0.5, 1)], id="multi-label",
    ),
    pytest.param([(100, 100, 20, 20, [0.1, 0, 0, 0])], IDENTITY, {}, [], id="nothing-above-conf"),
]  # fmt: skip


@pytest.mark.parametrize(("anchors", "info", "kwargs", "expected"), POSTPROCESS_CASES)
def test_postprocess_hand_built(anchors, info, kwargs, expected):
    (det,) = postprocess(make_raw(anchors), [info], **kwargs)
    exp = np.array(expected, np.float32).reshape(-1, 6)
    assert len(det) == len(exp)
    np.testing.assert_allclose(det.boxes, exp[:, :4], atol=1e-3)
    np.testing.assert_allclose(det.scores, exp[:, 4], atol=1e-6)
    assert det.class_ids.tolist() == exp[:, 5].astype(int).tolist()


@pytest.mark.parametrize(
    ("raw_shape", "n_infos", "kwargs", "error"),
    [
        ((1, 4, 10), 1, {}, "4 \\+ nc"),
        ((2, 8, 10), 1, {}, "letterbox infos"),
        ((1, 8, 10), 1, {"conf": 1.5}, "conf and iou"),
    ],
)
def test_postprocess_errors(raw_shape, n_infos, kwargs, error):
    with pytest.raises(ValueError, match=error):
        postprocess(np.zeros(raw_shape, np.float32), [IDENTITY] * n_infos, **kwargs)


def test_postprocess_batch_independent():
    rng = np.random.default_rng(7)
    raw = rng.uniform(0, 1, (3, 8, 500)).astype(np.float32)
    raw[:, :4] *= 300
    infos = [IDENTITY, HALF_PADDED, IDENTITY]
    batched = postprocess(raw, infos, conf=0.5)
    for i in range(3):
        (single,) = postprocess(raw[i : i + 1], [infos[i]], conf=0.5)
        np.testing.assert_array_equal(single.boxes, batched[i].boxes)
        assert len(single) > 0


def realistic_raw(
    rng: np.random.Generator, n_anchors: int = 8400, nc: int = 4, n_obj: int = 20
) -> np.ndarray:
    """A raw output that looks like a trained model's: mostly tiny scores plus clusters around objects."""
    raw = np.zeros((1, 4 + nc, n_anchors), np.float32)
    raw[0, :2] = rng.uniform(0, 640, (2, n_anchors))
    raw[0, 2:4] = rng.uniform(5, 120, (2, n_anchors))
    raw[0, 4:] = rng.beta(0.5, 60, (nc, n_anchors))
    for _ in range(n_obj):
        idx = rng.choice(n_anchors, 30, replace=False)
        raw[0, 0, idx] = rng.uniform(50, 590) + rng.normal(0, 2, 30)
        raw[0, 1, idx] = rng.uniform(50, 590) + rng.normal(0, 2, 30)
        raw[0, 2:4, idx] = rng.uniform(10, 100, 2)[None]
        raw[0, 4 + rng.integers(nc), idx] = rng.uniform(0.2, 0.95, 30)
    return raw


@pytest.mark.skipif(os.environ.get("LINEGUARD_SKIP_TIMING") == "1", reason="timing disabled")
@pytest.mark.parametrize(("conf", "budget_ms"), [(0.25, 2.0), (0.001, 30.0)])
def test_postprocess_speed(conf, budget_ms):
    raw = realistic_raw(np.random.default_rng(0))
    info = [LetterboxInfo(0.5, 0.0, 80.0, 1280, 960)]
    postprocess(raw, info, conf=conf)
    times = []
    for _ in range(15):
        t = time.perf_counter()
        out = postprocess(raw, info, conf=conf)
        times.append(time.perf_counter() - t)
    assert len(out[0]) > 0
    # generous factor for loaded CI machines; the README budget is budget_ms
    assert 1e3 * float(np.median(times)) < 3 * budget_ms


# ---------------------------------------------------------------------------- vs Ultralytics


@pytest.mark.parametrize(
    ("seed", "conf", "iou", "agnostic", "multi_label", "frame_hw"),
    [
        (0, 0.25, 0.7, False, False, (960, 1280)),
        (1, 0.001, 0.7, False, False, (640, 640)),
        (2, 0.5, 0.45, True, False, (1080, 1920)),
        (3, 0.3, 0.6, False, True, (333, 517)),
    ],
)
def test_postprocess_matches_ultralytics(seed, conf, iou, agnostic, multi_label, frame_hw):
    pytest.importorskip("ultralytics")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import torch
    from ultralytics.utils import nms as unms
    from ultralytics.utils import ops

    _, info = letterbox(np.zeros((*frame_hw, 3), np.uint8), 640)
    raw = realistic_raw(np.random.default_rng(seed), n_anchors=2100)
    (ours,) = postprocess(raw, [info], conf=conf, iou=iou, agnostic=agnostic, multi_label=multi_label)
    (ref,) = unms.non_max_suppression(
        torch.from_numpy(raw), conf, iou, agnostic=agnostic, multi_label=multi_label, max_det=300
    )
    ref = ref.numpy().copy()
    ref[:, :4] = ops.scale_boxes((640, 640), ref[:, :4], (info.orig_h, info.orig_w))
    assert len(ours) == len(ref) > 0
    # same set of detections; order can differ only between equal scores
    o = np.lexsort((ours.boxes[:, 0], ours.class_ids, -ours.scores))
    r = np.lexsort((ref[:, 0], ref[:, 5], -ref[:, 4]))
    np.testing.assert_allclose(ours.boxes[o], ref[r, :4], atol=1e-3)
    np.testing.assert_allclose(ours.scores[o], ref[r, 4], atol=1e-7)
    np.testing.assert_array_equal(ours.class_ids[o], ref[r, 5].astype(int))
