"""The radio recovery ladder as pure logic: a clock value in, the step due out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ble.recovery import RecoveryLadder, Step

SILENCE = 300.0
MAX = 6 * 3600.0
ALL = [Step.RESTART_DISCOVERY, Step.POWER_CYCLE, Step.RESTART_BLUETOOTH]


def ladder(restart_bluetooth: bool = True, max_interval_s: float = MAX) -> RecoveryLadder:
    return RecoveryLadder(SILENCE, max_interval_s=max_interval_s,
                          restart_bluetooth=restart_bluetooth, now=0.0)


def due(r: RecoveryLadder, now: float, *, bindings: bool = True, session: bool = False) -> Step | None:
    return r.due(now, has_bindings=bindings, session_active=session)


def take(r: RecoveryLadder, now: float, ok: bool = True) -> Step:
    step = due(r, now)
    assert step is not None, f"nothing due at {now}"
    r.done(step, ok, now)
    return step


def test_nothing_is_due_before_a_silent_period() -> None:
    r = ladder()
    assert due(r, SILENCE - 0.1) is None
    assert due(r, SILENCE) is Step.RESTART_DISCOVERY


def test_one_step_per_further_silent_period_up_the_ladder() -> None:
    r = ladder()
    assert take(r, 300) is Step.RESTART_DISCOVERY
    assert due(r, 599) is None
    assert take(r, 600) is Step.POWER_CYCLE
    assert take(r, 900) is Step.RESTART_BLUETOOTH
    assert r.steps_taken == 3 and r.climb_steps == 3
    assert r.current_step is Step.RESTART_BLUETOOTH


def test_after_the_top_the_ladder_starts_again_with_doubling_waits_capped() -> None:
    r = ladder(max_interval_s=2000)
    for t in (300, 600, 900):
        take(r, t)
    assert due(r, 900 + 599) is None  # not another 300 s: 600
    assert take(r, 1500) is Step.RESTART_DISCOVERY
    assert due(r, 1500 + 1199) is None
    assert take(r, 2700) is Step.POWER_CYCLE
    assert take(r, 2700 + 2000) is Step.RESTART_BLUETOOTH  # capped at 2000 (not 2400)
    assert r.interval_s == 2000


def test_without_the_bluetoothd_restart_the_top_is_the_power_cycle() -> None:
    r = ladder(restart_bluetooth=False)
    assert [take(r, t) for t in (300, 600)] == [Step.RESTART_DISCOVERY, Step.POWER_CYCLE]
    assert due(r, 900) is None  # backing off already
    assert take(r, 1200) is Step.RESTART_DISCOVERY


def test_an_advert_resets_the_ladder_and_names_the_step_that_helped() -> None:
    r = ladder()
    assert r.on_advert(10) is None  # healthy: nothing to report
    take(r, 310)
    take(r, 610)
    assert r.on_advert(700) is Step.POWER_CYCLE
    assert r.recovered_steps == 2 and r.recovered_after_s == pytest.approx(690)
    assert not r.climbing and r.current_step is None
    assert due(r, 999) is None
    assert due(r, 1000) is Step.RESTART_DISCOVERY  # from the bottom, a full period later


def test_an_advert_during_a_step_is_reported_by_done() -> None:
    r = ladder()
    step = due(r, 300)
    assert step is Step.RESTART_DISCOVERY
    assert r.on_advert(300.5) is None  # the step is still running: "recovered" follows it
    assert r.done(step, True, 301) is Step.RESTART_DISCOVERY
    assert not r.climbing
    assert due(r, 600) is None and due(r, 600.5) is Step.RESTART_DISCOVERY


def test_a_failed_step_is_counted_and_the_ladder_goes_on() -> None:
    r = ladder()
    take(r, 300)
    take(r, 600)
    assert take(r, 900, ok=False) is Step.RESTART_BLUETOOTH
    assert r.steps_failed == 1 and r.last_step_ok is False
    assert take(r, 1500) is Step.RESTART_DISCOVERY


def test_no_step_while_a_session_is_active_it_waits_for_its_end() -> None:
    r = ladder()
    take(r, 300)
    assert due(r, 600, session=True) is None
    assert due(r, 650, session=True) is None
    assert due(r, 651) is Step.POWER_CYCLE


def test_no_step_without_bindings_and_silence_counts_from_when_there_are() -> None:
    r = ladder()
    for t in range(0, 2001, 10):
        assert due(r, t, bindings=False) is None
    assert due(r, 2000 + SILENCE - 1) is None
    assert due(r, 2000 + SILENCE) is Step.RESTART_DISCOVERY


def test_losing_the_bindings_mid_climb_starts_over() -> None:
    r = ladder()
    take(r, 300)
    assert due(r, 400, bindings=False) is None
    assert not r.climbing
    assert due(r, 699) is None and due(r, 700) is Step.RESTART_DISCOVERY


def test_only_one_step_at_a_time() -> None:
    r = ladder()
    step = due(r, 300)
    assert step is not None
    assert due(r, 10_000) is None
    with pytest.raises(ValueError, match="not the step in progress"):
        r.done(Step.POWER_CYCLE, True, 301)


def test_silence_must_be_positive() -> None:
    with pytest.raises(ValueError, match="silence_s"):
        RecoveryLadder(0, max_interval_s=10, now=0)


# Events the ladder can see: an advert, a check (with/without bindings or a session) and how
# long a step takes to perform (0-120 s) and whether it works.
_event = st.one_of(
    st.tuples(st.just("advert"), st.floats(0, 2000)),
    st.tuples(st.just("tick"), st.floats(0, 2000), st.booleans(), st.booleans(),
              st.floats(0, 120), st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(_event, max_size=120), restart_bluetooth=st.booleans(),
       max_interval=st.floats(SILENCE, 50_000))
def test_property_no_step_twice_within_the_silence_and_backed_off_after_the_top(
    events: list[tuple[object, ...]], restart_bluetooth: bool, max_interval: float
) -> None:
    r = RecoveryLadder(SILENCE, max_interval_s=max_interval, restart_bluetooth=restart_bluetooth,
                       now=0.0)
    now = 0.0
    starts: list[float] = []
    topped = False
    last_end: float | None = None
    for event in events:
        now += float(event[1])  # type: ignore[arg-type]
        if event[0] == "advert":
            r.on_advert(now)
            topped, last_end = False, None
            continue
        _, _, bindings, session, duration, ok = event
        step = r.due(now, has_bindings=bool(bindings), session_active=bool(session))
        if not bindings:
            topped, last_end = False, None
        if step is None:
            continue
        assert not session and bindings
        if starts:
            assert now - starts[-1] >= SILENCE, "two steps within scan_silence_s"
        if topped and last_end is not None:
            assert now - last_end >= min(SILENCE * 2, max_interval) - 1e-6
        starts.append(now)
        now += float(duration)  # type: ignore[arg-type]
        helped = r.done(step, bool(ok), now)
        assert helped is None  # no advert arrived during the step in this model
        last_end = now
        if step is r.steps[-1]:
            topped = True


@settings(max_examples=200, deadline=None)
@given(durations=st.lists(st.floats(0, 600), min_size=1, max_size=40),
       max_interval=st.floats(SILENCE, 50_000))
def test_property_the_interval_never_shrinks_after_the_top_until_an_advert(
    durations: list[float], max_interval: float
) -> None:
    r = RecoveryLadder(SILENCE, max_interval_s=max_interval, now=0.0)
    now = 0.0
    seen_top = False
    previous = 0.0
    for d in durations:
        now = r.next_at
        step = r.due(now, has_bindings=True, session_active=False)
        assert step is not None
        now += d
        r.done(step, False, now)
        if seen_top:
            assert r.interval_s >= previous
            assert r.next_at - now >= previous - 1e-6  # the wait actually scheduled
        if step is r.steps[-1]:
            seen_top = True
        previous = r.interval_s
        assert SILENCE <= r.interval_s <= max(max_interval, SILENCE)
    r.on_advert(now + 1)
    assert r.interval_s == SILENCE and not r.climbing
