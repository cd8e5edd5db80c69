"""The device clock offset measured at connection: unbiased for a clock that is right."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from drivers.standard_profile import clock_offset_s

T0 = dt.datetime(2026, 12, 2, 12, 0, 0)


def test_a_whole_second_clock_read_late_in_its_second() -> None:
    # The read went out at .800 and came back at 1.000; the device said 12:00:00.
    before, after = T0 + dt.timedelta(seconds=0.8), T0 + dt.timedelta(seconds=1.0)
    assert clock_offset_s(T0, 1.0, before, after) == 0.5 - 0.9


@given(sent=st.floats(0, 10), round_trip=st.floats(0, 0.3), at=st.floats(0, 1),
       step=st.sampled_from([1.0, 1 / 256]))
def test_a_right_clock_is_never_off_by_more_than_half_its_step_and_the_round_trip(
    sent: float, round_trip: float, at: float, step: float
) -> None:
    before = T0 + dt.timedelta(seconds=sent)
    after = before + dt.timedelta(seconds=round_trip)
    # The device, exactly right, read its clock somewhere in the round trip and truncated it.
    true = sent + at * round_trip
    shown = T0 + dt.timedelta(seconds=true // step * step)
    bound = round_trip / 2 + step / 2 + 1e-6  # timedelta keeps microseconds
    assert abs(clock_offset_s(shown, step, before, after)) <= bound
