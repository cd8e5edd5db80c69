"""One connection to one paired device: connect with retry, let its driver talk, commit readings."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bleak import BleakClient
from bleak.backends.device import BLEDevice
from bleak.exc import BleakError
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from drivers.base import ClockCheck, DeviceInfo, Driver, Measurement, StorageUnavailableError
from gateway.ble.errors import BondLostError, SessionDeadlineError, SessionError, classify
from gateway.ble.radio import Radio
from gateway.config import RadioConfig

__all__ = ["MeasurementHandler", "SessionContext", "SessionError", "SessionStats", "run_session"]

log = logging.getLogger(__name__)


@dataclass
class SessionStats:
    """What one session did, for status and logs."""

    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    clock: ClockCheck | None = None
    info: DeviceInfo = field(default_factory=DeviceInfo)


MeasurementHandler = Callable[[Measurement, "SessionContext"], Awaitable[None]]


class SessionContext:
    """The driver's hooks for one connection, and what they learnt."""

    def __init__(self, cfg: RadioConfig, *, zone_now: Callable[[], dt.datetime],
                 clock_trusted: Callable[[], bool], on_reject: Callable[[str, bytes, str], None],
                 known_info: DeviceInfo | None = None,
                 storage_blocked: Callable[[], Awaitable[str | None]] | None = None,
                 on_commit: Callable[[float], None] | None = None,
                 on_commit_failed: Callable[[str, BaseException], None] | None = None,
                 address: str = "device") -> None:
        self.link_lost = asyncio.Event()
        self.address = address  # names the device in its log lines
        # Identifies this connection for readings that carry no time stamp or sequence
        # (timebase.reading_id); set when the link comes up.
        self.connection_id = ""
        self._occurrences: dict[tuple[str, bytes], int] = {}
        self._storage_blocked = storage_blocked
        self._on_commit = on_commit
        self._on_commit_failed = on_commit_failed
        self.known_info = known_info
        self.op_timeout_s = cfg.operation_timeout_s
        self.quiet_s = cfg.quiet_s
        self.stats = SessionStats()
        self._zone_now = zone_now
        self._clock_trusted = clock_trusted
        self._on_reject = on_reject

    def device_info(self, info: DeviceInfo) -> None:
        """Keep the identity strings for every reading of this connection."""
        self.stats.info = info

    def clock(self, check: ClockCheck) -> None:
        """Keep the clock offset found at connection."""
        self.stats.clock = check
        if check.offset_s is not None and abs(check.offset_s) > 60:
            log.warning("%s: device clock was %+.0f s off%s", self.address, check.offset_s,
                        "; set" if check.set_ok else "; could not set it")

    def rejected(self, characteristic: str, raw: bytes, reason: str) -> None:
        """Count a value that did not decode; its bytes only at debug level."""
        self.stats.rejected += 1
        self._on_reject(characteristic, raw, reason)

    def hub_clock_trusted(self) -> bool:
        """Whether the hub may set device clocks."""
        return self._clock_trusted()

    def local_now(self) -> dt.datetime:
        """Hub local wall-clock time, naive, as devices show it."""
        return self._zone_now()

    async def storage_blocked(self) -> str | None:
        """Why readings cannot be stored now, or None."""
        return None if self._storage_blocked is None else await self._storage_blocked()

    def committed(self, window_s: float) -> None:
        """Report one commit window (notification callback to commit returned)."""
        if self._on_commit is not None:
            self._on_commit(window_s)

    def commit_failed(self, characteristic: str, error: BaseException) -> None:
        """A confirmed value was given up after every retry."""
        if self._on_commit_failed is not None:
            self._on_commit_failed(characteristic, error)

    def occurrence(self, characteristic: str, raw: bytes) -> int:
        """How many identical values came before this one on this connection (0 for the first)."""
        key = (characteristic, raw)
        n = self._occurrences.get(key, 0)
        self._occurrences[key] = n + 1
        return n


async def run_session(
    radio: Radio,
    device: BLEDevice,
    driver: Driver,
    cfg: RadioConfig,
    ctx: SessionContext,
    handle: MeasurementHandler,
) -> SessionStats:
    """Connect (with retries), run the driver under a hard deadline, always disconnect."""

    async def sink(m: Measurement) -> None:
        await handle(m, ctx)

    address = device.address.upper()
    connected = False
    deadline = asyncio.timeout(cfg.session_timeout_s)
    try:
        async with deadline:
            client = await _connect(radio, device, cfg, ctx)
            connected = True
            ctx.connection_id = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
            try:
                # Asked again once connected (the disk may have filled meanwhile) and before
                # the driver sets the device clock: a clock set now but its records left on the
                # device would date them by the wrong offset at the next session.
                blocked = await ctx.storage_blocked()
                if blocked is not None:
                    raise StorageUnavailableError(blocked)
                await driver.collect(client, sink, ctx)
            finally:
                with contextlib.suppress(BleakError, TimeoutError, OSError):
                    async with asyncio.timeout(cfg.operation_timeout_s):
                        await client.disconnect()
    except TimeoutError as e:
        if deadline.expired():
            raise SessionDeadlineError(address, "session deadline passed") from e
        raise classify(address, e, connected=connected) from e
    except BleakError as e:
        raise classify(address, e, connected=connected) from e
    return ctx.stats


def _transient(e: BaseException) -> bool:
    """Worth another connection attempt: not a refused bond (retrying only drains the battery)."""
    return isinstance(e, BleakError | TimeoutError) and not isinstance(
        classify("", e, connected=False), BondLostError)


async def _connect(radio: Radio, device: BLEDevice, cfg: RadioConfig, ctx: SessionContext) -> BleakClient:
    def lost(_: BleakClient) -> None:
        ctx.link_lost.set()

    async for attempt in AsyncRetrying(
        stop=stop_after_attempt(cfg.connect_attempts),
        wait=wait_random_exponential(multiplier=0.25, max=4.0),
        # A refused bond is not transient: retrying only drains the device's battery.
        retry=retry_if_exception(_transient),
        reraise=True,
    ):
        with attempt:
            ctx.link_lost.clear()
            client = radio.client(device, lost, cfg.connect_timeout_s)
            async with asyncio.timeout(cfg.connect_timeout_s + 5):
                await client.connect()
            return client
    raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover
