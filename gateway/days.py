"""Days with data: what the clinic bills device supply on (health-devices.md §10).

The rule, per patient: the distinct calendar days, in the patient's time zone (hub.timezone),
on which at least one valid reading was *measured* (not received: a backlog downloaded on day N
does not make day N a day with data), counted in 30-day periods anchored at the patient's
enrolment date (the earliest `enrolled` of their bindings, else the day the hub first saw the
binding). A reading sent again counts once (the outbox keeps one row per reading); readings a
device filed under another user slot or "unknown user" are no patient's and never count.
16 days or more in a period supports CPT 99454; 2 to 15 days the 2026 code 99445.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.outbox import Outbox
    from gateway.pairings import Pairings

PERIOD_DAYS = 30
DAYS_FOR_99454 = 16
DAYS_FOR_99445 = 2


@dataclass(frozen=True)
class Period:
    """One 30-day period, both ends included."""

    start: dt.date
    end: dt.date

    def __contains__(self, day: object) -> bool:
        return isinstance(day, dt.date) and self.start <= day <= self.end


def period_on(enrolled: dt.date, today: dt.date) -> Period:
    """The period that contains `today` (the first one while enrolment is still ahead)."""
    index = max(0, (today - enrolled).days) // PERIOD_DAYS
    start = enrolled + dt.timedelta(days=index * PERIOD_DAYS)
    return Period(start, start + dt.timedelta(days=PERIOD_DAYS - 1))


@dataclass(frozen=True)
class DaysWithData:
    """One patient's count in the current period."""

    days: tuple[str, ...]  # the local dates (YYYY-MM-DD) with data, in order
    period: Period
    today: dt.date

    @property
    def count(self) -> int:
        """How many days with data so far in this period."""
        return len(self.days)

    @property
    def days_left(self) -> int:
        """Days of the period after today (0 on its last day)."""
        return max(0, (self.period.end - self.today).days)

    @property
    def code(self) -> str | None:
        """The device-supply code the count supports so far, if any."""
        if self.count >= DAYS_FOR_99454:
            return "99454"
        if self.count >= DAYS_FOR_99445:
            return "99445"
        return None

    def words(self) -> str:
        """As a nurse reads it: "9 of 16 days, 12 days left in period"."""
        left = "last day of period" if self.days_left == 0 else (
            f"{self.days_left} day{'s' if self.days_left != 1 else ''} left in period")
        return f"{self.count} of {DAYS_FOR_99454} days, {left}"

    def as_dict(self) -> dict[str, object]:
        """For the status message."""
        return {
            "days": self.count,
            "needed": DAYS_FOR_99454,
            "period_start": self.period.start.isoformat(),
            "period_end": self.period.end.isoformat(),
            "days_left": self.days_left,
            "code": self.code,
            "summary": self.words(),
        }


async def current_days(
    pairings: Pairings, outbox: Outbox | None, today: dt.date
) -> dict[str, dict[str, object]]:
    """Per patient: days with data in the period containing `today` (the status's field).

    Records today as the first-seen day of bindings that have none (see gateway.pairings).
    No outbox yet (a hub that never stored a reading): every count is 0.
    """
    from gateway.pairings import enrolled_on  # noqa: PLC0415 (the rule above stays import-light)

    store = pairings.registry
    if store is not None:
        store.ensure(pairings.addresses(), today)
    anchors: dict[str, dt.date] = {}
    for bound in pairings.all():
        day = enrolled_on(bound.binding, store, today)
        patient = bound.binding.patient_id
        anchors[patient] = min(day, anchors.get(patient, day))
    result: dict[str, dict[str, object]] = {}
    for patient, enrolled in sorted(anchors.items()):
        period = period_on(enrolled, today)
        days = [] if outbox is None else await outbox.days_with_data(
            patient, period.start.isoformat(), period.end.isoformat())
        result[patient] = DaysWithData(tuple(days), period, today).as_dict()
    return result
