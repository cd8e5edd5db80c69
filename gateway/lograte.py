"""Log a condition once when it starts or changes, then rarely: floods wear out the SD card.

A device that two drivers claim, a radio that is gone, a session that fails the same way every
few seconds: the first line (with its advice) is what a technician needs; repeats go to debug,
with a reminder at the original level every few minutes saying how often it happened.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

REMIND_S = 600.0
"""A condition that persists is logged again at its own level this often, with a count."""


@dataclass
class _State:
    state: str
    since_remind: float
    repeats: int = 0


class StateLog:
    """Per-key last state; `warning`/`error` log at their level only on a change or a reminder."""

    def __init__(self, logger: logging.Logger, *, remind_s: float = REMIND_S) -> None:
        self._log = logger
        self._remind_s = remind_s
        self._states: dict[str, _State] = {}

    def warning(self, key: str, state: str, msg: str, *args: object) -> bool:
        """Log at WARNING if `key` entered `state`; True when it was a change."""
        return self._emit(logging.WARNING, key, state, msg, args)

    def error(self, key: str, state: str, msg: str, *args: object) -> bool:
        """Log at ERROR if `key` entered `state`; True when it was a change."""
        return self._emit(logging.ERROR, key, state, msg, args)

    def clear(self, key: str) -> None:
        """The condition for `key` is over; the next one is logged in full again."""
        self._states.pop(key, None)

    def _emit(self, level: int, key: str, state: str, msg: str, args: tuple[object, ...]) -> bool:
        now = time.monotonic()
        current = self._states.get(key)
        if current is None or current.state != state:
            self._states[key] = _State(state, now)
            self._log.log(level, msg, *args)
            return True
        current.repeats += 1
        if now - current.since_remind >= self._remind_s:
            self._log.log(level, msg + " (still so; %d times since the last report)",
                          *args, current.repeats)
            current.since_remind, current.repeats = now, 0
        else:
            self._log.debug(msg, *args)
        return False
