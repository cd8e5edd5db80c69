"""The conversation every SIG health-profile device shares (health-devices.md §8.5 item 3).

connect (done by the session) → identity from Device Information → read the device clock,
record its offset, set it → subscribe to measurement indications → hand each decoded
measurement to the sink (which commits it) → stop when the device leaves or goes quiet.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bleak.exc import BleakError, BleakGATTProtocolError, BleakGATTProtocolErrorCode

from drivers import uuids
from drivers.base import (
    ClockCheck,
    DeviceInfo,
    Kind,
    Measurement,
    MeasurementSink,
    SessionHooks,
)
from drivers.codec.date_time import (
    CurrentTime,
    DateTime,
    decode_current_time,
    decode_date_time,
    encode_current_time,
    encode_date_time,
)
from drivers.codec.device_info import decode_battery_level, decode_string, decode_system_id
from drivers.codec.errors import DecodeError

if TYPE_CHECKING:
    from bleak import BleakClient
    from bleak.backends.characteristic import BleakGATTCharacteristic
    from bleak.backends.device import BLEDevice
    from bleak.backends.scanner import AdvertisementData

log = logging.getLogger(__name__)

# Identity and clock are nice to have: a device that refuses one still measures, so ATT errors
# and bad bytes there are logged and passed over. A timeout is not: after an ATT transaction
# timeout the bearer is dead (Core Vol 3 Part F §3.3.3), so it ends the session, which then
# says the device stopped answering instead of waiting out every read until the deadline.

# A failed commit of a confirmed value is retried after these pauses (s) before it is given up:
# about 20 s, longer than SQLite's 5 s busy timeout and a transient I/O error.
COMMIT_RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# The longest a session's end waits for its commits in flight.
SETTLE_LIMIT_S = 60.0

# A set clock that reads back further off than this was not really set (hass-omron #190).
CLOCK_SET_TOLERANCE_S = 5.0
# Bonding is a few round trips plus the device's own confirmation.
PAIRING_TIMEOUT_FACTOR = 3

_INFO_FIELDS: tuple[tuple[str, int, Callable[[bytes], Any]], ...] = (
    ("manufacturer", uuids.MANUFACTURER_NAME, decode_string),
    ("model", uuids.MODEL_NUMBER, decode_string),
    ("serial", uuids.SERIAL_NUMBER, decode_string),
    ("firmware", uuids.FIRMWARE_REVISION, decode_string),
    ("system_id", uuids.SYSTEM_ID, decode_system_id),
    ("battery_level", uuids.BATTERY_LEVEL, decode_battery_level),  # keep last: read every time
)

_AUTH_CODES = {
    BleakGATTProtocolErrorCode.INSUFFICIENT_AUTHENTICATION,
    BleakGATTProtocolErrorCode.INSUFFICIENT_ENCRYPTION,
    BleakGATTProtocolErrorCode.INSUFFICIENT_ENCRYPTION_KEY_SIZE,
}


def needs_pairing(err: BaseException) -> bool:
    """Whether a GATT error means the link must be encrypted (bonded) first."""
    if isinstance(err, BleakGATTProtocolError):
        return err.code in _AUTH_CODES
    # BlueZ: "[org.bluez.Error.NotPermitted] Not paired" (bleak leaves it a BleakDBusError). An
    # AuthenticationFailed is a pairing that already failed: pairing again would not help.
    if getattr(err, "dbus_error", None) == "org.bluez.Error.NotPermitted":
        return "not paired" in str(err).lower()
    text = str(err).lower()
    return any(w in text for w in (
        "insufficient authentication", "insufficient encryption", "not paired"))


def clock_offset_s(device_time: dt.datetime, step_s: float, before: dt.datetime,
                   after: dt.datetime) -> float:
    """Device clock minus hub clock, from a clock read sent at `before` and answered at `after`.

    The device read its clock at some moment of the round trip and cut it to its step (1 s for
    Date Time, 1/256 s for CTS): the best guess is the middle of both, else a clock just set
    reads about half a second slow, and a technician sees "-1 s".
    """
    midpoint = before + (after - before) / 2
    return (device_time - midpoint).total_seconds() + step_s / 2


@dataclass(frozen=True)
class StandardProfileDriver:
    """A SIG profile device: matched by its service UUID, read through indications.

    Timeouts come from the session (`hooks.op_timeout_s`, `hooks.quiet_s`: the radio config),
    because bleak's BlueZ backend puts none on reads and writes (hass-omron #110).
    """

    name: str
    version: str
    service: int
    measurement: int
    decode: Callable[[bytes], Measurement]
    kind: Kind  # what its readings are (the payload's `kind`)

    def matches(self, device: BLEDevice, adv: AdvertisementData) -> bool:
        """True when the advertisement lists this profile's service."""
        return uuids.full(self.service) in {u.lower() for u in adv.service_uuids}

    async def collect(self, client: BleakClient, sink: MeasurementSink, hooks: SessionHooks) -> None:
        """One connection: identity, clock, then measurements until the device is done."""
        hooks.device_info(await self._device_info(client, hooks))
        # Clock before subscribing: the subscription is what makes many devices start sending
        # (A&D sample, health-devices.md §2.5 gateway rule).
        hooks.clock(await self._clock(client, hooks))
        await self._subscribe_and_drain(client, sink, hooks)

    async def identify(self, client: BleakClient, hooks: SessionHooks) -> DeviceInfo:
        """Device Information and battery (drivers.base.Provisioning)."""
        return await self._device_info(client, hooks)

    async def check_clock(self, client: BleakClient, hooks: SessionHooks) -> ClockCheck:
        """Read the clock and set it when the hub clock is trusted (drivers.base.Provisioning)."""
        return await self._clock(client, hooks)

    # -- identity ---------------------------------------------------------------------------

    @staticmethod
    async def _read(client: BleakClient, uuid16: int, hooks: SessionHooks) -> bytes | None:
        if client.services.get_characteristic(uuids.full(uuid16)) is None:
            return None
        async with asyncio.timeout(hooks.op_timeout_s):
            return bytes(await client.read_gatt_char(uuids.full(uuid16)))

    async def _device_info(self, client: BleakClient, hooks: SessionHooks) -> DeviceInfo:
        # Some devices switch off soon after connecting (A&D "E 10", health-devices.md §8.1):
        # identity strings are read once per device; only the battery is read every time.
        known = hooks.known_info
        wanted = _INFO_FIELDS if known is None else _INFO_FIELDS[-1:]
        fields: dict[str, Any] = {} if known is None else dataclasses.asdict(known)
        for key, uuid16, decode in wanted:
            try:
                raw = await self._read(client, uuid16, hooks)
                fields[key] = None if raw is None else decode(raw)
            except (BleakError, DecodeError) as e:
                log.debug("device information 0x%04x unreadable: %s", uuid16, e)
                fields[key] = None
        return DeviceInfo(**fields)

    # -- clock ------------------------------------------------------------------------------

    async def _read_clock(
        self, client: BleakClient, hooks: SessionHooks, *, use_cts: bool
    ) -> tuple[dt.datetime | None, float | None]:
        """The device clock (CTS or Date Time) and its offset from the hub's local clock;
        None, None if absent or unknown (year 0)."""
        before = hooks.local_now()
        raw = await self._read(client, uuids.CURRENT_TIME if use_cts else uuids.DATE_TIME, hooks)
        after = hooks.local_now()
        if raw is None:
            return None, None
        if use_cts:
            cts = decode_current_time(raw)
            device_time = cts.date_time.to_datetime()
            # Most devices keep whole seconds and send fractions 0; a device that keeps
            # fractions sends 0 one time in 256, and is then taken for one that does not.
            step_s = 1 / 256 if cts.fractions256 else 1.0
            if device_time is not None:
                device_time += dt.timedelta(seconds=cts.fractions256 / 256)
        else:
            device_time, step_s = decode_date_time(raw).to_datetime(), 1.0
        if device_time is None:
            return None, None
        return device_time, clock_offset_s(device_time, step_s, before, after)

    async def _clock(self, client: BleakClient, hooks: SessionHooks) -> ClockCheck:
        device_time: dt.datetime | None = None
        offset: float | None = None
        has_cts = client.services.get_characteristic(uuids.full(uuids.CURRENT_TIME)) is not None
        has_dt = client.services.get_characteristic(uuids.full(uuids.DATE_TIME)) is not None
        try:
            device_time, offset = await self._read_clock(client, hooks, use_cts=has_cts)
        except (BleakError, DecodeError) as e:
            log.debug("device clock unreadable: %s", e)
        set_ok = False
        if (has_cts or has_dt) and hooks.hub_clock_trusted():
            set_ok = await self._set_clock(client, hooks, use_cts=has_cts)
        return ClockCheck(device_time=device_time, offset_s=offset, set_ok=set_ok)

    async def _set_clock(self, client: BleakClient, hooks: SessionHooks, *, use_cts: bool) -> bool:
        now = hooks.local_now()
        uuid16 = uuids.CURRENT_TIME if use_cts else uuids.DATE_TIME
        # The nearest whole second, not the one begun, and no fractions: most devices drop the
        # fractions, and would start up to a second behind the hub; this way every device
        # starts within half a second of it.
        nearest = (now + dt.timedelta(seconds=0.5)).replace(microsecond=0)
        value = (encode_current_time(CurrentTime.from_datetime(nearest)) if use_cts
                 else encode_date_time(DateTime.from_datetime(nearest)))
        try:
            async with asyncio.timeout(hooks.op_timeout_s):
                await client.write_gatt_char(uuids.full(uuid16), value, response=True)
            _, offset = await self._read_clock(client, hooks, use_cts=use_cts)
        except (BleakError, DecodeError) as e:
            log.info("device refused the clock write: %s", e)
            return False
        return offset is not None and abs(offset) <= CLOCK_SET_TOLERANCE_S

    # -- measurements -----------------------------------------------------------------------

    async def _subscribe_and_drain(
        self, client: BleakClient, sink: MeasurementSink, hooks: SessionHooks
    ) -> None:
        await subscribe_and_drain(client, ((self.measurement, self.decode),), sink, hooks)


Subscription = tuple[int, Callable[[bytes], Measurement]]
"""A measurement characteristic (16-bit UUID) and the pure decoder of its values."""


async def subscribe_and_drain(
    client: BleakClient, subscriptions: Sequence[Subscription], sink: MeasurementSink,
    hooks: SessionHooks,
) -> None:
    """Subscribe to every measurement characteristic and commit each value as it arrives.

    The stack confirms an indication before this code sees it, so the device may already have
    forgotten the record: the commit starts from the notification callback itself, one task
    per value, never queued behind the decoding or committing of others. Tasks start in arrival
    order and each reaches the outbox's single writer thread before its first suspension, so
    commit order is arrival order. The session ends when the device hangs up, goes quiet, or a
    commit fails (then at once: what the device has not sent yet stays in its memory).
    """
    loop = asyncio.get_running_loop()
    commits: set[asyncio.Task[None]] = set()
    activity = asyncio.Event()
    failed: list[BaseException] = []

    async def commit(decode: Callable[[bytes], Measurement], uuid16: int, data: bytes,
                     arrived: float) -> None:
        try:
            measurement = decode(data)
        except DecodeError as e:
            hooks.rejected(f"{uuid16:04x}", data, str(e))
            return
        # The device has let go of this value: a failed commit (a lock held past the busy
        # timeout, an I/O error) is retried, while the session ends at once so that the
        # device keeps the rest. Only after every retry is it given up, and reported.
        for delay in (*COMMIT_RETRY_S, None):
            try:
                await sink(measurement)
            except Exception as e:
                if not failed:
                    failed.append(e)
                    activity.set()
                if delay is None:
                    hooks.commit_failed(f"{uuid16:04x}", e)
                    return
                await asyncio.sleep(delay)
                continue
            hooks.committed(time.perf_counter() - arrived)
            return

    def callback(uuid16: int, decode: Callable[[bytes], Measurement]
                 ) -> Callable[[BleakGATTCharacteristic, bytearray], None]:
        def on_value(_: BleakGATTCharacteristic, data: bytearray) -> None:
            task = loop.create_task(commit(decode, uuid16, bytes(data), time.perf_counter()))
            commits.add(task)
            task.add_done_callback(commits.discard)
            activity.set()
        return on_value

    watch = loop.create_task(_wake_on(hooks.link_lost, activity))
    try:
        for uuid16, decode in subscriptions:
            await _start_notify(client, uuid16, callback(uuid16, decode), hooks)
        # Most devices hang up once they have sent everything (derdilla survey, obniz;
        # health-devices.md §8.4); for the others, silence ends the session.
        while not hooks.link_lost.is_set() and not failed:
            activity.clear()
            try:
                async with asyncio.timeout(hooks.quiet_s):
                    await activity.wait()
            except TimeoutError:
                break
    finally:
        watch.cancel()
        await _settle(commits)
    if failed:
        raise failed[0]


async def _wake_on(event: asyncio.Event, activity: asyncio.Event) -> None:
    await event.wait()
    activity.set()


async def _settle(tasks: set[asyncio.Task[None]]) -> None:
    """Wait for every commit in flight, even while being cancelled (their values were confirmed).

    Bounded: a store that hangs for good (a dead SD card) must not hold the agent's shutdown for
    ever; commits still running then go on by themselves and report their own outcome.
    """
    cancelled = False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_LIMIT_S
    while tasks and loop.time() < deadline:
        try:
            await asyncio.wait(set(tasks), timeout=max(0.0, deadline - loop.time()))
        except asyncio.CancelledError:
            cancelled = True
    if tasks:
        log.error("%d commit(s) still running after %.0f s; leaving them to finish",
                  len(tasks), SETTLE_LIMIT_S)
    if cancelled:
        raise asyncio.CancelledError


async def _start_notify(
    client: BleakClient, measurement: int,
    callback: Callable[[BleakGATTCharacteristic, bytearray], None], hooks: SessionHooks,
) -> None:
    target = uuids.full(measurement)
    try:
        async with asyncio.timeout(hooks.op_timeout_s):
            await client.start_notify(target, callback)
    except BleakError as e:
        if not needs_pairing(e):
            raise
        # The CCCD of a medical measurement usually needs an encrypted link (§6):
        # bond, then subscribe again.
        log.info("device requires bonding; pairing")
        async with asyncio.timeout(hooks.op_timeout_s * PAIRING_TIMEOUT_FACTOR):
            await client.pair()
        async with asyncio.timeout(hooks.op_timeout_s):
            await client.start_notify(target, callback)


@dataclass(frozen=True)
class CombinedDriver:
    """A device offering several supported SIG profiles: one conversation, every profile read.

    Identity and clock are read once; every part's measurement characteristic is subscribed.
    Readings carry the name of the part whose characteristic they came from (`part_for`).
    """

    parts: tuple[StandardProfileDriver, ...]

    @property
    def name(self) -> str:
        """The parts' names joined with '+'."""
        return "+".join(p.name for p in self.parts)

    @property
    def version(self) -> str:
        """The first part's version (each reading carries its own part's)."""
        return self.parts[0].version

    @property
    def kind(self) -> str:
        """The parts' kinds joined with '+'."""
        return "+".join(p.kind for p in self.parts)

    def matches(self, device: BLEDevice, adv: AdvertisementData) -> bool:
        """True when any part matches."""
        return any(p.matches(device, adv) for p in self.parts)

    def part_for(self, characteristic: str) -> StandardProfileDriver:
        """The part that reads `characteristic` (16-bit UUID as hex)."""
        for p in self.parts:
            if f"{p.measurement:04x}" == characteristic.lower():
                return p
        return self.parts[0]

    async def identify(self, client: BleakClient, hooks: SessionHooks) -> DeviceInfo:
        """Device Information and battery, once for the device."""
        return await self.parts[0].identify(client, hooks)

    async def check_clock(self, client: BleakClient, hooks: SessionHooks) -> ClockCheck:
        """The one device clock, read and set."""
        return await self.parts[0].check_clock(client, hooks)

    async def collect(self, client: BleakClient, sink: MeasurementSink, hooks: SessionHooks) -> None:
        """Identity and clock once, then every part's measurements."""
        first = self.parts[0]
        hooks.device_info(await first._device_info(client, hooks))
        hooks.clock(await first._clock(client, hooks))
        offered = [p for p in self.parts
                   if client.services.get_characteristic(uuids.full(p.measurement)) is not None]
        subs = [(p.measurement, p.decode) for p in offered or self.parts]
        await subscribe_and_drain(client, subs, sink, hooks)
