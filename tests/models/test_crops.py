"""Training crops at the model's scale (the CPU retraining preset)."""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.crops import CropPlan, _labels_in, crop_split, place_crops
from models.dataset_io import read_label_file
from models.processing import letterbox


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"size": 16}, "between 32 and the input's long side"),
    ({"size": 1000, "input_hw": (544, 960)}, r"between 32 and the input's long side \(960\)"),
    ({"background": -1}, "background crops"),
    ({"min_visible": 0.0}, "min_visible"),
    ({"min_visible": 1.5}, "min_visible"),
    ({"new_data_repeats": 0}, "new_data_repeats"),
])
def test_bad_plans_are_refused(kwargs: dict[str, float], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        CropPlan(**kwargs)  # type: ignore[arg-type]


def _inside(box: np.ndarray, corner: tuple[int, int], size: int) -> bool:
    x, y = corner
    return bool(x <= box[0] and y <= box[1] and box[2] <= x + size and box[3] <= y + size)


@pytest.mark.parametrize("seed", range(20))
def test_every_box_is_whole_inside_a_crop_that_lies_in_the_frame(seed: int) -> None:
    rng = np.random.default_rng(seed)
    w, h, plan = 960, 540, CropPlan(size=320, background=2)
    xy = rng.uniform([0, 0], [w - 60, h - 60], size=(int(rng.integers(0, 12)), 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 60, size=xy.shape)], axis=1)
    corners = place_crops(boxes, w, h, plan, random.Random(seed))
    for box in boxes:
        assert any(_inside(box, c, plan.size) for c in corners), (box, corners)
    assert all(0 <= x <= w - plan.size and 0 <= y <= h - plan.size for x, y in corners)
    assert plan.background <= len(corners) <= len(boxes) + plan.background


def test_boxes_share_a_crop_and_a_box_larger_than_a_crop_is_centred() -> None:
    plan = CropPlan(size=320, background=0)
    close = np.array([[100, 100, 120, 120], [130, 110, 150, 130]], np.float32)
    assert len(place_crops(close, 960, 540, plan, random.Random(1))) in (1, 2)
    # 30 px apart: whichever comes first, a crop over it holds the other one in most placements
    counts = [len(place_crops(close, 960, 540, plan, random.Random(s))) for s in range(50)]
    assert counts.count(1) > counts.count(2)
    big = np.array([[100, 50, 600, 500]], np.float32)  # 500 x 450: larger than the crop both ways
    assert place_crops(big, 960, 540, plan, random.Random(0)) == [(190, 115)]


@pytest.mark.parametrize(("box", "expected"), [
    ([0, 10, 10, 30, 30], [0, 10, 10, 30, 30]),  # inside: as it was
    ([1, 300, 10, 340, 30], [1, 300, 10, 320, 30]),  # half inside (0.5 >= 0.4): clipped
    ([2, 310, 10, 340, 30], None),  # a third inside: dropped
    ([3, 400, 10, 440, 30], None),  # outside
])
def test_labels_are_clipped_to_the_crop_or_dropped(box: list[float], expected: list[float] | None) -> None:
    out = _labels_in(np.array([box], np.float32), 0, 0, 320, 0.4)
    if expected is None:
        assert out.shape == (0, 5)
    else:
        np.testing.assert_allclose(out, [expected])


def _dataset(root: Path, frames: list[list[list[float]]]) -> None:
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for i, boxes in enumerate(frames):
        img = np.full((720, 1280, 3), 40, np.uint8)
        lines = []
        for c, x1, y1, x2, y2 in boxes:  # px at 1280x720
            cv2.rectangle(img, (int(x1), int(y1)), (int(x2), int(y2)), (0, 0, 255), -1)
            lines.append(f"{int(c)} {(x1 + x2) / 2560} {(y1 + y2) / 1440} {(x2 - x1) / 1280} {(y2 - y1) / 720}")
        cv2.imwrite(str(root / "images" / "train" / f"f{i}.jpg"), img)
        (root / "labels" / "train" / f"f{i}.txt").write_text("\n".join(lines) + "\n" if lines else "")


def test_crop_split_keeps_every_box_whole_at_the_models_scale_beside_the_frames(tmp_path: Path) -> None:
    frames = [[[0, 100, 100, 140, 140], [1, 1000, 600, 1100, 680]], [], [[1, 600, 300, 640, 330]]]
    _dataset(tmp_path, frames)
    plan = CropPlan(size=320, input_hw=(544, 960), background=1)
    n_frames, n_crops = crop_split(tmp_path, "train", "train_crops", nc=2, plan=plan, seed=0)
    images = sorted((tmp_path / "images" / "train_crops").iterdir())
    assert n_frames == 3 and n_crops == len(images) == 3 + 1 + 2  # two far-apart boxes + 1 bg, 1 bg, 1 + 1 bg
    assert all(p.suffix == ".png" and "_c" in p.stem for p in images)
    assert len(list((tmp_path / "images" / "train").iterdir())) == 3  # the frames stay (calibration reads them)
    found: dict[int, list[np.ndarray]] = {0: [], 1: []}
    for p in images:
        img = cv2.imread(str(p))
        assert img.shape == (320, 320, 3)
        for c, *xyxy in read_label_file(tmp_path / "labels" / "train_crops" / f"{p.stem}.txt", 2, 320, 320):
            box = np.array(xyxy)
            assert img[int(box[1]) + 2:int(box[3]) - 2, int(box[0]) + 2:int(box[2]) - 2, 2].min() > 200  # red there
            found[int(c)].append(box[2:] - box[:2])
    # scaled by 0.75 (1280 -> 960): 40x40 -> 30x30, 100x80 -> 75x60, 40x30 -> 30x22.5; each whole at least once
    sizes = {c: {tuple(np.round(s, 1)) for s in v} for c, v in found.items()}
    assert (30.0, 30.0) in sizes[0]
    assert (75.0, 60.0) in sizes[1] and (30.0, 22.5) in sizes[1]


@pytest.mark.parametrize(("frame_wh", "scaled_wh"), [
    ((1280, 720), (960, 540)),   # 16:9: 0.75, as before this test
    ((1280, 960), (725, 544)),   # 4:3: the height limits the scale (0.567), not the long side
    ((640, 480), (725, 544)),    # a small frame is scaled up, as the letterbox does
])
def test_crops_hold_the_pixels_the_agents_letterbox_gives_the_model(
        tmp_path: Path, frame_wh: tuple[int, int], scaled_wh: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    frame = rng.integers(0, 255, (frame_wh[1], frame_wh[0], 3), dtype=np.uint8)  # texture: interpolation shows
    cv2.imwrite(str(tmp_path / "images" / "train" / "f0.png"), frame)
    (tmp_path / "labels" / "train" / "f0.txt").write_text("")
    crop_split(tmp_path, "train", "train_crops", nc=1, plan=CropPlan(size=320, input_hw=(544, 960), background=3))
    model_input, info = letterbox(frame, (544, 960))
    w, h = scaled_wh
    top, left = int(info.pad_y), int(info.pad_x)
    scaled = model_input[top:top + h, left:left + w]  # the frame's pixels in the model's input, unpadded
    assert (round(info.orig_w * info.scale), round(info.orig_h * info.scale)) == (w, h)
    tiles = [cv2.imread(str(p)) for p in sorted((tmp_path / "images" / "train_crops").iterdir())]
    assert len(tiles) == 3
    for tile in tiles:
        diff = cv2.matchTemplate(scaled, tile, cv2.TM_SQDIFF)
        y, x = np.unravel_index(int(np.argmin(diff)), diff.shape)
        assert np.array_equal(scaled[y:y + 320, x:x + 320], tile)  # the same pixels, not a look-alike


def test_an_undecodable_frame_is_named(tmp_path: Path) -> None:
    _dataset(tmp_path, [[]])
    (tmp_path / "images" / "train" / "f0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="f0.jpg: cannot decode"):
        crop_split(tmp_path, "train", "train_crops", nc=1, plan=CropPlan())


def test_new_data_gets_more_placements(tmp_path: Path) -> None:
    _dataset(tmp_path, [[[0, 100, 100, 140, 140]], [[0, 100, 100, 140, 140]]])
    (tmp_path / "images" / "train" / "f1.jpg").rename(tmp_path / "images" / "train" / "replay_f1.jpg")
    (tmp_path / "labels" / "train" / "f1.txt").rename(tmp_path / "labels" / "train" / "replay_f1.txt")
    plan = CropPlan(size=320, input_hw=(544, 960), background=1, new_data_repeats=3)
    _, n = crop_split(tmp_path, "train", "train_crops", nc=1, plan=plan,
                      is_new=lambda p: not p.name.startswith("replay_"))
    names = sorted(p.stem for p in (tmp_path / "images" / "train_crops").iterdir())
    assert n == 3 * 2 + 2 and sum(s.startswith("f0_") for s in names) == 6 and len(names) == 8
    labelled = [s for s in names if (tmp_path / "labels" / "train_crops" / f"{s}.txt").read_text().strip()]
    assert {s for s in labelled if s.startswith("f0_")} >= {"f0_c0", "f0_c2", "f0_c4"}  # each placement has the box
