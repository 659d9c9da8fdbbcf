"""The polars-free reader of Ultralytics' results.csv (the GPU machine has no polars)."""

from __future__ import annotations

import math
import os
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


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cpu_training_gets_a_thread_per_core(device: str) -> None:
    """Ultralytics' import and CPU device selection leave torch one thread on a 2-core machine; the
    trainer's callback restores a thread per core (never fewer than it had) and leaves a GPU
    training's process alone."""
    torch = pytest.importorskip("torch")
    import os

    import psutil

    from models.train import _cpu_threads

    usable = len(os.sched_getaffinity(0))
    cores = min(psutil.cpu_count(logical=False) or usable, usable)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as Ultralytics leaves it on a 2-core machine
        _cpu_threads(SimpleNamespace(device=SimpleNamespace(type=device)))
        assert torch.get_num_threads() == (cores if device == "cpu" else 1)
        torch.set_num_threads(cores + 1)
        _cpu_threads(SimpleNamespace(device=SimpleNamespace(type=device)))
        assert torch.get_num_threads() == cores + 1  # never lowered
    finally:
        torch.set_num_threads(before)


def test_restore_returns_the_count_it_found() -> None:
    torch = pytest.importorskip("torch")
    from models.offline import restore_torch_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert restore_torch_threads() == 1
        assert torch.get_num_threads() >= 1
    finally:
        torch.set_num_threads(before)


def test_configure_offline_after_ultralytics_was_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ultralytics reads its flags from the environment at import: imported first, it still ends offline."""
    pytest.importorskip("ultralytics")
    import ultralytics.utils as uu
    import ultralytics.utils.checks as uc

    from models.offline import configure_offline

    for key in ("YOLO_OFFLINE", "YOLO_AUTOINSTALL", "YOLO_CONFIG_DIR", "YOLO_VERBOSE"):  # as they were, after
        had = os.environ.get(key)
        monkeypatch.setenv(key, had or "")
        if had is None:
            monkeypatch.delenv(key)
    for mod in (uu, uc):
        monkeypatch.setattr(mod, "ONLINE", True)
        monkeypatch.setattr(mod, "AUTOINSTALL", True)
    configure_offline(tmp_path / "cfg")
    assert (uu.ONLINE, uc.ONLINE, uu.AUTOINSTALL, uc.AUTOINSTALL) == (False, False, False, False)
    assert (tmp_path / "cfg" / "Arial.ttf").is_file()  # the fonts Ultralytics' plots ask for, placed
