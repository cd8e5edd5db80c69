"""The hub's own health: counters and per-device facts published on the retained status topic."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field

from gateway import __version__
from gateway.messages import HubReport


@dataclass
class DeviceStatus:
    """What the hub last saw of one paired device (no patient data)."""

    last_seen: str | None = None
    last_session: str | None = None
    last_reading: str | None = None  # when the last reading of this device was stored (UTC)
    last_error: str | None = None
    sessions_ok: int = 0
    sessions_failed: int = 0
    readings: int = 0
    clock_offset_s: float | None = None
    clock_set: bool | None = None
    battery_level: int | None = None
    rssi: int | None = None
    # The binding (filled by the agent; None until it does).
    patient_id: str | None = None
    source: str | None = None  # "config" or "registry"
    kind: str | None = None
    model: str | None = None
    serial: str | None = None


@dataclass
class RadioRecoveryStatus:
    """The recovery ladder as the status topic shows it (gateway.ble.recovery)."""

    step: str | None = None  # the latest step since the last advertisement; None: not climbing
    last_step: str | None = None  # the latest step ever taken
    last_step_at: str | None = None  # when it ran (UTC)
    last_result: str | None = None  # "ok", or "failed: <why>"
    steps_taken: int = 0
    steps_failed: int = 0
    last_advert_age_s: float | None = None  # None: no advertisement heard since the start


@dataclass
class HubStatus:
    """Counters for the status topic; updated by the agent, read by the uplink."""

    hub_id: str
    started_at: str = field(default_factory=lambda: _now())  # noqa: PLW0108 (defined below)
    devices: dict[str, DeviceStatus] = field(default_factory=dict)
    stored: int = 0
    duplicates: int = 0
    decode_errors: int = 0
    # Readings a device confirmed that could not be committed after every retry (should stay 0).
    readings_lost: int = 0
    unattributed: int = 0  # readings of another user slot or "unknown user": kept, never published
    unknown_seen: set[str] = field(default_factory=set)
    # The outbox's own persisted counters (OutboxStats), refreshed after every session.
    outbox: dict[str, object] = field(default_factory=dict)
    hub_clock_synced: bool = False
    # "ok", or "implausible: <date>" while the hub clock is certainly wrong (no device is read).
    hub_clock: str = "ok"
    radio: str = "starting"
    # "ok", or why no device is read now (disk nearly full, store failing, bound reached).
    storage: str = "starting"
    # What the outbox found at start-up when its file was damaged or empty, if anything.
    outbox_recovery: dict[str, object] | None = None
    radio_recovery: RadioRecoveryStatus = field(default_factory=RadioRecoveryStatus)
    # Per patient: days with data in the current 30-day billing period (gateway.days).
    days_with_data: dict[str, dict[str, object]] = field(default_factory=dict)
    # The agent's local control socket, if it listens on one.
    control_socket: str | None = None
    # Unattributed readings waiting in the outbox for a technician (None: not counted).
    unattributed_pending: int | None = None

    def device(self, address: str) -> DeviceStatus:
        """The entry for a paired device, created on first use."""
        return self.devices.setdefault(address.upper(), DeviceStatus())

    def saw_unknown(self, address: str) -> None:
        """Count a device that is not ours; kept only as a salted hash (neighbours' privacy)."""
        digest = hashlib.sha256(f"{self.hub_id}|{address.upper()}".encode()).hexdigest()[:12]
        if len(self.unknown_seen) < 10_000:
            self.unknown_seen.add(digest)

    def report(self) -> HubReport:
        """The status payload (without `broker` and `state`, which the uplink adds), validated:
        instants come out as `…Z` whatever form the agent stored them in."""
        return HubReport.model_validate(self._fields())

    def as_dict(self) -> dict[str, object]:
        """The status payload as JSON values (without `broker` and `state`)."""
        return self.report().model_dump(mode="json", by_alias=True)

    def _fields(self) -> dict[str, object]:
        return {
            "schema": "rpm-gateway/status/1",
            "hub_id": self.hub_id,
            "version": __version__,
            "started_at": self.started_at,
            "at": _now(),
            "hub_clock_synced": self.hub_clock_synced,
            "hub_clock": self.hub_clock,
            "radio": self.radio,
            "radio_recovery": vars(self.radio_recovery),
            "readings_stored": self.stored,
            "duplicates_ignored": self.duplicates,
            "decode_errors": self.decode_errors,
            "unattributed_readings": self.unattributed,
            "unattributed_pending": self.unattributed_pending,
            "readings_lost": self.readings_lost,
            "storage": self.storage,
            "outbox_recovery": self.outbox_recovery,
            "unknown_devices_seen": len(self.unknown_seen),
            "outbox": self.outbox or None,  # empty until the outbox was first read
            "devices": {a: vars(d) for a, d in sorted(self.devices.items())},
            "days_with_data": self.days_with_data,
            "control_socket": self.control_socket,
        }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
