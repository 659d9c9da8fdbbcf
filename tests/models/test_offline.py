"""The polars-free reader of Ultralytics' results.csv (the GPU machine has no polars)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from models.offline import _read_results_csv


@pytest.mark.parametrize(("text", "expected"), [
    ("epoch,loss\n1,0.5\n2,0.25\n", {"epoch": [1.0, 2.0], "loss": [0.5, 0.25]}),
    # the last epoch of a training without validation: the metrics' columns not measured
    ("epoch,loss,map\n1,0.5,0\n2,0.25,nan\n", {"epoch": [1.0, 2.0], "loss": [0.5, 0.25], "map": [0.0, math.nan]}),
    ("epoch,loss,map\n1,0.5,0\n2,0.25\n", {"epoch": [1.0, 2.0], "loss": [0.5, 0.25], "map": [0.0, math.nan]}),
    ("epoch,loss\n1,\n", {"epoch": [1.0], "loss": [math.nan]}),
    ("epoch,loss\n", {}),
])
def test_read_results_csv(tmp_path: Path, text: str, expected: dict[str, list[float]]) -> None:
    (tmp_path / "results.csv").write_text(text)
    got = _read_results_csv(SimpleNamespace(csv=tmp_path / "results.csv"))
    assert got.keys() == expected.keys()
    for k, values in expected.items():
        assert len(got[k]) == len(values)
        assert all(math.isnan(a) if math.isnan(b) else a == b for a, b in zip(got[k], values, strict=True))


def test_read_results_csv_without_a_file(tmp_path: Path) -> None:
    assert _read_results_csv(SimpleNamespace(csv=tmp_path / "results.csv")) == {}


def test_bad_value_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "results.csv").write_text("epoch,loss\n1,abc\n")
    with pytest.raises(ValueError):
        _read_results_csv(SimpleNamespace(csv=tmp_path / "results.csv"))
