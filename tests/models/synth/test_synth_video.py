"""Tests of the synthetic conveyor video generator (models.synth.video)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import cv2
import pytest

import models.synth.video as video
from models.synth import generate_video
from models.taxonomy import DEFAULT_CLASSES, PRODUCT_TYPES

W, H, FPS, SECONDS = 640, 360, 15, 2.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("video")
    mp4, truth = root / "line.mp4", root / "line.jsonl"
    generate_video(mp4, truth, seed=5, seconds=SECONDS, size=(W, H), fps=FPS, progress=False)
    return mp4, [json.loads(line) for line in truth.read_text().splitlines()]


def test_frame_count_and_timestamps(clip: tuple[Path, list[dict]]) -> None:
    mp4, frames = clip
    n = int(SECONDS * FPS)
    assert [f["frame"] for f in frames] == list(range(n))
    assert all(f["pts"] == pytest.approx(f["frame"] / FPS) for f in frames)
    cap = cv2.VideoCapture(str(mp4))
    decoded = 0
    while True:
        ok, img = cap.read()
        if not ok:
            break
        assert img.shape == (H, W, 3)
        decoded += 1
    assert decoded == n


def test_parts_move_right_monotonically(clip: tuple[Path, list[dict]]) -> None:
    _, frames = clip
    tracks: dict[int, list[list[float]]] = defaultdict(list)
    for f in frames:
        assert len({p["id"] for p in f["parts"]}) == len(f["parts"])
        for p in f["parts"]:
            assert p["product"] in PRODUCT_TYPES
            tracks[p["id"]].append(p["box"])
    assert len(tracks) >= 2 and max(len(f["parts"]) for f in frames) >= 2
    for boxes in tracks.values():
        for a, b in zip(boxes, boxes[1:], strict=False):
            assert b[0] >= a[0] and b[2] >= a[2] and b[0] + b[2] > a[0] + a[2]
            if min(a[0], b[0]) > 0 and max(a[2], b[2]) < W:  # wholly in view: no vertical motion
                assert (b[1], b[3]) == (a[1], a[3])


def test_objects_valid_and_on_defective_parts(clip: tuple[Path, list[dict]]) -> None:
    _, frames = clip
    seen = 0
    for f in frames:
        for o in f["objects"]:
            x1, y1, x2, y2 = o["box"]
            assert o["cls"] in DEFAULT_CLASSES
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
            assert x2 - x1 >= video.MIN_OBJECT_PX and y2 - y1 >= video.MIN_OBJECT_PX
            owners = [p for p in f["parts"] if p["box"][0] <= x1 and x2 <= p["box"][2]
                      and p["box"][1] <= y1 and y2 <= p["box"][3]]
            assert owners and any(p["defective"] for p in owners)
            seen += 1
    assert seen > 0


def test_defects_keep_their_shape(clip: tuple[Path, list[dict]]) -> None:
    """An object fully inside the frame keeps its size from frame to frame (it moves rigidly)."""
    _, frames = clip
    sizes: dict[tuple[str, float, float], set[tuple[float, float]]] = defaultdict(set)
    for f in frames:
        for o in f["objects"]:
            x1, y1, x2, y2 = o["box"]
            if x1 > 0 and x2 < W:
                sizes[(o["cls"], y1, y2)].add((round(x2 - x1, 2), round(y2 - y1, 2)))
    assert sizes and all(len(v) == 1 for v in sizes.values())


@pytest.mark.parametrize("fail_at", [0, 5])
def test_failure_leaves_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
    real = video.apply_camera
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
        if calls["n"] == fail_at:
            raise RuntimeError("boom")
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(video, "apply_camera", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        generate_video(tmp_path / "a.mp4", tmp_path / "a.jsonl", seconds=1.0, size=(320, 180), fps=10,
                       progress=False)
    assert list(tmp_path.iterdir()) == []
