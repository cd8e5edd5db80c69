"""The uplink's view of the broker: a state for the status payload, and logs that do not flood.

One line per change of state; while a broker stays unreachable, a reminder at most every
``REMIND_S`` with the number of attempts, and debug lines otherwise. A connection that keeps
dropping right after it was made is reported once per ``REMIND_S`` too. Refused or unreadable
credentials log one ERROR when they start (they are retried rarely; every retry is at debug).
"""

from __future__ import annotations

import enum
import logging
import random
import time
from datetime import UTC, datetime

REMIND_S = 300.0
"""A broker that stays unreachable is reported again at WARNING this often, with a count."""


class BrokerState(enum.StrEnum):
    """The connection to the broker, as the status payload reports it."""

    CONNECTED = "connected"
    CONNECTING = "connecting"  # starting, or the connection was just lost: no failed attempt yet
    UNREACHABLE = "unreachable"  # attempts fail: network, TLS, no CONNACK, a refusal
    AUTH_REFUSED = "auth_refused"  # CONNACK: bad user name or password / not authorized
    CREDENTIALS_UNREADABLE = "credentials_unreadable"  # a password/CA/cert file cannot be used


# States that a retry at the normal rate cannot fix: the next attempt waits auth_retry_s.
SLOW_STATES = frozenset({BrokerState.AUTH_REFUSED, BrokerState.CREDENTIALS_UNREADABLE})


def backoff(attempt: int, lo: float, hi: float) -> float:
    """Full jitter: uniform between ``lo`` and ``min(hi, lo * 2**attempt)``."""
    # Hubs that lost the broker together do not all come back in the same second.
    cap = min(hi, lo * 2.0 ** min(attempt, 32))
    return random.uniform(lo, max(lo, cap))


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class BrokerHealth:
    """The broker connection's state since when, its last error, and the log lines it deserves."""

    def __init__(self, where: str, logger: logging.Logger, *, remind_s: float = REMIND_S) -> None:
        self._where = where
        self._log = logger
        self._remind_s = remind_s
        self.state = BrokerState.CONNECTING
        self.since = _now_iso()
        # Kept after a recovery: the status then says why the hub was last cut off.
        self.last_error: str | None = None
        self._reminded_at = time.monotonic()
        self._repeats = 0
        self._flapping = False
        self._lost_logged_at = -remind_s
        self._lost_repeats = 0

    def _enter(self, state: BrokerState) -> bool:
        if state is self.state:
            return False
        self.state = state
        self.since = _now_iso()
        self._reminded_at = time.monotonic()
        self._repeats = 0
        return True

    def connected(self, protocol: str, tls: bool) -> None:
        """A CONNACK accepted the connection."""
        self._enter(BrokerState.CONNECTED)
        level = logging.DEBUG if self._flapping else logging.INFO
        self._log.log(
            level, "uplink connected to %s (MQTT %s%s)", self._where, protocol, ", TLS" if tls else ""
        )

    def lost(self, error: str, retry_in: float, *, stable: bool) -> None:
        """An established connection ended; ``stable``: it had lasted a while."""
        self.last_error = error
        self._enter(BrokerState.CONNECTING)
        now = time.monotonic()
        # A connection dropped right after CONNACK again and again (a broker that refuses a
        # reading for now, a flaky link): the first drop is news, the next ones are not.
        self._flapping = not stable and now - self._lost_logged_at < self._remind_s
        if self._flapping:
            self._lost_repeats += 1
            self._log.debug("uplink to %s: %s; reconnecting in %.1fs", self._where, error, retry_in)
            return
        again = f" ({self._lost_repeats} more drops since the last report)" if self._lost_repeats else ""
        self._log.warning(
            "uplink to %s: %s; reconnecting in %.1fs%s", self._where, error, retry_in, again
        )
        self._lost_logged_at, self._lost_repeats = now, 0

    def failed(self, state: BrokerState, error: str, retry_in: float) -> None:
        """A connection attempt failed; ``state`` says how."""
        self.last_error = error
        changed = self._enter(state)
        level = logging.ERROR if state in SLOW_STATES else logging.WARNING
        if changed:
            self._log.log(
                level, "uplink to %s: %s (%s); retrying in %.1fs",
                self._where, error, state.value, retry_in,
            )
            return
        self._repeats += 1
        now = time.monotonic()
        if state is BrokerState.UNREACHABLE and now - self._reminded_at >= self._remind_s:
            self._log.warning(
                "uplink to %s: still unreachable, %d failed attempts in %.0fs; last: %s; "
                "retrying in %.1fs",
                self._where, self._repeats, now - self._reminded_at, error, retry_in,
            )
            self._reminded_at, self._repeats = now, 0
        else:
            self._log.debug("uplink to %s: %s; retrying in %.1fs", self._where, error, retry_in)
