"""What every driver produces and promises: the decoded measurement and the driver protocol."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from bleak import BleakClient
    from bleak.backends.device import BLEDevice
    from bleak.backends.scanner import AdvertisementData

Kind = Literal["blood_pressure", "body_weight"]

STATUS_FLAGS = (
    "body_movement",
    "cuff_loose",
    "irregular_pulse",
    "pulse_above_range",
    "pulse_below_range",
    "improper_position",
)


class Observation(BaseModel):
    """One coded value: LOINC code, UCUM unit, in the unit the device sent (null when not a number)."""

    model_config = ConfigDict(frozen=True)

    code: str = Field(description="LOINC code")
    name: str
    value: float | None = Field(description="null for NaN, NRes, infinities or reserved values")
    unit: str = Field(description="UCUM unit")


class Measurement(BaseModel):
    """One decoded measurement as the device sent it, before the hub adds identity and time."""

    model_config = ConfigDict(frozen=True)

    kind: Kind
    observations: tuple[Observation, ...]
    status: tuple[str, ...] = ()
    valid: bool = True
    device_time: dt.datetime | None = Field(
        default=None, description="device clock as sent, naive local time; null if absent/unknown"
    )
    user_index: int | None = Field(
        default=None, description="the user id as sent; 255 = the device's 'unknown user'; "
        "null when the value has no user field")
    sequence: int | None = Field(
        default=None, description="the device's record sequence number, where it sends one")
    characteristic: str = Field(description="16-bit UUID of the characteristic, e.g. '2a35'")
    raw: bytes = Field(exclude=True)


@dataclass(frozen=True)
class DeviceInfo:
    """Read once per connection: DIS strings and the battery level (None where absent)."""

    manufacturer: str | None = None
    model: str | None = None
    serial: str | None = None
    firmware: str | None = None
    system_id: str | None = None
    battery_level: int | None = None


@dataclass(frozen=True)
class ClockCheck:
    """The device clock as read at connection, and its offset from the hub's local clock."""

    device_time: dt.datetime | None
    offset_s: float | None
    set_ok: bool


class StorageUnavailableError(Exception):
    """The hub cannot store readings now; the session ends before subscribing (device keeps them)."""


MeasurementSink = Callable[[Measurement], Awaitable[None]]
"""Commits a measurement to disk; returns only once it is durable."""


class Driver(Protocol):
    """A device profile: how to recognise the device and how to hold the conversation with it."""

    @property
    def name(self) -> str:
        """Unique driver name, as used in config and payloads."""
        ...

    @property
    def version(self) -> str:
        """Driver version, carried in every payload."""
        ...

    @property
    def kind(self) -> str:
        """The payload `kind` of its readings ('+'-joined for a device with several profiles)."""
        ...

    def matches(self, device: BLEDevice, adv: AdvertisementData) -> bool:
        """True when this driver speaks to the advertised device."""
        ...

    async def collect(
        self, client: BleakClient, sink: MeasurementSink, hooks: SessionHooks
    ) -> None:
        """Run one connection: identity, clock, measurements until the device is done."""
        ...


@runtime_checkable
class Provisioning(Protocol):
    """What `rpm-gateway pair` asks of a driver besides the readings: who the device is, and
    its clock read and set, without subscribing (a subscription makes many devices send)."""

    async def identify(self, client: BleakClient, hooks: SessionHooks) -> DeviceInfo:
        """Device Information strings and the battery level."""
        ...

    async def check_clock(self, client: BleakClient, hooks: SessionHooks) -> ClockCheck:
        """The device clock read, set when the hub clock is trusted, and read back."""
        ...


class SessionHooks(Protocol):
    """What a driver reports back to the session besides measurements."""

    link_lost: asyncio.Event
    """Set when the device drops the link."""

    known_info: DeviceInfo | None
    """Identity read on an earlier connection; the strings need not be read again."""

    op_timeout_s: float
    """Deadline for one GATT operation (radio.operation_timeout_s)."""

    quiet_s: float
    """Silence after which the session ends (radio.quiet_s)."""

    def device_info(self, info: DeviceInfo) -> None:
        """The device's identity strings, once per connection."""
        ...

    def clock(self, check: ClockCheck) -> None:
        """The device clock as found at connection and whether it was set."""
        ...

    def rejected(self, characteristic: str, raw: bytes, reason: str) -> None:
        """Bytes that did not decode: counted, logged at debug level."""
        ...

    def hub_clock_trusted(self) -> bool:
        """Whether the hub's own clock is synchronised, so it may set device clocks."""
        ...

    def committed(self, window_s: float) -> None:
        """A value was committed this long after its notification callback ran."""
        ...

    def commit_failed(self, characteristic: str, error: BaseException) -> None:
        """A confirmed value could not be committed after every retry: it is lost; report it."""
        ...

    def local_now(self) -> dt.datetime:
        """The hub's local wall-clock time (naive), as devices expect it."""
        ...
