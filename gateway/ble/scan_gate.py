"""Scanning paused while connecting, for adapters that cannot do both at once.

Many controllers (and BlueZ on some of them) refuse an LE connection while discovery runs:
Connect answers "Operation already in progress" for as long as the scan goes on, so the device
is never read. Home Assistant's habluetooth stops scanning for the length of a connection on
such adapters; the gateway does the same, from the start when configured
(radio.pause_scan_to_connect) or from the first such refusal on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

log = logging.getLogger(__name__)

# How long a connection waits for the scanner to stop before it goes ahead anyway.
STOP_WAIT_S = 10.0
# Busy refusals of Connect while scanning, in a row, before scanning pauses for connections.
REFUSALS_TO_LEARN = 2


class ScanGate:
    """Counts connections that need the adapter to themselves; the scan loop obeys it."""

    def __init__(self, rescan: asyncio.Event, *, exclusive: bool = False) -> None:
        self._rescan = rescan  # set: the scan loop stops its scanner
        self.exclusive = exclusive
        self._holds = 0
        self._open = asyncio.Event()
        self._open.set()
        self._stopped = asyncio.Event()
        self._stopped.set()
        self._refusals = 0  # busy refusals of Connect while scanning, in a row

    @property
    def paused(self) -> bool:
        """Whether scanning is held off for a connection right now."""
        return self._holds > 0

    @property
    def scanning(self) -> bool:
        """Whether a scanner is running (or starting) right now."""
        return not self._stopped.is_set()

    def refused_while_scanning(self) -> bool:
        """A Connect was refused as busy while scanning; True when this makes it exclusive.

        Two refusals in a row are needed: a single "in progress" also comes from a connection
        attempt that was still pending, which pausing would not cure.
        """
        if self.exclusive:
            return False
        self._refusals += 1
        if self._refusals < REFUSALS_TO_LEARN:
            return False
        self.exclusive = True
        log.warning("the Bluetooth adapter refused a connection while scanning; from now on "
                    "scanning pauses during each connection")
        return True

    async def wait_open(self) -> None:
        """The scan loop waits here before it starts a scanner."""
        await self._open.wait()

    def connected_while_scanning(self) -> None:
        """A connection came up with the scanner on: the adapter can do both."""
        if self.scanning:
            self._refusals = 0

    def scanner_running(self, running: bool) -> None:
        """The scan loop reports its scanner starting (before start) or stopped."""
        if running:
            self._stopped.clear()
        else:
            self._stopped.set()

    @contextlib.asynccontextmanager
    async def connecting(self) -> AsyncIterator[None]:
        """Around a session: with an exclusive adapter, no scanning until it ends."""
        if not self.exclusive:
            yield
            return
        self._holds += 1
        self._open.clear()
        self._rescan.set()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_WAIT_S):
                    await self._stopped.wait()
            yield
        finally:
            self._holds -= 1
            if self._holds == 0:
                self._open.set()
