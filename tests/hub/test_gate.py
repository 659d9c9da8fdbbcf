"""The evaluation gate: per-class recall at the operating threshold, confusion matrix, the rule,
and the report. Predictors are oracles that read the image index from the pixels, so every
expected number is known exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from hub.gate import (
    GateRule,
    decide,
    fingerprint,
    map_classes,
    score,
    score_detections,
    score_model_detections,
    write_report,
)
from models.dataset_io import load_dataset
from models.detections import Detections
from models.evaluate import predict_split

NAMES = ["scratch", "crack", "dent"]
# per image (index = pixel value): true boxes (cls, x1, y1, x2, y2) in a 200x100 image
TRUTH = {i: [(i % 3, 10.0 + i, 10.0, 60.0 + i, 50.0), ((i + 1) % 3, 120.0, 40.0, 180.0, 90.0)] for i in range(1, 10)}


def write(root: Path, truth: dict[int, list[tuple[float, ...]]] = TRUTH) -> Path:
    for d in ("images/val", "labels/val"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i, boxes in truth.items():
        cv2.imwrite(str(root / "images/val" / f"im{i:02d}.png"), np.full((100, 200, 3), i, np.uint8))
        lines = [f"{c} {(x1 + x2) / 400:.6f} {(y1 + y2) / 200:.6f} {(x2 - x1) / 200:.6f} {(y2 - y1) / 100:.6f}"
                 for c, x1, y1, x2, y2 in boxes]
        (root / "labels/val" / f"im{i:02d}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"path": str(root), "val": "images/val",
                                                    "names": dict(enumerate(NAMES))}))
    return root


def oracle(drop: set[tuple[int, int]] = frozenset(), relabel: dict[tuple[int, int], int] | None = None,
           extra: set[int] = frozenset(), score_of: float = 0.9, extra_class: int = 0) -> Any:
    """Predicts the truth, except boxes ``(image, box index)`` in ``drop`` (missed), ``relabel``
    (wrong class) and one extra false box (class ``extra_class``) on images in ``extra``."""
    relabel = relabel or {}

    def predict(frames: list[np.ndarray], **_: Any) -> list[Detections]:
        out = []
        for f in frames:
            i = int(f[0, 0, 0])
            rows = [(relabel.get((i, k), c), *box) for k, (c, *box) in enumerate(TRUTH[i]) if (i, k) not in drop]
            if i in extra:
                rows.append((extra_class, 150.0, 2.0, 195.0, 20.0))
            arr = np.array(rows, np.float32).reshape(-1, 5)
            out.append(Detections(arr[:, 1:], np.full(len(arr), score_of, np.float32), arr[:, 0].astype(np.int32)))
        return out

    return predict


@pytest.fixture
def golden(tmp_path: Path) -> Any:
    return load_dataset(write(tmp_path / "golden"))


def test_recall_and_confusion_are_exact(golden: Any) -> None:
    # image 3: box 0 is class 0 -> missed; image 4: box 0 (class 1) predicted as dent; image 5: one false box
    s = score(oracle(drop={(3, 0)}, relabel={(4, 0): 2}, extra={5}), golden, "val", operating_conf=0.25)
    n = {c: sum(b[0] == c for boxes in TRUTH.values() for b in boxes) for c in range(3)}
    assert s.recall_at_operating == {"scratch": (n[0] - 1) / n[0], "crack": (n[1] - 1) / n[1], "dent": 1.0}
    cm = s.confusion
    assert cm.shape == (4, 4) and cm.sum() == sum(map(len, TRUTH.values())) + 1
    assert cm[0, 3] == 1 and cm[1, 2] == 1 and cm[3, 0] == 1  # missed, confused, false alarm
    assert np.trace(cm) == sum(map(len, TRUTH.values())) - 2


def test_detections_under_the_operating_threshold_do_not_count(golden: Any) -> None:
    s = score(oracle(score_of=0.2), golden, "val", operating_conf=0.25)
    assert set(s.recall_at_operating.values()) == {0.0}
    assert s.report.map50 > 0.99  # mAP is threshold-free


@pytest.mark.parametrize(("candidate", "passed", "reason"), [
    (oracle(), True, None),
    (oracle(drop={(3, 0)}), False, "recall of 'scratch'"),         # one of 6 scratches: -16.7 points
    (oracle(relabel={(4, 0): 2}), False, "recall of 'crack'"),
    (oracle(extra={1, 2, 3}), True, None),                          # false alarms do not lower recall
])
def test_golden_recall_rule(golden: Any, candidate: Any, passed: bool, reason: str | None) -> None:
    prod = score(oracle(), golden, "val", 0.25)
    result = decide(GateRule(), score(candidate, golden, "val", 0.25), prod)
    assert result.passed is passed
    assert all(c["check"] == "golden recall" for c in result.checks) and len(result.checks) == 3
    if reason:
        assert any(reason in r for r in result.reasons), result.reasons


def _with_parts(root: Path) -> Path:
    """Sidecars: per image one defective part under each true box and one good part (top right)
    where ``oracle(extra=...)`` puts its false box."""
    (root / "parts/val").mkdir(parents=True)
    for i in TRUTH:
        parts = [{"box": [0, 0, 110, 60], "product": "bracket", "defective": True, "visible": 1.0},
                 {"box": [110, 35, 200, 100], "product": "bracket", "defective": True, "visible": 1.0},
                 {"box": [140, 0, 200, 30], "product": "bracket", "defective": False, "visible": 1.0}]
        (root / "parts/val" / f"im{i:02d}.json").write_text(json.dumps({"parts": parts}))
    return root


@pytest.mark.parametrize(("extra", "rise", "passed"), [
    (set(), 0.01, True),
    ({1}, 0.01, False),       # 1 of 9 good parts alarmed: +11.1 points
    ({1}, 0.12, True),
    ({1, 2, 3}, None, True),  # not checked
])
def test_golden_false_alarm_rule(tmp_path: Path, extra: set[int], rise: float | None, passed: bool) -> None:
    golden = load_dataset(_with_parts(write(tmp_path / "golden")))
    prod = score(oracle(), golden, "val", 0.25)
    cand = score(oracle(extra=extra), golden, "val", 0.25)
    result = decide(GateRule(max_false_alarm_rise=rise), cand, prod)
    assert result.passed is passed, result.reasons
    far = [c for c in result.checks if c["check"] == "golden part false alarms"]
    assert len(far) == (0 if rise is None else 1)
    if far:
        assert far[0]["n_good"] == 9 and far[0]["production"] == 0.0
        assert far[0]["candidate"] == pytest.approx(len(extra) / 9)
    if not passed:
        assert any("part false alarms" in r for r in result.reasons)


@pytest.mark.parametrize("model_names", [[*NAMES, "porosity"], ["porosity", *NAMES]])
def test_a_class_the_golden_set_lacks_is_scored_not_dropped(tmp_path: Path, model_names: list[str]) -> None:
    """A candidate that learned porosity calls one true crack porosity, boxes another crack as both
    crack and porosity, and puts a porosity box on a good part: the confusion matrix shows one
    crack -> porosity (the crack found as crack is found) and the part false alarm counts; mAP and
    the old classes' recall are what they are with those boxes dropped."""
    golden = load_dataset(_with_parts(write(tmp_path / "golden")))
    p = len(NAMES)  # porosity's id in the dataset's order, as the oracle emits it
    dets = predict_split(oracle(relabel={(4, 0): p}, extra={1}, extra_class=p), golden.split("val"), conf=0.001)
    to_model = {i: model_names.index(n) for i, n in enumerate([*NAMES, "porosity"])}
    # image 7's crack (box 0) is found as crack and boxed as porosity too, the porosity box first
    i7 = [s.image_path.stem for s in golden.split("val")].index("im07")
    d7 = dets[i7]
    dets[i7] = Detections(np.vstack([d7.boxes[:1], d7.boxes]), np.concatenate([[0.95], d7.scores]).astype(np.float32),
                          np.concatenate([[p], d7.class_ids]).astype(np.int32))
    for d in dets:  # into the model's own class ids
        d.class_ids[:] = [to_model[int(c)] for c in d.class_ids]
    kept = score_model_detections(golden, "val", dets, model_names, 0.25)
    dropped = score_detections(golden, "val", map_classes(dets, model_names, NAMES), 0.25)
    assert kept.names == [*NAMES, "porosity"] and kept.confusion.shape == (5, 5) and dropped.confusion.shape == (4, 4)
    assert kept.confusion[1, p] == 1 and kept.confusion[1, 4] == 0   # crack called porosity, not missed
    assert dropped.confusion[1, 3] == 1                                # the same box, dropped: a miss
    assert kept.confusion[4, p] == 2        # the porosity box on a good part, and image 7's second box
    assert kept.recall_at_operating["porosity"] is None
    assert {k: kept.recall_at_operating[k] for k in NAMES} == dropped.recall_at_operating
    assert kept.report.map50 == dropped.report.map50
    assert kept.report.part_level["false_alarms"] == 1 and dropped.report.part_level["false_alarms"] == 0
    result = decide(GateRule(), kept, score(oracle(), golden, "val", 0.25))
    assert not result.passed
    assert any("recall of 'crack'" in r for r in result.reasons)
    assert any("part false alarms" in r for r in result.reasons)


# 18 true boxes; the split parts miss `missed` of them
@pytest.mark.parametrize(("missed", "drop", "passed"), [
    (set(), 0.01, True),
    ({(3, 0)}, 0.01, False),     # one box of 18 missed: between 1 and 6 points
    ({(3, 0)}, 0.06, True),
    ({(3, 0), (4, 0)}, None, True),  # not checked
])
def test_split_parts_rule(golden: Any, missed: set[tuple[int, int]], drop: float | None, passed: bool) -> None:
    whole = score(oracle(), golden, "val", 0.25)
    split = score(oracle(drop=missed), golden, "val", 0.25)
    result = decide(GateRule(max_split_map50_drop=drop), whole, whole, golden_split=split)
    assert result.passed is passed, result.reasons
    checks = [c for c in result.checks if c["check"] == "golden split mAP50"]
    assert len(checks) == (0 if drop is None else 1)
    if checks:
        assert checks[0]["whole_model"] == whole.report.map50 and checks[0]["candidate"] == split.report.map50
        assert (checks[0]["candidate"] < whole.report.map50) is bool(missed)
    if not passed:
        assert any("split parts' mAP50" in r for r in result.reasons)
    unsplit = decide(GateRule(max_split_map50_drop=drop), whole, whole)  # an unsplit candidate: no check
    assert unsplit.passed and not any(c["check"] == "golden split mAP50" for c in unsplit.checks)


def test_recall_drop_within_the_rule_passes(golden: Any) -> None:
    prod = score(oracle(), golden, "val", 0.25)
    cand = score(oracle(drop={(3, 0)}), golden, "val", 0.25)
    assert decide(GateRule(max_recall_drop=0.17), cand, prod).passed
    assert not decide(GateRule(max_recall_drop=0.16), cand, prod).passed


def test_new_data_must_improve(golden: Any, tmp_path: Path) -> None:
    new = load_dataset(write(tmp_path / "new"))
    prod_g, cand_g = score(oracle(), golden, "val", 0.25), score(oracle(), golden, "val", 0.25)
    worse = score(oracle(drop={(i, 1) for i in range(1, 10)}), new, "val", 0.25)  # production misses half
    better = score(oracle(), new, "val", 0.25)
    ok = decide(GateRule(), cand_g, prod_g, better, worse)
    assert ok.passed and ok.checks[-1]["check"] == "new data mAP50 gain" and ok.checks[-1]["gain"] > 0.3
    same = decide(GateRule(), cand_g, prod_g, better, better)
    assert not same.passed and "does not beat production" in same.reasons[0]
    with pytest.raises(ValueError, match="both models or with neither"):
        decide(GateRule(), cand_g, prod_g, better, None)


def test_report_files(golden: Any, tmp_path: Path) -> None:
    prod, cand = score(oracle(), golden, "val", 0.25), score(oracle(drop={(3, 0)}), golden, "val", 0.25)
    result = decide(GateRule(), cand, prod)
    fp = fingerprint(Path(golden.root))
    path = write_report(tmp_path / "report", result, candidate="1.3.0", production="1.2.0", golden_fingerprint=fp,
                        golden=(cand, prod), rule=GateRule(), golden_split=cand)
    doc = json.loads(path.read_text())
    assert doc["golden"]["candidate_split"]["map50"] == cand.report.map50
    assert doc["rule"]["max_split_map50_drop"] == 0.01
    assert doc["passed"] is False and doc["candidate"] == "1.3.0" and doc["golden_fingerprint"] == fp
    assert doc["golden"]["candidate"]["confusion"][0][3] == 1
    for name in ("confusion.png", "pr_curves.png"):
        img = cv2.imread(str(tmp_path / "report" / name))
        assert img is not None and img.shape[0] > 100 and img.std() > 1  # a picture, not a blank


def test_fingerprint_follows_the_golden_set(tmp_path: Path) -> None:
    root = write(tmp_path / "g")
    a = fingerprint(root)
    assert fingerprint(root) == a
    (root / "labels/val/im01.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    assert fingerprint(root) != a
