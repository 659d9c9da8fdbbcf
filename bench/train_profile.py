"""Where the host's time goes in the retraining job's training step: Ultralytics' own trainer with
the job's preset, under Python's profiler (the main thread: the loop that feeds the GPU).

Two profiles: the set-up (from the trainer's start to its first epoch: model, data, loaders, AMP
check) and the loop (epochs 2 to the last: the first epoch's warm-up left out). Each lists the
functions with the most time of their own and the most time under them, per training iteration
for the loop. The profiler slows Python calls down (about 2x for call-heavy code), so the
figures rank where the host spends its time; the iteration times without the profiler are the
job's (docs/benchmarks.md).

    python bench/train_profile.py --device 0 --json docs/results/train_profile_h100.json

Needs the ``train`` extra and the golden data (``data/synth/dataset``).
"""

from __future__ import annotations

import argparse
import cProfile
import platform
import pstats
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import cpu_model, emit_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _top(prof: cProfile.Profile, key: str, n: int, per: int) -> list[dict[str, Any]]:
    """The ``n`` functions with the most ``key`` time (tottime: own, cumtime: with callees), ms per ``per``."""
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        short = "/".join(Path(file).parts[-3:]) if file != "~" else "~"
        rows.append({"function": f"{short}:{line}({name})", "calls_per": round(ncalls / per, 1),
                     "own_ms_per": round(1000 * tottime / per, 2), "cum_ms_per": round(1000 * cumtime / per, 2)})
    field = "own_ms_per" if key == "tottime" else "cum_ms_per"
    return sorted(rows, key=lambda r: -r[field])[:n]


def profile_training(data: Path, preset: str, epochs: int, device: str, workers: int, top: int) -> dict[str, Any]:
    from models.train import train

    setup, loop = cProfile.Profile(), cProfile.Profile()
    marks: dict[str, Any] = {"iters": 0, "loop_s": 0.0}

    def on_start(trainer: Any) -> None:
        marks["t0"] = time.perf_counter()
        setup.enable()

    def on_train_start(trainer: Any) -> None:
        setup.disable()
        marks["setup_s"] = time.perf_counter() - marks["t0"]

    def on_epoch_start(trainer: Any) -> None:
        if trainer.epoch >= 1:
            marks["epoch_t"] = time.perf_counter()
            loop.enable()

    def on_batch_end(trainer: Any) -> None:
        if trainer.epoch >= 1:
            marks["iters"] += 1

    def on_epoch_end(trainer: Any) -> None:
        if trainer.epoch >= 1:
            loop.disable()
            marks["loop_s"] += time.perf_counter() - marks["epoch_t"]

    from ultralytics import YOLO

    real_init = YOLO.__init__

    def init(self: Any, *a: Any, **k: Any) -> None:  # the callbacks on the model train() makes
        real_init(self, *a, **k)
        for event, fn in (("on_pretrain_routine_start", on_start), ("on_train_start", on_train_start),
                          ("on_train_epoch_start", on_epoch_start), ("on_train_batch_end", on_batch_end),
                          ("on_train_epoch_end", on_epoch_end)):
            self.add_callback(event, fn)

    YOLO.__init__ = init  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory(prefix="lg_trainprof_") as tmp:
            t0 = time.perf_counter()
            train(data, preset=preset, project_dir=Path(tmp), device=device, epochs=epochs, workers=workers,
                  weights=ROOT / "models" / "default" / "checkpoint.pt")
            total = time.perf_counter() - t0
    finally:
        YOLO.__init__ = real_init  # type: ignore[method-assign]
    iters = max(1, marks["iters"])
    return {
        "train_s": round(total, 1), "setup_s": round(marks.get("setup_s", float("nan")), 1),
        "profiled_iterations": marks["iters"], "profiled_ms_per_iteration": round(1000 * marks["loop_s"] / iters, 1),
        "setup_own": _top(setup, "tottime", top, 1), "setup_cum": _top(setup, "cumtime", top, 1),
        "loop_own": _top(loop, "tottime", top, iters), "loop_cum": _top(loop, "cumtime", top, iters),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "synth" / "dataset" / "data.yaml")
    p.add_argument("--preset", default="retrain")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--device", default="0", help="0 for the first GPU, or cpu")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    res = profile_training(args.data, args.preset, args.epochs, args.device, args.workers, args.top)
    import torch

    emit_json({**res, "preset": args.preset, "epochs": args.epochs, "data": str(args.data),
               "device": torch.cuda.get_device_name(0) if args.device.isdigit() else args.device,
               "machine": {"node": platform.node(), "cpu": cpu_model()}, "torch": torch.__version__,
               "date": datetime.now(UTC).strftime("%Y-%m-%d")}, args.json)


if __name__ == "__main__":
    main()
