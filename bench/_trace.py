"""Host CPU and GPU use sampled while a benchmark runs: where a job's steps leave cores or the GPU idle.

    with UsageTrace(interval=0.5) as trace:
        run()
    trace.samples  # [{"t": s since start, "cpu": % of all cores, "gpu": % busy or None}, ...]

CPU from psutil (system-wide, so the job's child processes count); GPU utilisation from NVML
(nvidia-ml-py) for the first GPU when it is there, else None.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

__all__ = ["UsageTrace", "mean_between"]


class UsageTrace:
    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="usage-trace", daemon=True)
        self.t0 = 0.0

    def __enter__(self) -> UsageTrace:
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        import psutil  # type: ignore[import-untyped]

        nvml: Any = None
        gpu: Any = None
        try:
            import pynvml as nvml  # type: ignore[import-untyped,no-redef]

            nvml.nvmlInit()
            gpu = nvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML library or no GPU: CPU only
            gpu = None
        psutil.cpu_percent(None)
        while not self._stop.wait(self.interval):
            util = nvml.nvmlDeviceGetUtilizationRates(gpu).gpu if gpu is not None else None
            self.samples.append({"t": round(time.perf_counter() - self.t0, 2), "cpu": psutil.cpu_percent(None),
                                 "gpu": util})


def mean_between(samples: list[dict[str, Any]], start: float, end: float, key: str) -> float | None:
    """Mean of ``key`` over the samples taken in ``[start, end)`` seconds; None without any."""
    vals = [s[key] for s in samples if start <= s["t"] < end and s[key] is not None]
    return round(sum(vals) / len(vals), 1) if vals else None
