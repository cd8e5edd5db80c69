"""The status and events messages (version 1), as pydantic models: the JSON Schemas in schema/
are generated from them (`make schema`), and the agent builds its messages through them.

* ``<prefix>/<hub_id>/status`` (retained): an :class:`OnlineStatus` while the hub is connected;
  an :class:`OfflineStatus` when it stops cleanly and, with the same shape, as its last will.
* ``<prefix>/<hub_id>/events``: one :class:`Event` envelope per event; ``EVENTS`` below is the
  one list of event names and their ``detail`` models. An event not in it cannot be published.

Every instant is UTC with a ``Z`` (gateway.models.UtcInstant). No message here carries a
reading's values.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model

from gateway.models import UtcInstant, dump_schema, not_required, reading_json_schema
from gateway.outbox import OutboxStats
from gateway.uplink_health import BrokerState

STATUS_SCHEMA_ID: Final = "rpm-gateway/status/1"
EVENT_SCHEMA_ID: Final = "rpm-gateway/event/1"
STATUS_SCHEMA_URL: Final = "https://rpm-gateway.invalid/schema/status-1.json"
EVENT_SCHEMA_URL: Final = "https://rpm-gateway.invalid/schema/event-1.json"

# gateway.ble.recovery.Step's values (a unit test keeps the two equal).
RecoveryStep = Literal["restart_discovery", "power_cycle", "restart_bluetooth"]
BindingSource = Literal["config", "registry"]
OfflineReason = Literal["stopped", "connection_lost"]
Address = Annotated[str, Field(description="Bluetooth address, upper case")]
By = Annotated[Annotated[str, Field(min_length=1)] | None,
               Field(description="who did it (free text: the technician's login name); null: not "
                     "known")]


class _Part(BaseModel):
    """A closed object: a field that is not declared here is an error, not a surprise."""

    model_config = ConfigDict(frozen=True, extra="forbid",
                              json_schema_serialization_defaults_required=True)


# -- status -------------------------------------------------------------------------------------


class DeviceReport(_Part):
    """One paired device as the hub last saw it (no patient data but the binding's id)."""

    last_seen: UtcInstant | None = Field(default=None, description="last advertisement heard")
    last_session: UtcInstant | None = Field(default=None, description="last connection ended")
    last_reading: UtcInstant | None = Field(default=None, description="last reading stored")
    last_error: str | None = Field(default=None, description="why the last session failed, with "
                                   "advice; null after a good one")
    sessions_ok: int = Field(default=0, ge=0)
    sessions_failed: int = Field(default=0, ge=0)
    readings: int = Field(default=0, ge=0, description="readings stored since the agent started")
    clock_offset_s: float | None = Field(default=None, description="device clock minus hub clock "
                                         "at the last connection, seconds")
    clock_set: bool | None = Field(default=None, description="whether the hub set the device clock")
    battery_level: int | None = Field(default=None, ge=0, le=100, description="percent")
    rssi: int | None = Field(default=None, description="dBm of the last advertisement")
    patient_id: str | None = Field(default=None, description="the bound patient")
    source: BindingSource | None = Field(default=None, description="where the binding comes from: "
                                         "the config file or the pairing registry")
    # A device offering several profiles reads as their kinds joined with "+".
    kind: str | None = Field(default=None, pattern=r"^[a-z_]+(\+[a-z_]+)*$",
                             description="the payload kind(s) of its readings")
    model: str | None = None
    serial: str | None = None


class RadioRecoveryReport(_Part):
    """The radio recovery ladder (gateway.ble.recovery)."""

    step: RecoveryStep | None = Field(default=None, description="the latest step since the last "
                                      "advertisement; null: not climbing")
    last_step: RecoveryStep | None = Field(default=None, description="the latest step ever taken")
    last_step_at: UtcInstant | None = None
    last_result: str | None = Field(default=None, description='"ok", or "failed: <why>"')
    steps_taken: int = Field(default=0, ge=0)
    steps_failed: int = Field(default=0, ge=0)
    last_advert_age_s: float | None = Field(default=None, description="null: no advertisement "
                                            "heard since the start")


# Described here, typed by gateway.outbox.OutboxStats: a counter added there appears in the
# status and, after `make schema`, in its schema.
_OUTBOX_FIELDS: Final = {
    "pending": "attributed, undelivered, not quarantined",
    "oldest_pending": "when the oldest of those was stored",
    "rejected_full": "new readings refused by the reject_new policy, ever",
    "dropped": "undelivered readings deleted (drop_oldest or the age limit), ever",
    "quarantined": "held back now (broker refusal, checksum mismatch)",
    "unattributed": "kept readings no patient can claim (never published)",
    "checksum_failures": "rows whose payload no longer matched its checksum, ever",
    "salvaged": "rows copied out of a corrupt outbox file, ever",
    "salvage_lost": "rows of a corrupt file that could not be read back, ever",
}


def _outbox_report() -> type[_Part]:
    hints = typing.get_type_hints(OutboxStats)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(OutboxStats):
        kind: Any = UtcInstant | None if f.name == "oldest_pending" else hints[f.name]
        minimum = 0 if kind is int else None
        fields[f.name] = (kind, Field(description=_OUTBOX_FIELDS.get(f.name), ge=minimum))
    return create_model("OutboxReport", __base__=_Part,
                        __doc__="The outbox's persisted counters (gateway.outbox.OutboxStats).",
                        **fields)


if typing.TYPE_CHECKING:
    OutboxReport = _Part
else:
    OutboxReport = _outbox_report()


class OutboxRecoveryReport(_Part):
    """What start-up found when the outbox file was damaged or empty."""

    kind: Literal["corrupt", "empty_file"]
    salvaged: int = Field(ge=0)
    lost: int = Field(ge=0)
    moved_to: str | None = Field(description="where the damaged file was kept")
    detail: str


class DaysReport(_Part):
    """One patient's days with data in the current 30-day period (gateway.days)."""

    days: int = Field(ge=0)
    needed: int = Field(ge=1)
    period_start: dt.date
    period_end: dt.date
    days_left: int = Field(ge=0)
    code: Literal["99454", "99445"] | None
    summary: str = Field(description='e.g. "9 of 16 days, 12 days left in period"')


class CommitWindow(_Part):
    """Notification callback to commit returned, over the latest commits, milliseconds."""

    n: int = Field(ge=1)
    p50: float
    p99: float
    max: float


class BrokerReport(_Part):
    """The uplink's own view of its broker connection."""

    state: BrokerState
    since: UtcInstant
    protocol: Literal["5", "3.1.1"]
    last_error: str | None
    quarantined: int = Field(ge=0, description="readings the broker refused for good, held back")


class HubReport(_Part):
    """What gateway.status.HubStatus reports; the uplink adds `broker` and `state`."""

    schema_: Literal["rpm-gateway/status/1"] = Field(default=STATUS_SCHEMA_ID, alias="schema")
    hub_id: str
    version: str
    started_at: UtcInstant
    at: UtcInstant = Field(description="when this message was made")
    hub_clock_synced: bool
    hub_clock: str = Field(description='"ok", or "implausible: <date>"')
    radio: str = Field(description='"ok", "starting", or "unavailable: <why>"')
    radio_recovery: RadioRecoveryReport
    readings_stored: int = Field(ge=0)
    duplicates_ignored: int = Field(ge=0)
    decode_errors: int = Field(ge=0)
    unattributed_readings: int = Field(ge=0)
    unattributed_pending: int | None = Field(default=None, ge=0, description="unattributed readings "
                                             "waiting for a technician to assign them")
    readings_lost: int = Field(ge=0)
    storage: str = Field(description='"ok", or why no device is read now')
    outbox_recovery: OutboxRecoveryReport | None
    unknown_devices_seen: int = Field(ge=0)
    outbox: OutboxReport | None = Field(description="null until the outbox was first read")
    devices: dict[str, DeviceReport] = Field(description="every binding, by address")
    days_with_data: dict[str, DaysReport] = Field(description="by patient id")
    control_socket: str | None = Field(default=None, description="the agent's local control "
                                       "socket; null: none")


class OnlineStatus(HubReport):
    """The retained status while the hub is connected (refreshed after each session, else every
    minute)."""

    model_config = ConfigDict(json_schema_extra=not_required("commit_window_ms"))

    broker: BrokerReport
    state: Literal["online"] = "online"
    commit_window_ms: CommitWindow | None = Field(default=None, description="absent before the "
                                                  "first commit")


class OfflineStatus(_Part):
    """The retained status after the hub went away: a clean stop, or the broker's last will.

    `at`: for `reason: "stopped"`, when the agent stopped; for `"connection_lost"` (the last
    will, fixed when the connection opened), when that connection was opened: the hub went away
    later, and the broker publishes the will when it notices (within 1.5 keepalives).
    """

    schema_: Literal["rpm-gateway/status/1"] = Field(default=STATUS_SCHEMA_ID, alias="schema")
    hub_id: str
    state: Literal["offline"] = "offline"
    at: UtcInstant
    reason: OfflineReason


StatusMessage = Annotated[OnlineStatus | OfflineStatus, Field(discriminator="state")]
STATUS: Final[TypeAdapter[OnlineStatus | OfflineStatus]] = TypeAdapter(StatusMessage)


def offline_message(hub_id: str, reason: OfflineReason, at: dt.datetime | None = None) -> bytes:
    """The offline status payload (the clean stop's, or the last will's)."""
    when = at or dt.datetime.now(dt.UTC).replace(microsecond=0)
    return OfflineStatus(hub_id=hub_id, at=when, reason=reason).model_dump_json(by_alias=True).encode()


# -- events -------------------------------------------------------------------------------------


class Detail(_Part):
    """An event's `detail` object."""


class BluetoothdRestarted(Detail):
    """bluetoothd restarted under the agent: stale links are released, the scanner reopened.
    No detail."""


class StoragePressure(Detail):
    """Devices are not read (blocked) or read again (ok); once per change."""

    state: Literal["ok", "blocked"]
    reason: str | None = Field(description="why blocked: disk nearly full, outbox full, store failing")


class OutboxRecovered(Detail):
    """Start-up found the outbox file damaged or empty (as status.outbox_recovery)."""

    kind: Literal["corrupt", "empty_file"]
    salvaged: int = Field(ge=0)
    lost: int = Field(ge=0)
    moved_to: str | None
    detail: str


class ReadingLost(Detail):
    """A reading the device confirmed could not be stored after every retry."""

    device: Address
    characteristic: str = Field(description="16-bit UUID, hex")
    error: str = Field(description="the error's type name")


class DecodeError(Detail):
    """A value the driver could not decode (counted; the session goes on)."""

    characteristic: str = Field(description="16-bit UUID, hex")


class ClockDrift(Detail):
    """A device clock was off by more than the threshold at connection."""

    device: Address
    offset_s: float = Field(description="device clock minus hub clock, seconds")
    set: bool | None = Field(description="whether the hub set the device clock")


class BondLost(Detail):
    """A device forgot its bond (once per episode)."""

    device: Address
    advice: str = Field(description="what the technician should do")


class UnattributedReadings(Detail):
    """A session stored readings of a user slot no binding claims (kept, not published)."""

    device: Address
    count: int = Field(ge=1)


class RadioExclusive(Detail):
    """The adapter cannot connect while it scans: scanning now pauses for connections."""

    reason: str


class RadioRecovery(Detail):
    """A recovery step ran after a silent radio."""

    step: RecoveryStep
    result: Literal["ok", "failed"]
    reason: str = Field(description="why the ladder climbed")
    error: str | None
    next_step_in_s: int | None = Field(description="null: no step left")


class RadioRecovered(Detail):
    """Advertisements are heard again after recovery steps."""

    step: RecoveryStep = Field(description="the step that helped (the last one taken)")
    step_result: str | None
    steps: int = Field(ge=0)
    silent_s: float = Field(ge=0)


class ReadingQuarantined(Detail):
    """The broker refused a reading for good, or it is too large: held back, retried hourly."""

    seq: int = Field(ge=0, description="the outbox row")
    reason: str


class DevicePaired(Detail):
    """A technician bound a device to a patient (`rpm-gateway pair`)."""

    device: Address
    patient_id: str
    kind: str | None = Field(default=None, pattern=r"^[a-z_]+(\+[a-z_]+)*$",
                             description="the payload kind(s) of its readings")
    user_index: int | None = Field(description="the device's user slot; null: the whole device")
    by: By


class DeviceUnpaired(Detail):
    """A binding and its bond were removed (`rpm-gateway unpair`)."""

    device: Address
    patient_id: str
    by: By


class DeviceRebound(Detail):
    """A bound device was bound to another patient (`pair --force`)."""

    device: Address
    from_patient_id: str
    to_patient_id: str
    by: By


class ReadingAssigned(Detail):
    """A technician assigned an unattributed reading to a patient (it is published now)."""

    reading_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    device: Address
    patient_id: str
    by: By


# The one list: every event the agent may publish, and its detail. Add an event here.
EVENTS: Final[Mapping[str, type[Detail]]] = {
    "storage_pressure": StoragePressure,
    "outbox_recovered": OutboxRecovered,
    "reading_lost": ReadingLost,
    "decode_error": DecodeError,
    "clock_drift": ClockDrift,
    "bond_lost": BondLost,
    "unattributed_readings": UnattributedReadings,
    "bluetoothd_restarted": BluetoothdRestarted,
    "radio_exclusive": RadioExclusive,
    "radio_recovery": RadioRecovery,
    "radio_recovered": RadioRecovered,
    "reading_quarantined": ReadingQuarantined,
    "device_paired": DevicePaired,
    "device_unpaired": DeviceUnpaired,
    "device_rebound": DeviceRebound,
    "reading_assigned": ReadingAssigned,
}


class EventEnvelope(_Part):
    """What every event has; `event` names it and decides the shape of `detail`."""

    schema_: Literal["rpm-gateway/event/1"] = Field(default=EVENT_SCHEMA_ID, alias="schema")
    event: str
    hub_id: str
    at: UtcInstant


def _envelope(name: str, detail: type[Detail]) -> type[EventEnvelope]:
    title = "".join(part.title() for part in name.split("_"))
    tag: Any = Literal[name]
    return create_model(f"{title}Event", __base__=EventEnvelope, __doc__=detail.__doc__,
                        event=(tag, ...), detail=(detail, ...))


ENVELOPES: Final[Mapping[str, type[EventEnvelope]]] = {n: _envelope(n, d) for n, d in EVENTS.items()}
_ANY_EVENT: Any = Union[tuple(ENVELOPES.values())]  # noqa: UP007 (built from the list)
EVENT: Final[TypeAdapter[Any]] = TypeAdapter(Annotated[_ANY_EVENT, Field(discriminator="event")])


class UnknownEventError(ValueError):
    """An event name that is not in EVENTS."""


def event_message(hub_id: str, name: str, detail: Mapping[str, object],
                  at: dt.datetime | str | None = None) -> bytes:
    """The events payload; raises UnknownEventError or pydantic's ValidationError.

    `at` is when it happened (an aware datetime or an ISO string with an offset); default now.
    """
    envelope = ENVELOPES.get(name)
    if envelope is None:
        raise UnknownEventError(f"event {name!r} is not declared in gateway.messages.EVENTS")
    when = dt.datetime.now(dt.UTC).replace(microsecond=0) if at is None else at
    message = envelope.model_validate(
        {"schema": EVENT_SCHEMA_ID, "event": name, "hub_id": hub_id, "at": when, "detail": detail}
    )
    return message.model_dump_json(by_alias=True).encode()


def why_invalid(error: ValidationError) -> str:
    """A validation error without the values (an event may name a patient)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}"
        for e in error.errors(include_input=False, include_url=False)
    )


# -- schemas ------------------------------------------------------------------------------------


def _schema_text(adapter: TypeAdapter[Any], url: str, title: str, description: str) -> str:
    schema = adapter.json_schema(by_alias=True, mode="serialization")
    return dump_schema({"$id": url, "title": title, "description": description, **schema})


def status_json_schema() -> str:
    """The JSON Schema of the status topic, as checked into the repository."""
    return _schema_text(STATUS, STATUS_SCHEMA_URL, "rpm-gateway status",
                        "The retained message on `<prefix>/<hub_id>/status`: online (the hub's "
                        "health) or offline (a clean stop, or the last will); `state` tells which.")


def event_json_schema() -> str:
    """The JSON Schema of the events topic, as checked into the repository."""
    return _schema_text(EVENT, EVENT_SCHEMA_URL, "rpm-gateway event",
                        "One message on `<prefix>/<hub_id>/events` (QoS 1, best effort); `event` "
                        "names it and decides the shape of `detail`.")


def schemas() -> dict[str, str]:
    """Every checked-in schema file (under schema/) and its generated text."""
    return {
        "reading-1.json": reading_json_schema(),
        "status-1.json": status_json_schema(),
        "event-1.json": event_json_schema(),
    }


def write_schemas(directory: Path) -> None:
    """Write every schema file into `directory` (`make schema`)."""
    for name, text in schemas().items():
        (directory / name).write_text(text)
