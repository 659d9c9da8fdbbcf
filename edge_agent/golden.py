"""Compare replay results with a golden results.jsonl, for regression tests on recorded video.

Two detections match when they have the same class, IoU >= ``iou_tol`` and scores within
``score_tol``. A detection without a match is tolerated only when its score is within
``score_tol`` of the confidence threshold (it may flicker across it between runtimes);
anything else is a difference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Tolerance", "GoldenDiff", "compare_results", "read_results"]


@dataclass(frozen=True)
class Tolerance:
    iou: float = 0.85
    score: float = 0.05
    conf: float = 0.25  # the threshold the golden file was produced with


@dataclass
class GoldenDiff:
    frames_compared: int = 0
    matched: int = 0
    tolerated: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (f"{self.frames_compared} frames, {self.matched} detections matched, "
                f"{self.tolerated} borderline tolerated, {len(self.problems)} differences")
        return "\n".join([head, *self.problems[:20]] + (["..."] if len(self.problems) > 20 else []))


def read_results(path: Path) -> list[dict[str, Any]]:
    rows = []
    with Path(path).open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from exc
    return rows


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def compare_results(actual: list[dict[str, Any]], golden: list[dict[str, Any]], tol: Tolerance) -> GoldenDiff:
    diff = GoldenDiff()
    if len(actual) != len(golden):
        diff.problems.append(f"frame count differs: {len(actual)} now, {len(golden)} in the golden file")
    for got, want in zip(actual, golden, strict=False):
        diff.frames_compared += 1
        if got["frame"] != want["frame"]:
            diff.problems.append(f"frame index {got['frame']} where the golden file has {want['frame']}")
            continue
        unmatched = list(got["detections"])
        for w in want["detections"]:
            best, best_iou = None, tol.iou
            for g in unmatched:
                if g["cls"] == w["cls"] and (iou := _iou(g["box"], w["box"])) >= best_iou:
                    best, best_iou = g, iou
            if best is None:
                if w["score"] < tol.conf + tol.score:
                    diff.tolerated += 1
                else:
                    diff.problems.append(f"frame {want['frame']}: missing {w['cls']} {w['score']:.2f} at {w['box']}")
                continue
            unmatched.remove(best)
            if abs(best["score"] - w["score"]) > tol.score:
                diff.problems.append(
                    f"frame {want['frame']}: {w['cls']} score {best['score']:.3f}, golden {w['score']:.3f}")
            else:
                diff.matched += 1
        for g in unmatched:
            if g["score"] < tol.conf + tol.score:
                diff.tolerated += 1
            else:
                diff.problems.append(f"frame {got['frame']}: extra {g['cls']} {g['score']:.2f} at {g['box']}")
    return diff
