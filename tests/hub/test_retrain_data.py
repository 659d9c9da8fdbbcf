"""Assembling a retraining dataset: class ids remapped by name, a seeded draw, and golden-set
images left out by their bytes whatever their names."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.retrain_data import copy_split, dataset_names, image_hashes, replay_limits

NAMES = ["scratch", "crack", "dent", "stain"]


def _dataset(root: Path, split: str, n: int, *, salt: str = "") -> Path:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / "images" / split / f"f{i:02d}.jpg").write_bytes(f"image {salt}{i}".encode())
        (root / "labels" / split / f"f{i:02d}.txt").write_text(f"{i % 4} 0.5 0.5 0.1 0.1\n")
    (root / "data.yaml").write_text("names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(NAMES)))
    return root


def _copied(dst: Path, split: str) -> list[bytes]:
    return sorted(p.read_bytes() for p in (dst / "images" / split).glob("*.jpg"))


def test_labels_remapped_by_name(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "src", "train", 4)
    dst_names = ["porosity", *reversed(NAMES)]
    assert copy_split(src, "train", tmp_path / "dst", dataset_names(src), dst_names, prefix="replay_") == (4, 0)
    for i in range(4):
        line = (tmp_path / "dst" / "labels" / "train" / f"replay_f{i:02d}.txt").read_text().split()
        assert dst_names[int(line[0])] == NAMES[i % 4]


@pytest.mark.parametrize(("n", "golden", "limit", "copied", "left_out"), [
    (10, [], None, 10, 0),          # nothing to leave out
    (10, [2, 5], None, 8, 2),       # golden images are left out
    (10, [], 4, 4, 0),              # a draw of 4
    (10, list(range(8)), 4, 2, 8),  # the draw goes on past golden images; only 2 others exist
    (10, list(range(10)), 4, 0, 10),
])
def test_golden_images_left_out(tmp_path: Path, n: int, golden: list[int], limit: int | None, copied: int,
                                left_out: int) -> None:
    src = _dataset(tmp_path / "src", "val", n)
    # the golden set holds some of the same images under other names (bytes decide, not names)
    gold = tmp_path / "golden"
    (gold / "images" / "val").mkdir(parents=True)
    for i in golden:
        (gold / "images" / "val" / f"g{i}.jpg").write_bytes(f"image {i}".encode())
    (gold / "images" / "val" / "other.jpg").write_bytes(b"not in the replay data")
    exclude = image_hashes(gold)
    assert len(exclude) == len(golden) + 1
    got = copy_split(src, "val", tmp_path / "dst", NAMES, NAMES, limit=limit, exclude=exclude)
    assert got == (copied, left_out)
    kept = _copied(tmp_path / "dst", "val")
    assert len(kept) == copied
    assert not {f"image {i}".encode() for i in golden} & set(kept)


def test_the_draw_is_unchanged_when_nothing_is_left_out(tmp_path: Path) -> None:
    """The seeded draw of ``limit`` images is the one earlier jobs made (random.Random(0).sample)."""
    import random

    src = _dataset(tmp_path / "src", "val", 30)
    copy_split(src, "val", tmp_path / "a", NAMES, NAMES, limit=7)
    copy_split(src, "val", tmp_path / "b", NAMES, NAMES, limit=7, exclude={"0" * 64})
    images = sorted((src / "images" / "val").glob("*.jpg"))
    expected = sorted(p.read_bytes() for p in random.Random(0).sample(images, 7))
    assert _copied(tmp_path / "a", "val") == _copied(tmp_path / "b", "val") == expected


@pytest.mark.parametrize(("replay", "val", "expected", "error"), [
    (600, None, {"train": 600, "val": 150}, None),   # the default: a quarter
    (600, 300, {"train": 600, "val": 300}, None),
    (8, None, {"train": 8, "val": 2}, None),
    (0, None, {"train": 0, "val": 0}, None),
    (600, 0, {"train": 600, "val": 0}, None),         # validation on the reviewed frames only
    (600, -1, None, "must be >= 0"),
    (-1, None, None, "must be >= 0"),
])
def test_replay_limits(replay: int, val: int | None, expected: dict[str, int] | None, error: str | None) -> None:
    if error:
        with pytest.raises(ValueError, match=error):
            replay_limits(replay, val)
    else:
        assert replay_limits(replay, val) == expected
