"""The hub's configuration: TOML, validated by pydantic, with errors that name the key."""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# A BLE address as BlueZ prints it; simulated devices use the same form.
ADDRESS_RE = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$")
# Where `rpm-gateway simulate` serves the virtual radio's devices (development only).
LINK_RE = re.compile(r"^tcp:[^:\s]+:[0-9]{1,5}$")
# Topic levels and ids go into MQTT topics: no wildcards, separators or spaces.
ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and what is wrong."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubConfig(_Section):
    """Who this hub is and where it keeps its state."""

    id: Annotated[str, Field(pattern=ID_RE.pattern)]
    timezone: str = "UTC"
    data_dir: Path = Path("/var/lib/rpm-gateway")
    # Whether the hub clock may be trusted to stamp readings and set device clocks.
    # None: ask the kernel whether NTP has synchronised it (a Pi has no RTC).
    trust_clock: bool | None = None
    # Where the agent listens for `rpm-gateway` commands (the unit's RuntimeDirectory=).
    control_socket: Path = Path("/run/rpm-gateway/control.sock")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"unknown IANA time zone {v!r}") from e
        return v

    @property
    def zone(self) -> ZoneInfo:
        """The patient's home time zone: device clocks show local wall-clock time."""
        return ZoneInfo(self.timezone)


class TlsConfig(_Section):
    """TLS to the broker; a client certificate and key make it mutual TLS."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure_skip_verify: bool = False


class MqttConfig(_Section):
    """Where readings go and how the uplink behaves."""

    host: str = "localhost"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_./-]{1,128}$")] = "rpm"
    client_id: str | None = None
    username: str | None = None
    # The password lives in its own file (mode 0600) so the config can be shown and shared.
    password_file: Path | None = None
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 60
    # "auto": MQTT 5, falling back to 3.1.1 for a broker that refuses it. MQTT 5 is preferred:
    # only it tells us when the broker refuses a reading (PUBACK reason code).
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    inflight: Annotated[int, Field(ge=1, le=1000)] = 20
    reconnect_min_s: Annotated[float, Field(gt=0)] = 1.0
    # Full jitter up to this ceiling: a hub comes back within a minute of the broker, and a
    # fleet that lost it together does not reconnect in step.
    reconnect_max_s: Annotated[float, Field(gt=0)] = 60.0
    publish_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    # A reading the broker refuses for good is quarantined and offered again this rarely.
    quarantine_retry_s: Annotated[float, Field(gt=0)] = 3600.0
    # Wrong credentials will not fix themselves: retry rarely instead of hammering the broker.
    auth_retry_s: Annotated[float, Field(gt=0)] = 600.0
    tls: TlsConfig | None = None


class OutboxConfig(_Section):
    """The on-disk store-and-forward queue and what happens when it is full."""

    path: Path | None = None  # default: <hub.data_dir>/outbox.db
    max_pending: Annotated[int, Field(ge=100)] = 100_000
    max_pending_age_days: Annotated[int, Field(ge=1)] = 365
    when_full: Literal["reject_new", "drop_oldest"] = "reject_new"
    # Delivered readings are kept (not re-published) for de-duplication and days-with-data.
    keep_delivered_days: Annotated[int, Field(ge=31)] = 90
    # Below this much free space on the outbox's filesystem no device is read: SQLite's WAL
    # needs room to commit, and a device forgets what it indicated.
    min_free_mb: Annotated[float, Field(ge=0.25)] = 2.0


class SimulatedDeviceConfig(_Section):
    """A device on the virtual radio (development and demo only)."""

    profile: Literal["weight_scale", "blood_pressure"]
    address: Annotated[str, Field(pattern=ADDRESS_RE.pattern)]
    name: str | None = None
    readings: Annotated[int, Field(ge=0, le=10_000)] = 3
    interval_s: Annotated[float, Field(gt=0)] = 2.0
    bonding_required: bool = False
    clock_offset_s: float = 0.0
    # Advertise from switch-on for this long even with nothing to send, as a device whose
    # Bluetooth button the technician holds, so `scan` and `pair` find it before it measures.
    pairing_mode_s: Annotated[float, Field(ge=0)] = 0.0


class RadioConfig(_Section):
    """Which Bluetooth radio the agent uses."""

    kind: Literal["bluez", "virtual"] = "bluez"
    adapter: str | None = None  # e.g. "hci1"; None = the system default
    connect_timeout_s: Annotated[float, Field(gt=0)] = 20.0
    operation_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # A hard deadline for one whole device session: a wedged stack must not hang the agent.
    session_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    quiet_s: Annotated[float, Field(gt=0)] = 5.0
    connect_attempts: Annotated[int, Field(ge=1, le=10)] = 4
    # After a session that brought nothing, wait longer before the next (doubling up to this),
    # so a device that never stops advertising is not reconnected every few seconds.
    idle_backoff_max_s: Annotated[float, Field(gt=0)] = 300.0
    # Recovery ladder (gateway.ble.recovery): with paired devices and no advertisement at all for
    # this long, restart discovery; then power-cycle the adapter; then restart bluetoothd (if
    # allowed), one step per further silent period; then the same with doubling waits up to
    # recovery_max_interval_s.
    scan_silence_s: Annotated[float, Field(gt=0)] = 300.0
    recovery_restart_bluetooth: bool = True
    recovery_max_interval_s: Annotated[float, Field(gt=0)] = 21600.0
    # The adapter cannot connect while it scans (Connect answers "in progress"): scanning pauses
    # for each connection. Learned by itself at the first such refusal; set it to start so.
    pause_scan_to_connect: bool = False
    simulated: tuple[SimulatedDeviceConfig, ...] = ()
    # Virtual radio only: None puts the simulated devices in this process; "tcp:HOST:PORT"
    # reaches devices run by `rpm-gateway simulate` in another process.
    link: Annotated[str, Field(pattern=LINK_RE.pattern)] | None = None


class DeviceBinding(_Section):
    """A paired device bound to a patient: the allowlist entry."""

    address: Annotated[str, Field(pattern=ADDRESS_RE.pattern)]
    patient_id: Annotated[str, Field(pattern=ID_RE.pattern)]
    driver: str | None = None  # None: chosen by the driver registry from the advertisement
    user_index: int | None = None  # the device's user slot for this patient, if it has slots
    # The day monitoring with this device began (anchors the 30-day billing periods); None:
    # the day the hub first ran with this binding (recorded in <data_dir>/enrolment.json).
    enrolled: dt.date | None = None

    @field_validator("address", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v


class GatewayConfig(_Section):
    """The whole configuration file."""

    hub: HubConfig
    mqtt: MqttConfig = MqttConfig()
    outbox: OutboxConfig = OutboxConfig()
    radio: RadioConfig = RadioConfig()
    devices: tuple[DeviceBinding, ...] = ()
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("radio", mode="before")
    @classmethod
    def _radio_shorthand(cls, v: object) -> object:
        # `radio = "virtual"` is short for `[radio] kind = "virtual"`.
        return {"kind": v} if isinstance(v, str) else v

    @property
    def outbox_path(self) -> Path:
        """Where the outbox database lives."""
        return self.outbox.path or self.hub.data_dir / "outbox.db"

    @field_validator("devices")
    @classmethod
    def _unique_addresses(cls, v: tuple[DeviceBinding, ...]) -> tuple[DeviceBinding, ...]:
        seen: dict[str, int] = {}
        for n, d in enumerate(v, 1):
            if d.address in seen:
                raise ValueError(f"device {d.address} is listed twice: [[devices]] entries "
                                 f"{seen[d.address]} and {n}")
            seen[d.address] = n
        return v


def _describe(err: ValidationError, text: str, source: str) -> str:
    # The wording lives with `config check`, so the one-line error and the full report agree.
    from gateway.config_check import one_line, validation_problems  # noqa: PLC0415

    return one_line(source, validation_problems(err, text))


def parse_config(text: str, source: str = "<config>") -> GatewayConfig:
    """Validate TOML text; raises ConfigError naming the key and what is wrong."""
    from gateway.config_check import one_line, syntax_problem  # noqa: PLC0415

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(one_line(source, [syntax_problem(e)])) from e
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, text, source)) from e


def load_config(path: Path) -> GatewayConfig:
    """Read and validate a config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: is not UTF-8 text") from e
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: does not exist (start from config/gateway.example.toml)") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {(e.strerror or type(e).__name__).lower()}") from e
    return parse_config(text, str(path))


def read_password(cfg: MqttConfig) -> str | None:
    """The broker password from its file, without a trailing newline."""
    if cfg.password_file is None:
        return None
    try:
        return cfg.password_file.read_text(encoding="utf-8").rstrip("\n")
    except OSError as e:
        raise ConfigError(f"mqtt.password_file: cannot read {cfg.password_file}: {e.strerror}") from e
