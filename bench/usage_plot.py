"""Plot a retraining job's host CPU and GPU use over time, its steps shaded, from the JSON that
``bench/learning_cycle.py`` writes (``retrain.usage``: sampled every 0.5 s while the job ran).

    python bench/usage_plot.py docs/results/learning_cycle_cover_h100_xfer.json docs/img/learning_cycle_usage_h100.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(doc: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = doc["retrain"]
    samples = r["usage"]["samples"]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    t = [s["t"] for s in samples]
    ax.plot(t, [s["cpu"] for s in samples], label=f"host CPU (% of {r['usage']['cores']} cores)", lw=1.2)
    if any(s["gpu"] is not None for s in samples):
        ax.plot(t, [s["gpu"] if s["gpu"] is not None else float("nan") for s in samples], label="GPU busy (%)", lw=1.2)
    start = float(r["usage"].get("job_start_s", 0.0))  # the steps run one after another from the job's start
    colours, total, shown = ["#eeeeee", "#dddddd"], sum(r["steps_s"].values()) or 1.0, 0
    for step, secs in r["steps_s"].items():
        if secs >= 1.0:
            ax.axvspan(start, start + secs, color=colours[shown % 2], zorder=0)
            narrow = secs < 0.06 * total  # short steps' labels alternate in height so that they do not overlap
            ax.text(start + secs / 2, 112 if narrow and shown % 2 else 101, f"{step} {secs:.0f} s", ha="center",
                    va="bottom", fontsize=8)
            shown += 1
        start += secs
    ax.set_xlabel("seconds since the job started")
    ax.set_ylim(0, 125)
    ax.set_ylabel("%")
    ax.set_title(title, fontsize=10, pad=24)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--title", default=None)
    args = p.parse_args()
    doc = json.loads(args.json.read_text())
    m = doc.get("machine") or {}
    title = args.title or (f"retraining job, {doc.get('line')} line: {doc['retrain']['seconds']} s "
                           f"({m.get('cpus')} cores, device {m.get('device')}, {str(doc.get('date', ''))[:10]})")
    plot(doc, args.png, title)


if __name__ == "__main__":
    main()
