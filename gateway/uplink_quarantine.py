"""What the uplink remembers about the readings it quarantined: how many, when they are due again.

The outbox holds a quarantined row back until its retry time; the drain, whose cursor has moved
past it, must come back for it. These due times tell the drain when (one sweep every
``retry_s`` besides, for rows quarantined before the agent started). Logging is one WARNING,
then at most one line per ``LOG_EVERY_S`` with a count: an ACL that refuses the readings topic
quarantines every reading.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time

LOG_EVERY_S = 60.0
"""Quarantined readings are logged one at WARNING, then at most one line this often."""

# The outbox keeps its own (wall) clock for when a row is due: come back a little later, so a
# sweep does not arrive a moment too early and miss the row.
_MARGIN_S = 0.5


class QuarantineBook:
    """The count of readings quarantined by this uplink, and when the drain should look again."""

    def __init__(self, retry_s: float, logger: logging.Logger) -> None:
        self._retry_s = retry_s
        self._log = logger
        self.count = 0
        self.changed = asyncio.Event()  # set when a reading is quarantined
        self._due = [time.monotonic() + retry_s]  # heap, never empty: the periodic sweep
        self._logged_at = -LOG_EVERY_S
        self._logged_count = 0

    def record(self, seq: int, reason: str, *, new: bool = True) -> None:
        """A reading was quarantined in the outbox (seq and reason only: no patient data).

        `new`: it was not quarantined before; a retry refused again only schedules the next.
        """
        heapq.heappush(self._due, time.monotonic() + self._retry_s + _MARGIN_S)
        self.changed.set()
        if not new:
            self._log.debug("uplink: reading seq %d refused again (%s)", seq, reason)
            return
        self.count += 1
        now = time.monotonic()
        if now - self._logged_at < LOG_EVERY_S:
            self._log.debug("uplink: reading seq %d quarantined (%s)", seq, reason)
            return
        more = self.count - self._logged_count - 1
        self._log.warning(
            "uplink: reading seq %d quarantined (%s); offered again in %.0fs%s",
            seq, reason, self._retry_s,
            f" ({more} more quarantined since the last report)" if more else "",
        )
        self._logged_at, self._logged_count = now, self.count

    def due_in(self) -> float:
        """Seconds until the drain should look for quarantined readings again (<= 0: now)."""
        return self._due[0] - time.monotonic()

    def swept(self) -> None:
        """The drain went back to the lowest seq: forget the due times that have passed."""
        now = time.monotonic()
        while self._due and self._due[0] <= now:
            heapq.heappop(self._due)
        if not self._due:
            heapq.heappush(self._due, now + self._retry_s)
