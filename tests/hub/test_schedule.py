"""Cron expressions for the weekly retraining: next fire times and errors that name the field."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from hub.schedule import CronError, CronSchedule


def t(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(("expr", "after", "expected"), [
    ("0 2 * * mon", t(2026, 11, 23, 1, 59), t(2026, 11, 23, 2, 0)),   # 2026-11-23 is a Monday
    ("0 2 * * mon", t(2026, 11, 23, 2, 0), t(2026, 11, 30, 2, 0)),    # strictly after
    ("0 2 * * 1", t(2026, 11, 24, 0, 0), t(2026, 11, 30, 2, 0)),
    ("*/15 * * * *", t(2026, 11, 23, 10, 7, 30), t(2026, 11, 23, 10, 15)),
    ("30 23 31 12 *", t(2026, 1, 1), t(2026, 12, 31, 23, 30)),
    ("0 0 29 2 *", t(2026, 3, 1), t(2028, 2, 29, 0, 0)),               # the next leap day
    ("0 12 1 * sun", t(2026, 11, 23), t(2026, 11, 29, 12, 0)),         # day-of-month OR day-of-week
    ("0 12 1 * sun", t(2026, 11, 29, 12, 0), t(2026, 12, 1, 12, 0)),
    ("0 3 * * 7", t(2026, 11, 23), t(2026, 11, 29, 3, 0)),             # 7 is Sunday too
    ("5 4 * jan-mar/2 *", t(2026, 2, 1), t(2026, 3, 1, 4, 5)),
    ("0 9-17/4 * * mon-fri", t(2026, 11, 27, 17, 1), t(2026, 11, 30, 9, 0)),  # Friday evening -> Monday
])
def test_next_fire_time(expr: str, after: datetime, expected: datetime) -> None:
    s = CronSchedule.parse(expr)
    assert s.next_after(after) == expected
    assert s.matches(expected)


@pytest.mark.parametrize(("expr", "error"), [
    ("0 2 * *", "expected 5 fields"),
    ("60 2 * * *", "minute: 60 is outside 0-59"),
    ("0 24 * * *", "hour: 24 is outside 0-23"),
    ("0 2 0 * *", "day of month: 0 is outside 1-31"),
    ("0 2 * 13 *", "month: 13 is outside 1-12"),
    ("0 2 * * funday", "day of week: 'funday' is not a number"),
    ("*/0 * * * *", "minute: step '0' must be a positive number"),
    ("0 5-2 * * *", "hour: range '5-2' runs backwards"),
    ("0 0 30 2 *", "never fires"),
])
def test_bad_expressions_name_the_field(expr: str, error: str) -> None:
    with pytest.raises(CronError, match=error):
        CronSchedule.parse(expr).next_after(t(2026, 1, 1))


@pytest.mark.parametrize(("retrain", "error"), [
    ({"golden": "g", "schedule": "0 25 * * mon"}, r"retrain\.schedule.*hour: 25 is outside 0-23"),
    ({"golden": "g", "shedule": "0 2 * * mon"}, r"retrain\.shedule"),
    ({"schedule": "0 2 * * mon"}, r"retrain\.golden"),
    ({"golden": "g", "preset": "default"}, r"retrain\.preset"),
    ({"golden": "g", "max_recall_drop_points": -1}, r"retrain\.max_recall_drop_points"),
    ({"golden": "g", "calib_images": 4}, r"retrain\.calib_images"),
    ({"golden": "g", "score_workers": 0}, r"retrain\.score_workers"),
    ({"golden": "g", "split_retune_steps": -1}, r"retrain\.split_retune_steps"),
    ({"golden": "g", "max_split_map50_drop_points": -1}, r"retrain\.max_split_map50_drop_points"),
    ({"golden": "g", "preset": "retrain", "device": "cpu"}, r"retrain: preset 'retrain' with device 'cpu'"),
])
def test_retrain_config_errors_name_the_key(retrain: dict[str, object], error: str) -> None:
    from hub.core.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=error):
        build_config({"retrain": retrain})


def test_retrain_config_defaults() -> None:
    from hub.core.config import build_config

    rc = build_config({"retrain": {"golden": "g"}}).retrain
    assert rc is not None and rc.schedule == "0 2 * * mon" and rc.max_recall_drop_points == 1.0
    assert (rc.calib_images, rc.score_workers, rc.split_retune_steps) == (100, None, 200)
    assert (rc.preset, rc.max_split_map50_drop_points) == ("auto", 1.0)
    assert build_config({"retrain": {"golden": "g", "schedule": None}}).retrain.schedule is None  # type: ignore[union-attr]
