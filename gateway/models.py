"""The MQTT payload contract (version 1): one JSON object per measurement."""

from __future__ import annotations

import datetime as dt
import json
from typing import Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from drivers.base import Kind, Observation

SCHEMA_ID: Final = "rpm-gateway/reading/1"

TimeSource = Literal["device_clock", "device_clock_corrected", "hub_receipt"]


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
        json_schema_extra={"$id": "https://rpm-gateway.invalid/schema/reading-1.json"},
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
    measured_at: AwareDatetime = Field(description="UTC; see time_source")
    received_at: AwareDatetime = Field(description="UTC, hub clock when the bytes arrived")
    time_source: TimeSource
    device_time: dt.datetime | None = Field(
        description="the device's time stamp as sent (local wall clock, no zone); null if absent"
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
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
