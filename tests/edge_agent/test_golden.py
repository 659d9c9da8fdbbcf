import json
from pathlib import Path

import pytest

from edge_agent.golden import Tolerance, compare_results, read_results


def _frame(i: int, *dets: tuple[str, float, list[float]]) -> dict:
    return {"frame": i, "pts": i / 30, "detections": [{"cls": c, "score": s, "box": b} for c, s, b in dets]}


BOX = [100.0, 100.0, 150.0, 140.0]
NEAR = [101.0, 100.5, 150.5, 140.0]  # IoU ~0.95 with BOX
FAR = [300.0, 300.0, 350.0, 340.0]
TOL = Tolerance(iou=0.85, score=0.05, conf=0.25)


@pytest.mark.parametrize(
    ("actual", "golden", "ok", "problem"),
    [
        ([_frame(0, ("dent", 0.9, BOX))], [_frame(0, ("dent", 0.9, BOX))], True, None),
        ([_frame(0, ("dent", 0.88, NEAR))], [_frame(0, ("dent", 0.9, BOX))], True, None),
        ([_frame(0, ("dent", 0.70, BOX))], [_frame(0, ("dent", 0.9, BOX))], False, "score 0.700, golden 0.900"),
        ([_frame(0, ("crack", 0.9, BOX))], [_frame(0, ("dent", 0.9, BOX))], False, "missing dent"),
        ([_frame(0, ("dent", 0.9, FAR))], [_frame(0, ("dent", 0.9, BOX))], False, "missing dent"),
        ([_frame(0, ("dent", 0.9, BOX), ("stain", 0.8, FAR))], [_frame(0, ("dent", 0.9, BOX))], False, "extra stain"),
        # borderline detections near the threshold may flicker between runtimes
        ([_frame(0, ("dent", 0.9, BOX), ("stain", 0.27, FAR))], [_frame(0, ("dent", 0.9, BOX))], True, None),
        ([_frame(0)], [_frame(0, ("stain", 0.26, FAR))], True, None),
        ([_frame(0), _frame(1)], [_frame(0)], False, "frame count differs"),
        ([_frame(1)], [_frame(0)], False, "frame index 1"),
    ],
)
def test_compare_results(actual: list, golden: list, ok: bool, problem: str | None) -> None:
    diff = compare_results(actual, golden, TOL)
    assert diff.ok is ok, diff.summary()
    if problem:
        assert any(problem in p for p in diff.problems), diff.problems


def test_read_results_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_frame(0)) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"r\.jsonl:2: not JSON"):
        read_results(path)
