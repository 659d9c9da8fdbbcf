"""The staged training recipe: which presets run, with what share of the hours, from which weights.

Training itself is exercised by test_export (the `ci` preset on a tiny dataset); here the stage
logic runs with a stand-in for one stage's training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from models.train import PRESETS, RECIPES, TrainResult, train_recipe


def fake_stage(calls: list[dict[str, Any]]) -> Any:
    def fn(data_yaml: Path, preset: str, hours: float | None, weights: Path | None, **kw: Any) -> TrainResult:
        calls.append({"preset": preset, "hours": hours, "weights": weights, **kw})
        return TrainResult(Path(f"runs/{preset}/best.pt"), Path(f"runs/{preset}"), PRESETS[preset], {})
    return fn


@pytest.mark.parametrize(
    ("preset", "hours", "stages", "weights", "expected"),
    [
        ("default", 0.25, None, None,
         [("default", 0.13, None), ("default-finetune", 0.12, "runs/default/best.pt")]),
        ("default", None, None, None,
         [("default", None, None), ("default-finetune", None, "runs/default/best.pt")]),
        ("default", 0.25, ["default-finetune"], "stage1.pt", [("default-finetune", 0.12, "stage1.pt")]),
        ("ci", 0.1, None, None, [("ci", 0.1, None)]),
    ],
)
def test_recipe_stages(preset: str, hours: float | None, stages: list[str] | None, weights: str | None,
                       expected: list[tuple[str, float | None, str | None]]) -> None:
    calls: list[dict[str, Any]] = []
    results = train_recipe(Path("data.yaml"), preset=preset, hours=hours, stages=stages,
                           weights=Path(weights) if weights else None, train_fn=fake_stage(calls), device="0")
    got = [(c["preset"], None if c["hours"] is None else round(c["hours"], 2),
            str(c["weights"]) if c["weights"] else None) for c in calls]
    assert got == expected
    assert all(c["device"] == "0" for c in calls)
    assert results[-1].checkpoint == Path(f"runs/{expected[-1][0]}/best.pt")


def test_recipe_shares_add_up_and_name_real_presets() -> None:
    for name, plan in RECIPES.items():
        assert sum(share for _, share in plan) == pytest.approx(1.0), name
        assert all(stage in PRESETS for stage, _ in plan)


def test_unknown_stage_is_an_error() -> None:
    with pytest.raises(ValueError, match="not in recipe 'default'"):
        train_recipe(Path("d.yaml"), preset="default", stages=["nope"], train_fn=fake_stage([]))
