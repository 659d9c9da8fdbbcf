"""Tests of the synthetic dataset generator (models.synth.dataset)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import models.synth.dataset as ds
from models.synth import PRESETS, DatasetPreset, generate_dataset
from models.synth.lines import LineSpec
from models.taxonomy import DEFAULT_CLASSES, PRODUCT_TYPES

W, H = 1280, 720


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("data.yaml", "meta.json")}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synth") / "small", seed=3, preset="small",
                            workers=2, progress=False)


def _read_split(root: Path, split: str) -> list[tuple[list[list[float]], list[dict]]]:
    out = []
    for lbl in sorted((root / "labels" / split).glob("*.txt")):
        rows = [[float(v) for v in line.split()] for line in lbl.read_text().splitlines()]
        parts = json.loads((root / "parts" / split / f"{lbl.stem}.json").read_text())["parts"]
        out.append((rows, parts))
    return out


@pytest.mark.parametrize(("workers_a", "workers_b"), [(1, 1), (1, 2)])
def test_deterministic_whatever_the_workers(tmp_path: Path, workers_a: int, workers_b: int) -> None:
    a = generate_dataset(tmp_path / "a", seed=11, preset="tiny", workers=workers_a, progress=False)
    b = generate_dataset(tmp_path / "b", seed=11, preset="tiny", workers=workers_b, progress=False)
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys()
    assert all(fa[k] == fb[k] for k in fa), [k for k in fa if fa[k] != fb[k]]
    assert json.loads((a / "meta.json").read_text()) == json.loads((b / "meta.json").read_text())


def test_different_seed_differs(tmp_path: Path) -> None:
    a = _files(generate_dataset(tmp_path / "a", seed=1, preset="tiny", workers=1, progress=False))
    b = _files(generate_dataset(tmp_path / "b", seed=2, preset="tiny", workers=1, progress=False))
    assert a["images/train/000000.jpg"] != b["images/train/000000.jpg"]


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_layout_and_counts(small: Path, split: str) -> None:
    n = PRESETS["small"].count(split)
    for kind, ext in (("images", "jpg"), ("labels", "txt"), ("parts", "json")):
        names = sorted(p.name for p in (small / kind / split).iterdir())
        assert names == [f"{i:06d}.{ext}" for i in range(n)]
    meta = json.loads((small / "meta.json").read_text())
    assert meta["counts"][split]["images"] == n
    assert meta["seed"] == 3 and meta["preset"]["name"] == "small" and meta["generator_version"]


def test_data_yaml(small: Path) -> None:
    data = yaml.safe_load((small / "data.yaml").read_text())
    assert data["path"] == str(small) and Path(data["path"]).is_absolute()
    assert (data["train"], data["val"], data["test"]) == ("images/train", "images/val", "images/test")
    assert data["names"] == dict(enumerate(DEFAULT_CLASSES)) and data["nc"] == len(DEFAULT_CLASSES)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_labels_valid_and_inside_defective_parts(small: Path, split: str) -> None:
    for rows, parts in _read_split(small, split):
        for p in parts:
            x1, y1, x2, y2 = p["box"]
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
            assert p["product"] in PRODUCT_TYPES and 0 < p["visible"] <= 1
        for cls, cx, cy, w, h in rows:
            assert int(cls) == cls and 0 <= cls < len(DEFAULT_CLASSES)
            assert w > 0 and h > 0
            bx = ((cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H)
            assert cx - w / 2 >= -1e-6 and cx + w / 2 <= 1 + 1e-6 and cy - h / 2 >= -1e-6 and cy + h / 2 <= 1 + 1e-6
            owners = [p for p in parts if p["box"][0] - 0.01 <= bx[0] and bx[2] <= p["box"][2] + 0.01
                      and p["box"][1] - 0.01 <= bx[1] and bx[3] <= p["box"][3] + 0.01]
            assert owners and all(p["defective"] for p in owners)
        for p in parts:  # a good part has no defect centre on it
            if not p["defective"]:
                for _, cx, cy, _, _ in rows:
                    assert not (p["box"][0] <= cx * W <= p["box"][2] and p["box"][1] <= cy * H <= p["box"][3])


def test_label_format(small: Path) -> None:
    for lbl in (small / "labels" / "train").glob("*.txt"):
        for line in lbl.read_text().splitlines():
            fields = line.split()
            assert len(fields) == 5 and all(len(f.split(".")[1]) == 6 for f in fields[1:])


def test_class_balance_and_good_fraction(small: Path) -> None:
    meta = json.loads((small / "meta.json").read_text())["counts"]
    per_class = {c: sum(meta[s]["defects"][c] for s in ds.SPLITS) for c in DEFAULT_CLASSES}
    total = sum(per_class.values())
    assert total >= 40
    for c, n in per_class.items():
        assert 0.12 <= n / total <= 0.4, (c, per_class)
    parts = sum(meta[s]["parts"] for s in ds.SPLITS)
    good = sum(meta[s]["good_parts"] for s in ds.SPLITS)
    assert 0.55 <= good / parts <= 0.85


def test_empty_belt_images(tmp_path: Path) -> None:
    preset = DatasetPreset("empty", 2, 1, 1, empty_prob=1.0)
    root = generate_dataset(tmp_path / "e", seed=0, preset=preset, workers=1, progress=False)
    for split in ds.SPLITS:
        for rows, parts in _read_split(root, split):
            assert rows == [] and parts == []


@pytest.mark.parametrize("existing", [False, True])
def test_failure_leaves_no_partial_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool) -> None:
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "marker").write_text("old")
    real = ds.render_item

    def flaky(seed: int, split: str, index: int, preset: DatasetPreset, line: LineSpec):  # type: ignore[no-untyped-def]
        if split == "val" and index == 2:
            raise RuntimeError("boom")
        return real(seed, split, index, preset, line)

    monkeypatch.setattr(ds, "render_item", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        generate_dataset(out, seed=0, preset="tiny", workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["marker"]


def test_replaces_existing_dataset(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    generate_dataset(out, seed=0, preset="tiny", workers=1, progress=False)
    assert not (out / "stale.txt").exists() and (out / "data.yaml").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
