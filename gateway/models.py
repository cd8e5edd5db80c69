"""The MQTT payload contract (version 1): one JSON object per measurement, and the time types
every published message shares (gateway.messages has the status and events messages)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    NaiveDatetime,
    PlainSerializer,
    WithJsonSchema,
)

from drivers.base import Kind, Observation

SCHEMA_ID: Final = "rpm-gateway/reading/1"
JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"

TimeSource = Literal["device_clock", "device_clock_corrected", "hub_receipt"]

UTC_PATTERN: Final = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$"
LOCAL_PATTERN: Final = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?$"
ZONE_PATTERN: Final = r"^[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*$"


def utc_z(value: dt.datetime) -> str:
    """An instant as published: RFC 3339 in UTC with a `Z` (never `+00:00`)."""
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _local_iso(value: dt.datetime) -> str:
    return value.isoformat()


# An instant: any aware datetime (or ISO string with an offset) in, `…Z` out.
UtcInstant = Annotated[
    AwareDatetime,
    PlainSerializer(utc_z, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": UTC_PATTERN}),
]
# A wall-clock time with no zone (a device's own clock): no `format: date-time`, which requires
# an offset; the zone it is read in is the reading's `timezone`.
LocalDateTime = Annotated[
    NaiveDatetime,
    PlainSerializer(_local_iso, return_type=str),
    WithJsonSchema({"type": "string", "pattern": LOCAL_PATTERN}),
]


def not_required(*names: str) -> Any:
    """A json_schema_extra hook: these fields are always sent, but a message without them is
    still valid (they were added within the schema version)."""

    def hook(schema: dict[str, Any]) -> None:
        schema["required"] = [n for n in schema.get("required", []) if n not in names]

    return hook


def dump_schema(schema: dict[str, Any]) -> str:
    """A JSON Schema as checked into schema/: sorted keys, two-space indent, final newline."""
    return json.dumps({"$schema": JSON_SCHEMA_DIALECT, **schema}, indent=2, sort_keys=True) + "\n"


class DeviceRef(BaseModel):
    """The device that measured, as identified at connection."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str = Field(description="Bluetooth address (identity address once bonded)")
    manufacturer: str | None = None
    model: str | None = None
    serial: str | None = None
    firmware: str | None = None
    system_id: str | None = Field(default=None, description="DIS System ID, 16 hex digits")
    driver: str = Field(description="the gateway driver that spoke to the device")


class Reading(BaseModel):
    """One measurement as published to `<prefix>/<hub_id>/readings` (QoS 1)."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        title="rpm-gateway reading",
        json_schema_serialization_defaults_required=True,
        json_schema_extra=not_required("timezone"),
    )

    schema_: Literal["rpm-gateway/reading/1"] = Field(default=SCHEMA_ID, alias="schema")
    reading_id: str = Field(
        pattern=r"^[0-9a-f]{32}$",
        description="stable: the same measurement re-sent by a device gets the same id",
    )
    hub_id: str
    patient_id: str = Field(description="the patient bound to the device when it was read")
    device: DeviceRef
    kind: Kind
    observations: tuple[Observation, ...]
    status: tuple[str, ...] = Field(description="named device status flags, e.g. irregular_pulse")
    valid: bool = Field(description="false for 'measurement unsuccessful' or no usable value")
    measured_at: UtcInstant = Field(description="UTC; see time_source")
    received_at: UtcInstant = Field(description="UTC, hub clock when the bytes arrived")
    time_source: TimeSource
    device_time: LocalDateTime | None = Field(
        description="the device's time stamp as sent: its local wall clock, no zone (the zone is "
        "`timezone`); null if absent"
    )
    timezone: str | None = Field(
        default=None,
        pattern=ZONE_PATTERN,
        description="the patient's home time zone (IANA name, the hub's hub.timezone): the zone of "
        "device_time and of the patient's calendar days; absent in readings stored by a hub "
        "older than this field",
    )
    device_clock_offset_s: float | None = Field(
        description="device clock minus hub clock at connection, seconds; null if not read"
    )
    hub_clock_synced: bool = Field(description="whether the hub clock was NTP-synchronised")
    user_index: int | None = Field(description="the device's user slot, if it sent one")
    characteristic: str = Field(description="16-bit UUID of the source characteristic")
    raw: str = Field(pattern=r"^([0-9a-f]{2})*$", description="the characteristic bytes, hex")
    driver_version: str
    transport: Literal["indication"] = "indication"

    def to_json(self) -> bytes:
        """Compact JSON, with the schema field named `schema`."""
        return self.model_dump_json(by_alias=True).encode()


def reading_json_schema() -> str:
    """The JSON Schema of the payload, as checked into the repository."""
    schema = Reading.model_json_schema(by_alias=True, mode="serialization")
    return dump_schema({"$id": "https://rpm-gateway.invalid/schema/reading-1.json", **schema})
