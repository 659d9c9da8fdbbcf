"""Make Ultralytics work with no network: no asset, font, weights or settings downloads.

Call :func:`configure_offline` before the first ``import ultralytics`` (its settings are
read at import time; called after it, it sets the flags Ultralytics read), then
:func:`patch_ultralytics` after it. What each step prevents:

- ``YOLO_OFFLINE=1``: ``ultralytics.utils.is_online()`` answers False without a DNS probe,
  so usage events and pip-update checks are skipped.
- ``YOLO_AUTOINSTALL=false``: ``check_requirements`` never runs ``pip install``.
- ``YOLO_CONFIG_DIR``: settings.json and fonts live in a project-owned directory.
- Fonts: label plots call ``check_font("Arial.ttf")``, which downloads the font when it is
  not in the config dir. We place matplotlib's bundled DejaVu Sans there under the names
  Ultralytics asks for, so plots render with it and nothing is fetched.
- AMP check: on CUDA, ``check_amp`` loads ``yolo26n.pt`` (a download) to compare FP32 and
  AMP outputs. We replace it with the same comparison run on the model being trained.
- ``read_results_csv`` needs polars; where polars is absent (the GPU machine) a csv-module
  reader with the same output stands in, so checkpoints still record their metrics.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = ["configure_offline", "default_config_dir", "patch_ultralytics", "restore_torch_threads"]

log = logging.getLogger(__name__)

_FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")


def default_config_dir() -> Path:
    return Path(os.environ.get("LINEGUARD_CACHE", Path.home() / ".cache" / "lineguard")) / "ultralytics"


def configure_offline(config_dir: Path | None = None) -> Path:
    """Set the environment for an offline Ultralytics and place its fonts. Returns the config dir."""
    config_dir = Path(config_dir or default_config_dir())
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ.setdefault("YOLO_VERBOSE", "true")
    _place_fonts(config_dir)
    if "ultralytics.utils" in sys.modules:  # imported before this: it read the environment already
        import ultralytics.utils as uu
        import ultralytics.utils.checks as uc

        uu.ONLINE = uc.ONLINE = False
        uu.AUTOINSTALL = uc.AUTOINSTALL = False
    return config_dir


def restore_torch_threads() -> int:
    """Give torch in this process a thread per physical core again; returns the count it had.

    Ultralytics sets ``OMP_NUM_THREADS=1`` at import when it is unset (torch imported after it then
    runs on one thread) and its CPU device selection sets one thread fewer than the cores: on the
    2-core build machine retraining ran on one core while the other idled (2026-11-24). Called for
    CPU training only: children keep Ultralytics' one thread each (the scoring pool, the bottleneck
    process), and a GPU hub's processes are not touched."""
    import psutil  # type: ignore[import-untyped]
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = min(psutil.cpu_count(logical=False) or usable, usable)
    have = torch.get_num_threads()
    if cores > have:
        torch.set_num_threads(cores)
        log.info("torch on the CPU: %d threads (had %d)", cores, have)
    return have


def _place_fonts(config_dir: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # Ultralytics depends on matplotlib; without it there are no plots either
        return
    src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in _FONT_NAMES:
        dst = config_dir / name
        if not dst.exists() and src.exists():
            tmp = dst.with_suffix(".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)


def patch_ultralytics() -> None:
    """Patch the two Ultralytics call sites that would reach the network or need polars."""
    from ultralytics.engine import trainer as trainer_mod
    from ultralytics.utils import SETTINGS

    if SETTINGS.get("sync"):
        SETTINGS.update({"sync": False})  # no usage analytics
    trainer_mod.check_amp = _check_amp_offline
    try:
        import polars  # noqa: F401
    except ImportError:
        trainer_mod.BaseTrainer.read_results_csv = _read_results_csv  # type: ignore[method-assign]


def _check_amp_offline(model: Any) -> bool:
    """Ultralytics' AMP check, run on the model itself instead of a downloaded reference model."""
    import torch

    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    x = torch.rand(2, 3, 256, 256, device=device)
    model_was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            a = model(x)
            with torch.autocast("cuda"):
                b = model(x)
        a0 = a[0] if isinstance(a, (list, tuple)) else a
        b0 = b[0] if isinstance(b, (list, tuple)) else b
        ok = bool(torch.isfinite(b0).all()) and torch.allclose(a0.float(), b0.float(), atol=0.5, rtol=0.05)
    finally:
        model.train(model_was_training)
    log.info("AMP check on the model itself: %s", "passed" if ok else "failed, AMP off")
    return ok


def _read_results_csv(self: Any) -> dict[str, list[float]]:
    """Read results.csv into {column: values} without polars (same shape as Ultralytics'); a
    missing value (a row shorter than the header) reads as NaN."""
    path = Path(self.csv)
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            out.setdefault(key, []).append(float(value) if value not in (None, "") else math.nan)
    return out
