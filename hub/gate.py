"""The evaluation gate: a retrained candidate ships only if it passes the configured rule (issue 6).

Both the candidate and the current production model are scored on the same two sets:

- the **golden set**: a fixed dataset directory (Ultralytics layout, split ``val``) that does not
  change between retrainings; its fingerprint (SHA-256 over every file's path and bytes) is in
  every report, so a report says exactly which golden set it used;
- the **new data**: the validation side of the reviewed samples this retraining learned from.

Per class, recall is taken at each model's own operating threshold (``operating_conf`` of its
manifest: what the line experiences), plus AP50 and the confusion matrix there; a candidate's
classes the set lacks are kept as columns of their own (:func:`score_model_detections`). The rule
(:class:`GateRule`): on the golden set no class that production knows loses more than
``max_recall_drop`` (1 point by default) of recall, its part false-alarm rate rises by at most
``max_false_alarm_rise``, a split candidate's two parts lose at most ``max_split_map50_drop`` of
golden mAP50 against its whole model, and on the new data the candidate's mAP50 beats
production's by at least ``min_new_data_gain``. A report (``gate.json``, ``confusion.png``,
``pr_curves.png``) is written for every candidate, passed or not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from models.dataset_io import YoloDataset
from models.detections import Detections
from models.evaluate import EvalReport, evaluate_predictions, predict_split
from models.fsutil import atomic_write_bytes
from models.metrics import ApResult, DetectionMetrics, box_iou, match_predictions

__all__ = ["GateResult", "GateRule", "Scored", "decide", "fingerprint", "map_classes", "mapped_predictor", "score",
           "score_detections", "score_model_detections", "scoring_names", "write_report"]

Predict = Callable[..., list[Detections]]


@dataclass(frozen=True)
class GateRule:
    max_recall_drop: float = 0.01  # per class on the golden set, as a fraction (0.01 = 1 point)
    min_new_data_gain: float = 0.0  # candidate mAP50 - production mAP50 on the new data, must exceed this
    iou: float = 0.5  # a detection counts for recall and the confusion matrix at this IoU
    #: golden set, at each model's operating threshold: the candidate's part false-alarm rate may
    #: exceed production's by this much (a fraction of good parts); None: not checked. Needs the
    #: golden set's parts sidecars (without them there is nothing to count and the check is skipped).
    max_false_alarm_rise: float | None = 0.01
    #: golden set: a split candidate's two INT8 parts (edge -> codes -> hub) may lose this much mAP50
    #: against its own whole INT8 model (a fraction); None: not checked. Unsplit candidates: no check.
    max_split_map50_drop: float | None = 0.01


@dataclass
class Scored:
    """One model on one set: the usual report plus what the gate needs."""

    report: EvalReport
    operating_conf: float
    recall_at_operating: dict[str, float | None]  # per class name; None: no instances
    confusion: np.ndarray  # (nc + 1, nc + 1): rows true class, columns predicted; last = background
    names: list[str]
    curves: ApResult | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"map50": self.report.map50, "map50_95": self.report.map50_95, "operating_conf": self.operating_conf,
                "recall_at_operating": self.recall_at_operating, "per_class": self.report.per_class,
                "part_level": self.report.part_level, "n_images": self.report.n_images,
                "confusion": self.confusion.tolist(), "names": self.names}


@dataclass
class GateResult:
    passed: bool
    reasons: list[str]  # why it failed; empty when it passed
    checks: list[dict[str, Any]] = field(default_factory=list)  # every comparison made, passed or not


def fingerprint(dataset_dir: Path) -> str:
    """SHA-256 over every file (relative path and contents) under ``dataset_dir``, in path order."""
    h = hashlib.sha256()
    root = Path(dataset_dir)
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _recall_and_confusion(dataset: YoloDataset, split: str, dets: Sequence[Detections], conf: float,
                          iou: float) -> tuple[dict[str, float | None], np.ndarray]:
    nc = dataset.nc
    hits, totals = np.zeros(nc), np.zeros(nc)
    cm = np.zeros((nc + 1, nc + 1), np.int64)
    for smp, det in zip(dataset.split(split), dets, strict=True):
        det = det.filter(conf)
        labels = np.asarray(smp.labels, np.float32).reshape(-1, 5)
        gt_cls = labels[:, 0].astype(int)
        totals += np.bincount(gt_cls, minlength=nc)[:nc]
        if len(det) and len(labels):
            ious = box_iou(labels[:, 1:], det.boxes)  # (G, D)
            tp = match_predictions(det.class_ids, labels[:, 0], ious)[:, 0]
            for c in det.class_ids[tp]:
                hits[int(c)] += 1
        else:
            ious = np.zeros((len(labels), len(det)))
        # confusion: each true box takes its best-overlapping unused detection of its own class, else
        # of any class: a crack found as crack and also boxed as porosity is a crack found (the
        # porosity box is then a false one), a crack boxed only as porosity is crack -> porosity
        used = np.zeros(len(det), bool)
        for g in np.argsort(-(ious.max(1) if ious.size else np.zeros(len(labels)))):
            near = ~used & (ious[g] >= iou) if ious.size else np.zeros(len(det), bool)
            same = near & (det.class_ids == gt_cls[g])
            cand = np.where(same if same.any() else near)[0]
            if len(cand):
                d = cand[np.argmax(ious[g, cand])]
                used[d] = True
                cm[gt_cls[g], int(det.class_ids[d])] += 1
            else:
                cm[gt_cls[g], nc] += 1
        for d in np.where(~used)[0]:
            cm[nc, int(det.class_ids[d])] += 1
    recall = {name: (float(hits[i] / totals[i]) if totals[i] else None) for i, name in enumerate(dataset.names)}
    return recall, cm


def map_classes(dets: list[Any], model_names: list[str], dataset_names: list[str]) -> list[Any]:
    """Detections in a model's class ids re-indexed to a dataset's (by name); classes it lacks dropped."""
    to = {i: dataset_names.index(n) for i, n in enumerate(model_names) if n in dataset_names}
    if all(to.get(i) == i for i in range(len(model_names))):
        return dets
    out = []
    for d in dets:
        d = d[np.array([int(c) in to for c in d.class_ids], bool)]
        d.class_ids[:] = [to[int(c)] for c in d.class_ids]
        out.append(d)
    return out


def scoring_names(model_names: Sequence[str], dataset_names: Sequence[str]) -> list[str]:
    """The dataset's class names, then the model's classes the dataset lacks (in the model's order)."""
    return [*dataset_names, *(n for n in model_names if n not in dataset_names)]


def score_model_detections(dataset: YoloDataset, split: str, dets: list[Detections], model_names: Sequence[str],
                           operating_conf: float, *, iou: float = 0.5) -> Scored:
    """:func:`score_detections` for detections in a model's own class ids. Classes the model knows
    and the dataset does not (a class added since the golden set was made) are **kept**, after the
    dataset's: a true crack the candidate calls porosity shows in the confusion matrix as
    crack -> porosity (not as a miss beside nothing), and a porosity box on a good part counts as the
    false alarm the line would raise. Per-class AP and recall are taken over the dataset's classes
    with instances, so mAP is the same as with those detections dropped."""
    names = scoring_names(model_names, dataset.names)
    if names != list(dataset.names):
        dataset = replace(dataset, names=names)
    return score_detections(dataset, split, map_classes(dets, list(model_names), names), operating_conf, iou=iou)


def mapped_predictor(predict: Callable[..., Any], model_names: list[str],
                     dataset_names: list[str]) -> Callable[..., Any]:
    """A predictor whose detections are in a dataset's class ids (:func:`map_classes`)."""
    if all(n in dataset_names and dataset_names.index(n) == i for i, n in enumerate(model_names)):
        return predict

    def run(frames: list[Any], **kw: Any) -> list[Any]:
        return map_classes(predict(frames, **kw), model_names, dataset_names)

    return run


def score(predict: Predict, dataset: YoloDataset, split: str, operating_conf: float, *, iou: float = 0.5,
          progress: bool = False) -> Scored:
    """Predict ``split`` once (conf 0.001, as ``yolo val``) and derive everything the gate reads."""
    dets = predict_split(predict, dataset.split(split), conf=0.001, progress=progress)
    return score_detections(dataset, split, dets, operating_conf, iou=iou)


def score_detections(dataset: YoloDataset, split: str, dets: Sequence[Detections], operating_conf: float, *,
                     iou: float = 0.5) -> Scored:
    """:func:`score` from detections already predicted (conf 0.001), one per image of ``split``."""
    samples = dataset.split(split)
    if len(dets) != len(samples):
        raise ValueError(f"{len(dets)} detections for {len(samples)} images of {split!r}")
    report = evaluate_predictions(dataset, split, dets, operating_conf=operating_conf)
    recall, cm = _recall_and_confusion(dataset, split, dets, operating_conf, iou)
    dm = DetectionMetrics(dataset.nc)
    for smp, det in zip(samples, dets, strict=True):
        dm.update(det, smp.labels)
    return Scored(report, operating_conf, recall, cm, list(dataset.names), dm.compute())


def _false_alarm_check(rule: GateRule, cand: Scored, prod: Scored) -> tuple[dict[str, Any], str] | None:
    if rule.max_false_alarm_rise is None:
        return None
    pc, pp = cand.report.part_level or {}, prod.report.part_level or {}
    if not pp.get("n_good") or not pc.get("n_good"):  # no parts sidecars: no good parts to count
        return None
    c, p = float(pc["false_alarm_rate"]), float(pp["false_alarm_rate"])
    check = {"check": "golden part false alarms", "candidate": c, "production": p,
             "limit": round(p + rule.max_false_alarm_rise, 6), "n_good": int(pc["n_good"]),
             "ok": c <= p + rule.max_false_alarm_rise + 1e-12}
    return check, (f"golden set: part false alarms {c:.4f} > production {p:.4f} + "
                   f"{rule.max_false_alarm_rise:.4f}")


def _split_check(rule: GateRule, whole: Scored, split: Scored | None) -> tuple[dict[str, Any], str] | None:
    if split is None or rule.max_split_map50_drop is None:
        return None
    s, w = split.report.map50, whole.report.map50
    limit = w - rule.max_split_map50_drop
    check = {"check": "golden split mAP50", "candidate": s, "whole_model": w, "limit": round(limit, 6),
             "ok": s >= limit - 1e-12}
    return check, (f"golden set: split parts' mAP50 {s:.3f} < the whole model's {w:.3f} - "
                   f"{rule.max_split_map50_drop:.3f}")


def decide(rule: GateRule, golden_candidate: Scored, golden_production: Scored,
           new_candidate: Scored | None = None, new_production: Scored | None = None,
           golden_split: Scored | None = None) -> GateResult:
    """``golden_split``: the candidate's split parts on the golden set (a split candidate), checked
    against the candidate's whole model (``max_split_map50_drop``)."""
    reasons: list[str] = []
    checks: list[dict[str, Any]] = []
    for name, base in golden_production.recall_at_operating.items():
        if base is None:
            continue
        cand = golden_candidate.recall_at_operating.get(name)
        ok = cand is not None and cand >= base - rule.max_recall_drop - 1e-12
        checks.append({"check": "golden recall", "class": name, "candidate": cand, "production": base,
                       "limit": round(base - rule.max_recall_drop, 6), "ok": ok})
        if not ok:
            reasons.append(f"golden set: recall of {name!r} {0.0 if cand is None else cand:.3f} < "
                           f"production {base:.3f} - {rule.max_recall_drop:.3f}")
    for extra in (_false_alarm_check(rule, golden_candidate, golden_production),
                  _split_check(rule, golden_candidate, golden_split)):
        if extra is not None:
            check, reason = extra
            checks.append(check)
            if not check["ok"]:
                reasons.append(reason)
    if new_candidate is not None and new_production is not None:
        gain = new_candidate.report.map50 - new_production.report.map50
        ok = gain > rule.min_new_data_gain
        checks.append({"check": "new data mAP50 gain", "candidate": new_candidate.report.map50,
                       "production": new_production.report.map50, "gain": gain, "limit": rule.min_new_data_gain,
                       "ok": ok})
        if not ok:
            reasons.append(f"new data: mAP50 {new_candidate.report.map50:.3f} does not beat production "
                           f"{new_production.report.map50:.3f} by more than {rule.min_new_data_gain:.3f}")
    elif new_candidate is not None or new_production is not None:
        raise ValueError("score the new data with both models or with neither")
    return GateResult(not reasons, reasons, checks)


def _plots(out: Path, golden_candidate: Scored, golden_production: Scored) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (title, s) in zip(axes, (("candidate", golden_candidate), ("production", golden_production)),
                              strict=True):
        labels = [*s.names, "background"]
        ax.imshow(np.log1p(s.confusion), cmap="Blues")
        for (i, j), v in np.ndenumerate(s.confusion):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}: golden set at conf {s.operating_conf:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=100)
    plt.close(fig)
    written.append("confusion.png")
    fig, ax = plt.subplots(figsize=(7, 5))
    for style, (title, s) in (("-", ("candidate", golden_candidate)), (":", ("production", golden_production))):
        if s.curves is None:
            continue
        for row, cls in enumerate(s.curves.unique_classes):
            ax.plot(s.curves.r_curve[row], s.curves.p_curve[row], style, color=f"C{int(cls) % 10}",
                    label=f"{title} {s.names[int(cls)]}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=6, loc="lower left")
    ax.set_title("golden set: precision-recall per class (solid: candidate, dotted: production)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "pr_curves.png", dpi=100)
    plt.close(fig)
    written.append("pr_curves.png")
    return written


def write_report(out: Path, result: GateResult, *, candidate: str, production: str, golden_fingerprint: str,
                 golden: tuple[Scored, Scored], new: tuple[Scored, Scored] | None = None,
                 rule: GateRule | None = None, plots: bool = True, golden_split: Scored | None = None) -> Path:
    """``out/gate.json`` (and the PNGs); returns the JSON's path."""
    out.mkdir(parents=True, exist_ok=True)
    files = _plots(out, *golden) if plots else []
    doc = {"candidate": candidate, "production": production, "passed": result.passed, "reasons": result.reasons,
           "checks": result.checks, "rule": asdict(rule or GateRule()), "golden_fingerprint": golden_fingerprint,
           "golden": {"candidate": golden[0].to_dict(), "production": golden[1].to_dict(),
                      "candidate_split": None if golden_split is None else golden_split.to_dict()},
           "new_data": None if new is None else {"candidate": new[0].to_dict(), "production": new[1].to_dict()},
           "files": files}
    path = out / "gate.json"
    atomic_write_bytes(path, (json.dumps(doc, indent=1, default=float) + "\n").encode())
    return path
