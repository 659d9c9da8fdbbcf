"""Synthetic lines for the learning loop: a new defect class (porosity) and a new product (covers),
each in its own random stream; the default line is untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from models.synth.dataset import PRESETS, generate_dataset, render_item
from models.synth.lines import LINES, LineSpec, get_line
from models.taxonomy import DEFAULT_CLASSES, PRODUCT_TYPES


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"products": ("gear",)}, "unknown products"),
    ({"defects": (4,)}, r"defects \['porosity'\] are not in its classes"),
    ({"classes": ("crack", "scratch", "dent", "stain")}, "must start with"),
])
def test_line_spec_errors(kwargs: dict, error: str) -> None:
    base = {"name": "x", "products": PRODUCT_TYPES, "defects": (0, 1), "classes": DEFAULT_CLASSES}
    with pytest.raises(ValueError, match=error):
        LineSpec(**{**base, **kwargs})


def test_unknown_line_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown line 'paint'; known: \['cover', 'default', 'porosity'\]"):
        get_line("paint")


def test_default_line_is_the_default_stream() -> None:
    p = PRESETS["tiny"]
    assert render_item(0, "train", 3, p) == render_item(0, "train", 3, p, LINES["default"])
    assert render_item(0, "train", 3, p)[0] != render_item(0, "train", 3, p, LINES["porosity"])[0]


@pytest.mark.parametrize(("line", "nc", "products"), [("porosity", 5, set(PRODUCT_TYPES)), ("cover", 4, {"cover"})])
def test_line_dataset(tmp_path: Path, line: str, nc: int, products: set[str]) -> None:
    out = generate_dataset(tmp_path / line, preset=PRESETS["small"], workers=1, progress=False, line=line)
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["nc"] == nc and list(data["names"].values()) == list(LINES[line].classes)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["line"] == line and meta["products"] == list(LINES[line].products)
    seen_products = {p["product"] for f in (out / "parts").rglob("*.json") for p in json.loads(f.read_text())["parts"]}
    assert seen_products and seen_products <= products
    ids = [int(row.split()[0]) for f in (out / "labels").rglob("*.txt") for row in f.read_text().splitlines()]
    assert ids and max(ids) < nc
    if line == "porosity":  # the new class is drawn, about half of the defects
        assert 0.3 < ids.count(4) / len(ids) < 0.7, ids
        assert sum(meta["counts"][s]["defects"]["porosity"] for s in ("train", "val", "test")) == ids.count(4)
