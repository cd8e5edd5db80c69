"""The radio recovery ladder: what to try, and when, when the hub hears no advertisement at all.

Pure logic, no I/O: the agent passes a monotonic clock value into every call, performs the step
it is handed and reports back. Modelled on Home Assistant's scanner watchdog (habluetooth: restart
the scanner when nothing was heard for a while) and bluetooth-auto-recovery (power-cycle the
adapter), with the last resort the hub has: restart bluetoothd.

* While the hub has paired devices and nothing at all was heard for `silence_s`, the next rung is
  due: restart discovery, then power-cycle the adapter, then restart bluetoothd (if allowed), one
  rung per further silent period.
* After the top rung the ladder starts again from the bottom, but every wait doubles (capped at
  `max_interval_s`): a hub in a genuinely quiet home is not power-cycled every few minutes for ever.
* Any advertisement resets the ladder; the step taken last is reported as the one that helped.
* No step while a device session is active (it waits for the session to end), and none while the
  hub has no paired device (the silence is then measured from when it has one again).
"""

from __future__ import annotations

import enum


class Step(enum.Enum):
    """One rung of the ladder; its value is the name used in events, logs and the status."""

    RESTART_DISCOVERY = "restart_discovery"
    POWER_CYCLE = "power_cycle"
    RESTART_BLUETOOTH = "restart_bluetooth"


class RecoveryLadder:
    """The ladder's state; feed it adverts and clock ticks, it says which step is due.

    ``on_advert(now)`` on every advertisement, ``due(now, ...)`` regularly; when it returns a
    step, perform it and call ``done(step, ok, now)``. All times are one monotonic clock, seconds.
    """

    def __init__(self, silence_s: float, *, max_interval_s: float, restart_bluetooth: bool = True,
                 now: float) -> None:
        if silence_s <= 0:
            raise ValueError("silence_s must be > 0")
        self.silence_s = float(silence_s)
        self.max_interval_s = max(float(max_interval_s), self.silence_s)
        self.steps: tuple[Step, ...] = (Step.RESTART_DISCOVERY, Step.POWER_CYCLE) + (
            (Step.RESTART_BLUETOOTH,) if restart_bluetooth else ())
        self.last_advert: float | None = None  # None: nothing heard yet
        self._watch_from = now  # silence counts from here at the earliest (start, no bindings)
        self.steps_taken = 0
        self.steps_failed = 0
        self.last_step: Step | None = None
        self.last_step_at: float | None = None  # when the last step started
        self.last_step_ok: bool | None = None
        self.climb_steps = 0  # steps taken since the last advertisement
        # Of the latest recovery: how long the radio had been silent, how many steps it took.
        self.recovered_after_s = 0.0
        self.recovered_steps = 0
        self._silent_since = now
        self._rung = 0  # index into self.steps of the next step
        self._interval = self.silence_s  # the wait after the step now climbed
        self._topped = False  # the top rung was reached since the last advertisement
        self._next_at = now + self.silence_s  # only meaningful while climbing
        self._pending: Step | None = None
        self._pending_since = 0.0
        self._heard_during_step = False

    # -- inputs ----------------------------------------------------------------------------------

    def on_advert(self, now: float) -> Step | None:
        """An advertisement arrived; returns the step that helped, if the ladder had climbed.

        Called for every advertisement: cheap when the radio is healthy. While a step is still
        running the answer comes from `done` instead (so "recovered" follows "step taken").
        """
        self.last_advert = now
        if self.climb_steps == 0 and self._pending is None:
            return None
        if self._pending is not None:
            self._heard_during_step = True
            return None
        helped = self.last_step
        self._recovered(now)
        return helped

    def due(self, now: float, *, has_bindings: bool, session_active: bool) -> Step | None:
        """The step to take now, or None; a returned step must be followed by `done`."""
        if self._pending is not None:
            return None
        if not has_bindings:
            # Nothing to read, nothing to recover for; silence counts from when there is.
            self._reset()
            self._watch_from = now
            return None
        if now < self.next_at or session_active:
            # A power cycle or a bluetoothd restart would cut the session; even restarting
            # discovery waits, since a connected device does not advertise.
            return None
        step = self.steps[self._rung]
        if self.climb_steps == 0:
            self._silent_since = now - self.silent_for(now)
        self._pending, self._pending_since = step, now
        self._heard_during_step = False
        self.last_step, self.last_step_at, self.last_step_ok = step, now, None
        return step

    def done(self, step: Step, ok: bool, now: float) -> Step | None:
        """The step handed out by `due` finished; returns it if an advert arrived meanwhile."""
        if step is not self._pending:
            raise ValueError(f"{step.value} was not the step in progress")
        self._pending = None
        self.steps_taken += 1
        self.climb_steps += 1
        self.last_step_ok = ok
        if not ok:
            self.steps_failed += 1
        if self._heard_during_step:
            self._heard_during_step = False
            self._recovered(self.last_advert if self.last_advert is not None else now)
            return step
        if self._rung == len(self.steps) - 1:
            self._topped = True
        if self._topped:
            self._interval = min(self._interval * 2.0, self.max_interval_s)
        self._rung = (self._rung + 1) % len(self.steps)
        self._next_at = now + self._interval
        return None

    # -- views -----------------------------------------------------------------------------------

    @property
    def next_at(self) -> float:
        """When the next step falls due (if the hub has paired devices and no session runs)."""
        if self.climb_steps == 0:
            heard = self._watch_from if self.last_advert is None else self.last_advert
            floor = max(heard, self._watch_from) + self.silence_s
            if self.last_step_at is not None:
                floor = max(floor, self.last_step_at + self.silence_s)
            return floor
        return self._next_at

    @property
    def climbing(self) -> bool:
        """True from the first step taken until the next advertisement."""
        return self.climb_steps > 0 or self._pending is not None

    @property
    def current_step(self) -> Step | None:
        """The step in progress, else the latest one since the last advertisement; None if none."""
        if self._pending is not None:
            return self._pending
        return self.last_step if self.climb_steps else None

    @property
    def pending(self) -> Step | None:
        """The step being performed now, if any."""
        return self._pending

    @property
    def interval_s(self) -> float:
        """The wait between the end of the step last taken and the next one."""
        return self._interval

    @property
    def next_step(self) -> Step:
        """The step `due` would hand out next."""
        return self.steps[self._rung]

    def silent_for(self, now: float) -> float:
        """Seconds without an advertisement (since the start if none was ever heard)."""
        heard = self._watch_from if self.last_advert is None else self.last_advert
        return max(0.0, now - heard)

    def _recovered(self, heard: float) -> None:
        self.recovered_after_s = max(0.0, heard - self._silent_since)
        self.recovered_steps = self.climb_steps
        self._reset()

    def _reset(self) -> None:
        self._rung = 0
        self._interval = self.silence_s
        self._topped = False
        self.climb_steps = 0
