"""Adaptive batching under a rising load: 1 to N live streams through the real detector.

Each stream is the sample video played as a live camera (paced at its frame rate, looping);
one stream is added per step. The :class:`~edge_agent.batcher.AdaptiveBatcher` feeds the
bundle's INT8 model with the newest frame of each camera. Plotted over time: the batch size,
the throughput against the offered load, and the p50/p99 latency (capture -> result) against
the objective; printed and written as JSON: one summary per step.

    python bench/streams.py --bundle models/default --video sample_data/line_1080p.mp4 \\
        --max-streams 8 --duration-per-step 15 --png docs/img/batching_ramp.png --json out/bench/streams.json
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from _common import emit_json  # noqa: E402  (bench/, first on sys.path)
from tqdm import tqdm  # noqa: E402

from edge_agent.batcher import AdaptiveBatcher, BatchPolicy, Result  # noqa: E402
from edge_agent.runtime import create_detector  # noqa: E402
from edge_agent.sources import FileStreamSource  # noqa: E402
from models.bundle import load_bundle  # noqa: E402


@dataclass(frozen=True)
class Done:
    """One frame's result, as kept by the benchmark."""

    t: float  # seconds since the ramp started, when the result came
    camera: str
    latency_ms: float
    batch: int


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if values else math.nan


def summarize_step(streams: int, fps: float, done: list[Done], t0: float, t1: float, slo_ms: float,
                   captured: int, dropped: int, infer_ms: dict[int, float]) -> dict[str, Any]:
    lat = [d.latency_ms for d in done]
    return {
        "streams": streams,
        "offered_fps": round(streams * fps, 1),
        "processed_fps": round(len(done) / (t1 - t0), 2),
        "mean_batch": round(float(np.mean([d.batch for d in done])), 2) if done else math.nan,
        "max_batch": max((d.batch for d in done), default=0),
        "latency_p50_ms": pct(lat, 50),
        "latency_p99_ms": pct(lat, 99),
        "within_slo": round(sum(v <= slo_ms for v in lat) / len(lat), 3) if lat else math.nan,
        "captured_fps": round(captured / (t1 - t0), 1),
        "dropped_share": round(dropped / captured, 3) if captured else math.nan,
        "infer_ms_by_batch": infer_ms,
    }


def plot(path: Path, done: list[Done], samples: list[dict[str, float]], steps: list[dict[str, Any]],
         step_s: float, slo_ms: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = len(steps) * step_s  # whole 1 s bins of the ramp only
    edges = np.arange(0.0, math.floor(end) + 0.5, 1.0)
    mid = edges[:-1] + 0.5
    t = np.array([d.t for d in done])
    lat = np.array([d.latency_ms for d in done])
    batch = np.array([d.batch for d in done], dtype=float)
    idx = np.digitize(t, edges) - 1
    per = [np.flatnonzero(idx == i) for i in range(len(mid))]
    fps = np.array([len(p) for p in per], dtype=float)
    p50 = np.array([np.percentile(lat[p], 50) if len(p) else np.nan for p in per])
    p99 = np.array([np.percentile(lat[p], 99) if len(p) else np.nan for p in per])
    mean_batch = np.array([batch[p].mean() if len(p) else np.nan for p in per])

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    st = np.array([s["t"] for s in samples])
    axes[0].step(st, [s["batch_size"] for s in samples], where="post", label="controller batch size")
    axes[0].plot(mid, mean_batch, ".", label="mean batch run (1 s bins)")
    axes[0].step(st, [s["streams"] for s in samples], where="post", ls="--", c="grey", label="streams")
    axes[0].set_ylabel("frames")
    axes[0].legend(loc="upper left", fontsize=8)
    axes[1].plot(mid, fps, label="processed fps")
    axes[1].step(st, [s["offered_fps"] for s in samples], where="post", ls="--", c="grey", label="offered fps")
    axes[1].set_ylabel("frames / s")
    axes[1].set_yscale("log")
    axes[1].legend(loc="upper left", fontsize=8)
    axes[2].plot(mid, p50, label="p50")
    axes[2].plot(mid, p99, label="p99")
    axes[2].axhline(slo_ms, c="red", ls=":", label=f"objective {slo_ms:.0f} ms")
    axes[2].set_ylabel("latency capture -> result (ms)")
    axes[2].set_xlabel("time (s)")
    axes[2].set_yscale("log")
    axes[2].legend(loc="upper left", fontsize=8)
    for ax in axes:
        for k in range(1, len(steps)):
            ax.axvline(k * step_s, c="lightgrey", lw=0.8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("models/default"))
    ap.add_argument("--video", type=Path, default=Path("sample_data/line_1080p.mp4"))
    ap.add_argument("--model", default="onnx_int8", choices=["onnx_int8", "onnx_fp32"])
    ap.add_argument("--max-streams", type=int, default=8)
    ap.add_argument("--step", type=int, default=1, help="streams added per step")
    ap.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "torch", "auto"],
                    help="torch: the checkpoint in FP16 on CUDA (GPU machines)")
    ap.add_argument("--workers", type=int, default=None, help="ONNX Runtime sessions (default 1, as the agent)")
    ap.add_argument("--duration-per-step", type=float, default=15.0, help="seconds per number of streams")
    ap.add_argument("--slo-ms", type=float, default=None, help="latency objective (default: by provider)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    ap.add_argument("--png", type=Path, default=Path("docs/img/batching_ramp.png"))
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args()

    bundle = load_bundle(args.bundle, roles=(args.model,))
    detector = create_detector(str(args.bundle), runtime=args.runtime, role=args.model, threads=args.threads,
                               workers=args.workers or 1)  # as the agent: one session, every core
    detector.load()
    policy = BatchPolicy.for_provider(detector.provider, max_batch=args.max_batch,
                                      **({"slo_ms": args.slo_ms} if args.slo_ms else {}))
    probe = FileStreamSource(args.video)
    frame = np.zeros((probe.height, probe.width, 3), np.uint8)
    alone_ms: dict[int, float] = {}
    sizes = sorted({1, 2, 4, 8, 16, 32, 64, policy.max_batch} & set(range(1, policy.max_batch + 1)))
    for n in sizes:  # first runs at a new batch shape allocate: keep them out
        detector.detect([frame] * n)
        t = time.perf_counter()
        detector.detect([frame] * n)
        alone_ms[n] = round(1000 * (time.perf_counter() - t), 1)
    load_start = os.getloadavg()

    done: list[Done] = []
    lock = threading.Lock()
    start = time.monotonic()

    def on_results(results: list[Result]) -> None:
        now = time.monotonic() - start
        with lock:
            done.extend(Done(now, r.frame.camera_id, 1000 * r.latency_s, r.batch_size) for r in results)

    batcher = AdaptiveBatcher(detector, policy=policy, on_results=on_results)
    sources: list[FileStreamSource] = []
    samples: list[dict[str, float]] = []
    steps: list[dict[str, Any]] = []
    fps = 0.0
    counts = list(range(args.step, args.max_streams + 1, args.step)) or [args.max_streams]
    bar = tqdm(total=round(len(counts) * args.duration_per_step), unit="s", disable=args.quiet,
               desc="ramp", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s {postfix}")
    batcher.start()
    try:
        for step, k in enumerate(counts, start=1):
            while len(sources) < k:
                src = FileStreamSource(args.video, f"cam{len(sources) + 1}", loop=True)
                src.transform = detector.prepare  # letterbox in the capture threads
                fps = src.fps
                src.start()
                sources.append(src)
                batcher.add_source(src)
            before = [s.stats() for s in sources]
            t_step = time.monotonic() - start
            samples.append({"t": t_step, "streams": k, "offered_fps": k * fps,
                            "batch_size": batcher.batch_size})
            with lock:
                n0 = len(done)
            while (now := time.monotonic() - start) < step * args.duration_per_step:
                time.sleep(0.5)
                st = batcher.stats()
                samples.append({"t": now, "streams": k, "offered_fps": k * fps, "batch_size": st.batch_size,
                                "fps": st.fps, "p50": st.latency_p50_ms, "p99": st.latency_p99_ms,
                                "queue_depth": st.queue_depth})
                bar.set_postfix_str(f"streams {k} batch {st.batch_size} {st.fps:.1f} fps "
                                    f"p50 {st.latency_p50_ms:.0f} p99 {st.latency_p99_ms:.0f} ms")
                bar.n = min(bar.total, round(now))
                bar.refresh()
            after = [s.stats() for s in sources]
            with lock:
                step_done = done[n0:]
            captured = sum(a.captured for a in after) - sum(b.captured for b in before)
            dropped = sum(a.dropped for a in after) - sum(b.dropped for b in before)
            steps.append(summarize_step(k, fps, step_done, t_step, time.monotonic() - start, policy.slo_ms,
                                        captured, dropped, batcher.stats().infer_ms_by_size))
    finally:
        bar.close()
        batcher.stop()
        for s in sources:
            s.close()

    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "provider": detector.provider, "model": args.model, "bundle_version": bundle.manifest.version,
        "video": str(args.video), "frame": f"{probe.width}x{probe.height}", "stream_fps": fps,
        "duration_per_step_s": args.duration_per_step,
        "load_average": {"start": [round(v, 2) for v in load_start],
                         "end": [round(v, 2) for v in os.getloadavg()]},
        "detector_alone_ms_by_batch": alone_ms,  # no streams decoding: the model's own time per batch
        "policy": {k: getattr(policy, k) for k in ("slo_ms", "max_batch", "max_queue_delay_ms", "increase_step",
                                                   "decrease_factor", "probe_holdoff_s")},
        "steps": steps,
        "png": str(args.png),
    }
    title = (f"{args.model} v{bundle.manifest.version} on {detector.provider}, {os.cpu_count()} cores; "
             f"1..{args.max_streams} streams of {probe.width}x{probe.height} @ {fps:.0f} fps")
    plot(args.png, done, samples, steps, args.duration_per_step, policy.slo_ms, title)
    print(f"{'streams':>7} {'offered':>8} {'fps':>7} {'batch':>6} {'p50 ms':>8} {'p99 ms':>8} {'in SLO':>7} "
          f"{'captured':>9} {'dropped':>8}")
    for row in steps:
        print(f"{row['streams']:>7} {row['offered_fps']:>8} {row['processed_fps']:>7} {row['mean_batch']:>6} "
              f"{row['latency_p50_ms']:>8} {row['latency_p99_ms']:>8} {row['within_slo']:>7} "
              f"{row['captured_fps']:>9} {row['dropped_share']:>8}")
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
