"""hub/export.py: the train/val split of reviewed samples (a hash of the sample id, neither side
left empty when there are two or more), on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hub.export import _hash, export_dir
from tests.hub.conftest import reject_samples, sample_ids_on_sides


def _sides(root: Path) -> dict[str, str]:
    return {p.stem: split for split in ("train", "val") for p in (root / "images" / split).glob("*.jpg")}


@pytest.mark.parametrize(("val_share", "below", "above", "val", "moved"), [
    (0.2, 0, 3, 1, "lowest hash to val"),      # all hashed to train: the lowest validates
    (0.5, 3, 0, 2, "highest hash to train"),   # all hashed to val: the highest trains
    (0.2, 1, 2, 1, None),                      # both sides hashed: nothing moves
    (0.2, 0, 1, 0, None),                      # one sample: nothing to move
    (0.0, 0, 3, 0, None),                      # val_share 0 asks for no validation side
])
def test_neither_side_is_left_empty(hub_store: Any, sample_factory: Any, tmp_path: Path, val_share: float,
                                    below: int, above: int, val: int, moved: str | None) -> None:
    ids = sample_ids_on_sides(below, above, val_share)
    reject_samples(hub_store, sample_factory, ids)
    with hub_store.sessions() as s:
        stats = export_dir(s, hub_store.blobs, tmp_path / "out", val_share=val_share)
    sides = _sides(tmp_path / "out")
    assert (stats.val, stats.train) == (val, len(ids) - val) == (
        sum(v == "val" for v in sides.values()), sum(v == "train" for v in sides.values()))
    hashed = {sid: "val" if _hash(sid) < val_share else "train" for sid in ids}
    changed = [sid for sid in ids if sides[sid] != hashed[sid]]
    if moved is None:
        assert changed == []
    else:
        by_hash = sorted(ids, key=_hash)
        assert changed == [by_hash[0] if moved.startswith("lowest") else by_hash[-1]]


def test_a_moved_sample_goes_back_once_another_hashes_to_its_side(hub_store: Any, sample_factory: Any,
                                                                  tmp_path: Path) -> None:
    first = sample_ids_on_sides(0, 2, 0.2)
    reject_samples(hub_store, sample_factory, first)
    with hub_store.sessions() as s:
        export_dir(s, hub_store.blobs, tmp_path / "week1", val_share=0.2)
    week1 = _sides(tmp_path / "week1")
    assert sorted(week1.values()) == ["train", "val"]
    natural = sample_ids_on_sides(1, 0, 0.2, start=10_000)
    reject_samples(hub_store, sample_factory, natural)
    with hub_store.sessions() as s:
        export_dir(s, hub_store.blobs, tmp_path / "week2", val_share=0.2)
    assert _sides(tmp_path / "week2") == {**dict.fromkeys(first, "train"), natural[0]: "val"}
