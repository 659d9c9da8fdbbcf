"""Cron expressions for the hub's scheduled work (the weekly retraining, issue 6).

Five fields, as crontab(5): ``minute hour day-of-month month day-of-week``. Each field is ``*``, a
number, a range ``a-b``, a list ``a,b,c`` of those, and any of them with a step ``/n``. Day of
week is 0-7 (0 and 7 are Sunday) or ``mon``..``sun``; months 1-12 or ``jan``..``dec``. As in
cron, when both day-of-month and day-of-week are restricted a day matching either one fires.
Times are evaluated in the zone of the ``datetime`` given (the hub passes UTC unless configured).

    >>> s = CronSchedule.parse("0 2 * * mon")       # Mondays at 02:00
    >>> s.next_after(datetime(2026, 11, 23, 2, 0, tzinfo=UTC))
    datetime.datetime(2026, 11, 30, 2, 0, tzinfo=datetime.timezone.utc)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta  # noqa: F401  (UTC: the doctest)

__all__ = ["CronError", "CronSchedule"]

_NAMES = {
    4: {n: i + 1 for i, n in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov",
                                        "dec"])},
    5: {n: i for i, n in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])},
}
_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
_FIELDS = ["minute", "hour", "day of month", "month", "day of week"]


class CronError(ValueError):
    """An expression that is not five valid cron fields; the message names the field."""


def _value(text: str, index: int) -> int:
    names = _NAMES.get(index + 1, {})
    if text.lower() in names:
        return names[text.lower()]
    if not text.isdigit():
        raise CronError(f"{_FIELDS[index]}: {text!r} is not a number")
    lo, hi = _RANGES[index]
    v = int(text)
    if not lo <= v <= hi:
        raise CronError(f"{_FIELDS[index]}: {v} is outside {lo}-{hi}")
    return v


def _field(text: str, index: int) -> frozenset[int]:
    lo, hi = _RANGES[index]
    out: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) < 1:
                raise CronError(f"{_FIELDS[index]}: step {step_text!r} must be a positive number")
            step = int(step_text)
        if base == "*":
            start, end = lo, hi
        elif "-" in base:
            a, _, b = base.partition("-")
            start, end = _value(a, index), _value(b, index)
            if start > end:
                raise CronError(f"{_FIELDS[index]}: range {base!r} runs backwards")
        else:
            start = _value(base, index)
            end = hi if step_text else start
        out.update(range(start, end + 1, step))
    if index == 4 and 7 in out:  # Sunday is 0 and 7
        out = (out - {7}) | {0}
    return frozenset(out)


@dataclass(frozen=True)
class CronSchedule:
    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        parts = expression.split()
        if len(parts) != 5:
            raise CronError(f"{expression!r}: expected 5 fields (minute hour day-of-month month day-of-week), "
                            f"got {len(parts)}")
        mi, ho, da, mo, wd = (_field(p, i) for i, p in enumerate(parts))
        return cls(expression, mi, ho, da, mo, wd, days_restricted=parts[2] != "*",
                   weekdays_restricted=parts[4] != "*")

    def matches(self, t: datetime) -> bool:
        if t.minute not in self.minutes or t.hour not in self.hours or t.month not in self.months:
            return False
        day_ok, wday_ok = t.day in self.days, (t.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return day_ok or wday_ok
        return day_ok and wday_ok

    def next_after(self, t: datetime) -> datetime:
        """The first whole minute strictly after ``t`` that matches (searches up to 5 years)."""
        cur = t.replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = cur + timedelta(days=366 * 5)
        while cur < limit:
            if cur.month not in self.months:  # skip to the next month's first minute
                cur = (cur.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
                continue
            day_ok = self.matches(cur.replace(hour=min(self.hours), minute=min(self.minutes)))
            if not day_ok:
                cur = cur.replace(hour=0, minute=0) + timedelta(days=1)
                continue
            if cur.hour not in self.hours:
                cur = cur.replace(minute=0) + timedelta(hours=1)
                continue
            if cur.minute in self.minutes:
                return cur
            cur += timedelta(minutes=1)
        raise CronError(f"{self.expression!r} never fires (within 5 years)")
