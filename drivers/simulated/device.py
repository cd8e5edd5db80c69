"""What every simulated health device shares: script, clock, standard services, connection loop.

A simulated device is a bumble GATT server on a VirtualRadio. It encodes its readings with the
same codec the driver decodes with (design.md §3, §4), advertises only while it has something
to send or is in pairing mode, sends its readings as indications once the hub subscribes, then
waits a moment and hangs up by itself, as real cuffs and scales do.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar
from zoneinfo import ZoneInfo

from bumble import hci
from bumble.att import ATT_Error, ErrorCode
from bumble.controller import Controller
from bumble.core import UUID, BaseBumbleError
from bumble.device import Connection, Device
from bumble.gatt import (
    GATT_CLIENT_CHARACTERISTIC_CONFIGURATION_DESCRIPTOR,
    Characteristic,
    CharacteristicValue,
    Descriptor,
    Service,
)
from bumble.pairing import PairingConfig, PairingDelegate

from drivers import uuids
from drivers.codec.date_time import (
    CURRENT_TIME_SIZE,
    DATE_TIME_SIZE,
    CurrentTime,
    DateTime,
    decode_current_time,
    decode_date_time,
    encode_current_time,
    encode_date_time,
)
from drivers.codec.device_info import encode_battery_level, encode_string, encode_system_id
from drivers.codec.errors import DecodeError
from gateway.sim.radio import Medium, make_device

log = logging.getLogger(__name__)

# One table of assigned numbers for both sides: the twin serves what the driver looks for.
DEVICE_INFORMATION_SERVICE = uuids.DEVICE_INFORMATION
BATTERY_SERVICE = uuids.BATTERY
CURRENT_TIME_SERVICE = uuids.CURRENT_TIME_SERVICE
MANUFACTURER_NAME = uuids.MANUFACTURER_NAME
MODEL_NUMBER = uuids.MODEL_NUMBER
SERIAL_NUMBER = uuids.SERIAL_NUMBER
HARDWARE_REVISION = uuids.HARDWARE_REVISION
FIRMWARE_REVISION = uuids.FIRMWARE_REVISION
SYSTEM_ID = uuids.SYSTEM_ID
BATTERY_LEVEL = uuids.BATTERY_LEVEL
CURRENT_TIME = uuids.CURRENT_TIME
DATE_TIME = uuids.DATE_TIME

# Core Vol 3 Part C §11: AD types, and flags "LE General Discoverable, BR/EDR not supported".
_AD_FLAGS, _AD_UUID16_COMPLETE, _AD_NAME_COMPLETE = 0x01, 0x03, 0x09
_AD_SERVICE_DATA16, _AD_MANUFACTURER = 0x16, 0xFF
_FLAGS_LE_GENERAL_NO_BREDR = 0x06
LEGACY_ADV_MAX = 31  # Core Vol 6 Part B §2.3.1.1

DEFAULT_ZONE = ZoneInfo("UTC")
"""The zone a simulated clock keeps unless told the hub's: UTC, as the hub config's default.

Never the machine's own zone: the hub measures drift against its configured zone, so a clock
set from the machine's zone would read hours off on a machine in another zone.
"""

OP_TIMEOUT_S = 10.0
"""Bound for one operation of a simulated device (an indication, a hang-up, a key store call)."""

R = TypeVar("R")
"""The codec type of a device's measurements (WeightMeasurement, BloodPressureMeasurement)."""

ClockMode = Literal["set", "year0", "epoch"]
"""How the device clock starts: hub time + offset, year 0 ("not known", §2.1), or an epoch."""

TimeService = Literal["cts", "date_time", "none"]
"""How the clock is exposed: Current Time 0x2A2B, A&D-style Date Time 0x2A08, or not at all."""

AttErrorTarget = Literal["info", "cccd"]
"""What a scripted ATT error answers: Device Information/Battery reads, measurement CCCD writes."""

SilentFrom = Literal["connect", "session"]
"""Where a never-answering device goes silent: from the link's start, or after discovery."""

PairingIo = Literal["none", "display_yes_no", "display_only"]
"""What the device has for pairing: nothing (Just Works), a display and a yes/no button
(numeric comparison), or a display only (it shows a passkey the hub must type)."""

SILENT_HOLD_S = 600.0
"""How long a never-answering device holds the link before hanging up (the hub should go first)."""

# Core Vol 3 Part F §3.4: what the hub's connection setup sends (MTU exchange and discovery).
# A device silent from "session" on answers these, then nothing the driver asks.
_SETUP_OPCODES = frozenset({0x02, 0x04, 0x06, 0x08, 0x10})


@dataclass
class SimScript(Generic[R]):
    """Everything a simulated device is and does; every field has a realistic default.

    `stored` items and `measure()` arguments are codec objects, encoded with the project's
    codec, or raw `bytes`, which are indicated exactly as given (garbage, vendor quirks).
    """

    address: str
    name: str
    manufacturer: str = "Simulated Health"
    model: str = "SIM-1"
    serial: str = "SN000001"
    hardware: str = "A"
    firmware: str = "1.0.0"
    system_id: str = "0102030405F0FFEE"  # 16 hex digits, over-the-air order (codec contract)
    battery_level: int = 90
    stored: list[R | bytes] = field(default_factory=list)
    resend_stored: bool = False  # True: every connection replays the whole memory
    clock: ClockMode = "set"
    clock_offset_s: float = 0.0  # "set": device clock = wall-clock time in `zone` + this
    zone: ZoneInfo = DEFAULT_ZONE  # the patient's (hub's) time zone the clock was set in
    clock_epoch: dt.datetime = dt.datetime(2000, 1, 1)  # "epoch": where the clock starts
    time_service: TimeService = "cts"
    clock_writable: bool = True
    bonding_required: bool = False  # measurement CCCDs need an encrypted link
    accept_pairing: bool = True
    # "display_yes_no": a display and a yes/no button, so pairing with a hub that also has
    # them is numeric comparison (MITM-protected) instead of Just Works.
    pairing_io: PairingIo = "none"
    drop_link_after: int | None = None  # once: drop the link after N indications
    quiet_s: float = 0.3  # idle time after the last indication before hanging up
    idle_timeout_s: float = 5.0  # how long to wait for the hub to subscribe before hanging up
    pairing_mode: bool = False  # advertise even with nothing to send
    advertising_interval_ms: float = 20.0
    rssi: int = -60
    manufacturer_data: dict[int, bytes] = field(default_factory=dict)
    service_data: dict[int, bytes] = field(default_factory=dict)  # 16-bit UUID -> data
    mtu: int = 247  # the largest ATT MTU the device accepts
    # Radio faults, each for the first N connections (0: never), then the device behaves.
    att_error_connections: int = 0  # answer `att_error_on` requests with `att_error_code`
    att_error_code: int = int(ErrorCode.UNLIKELY_ERROR)
    att_error_on: frozenset[AttErrorTarget] = frozenset({"info", "cccd"})
    never_answer_connections: int = 0  # accept the link, then answer no ATT request
    never_answer_from: SilentFrom = "session"
    forget_bond_after: int | None = None  # once: delete every bond after N connections


class SimClock:
    """The device's wall clock: starts per the script, runs at the hub's rate, can be set.

    Like a real device it keeps naive local time; "set" starts it at the wall-clock time in
    `zone` (the hub's zone, UTC by default) plus the offset.
    """

    def __init__(
        self,
        mode: ClockMode,
        offset_s: float = 0.0,
        epoch: dt.datetime | None = None,
        zone: ZoneInfo = DEFAULT_ZONE,
    ) -> None:
        self._origin = time.monotonic()
        self._value: dt.datetime | None  # None: year 0, only the time of day runs
        if mode == "set":
            local = dt.datetime.now(zone).replace(tzinfo=None)
            self._value = local + dt.timedelta(seconds=offset_s)
        elif mode == "epoch":
            self._value = epoch or dt.datetime(2000, 1, 1)
        else:
            self._value = None

    @property
    def is_set(self) -> bool:
        """False while the clock reports year 0 (never set)."""
        return self._value is not None

    def now(self) -> DateTime:
        """The current device time as the device would send it."""
        elapsed = time.monotonic() - self._origin
        if self._value is None:
            seconds = int(elapsed)
            return DateTime(0, 0, 0, seconds // 3600 % 24, seconds // 60 % 60, seconds % 60)
        return DateTime.from_datetime(self._value + dt.timedelta(seconds=elapsed))

    def now_datetime(self) -> dt.datetime | None:
        """The current device time as a naive datetime, or None while the date is unknown."""
        return self.now().to_datetime()

    def set(self, value: DateTime) -> None:
        """Set the clock (a date the device cannot represent leaves it at year 0)."""
        self._origin = time.monotonic()
        self._value = value.to_datetime()

    def current_time(self) -> CurrentTime:
        """The clock as a Current Time value (day of week 0 when the date is unknown)."""
        now = self.now()
        as_datetime = now.to_datetime()
        day_of_week = as_datetime.isoweekday() if as_datetime is not None else 0
        return CurrentTime(now, day_of_week, 0, 0)


@dataclass
class _Record(Generic[R]):
    """One frame in device memory and whether the hub has confirmed it."""

    frame: R | bytes
    payload: bytes
    index: int  # position in the device's memory
    delivered: bool = False


class DeviceObserver(Protocol):
    """Told what happens to a device's memory and links (the simulate command's ledger)."""

    def produced(self, address: str, index: int, payload: bytes) -> None:
        """A frame entered device memory at `index`."""
        ...

    def confirmed(self, address: str, index: int, payload: bytes) -> None:
        """The hub's ATT confirmation of the frame at `index` arrived."""
        ...

    def connected(self, address: str) -> None:
        """A hub connected."""
        ...

    def disconnected(self, address: str) -> None:
        """The hub's link is gone (either side)."""
        ...


class _Link(Generic[R]):
    """One connection from the hub and what happened on it."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.alive = True
        self.subscribed = asyncio.Event()  # measurement indications enabled on this link
        self.sent: list[_Record[R]] = []  # confirmed on this link, in order
        self.in_flight: _Record[R] | None = None  # indicated, confirmation not heard yet
        self.session: asyncio.Task[None] | None = None
        self.att_error = False  # scripted: answer info reads / CCCD writes with an ATT error
        self.silent: SilentFrom | None = None  # scripted: answer no ATT request (from where)


class _SimPairingDelegate(PairingDelegate):
    """Just Works (no input, no output) or numeric comparison, accepting or refusing per the script."""

    def __init__(self, accept: bool, io: PairingIo = "none") -> None:
        # No identity key: the device keeps its static address, and an IRK would make bumble's
        # central scan for a resolvable address before every reconnection.
        capabilities = {
            "none": PairingDelegate.IoCapability.NO_OUTPUT_NO_INPUT,
            "display_yes_no": PairingDelegate.IoCapability.DISPLAY_OUTPUT_AND_YES_NO_INPUT,
            "display_only": PairingDelegate.IoCapability.DISPLAY_OUTPUT_ONLY,
        }
        super().__init__(
            io_capability=capabilities[io],
            local_responder_key_distribution=(
                PairingDelegate.KeyDistribution.DISTRIBUTE_ENCRYPTION_KEY
            ),
        )
        self._accept = accept
        self.compared: list[int] = []  # the six-digit numbers shown, one per numeric comparison
        self.shown: list[int] = []  # the passkeys displayed for the hub to type

    async def accept(self) -> bool:
        """Whether the device agrees to pair."""
        return self._accept

    async def compare_numbers(self, number: int, digits: int) -> bool:
        """The patient presses "yes" on the device (or not, per the script)."""
        del digits
        self.compared.append(number)
        return self._accept

    async def display_number(self, number: int, digits: int) -> None:
        """The passkey on the device's screen, for the technician to type on the hub."""
        del digits
        self.shown.append(number)


def uuid16(value: int) -> UUID:
    """A bumble UUID from a 16-bit assigned number."""
    return UUID.from_16_bits(value)


def read_only_characteristic(number: int, value: bytes) -> Characteristic[bytes]:
    """A readable characteristic with a fixed value."""
    return Characteristic(
        uuid16(number), Characteristic.Properties.READ, Characteristic.READABLE, value
    )


_ATT_HANDLE_VALUE_CONFIRMATION = 0x1E  # Core Vol 3 Part F §3.4.7.3


class _PeripheralDevice(Device):
    """A bumble Device that reports each ATT Handle Value Confirmation as it arrives.

    A frame counts as delivered when the hub's confirmation reaches the device. The task that
    sent the indication learns of it a few loop iterations later, possibly after the link is
    already gone; hearing the confirmation here keeps "sent" exact when the hub hangs up at once.
    """

    on_confirmation: Callable[[], None] | None = None
    swallow: Callable[[int, bytes], bool] | None = None  # True: act as if the PDU never came

    def on_gatt_pdu(self, connection_handle: int, pdu: bytes) -> None:
        """Note confirmations, then let bumble handle the PDU as usual (unless swallowed)."""
        if self.swallow is not None and self.swallow(connection_handle, pdu):
            return
        if pdu[:1] == bytes([_ATT_HANDLE_VALUE_CONFIRMATION]) and self.on_confirmation is not None:
            self.on_confirmation()
        super().on_gatt_pdu(connection_handle, pdu)


class SimulatedDevice(abc.ABC, Generic[R]):
    """A scripted BLE health device on a VirtualRadio (one twin per driver)."""

    SERVICE_UUID: ClassVar[int]
    """The profile's primary service, advertised and served."""

    def __init__(self, script: SimScript[R]) -> None:
        self.script = script
        self.address = script.address.upper()
        self.name = script.name
        self.clock = SimClock(
            script.clock, script.clock_offset_s, script.clock_epoch, script.zone
        )
        self.sent: list[bytes] = []
        """Payloads whose indication the hub confirmed, in order, over all connections."""
        self.clock_writes: list[DateTime] = []
        """Every time value the hub wrote to the device clock, in order."""
        self.connection_count = 0
        self.pairing_delegate = _SimPairingDelegate(script.accept_pairing, script.pairing_io)
        """Answers the hub's pairing; `.compared` holds the numbers of numeric comparisons."""
        self._pairing_mode = script.pairing_mode
        self._drop_after = script.drop_link_after
        self._forget_after = script.forget_bond_after
        self._memory: list[_Record[R]] = []
        self._radio: Medium | None = None
        self._device: Device | None = None
        self._controller: Controller | None = None
        self._link: _Link[R] | None = None  # the hub's current connection, if any
        self._settled = True  # False from a disconnection until advertising is updated
        self._tasks: set[asyncio.Task[None]] = set()
        self._news = asyncio.Event()
        self._change = asyncio.Event()  # set and replaced on every change waiters care about
        self._advertising = False
        self._advertising_lock = asyncio.Lock()
        self._switched_off = False
        self._measurement: Characteristic[bytes] | None = None
        self._observer: DeviceObserver | None = None
        self.advertising_data = self._build_advertising_data()
        for frame in script.stored:
            self._remember(frame)

    # -- what a profile provides ---------------------------------------------------------------

    @abc.abstractmethod
    def encode(self, reading: R) -> bytes:
        """The measurement characteristic value for one reading (the project's codec)."""

    @abc.abstractmethod
    def stamped(self, reading: R, now: DateTime) -> R:
        """The reading with the device clock as its time stamp, if it has none and may have one."""

    @abc.abstractmethod
    def profile_service(self) -> tuple[Service, Characteristic[bytes]]:
        """The profile's GATT service and its measurement (indicate) characteristic."""

    async def before_frame(self, connection: Connection, frame: R | bytes) -> None:
        """Called before each measurement indication (the cuff's intermediate pressures)."""

    # -- scripting API -------------------------------------------------------------------------

    @property
    def rssi(self) -> int:
        """The signal strength the hub reports for this device, dBm."""
        return self.script.rssi

    @property
    def is_connected(self) -> bool:
        """True while a hub holds a link to the device."""
        return self._link is not None

    @property
    def is_advertising(self) -> bool:
        """True while the device advertises (connectable)."""
        return self._advertising

    @property
    def unsent(self) -> int:
        """How many frames in memory the hub has not confirmed yet."""
        return sum(not record.delivered for record in self._memory)

    async def measure(self, reading: R | bytes, *, stamp: bool = True) -> None:
        """Take a new measurement (stamped with the device clock) and advertise to send it."""
        if stamp and not isinstance(reading, bytes):
            reading = self.stamped(reading, self.clock.now())
        self._remember(reading)
        self._news.set()
        await self._update_advertising()

    def observe(self, observer: DeviceObserver | None) -> None:
        """Report memory and link events to `observer`, starting with what memory holds now."""
        self._observer = observer
        if observer is not None:
            for record in self._memory:
                observer.produced(self.address, record.index, record.payload)

    def _remember(self, frame: R | bytes) -> None:
        """Append a frame to memory (and tell the observer)."""
        record = _Record(frame, self._payload(frame), len(self._memory))
        self._memory.append(record)
        if self._observer is not None:
            self._observer.produced(self.address, record.index, record.payload)

    async def set_pairing_mode(self, on: bool) -> None:
        """Enter or leave pairing mode (advertise even with nothing to send)."""
        self._pairing_mode = on
        await self._update_advertising()

    async def forget_bonds(self) -> None:
        """Delete every bond, as a factory reset or a battery change does on some devices."""
        keystore = self._require_device().keystore
        if keystore is not None:
            async with asyncio.timeout(OP_TIMEOUT_S):
                for name, _keys in await keystore.get_all():
                    await keystore.delete(name)

    async def hang_up(self) -> None:
        """Drop the current link now, as if the device had been switched off mid-way."""
        if self._link is not None:
            await self._disconnect(self._link.connection)

    async def wait_sent(self, count: int, timeout: float = 2.0) -> None:
        """Wait until `count` frames in total have been confirmed by the hub."""
        await self._wait_until(lambda: len(self.sent) >= count, timeout)

    async def wait_disconnected(self, timeout: float = 2.0) -> None:
        """Wait until no hub is connected and the device has resumed advertising if it should."""
        await self._wait_until(lambda: self._link is None and self._settled, timeout)

    async def _wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        """Wait (bounded) until condition() holds, re-checking on every change."""
        async with asyncio.timeout(timeout):
            while not condition():
                await self._change.wait()

    def _changed(self) -> None:
        """Wake everyone in _wait_until."""
        self._change.set()
        self._change = asyncio.Event()

    # -- Peripheral protocol (gateway.sim.radio) -----------------------------------------------

    async def attach(self, radio: Medium) -> None:
        """Switch on: build the GATT database on radio.link and advertise if there is news."""
        if self._device is not None:
            raise RuntimeError(f"{self.address} is already switched on")
        self._switched_off = False
        device, controller = make_device(
            radio.link, self.name, self.address, device_class=_PeripheralDevice
        )
        device.on_confirmation = self._on_confirmation
        device.swallow = self._swallow
        device.gatt_server.max_mtu = self.script.mtu
        delegate = self.pairing_delegate
        device.pairing_config_factory = lambda _connection: PairingConfig(
            sc=True,
            mitm=self.script.pairing_io != "none",
            bonding=True,
            delegate=delegate,
            identity_address_type=PairingConfig.AddressType.RANDOM,
        )
        service, self._measurement = self.profile_service()
        device.add_services([*self._standard_services(), service])
        self._measurement.on(Characteristic.EVENT_SUBSCRIPTION, self._on_subscription)
        device.on(Device.EVENT_CONNECTION, self._on_connection)
        self._radio, self._device, self._controller = radio, device, controller
        await device.power_on()
        await self._update_advertising()

    async def detach(self) -> None:
        """Switch off: drop the link, stop advertising, leave the radio's link."""
        device, radio = self._device, self._radio
        if device is None or radio is None:
            return
        self._switched_off = True  # from here on _update_advertising only ever stops
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(BaseBumbleError, TimeoutError):
            async with asyncio.timeout(radio.op_timeout):
                link = self._link
                if link is not None:
                    await link.connection.disconnect()
                    if link.session is not None:
                        link.session.cancel()
                        await asyncio.gather(link.session, return_exceptions=True)
                await self._update_advertising()
                await device.power_off()
        if self._controller is not None:
            radio.link.remove_controller(self._controller)
        self._device = self._controller = self._radio = None

    # -- GATT database ---------------------------------------------------------------------------

    def _standard_services(self) -> list[Service]:
        """Device Information, Battery and (per script) Current Time."""
        s = self.script
        services = [
            Service(
                uuid16(DEVICE_INFORMATION_SERVICE),
                [
                    self._info(MANUFACTURER_NAME, encode_string(s.manufacturer)),
                    self._info(MODEL_NUMBER, encode_string(s.model)),
                    self._info(SERIAL_NUMBER, encode_string(s.serial)),
                    self._info(HARDWARE_REVISION, encode_string(s.hardware)),
                    self._info(FIRMWARE_REVISION, encode_string(s.firmware)),
                    self._info(SYSTEM_ID, encode_system_id(s.system_id)),
                ],
            ),
            Service(
                uuid16(BATTERY_SERVICE),
                [
                    Characteristic(
                        uuid16(BATTERY_LEVEL),
                        Characteristic.Properties.READ | Characteristic.Properties.NOTIFY,
                        Characteristic.READABLE,
                        self._info_value(encode_battery_level(s.battery_level)),
                    )
                ],
            ),
        ]
        if s.time_service == "cts":
            properties = Characteristic.Properties.READ | Characteristic.Properties.NOTIFY
            if s.clock_writable:
                properties |= Characteristic.Properties.WRITE
            current_time: Characteristic[bytes] = Characteristic(
                uuid16(CURRENT_TIME),
                properties,
                Characteristic.READABLE | Characteristic.WRITEABLE,
                CharacteristicValue(read=self._read_current_time, write=self._write_current_time),
            )
            services.append(Service(uuid16(CURRENT_TIME_SERVICE), [current_time]))
        return services

    def _info(self, number: int, value: bytes) -> Characteristic[bytes]:
        """A read-only identity characteristic (subject to a scripted ATT error)."""
        return Characteristic(
            uuid16(number), Characteristic.Properties.READ, Characteristic.READABLE,
            self._info_value(value),
        )

    def _info_value(self, value: bytes) -> CharacteristicValue[bytes]:
        """A fixed value whose reads fail with the scripted ATT error on a faulty link."""

        def read(connection: Connection) -> bytes:
            self._scripted_att_error(connection, "info")
            return value

        return CharacteristicValue(read=read)

    def _scripted_att_error(self, connection: Connection, target: AttErrorTarget) -> None:
        """Raise the scripted ATT error if this link has one for `target`."""
        link = self._link
        if (link is not None and link.connection is connection and link.att_error
                and target in self.script.att_error_on):
            log.debug("%s: answering with ATT error 0x%02X, as scripted", self.address,
                      self.script.att_error_code)
            raise ATT_Error(self.script.att_error_code)

    def date_time_characteristic(self) -> list[Characteristic[bytes]]:
        """Date Time 0x2A08 (read, write) for the profile service when the script asks for it."""
        if self.script.time_service != "date_time":
            return []
        properties = Characteristic.Properties.READ
        if self.script.clock_writable:
            properties |= Characteristic.Properties.WRITE
        return [
            Characteristic(
                uuid16(DATE_TIME),
                properties,
                Characteristic.READABLE | Characteristic.WRITEABLE,
                CharacteristicValue(read=self._read_date_time, write=self._write_date_time),
            )
        ]

    def subscribable(
        self, number: int, properties: Characteristic.Properties
    ) -> Characteristic[bytes]:
        """A notify/indicate-only characteristic; its CCCD needs encryption if bonding is required."""
        characteristic: Characteristic[bytes] = Characteristic(
            uuid16(number), properties, Characteristic.Permissions(0)
        )
        permissions = Descriptor.READABLE | Descriptor.WRITEABLE
        if self.script.bonding_required:
            # The Cordio reference services protect the CCCD, not the value (§6).
            permissions |= Descriptor.WRITE_REQUIRES_ENCRYPTION

        def read(connection: Connection) -> bytes:
            return self._require_device().gatt_server.read_cccd(connection, characteristic)

        def write(connection: Connection, value: bytes) -> None:
            self._scripted_att_error(connection, "cccd")
            self._require_device().gatt_server.write_cccd(connection, characteristic, value)

        # The server adds a plain CCCD unless one is given: give one, with our permissions,
        # backed by the server's own per-link subscription state.
        characteristic.descriptors = [
            Descriptor(
                GATT_CLIENT_CHARACTERISTIC_CONFIGURATION_DESCRIPTOR,
                permissions,
                CharacteristicValue(read=read, write=write),
            )
        ]
        return characteristic

    def _read_current_time(self, _connection: Connection) -> bytes:
        """CTS read: the device clock now."""
        return encode_current_time(self.clock.current_time())

    def _write_current_time(self, _connection: Connection, value: bytes) -> None:
        """CTS write: set the clock (ATT errors as a real server would answer)."""
        if not self.script.clock_writable:
            raise ATT_Error(ErrorCode.WRITE_NOT_PERMITTED)
        try:
            current = decode_current_time(value)
        except DecodeError as e:
            raise ATT_Error(_value_error(value, CURRENT_TIME_SIZE)) from e
        self._set_clock(current.date_time)

    def _read_date_time(self, _connection: Connection) -> bytes:
        """Date Time read: the device clock now."""
        return encode_date_time(self.clock.now())

    def _write_date_time(self, _connection: Connection, value: bytes) -> None:
        """Date Time write: set the clock."""
        if not self.script.clock_writable:
            raise ATT_Error(ErrorCode.WRITE_NOT_PERMITTED)
        try:
            date_time = decode_date_time(value)
        except DecodeError as e:
            raise ATT_Error(_value_error(value, DATE_TIME_SIZE)) from e
        self._set_clock(date_time)

    def _set_clock(self, value: DateTime) -> None:
        """Record a clock write and apply it."""
        self.clock_writes.append(value)
        self.clock.set(value)

    # -- advertising -----------------------------------------------------------------------------

    def _build_advertising_data(self) -> bytes:
        """Flags, the profile service UUID, the name, and any scripted extras (≤ 31 bytes)."""
        s = self.script
        structures = [
            (_AD_FLAGS, bytes([_FLAGS_LE_GENERAL_NO_BREDR])),
            (_AD_UUID16_COMPLETE, self.SERVICE_UUID.to_bytes(2, "little")),
            (_AD_NAME_COMPLETE, s.name.encode()),
            *((_AD_MANUFACTURER, k.to_bytes(2, "little") + v) for k, v in s.manufacturer_data.items()),
            *((_AD_SERVICE_DATA16, k.to_bytes(2, "little") + v) for k, v in s.service_data.items()),
        ]
        data = b"".join(bytes([len(value) + 1, ad_type]) + value for ad_type, value in structures)
        if len(data) > LEGACY_ADV_MAX:
            raise ValueError(
                f"advertising data for {s.name!r} is {len(data)} bytes; a legacy advertisement "
                f"holds {LEGACY_ADV_MAX}: shorten the name or the extras"
            )
        return data

    async def _update_advertising(self) -> None:
        """Advertise exactly while switched on, unconnected, and with news or in pairing mode."""
        async with self._advertising_lock:
            device = self._device
            if device is None:
                return
            wanted = (
                not self._switched_off
                and self._link is None
                and (self._pairing_mode or self.unsent > 0)
            )
            if wanted == self._advertising:
                return
            async with asyncio.timeout(OP_TIMEOUT_S):
                if wanted:
                    interval = self.script.advertising_interval_ms
                    await device.start_advertising(
                        advertising_data=self.advertising_data,
                        scan_response_data=b"",
                        advertising_interval_min=interval,
                        advertising_interval_max=interval,
                        own_address_type=hci.OwnAddressType.RANDOM,
                    )
                else:
                    await device.stop_advertising()
            self._advertising = wanted

    # -- connection behaviour ----------------------------------------------------------------

    def _on_connection(self, connection: Connection) -> None:
        """A hub connected: the controller stopped advertising; start serving this link."""
        self._advertising = False
        self.connection_count += 1
        if self._observer is not None:
            self._observer.connected(self.address)
        link = _Link[R](connection)
        link.att_error = self.connection_count <= self.script.att_error_connections
        if self.connection_count <= self.script.never_answer_connections:
            link.silent = self.script.never_answer_from
        self._link = link
        connection.on(
            Connection.EVENT_DISCONNECTION, lambda _reason: self._on_disconnection(link)
        )
        link.session = asyncio.get_running_loop().create_task(self._serve(link))

    def _on_disconnection(self, link: _Link[R]) -> None:
        """The link is gone (either side): stop serving, advertise again if news is left."""
        link.alive = False
        link.subscribed.clear()
        link.in_flight = None
        if self._observer is not None:
            self._observer.disconnected(self.address)
        if link.session is not None:
            link.session.cancel()
        if self._link is link:
            self._link = None
        self._settled = False
        self._spawn(self._after_disconnection())

    async def _after_disconnection(self) -> None:
        """Forget bonds if scripted, resume advertising if there is news, then wake waiters."""
        try:
            if self._forget_after is not None and self.connection_count >= self._forget_after:
                # Before advertising again: the next connection must find the bond gone.
                self._forget_after = None
                log.debug("%s: forgetting every bond, as scripted", self.address)
                await self.forget_bonds()
            await self._update_advertising()
        finally:
            self._settled = True
            self._changed()

    def _on_subscription(self, bearer: object, _notify: bool, indicate: bool) -> None:
        """The hub wrote the measurement CCCD on the current link."""
        link = self._link
        if link is not None and bearer is link.connection:
            if indicate:
                link.subscribed.set()
            else:
                link.subscribed.clear()

    def _swallow(self, connection_handle: int, pdu: bytes) -> bool:
        """Whether to ignore an ATT PDU: the link is scripted silent (from its start or setup)."""
        link = self._link
        if link is None or link.silent is None or link.connection.handle != connection_handle:
            return False
        if link.silent == "session" and pdu[:1] and pdu[0] in _SETUP_OPCODES:
            return False
        log.debug("%s: ignoring ATT opcode 0x%02X, as scripted", self.address, pdu[0] if pdu else 0)
        return True

    async def _serve(self, link: _Link[R]) -> None:
        """One connection: wait for the subscription, indicate, go quiet, hang up."""
        if link.silent is not None:
            # A wedged device keeps the link up (its controller still answers) and says nothing:
            # ending the session is the hub's job.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SILENT_HOLD_S):
                    await asyncio.Event().wait()
            if link.alive:
                await self._disconnect(link.connection)
            return
        try:
            while link.alive:
                try:
                    async with asyncio.timeout(self.script.idle_timeout_s):
                        await link.subscribed.wait()
                except TimeoutError:
                    log.debug("%s: hub never subscribed; hanging up", self.address)
                    break
                pending = [
                    record
                    for record in self._memory
                    if all(record is not done for done in link.sent)
                    and (self.script.resend_stored or not record.delivered)
                ]
                if not pending:
                    # Quiet: wait a moment for a new measurement, then hang up like a cuff.
                    self._news.clear()
                    try:
                        async with asyncio.timeout(self.script.quiet_s):
                            await self._news.wait()
                    except TimeoutError:
                        break
                    continue
                outcome = await self._indicate(link, pending)
                if outcome == "drop":
                    log.debug("%s: dropping the link mid-transfer, as scripted", self.address)
                    break
                if outcome == "stuck":
                    log.debug("%s: indication not confirmed; hanging up", self.address)
                    break
        except (BaseBumbleError, TimeoutError) as e:
            log.debug("%s: connection ended: %r", self.address, e)
        if link.alive:
            await self._disconnect(link.connection)

    async def _indicate(
        self, link: _Link[R], pending: list[_Record[R]]
    ) -> Literal["drop", "more", "stuck"]:
        """Indicate pending frames in order until done, unsubscribed, or a scripted drop."""
        device, measurement = self._require_device(), self._measurement
        assert measurement is not None
        for record in pending:
            if not (link.alive and link.subscribed.is_set()):
                return "more"  # the hub turned indications off: wait for it to turn them on
            await self.before_frame(link.connection, record.frame)
            link.in_flight = record
            async with asyncio.timeout(OP_TIMEOUT_S):
                await device.indicate_subscriber(link.connection, measurement, record.payload)
            if link.in_flight is record:
                # bumble returned without a confirmation: nothing was sent on this link. Going
                # round again would spin, so give up on the link instead.
                link.in_flight = None
                return "more" if not link.subscribed.is_set() else "stuck"
            if self._drop_after is not None and len(link.sent) >= self._drop_after:
                self._drop_after = None
                return "drop"
        return "more"

    def _on_confirmation(self) -> None:
        """The hub confirmed the indication in flight: it is delivered, whatever happens next."""
        link = self._link
        if link is None or link.in_flight is None:
            return
        record, link.in_flight = link.in_flight, None
        record.delivered = True
        link.sent.append(record)
        self.sent.append(record.payload)
        if self._observer is not None:
            self._observer.confirmed(self.address, record.index, record.payload)
        self._changed()

    async def _disconnect(self, connection: Connection) -> None:
        """Hang up (best effort: the hub may have gone already)."""
        with contextlib.suppress(BaseBumbleError, TimeoutError):
            async with asyncio.timeout(OP_TIMEOUT_S):
                await connection.disconnect()

    # -- helpers -------------------------------------------------------------------------------

    def _payload(self, frame: R | bytes) -> bytes:
        """The bytes to indicate for a frame."""
        return bytes(frame) if isinstance(frame, bytes) else self.encode(frame)

    def _require_device(self) -> Device:
        """The bumble device, or an error saying the device is switched off."""
        if self._device is None:
            raise RuntimeError(f"{self.address} is switched off: add it to a VirtualRadio first")
        return self._device

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a coroutine in the background, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _value_error(value: bytes, size: int) -> int:
    """The ATT error for a rejected time write: wrong length, or a field out of range."""
    return (
        ErrorCode.INVALID_ATTRIBUTE_LENGTH if len(value) != size else ErrorCode.VALUE_NOT_ALLOWED
    )
