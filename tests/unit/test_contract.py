"""Every message the hub publishes validates against its checked-in schema, formats checked.

The schema files are the clinic's contract (schema/*.json); these tests build messages the way
the agent does and validate them with jsonschema's Draft 2020-12 validator and its format
checker (rfc3339-validator installed, so `date-time` is really checked).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from jsonschema import Draft202012Validator

from drivers.base import ClockCheck, DeviceInfo
from drivers.blood_pressure import decode_bp
from drivers.weight_scale import decode_weight
from gateway import agent as agent_module
from gateway import uplink as uplink_module
from gateway.ble.recovery import Step
from gateway.config import DeviceBinding, MqttConfig
from gateway.days import DaysWithData, period_on
from gateway.intake import build_reading
from gateway.messages import EVENTS, RecoveryStep, event_message, offline_message
from gateway.outbox import OutboxStats
from gateway.status import HubStatus
from gateway.uplink import Uplink
from gateway.uplink_errors import ConnectError
from gateway.uplink_status import Announcer
from tests.schemas import EVENT, READING, STATUS, errors

ROOT = Path(__file__).resolve().parents[2]
HUB = "hub-1"
CUFF = "C0:00:00:00:BC:01"
# health-devices.md §12, BPM row 1: 2025-03-14 07:52:10 on the cuff's clock, 128/82/97, pulse 64.
BPM = bytes.fromhex("1E800052006100E907030E07340A4000010400")
NEW_YORK = ZoneInfo("America/New_York")




def instants(message: Any, path: str = "") -> list[tuple[str, str]]:
    """Every string in a message that looks like a date and time."""
    if isinstance(message, dict):
        return [i for k, v in message.items() for i in instants(v, f"{path}/{k}")]
    if isinstance(message, list):
        return [i for n, v in enumerate(message) for i in instants(v, f"{path}/{n}")]
    if isinstance(message, str) and re.match(r"^\d{4}-\d{2}-\d{2}T", message):
        return [(path, message)]
    return []


def test_the_format_checker_really_checks_date_time() -> None:
    # Without rfc3339-validator, jsonschema skips `date-time` silently and these tests would
    # pass for the wrong reason.
    checker = Draft202012Validator.FORMAT_CHECKER
    assert not checker.conforms("2025-03-14T07:52:10", "date-time")
    assert checker.conforms("2025-03-14T07:52:10Z", "date-time")


# -- readings -----------------------------------------------------------------------------------


def reading(raw: bytes = BPM, *, weight: bool = False, zone: ZoneInfo = NEW_YORK,
            clock: ClockCheck | None = None) -> dict[str, Any]:
    m = decode_weight(raw) if weight else decode_bp(raw)
    r = build_reading(
        m, hub_id=HUB, binding=DeviceBinding(address=CUFF, patient_id="patient-1"), address=CUFF,
        info=DeviceInfo(manufacturer="Sim", model="BP-1", serial="BP00BC01"),
        driver_name="sig_blood_pressure", driver_version="1.0", clock=clock,
        received_at=dt.datetime.now(dt.UTC), zone=zone, hub_clock_synced=True)
    result: dict[str, Any] = json.loads(r.to_json())
    return result


def test_a_reading_with_device_time_validates() -> None:
    r = reading(clock=ClockCheck(device_time=None, offset_s=30.0, set_ok=True))
    assert errors(READING, r) == []
    # The device's wall clock as sent, no zone; the zone it is in is the patient's.
    assert r["device_time"] == "2025-03-14T07:52:10"
    assert r["timezone"] == "America/New_York"
    assert r["time_source"] == "device_clock_corrected"
    # 07:52:10 minus 30 s in New York (EDT since 9 March) is 11:51:40 UTC.
    assert r["measured_at"] == "2025-03-14T11:51:40Z"
    assert r["received_at"].endswith("Z")


def test_a_reading_without_device_time_validates() -> None:
    # A scale frame without a time stamp: 82.0 kg (health-devices.md §12 weight row).
    r = reading(bytes.fromhex("000832"), weight=True)
    assert r["device_time"] is None and r["time_source"] == "hub_receipt"
    assert errors(READING, r) == []


def test_a_reading_stored_by_an_older_hub_still_validates() -> None:
    # Readings in an outbox written before `timezone` existed are published as stored.
    r = reading()
    del r["timezone"]
    assert errors(READING, r) == []


@pytest.mark.parametrize(("field", "value"), [
    ("measured_at", "2025-03-14T11:51:40+00:00"),  # an instant must say Z
    ("device_time", "2025-03-14T07:52:10-04:00"),  # a local time carries no zone
    ("device_time", "2025-03-14 07:52:10"),
    ("timezone", "New York"),
])
def test_the_reading_schema_rejects(field: str, value: str) -> None:
    r = reading()
    r[field] = value
    assert errors(READING, r)


# -- status -------------------------------------------------------------------------------------


def busy_status() -> HubStatus:
    """A status with every part filled the way the agent fills it (its timestamps included)."""
    s = HubStatus(hub_id=HUB)
    now = agent_module._now()  # the agent's own time stamps: "+00:00"
    cuff = s.device(CUFF)
    cuff.last_seen = cuff.last_session = cuff.last_reading = now
    cuff.sessions_ok, cuff.readings, cuff.rssi = 3, 4, -61
    cuff.clock_offset_s, cuff.clock_set, cuff.battery_level = 0.4, True, 64
    cuff.patient_id, cuff.source, cuff.kind = "patient-1", "registry", "blood_pressure"
    cuff.model, cuff.serial = "SIM-BP1", "BP00BC01"
    scale = s.device("c0:00:00:00:5c:01")
    scale.last_error, scale.sessions_failed = "out of range: move the hub closer", 1
    s.stored, s.duplicates, s.decode_errors, s.unattributed = 4, 2, 1, 1
    s.unattributed_pending, s.control_socket = 1, "/run/rpm-gateway/control.sock"
    s.saw_unknown("C0:00:00:00:BC:99")
    s.outbox = dataclasses.asdict(OutboxStats(
        pending=1, oldest_pending=dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
        delivered=3, db_bytes=40960, rejected_full=0, dropped=0))
    s.outbox_recovery = {"kind": "corrupt", "salvaged": 3, "lost": 1,
                         "moved_to": "/var/lib/rpm-gateway/outbox.db.corrupt", "detail": "malformed"}
    s.hub_clock_synced, s.radio, s.storage = True, "ok", "ok"
    rs = s.radio_recovery
    rs.step, rs.last_step, rs.last_step_at, rs.last_result = None, "power_cycle", now, "ok"
    rs.steps_taken, rs.last_advert_age_s = 1, 0.3
    today = dt.date(2026, 3, 20)
    period = period_on(dt.date(2026, 3, 1), today)
    s.days_with_data = {"patient-1": DaysWithData(("2026-03-01", "2026-03-02"), period,
                                                  today).as_dict()}
    return s


def online(s: HubStatus, provider: Any = None) -> dict[str, Any]:
    """The online status exactly as the uplink's publisher builds it for the agent (with the
    broker's part from an Uplink that never connected)."""
    uplink = Uplink(MqttConfig(host="127.0.0.1"), s.hub_id, outbox=None,  # type: ignore[arg-type]
                    status=provider or s.as_dict)
    announcer = Announcer(s.hub_id, uplink.topic, provider or s.as_dict, uplink.broker_status,
                          publish_timeout_s=1, event_queue_size=1)
    result: dict[str, Any] = json.loads(announcer.status_payload())
    return result


def test_a_fresh_status_validates() -> None:
    # Before anything happened: no outbox read yet, no device heard, no commit window.
    s = HubStatus(hub_id=HUB)
    s.device(CUFF)
    msg = online(s)
    assert msg["state"] == "online" and msg["outbox"] is None
    assert "commit_window_ms" not in msg
    assert errors(STATUS, msg) == []


def test_a_busy_status_validates_and_every_instant_says_z() -> None:
    s = busy_status()

    def with_windows() -> dict[str, object]:  # as agent._status_dict adds it
        doc = s.as_dict()
        doc["commit_window_ms"] = agent_module._window_summary([0.008, 0.012, 0.02])
        return doc

    msg = online(s, with_windows)
    assert errors(STATUS, msg) == []
    found = dict(instants(msg))
    assert {"/started_at", "/at", "/broker/since", f"/devices/{CUFF}/last_seen",
            f"/devices/{CUFF}/last_session", f"/devices/{CUFF}/last_reading",
            "/radio_recovery/last_step_at", "/outbox/oldest_pending"} <= set(found)
    assert all(v.endswith("Z") for v in found.values()), found
    assert msg["devices"][CUFF]["patient_id"] == "patient-1"
    assert msg["control_socket"] == "/run/rpm-gateway/control.sock"


@pytest.mark.parametrize("reason", ["stopped", "connection_lost"])
def test_the_offline_message_validates(reason: str) -> None:
    msg = json.loads(offline_message(HUB, reason))  # type: ignore[arg-type]
    assert errors(STATUS, msg) == []
    assert set(msg) == {"schema", "hub_id", "state", "at", "reason"}
    assert msg["state"] == "offline" and msg["at"].endswith("Z")


async def test_the_last_will_is_the_offline_message(monkeypatch: pytest.MonkeyPatch) -> None:
    wills: list[Any] = []

    async def no_broker(cfg: Any, client_id: str, will: Any, *args: Any, **kw: Any) -> Any:
        wills.append(will)
        raise ConnectError("no broker in a unit test")

    monkeypatch.setattr(uplink_module, "open_client", no_broker)
    uplink = Uplink(MqttConfig(host="127.0.0.1"), HUB, outbox=None,  # type: ignore[arg-type]
                    status=dict)
    with pytest.raises(ConnectError):
        await uplink._connect()
    (will,) = wills
    assert will.topic == f"rpm/{HUB}/status" and will.retain and will.qos == 1
    msg = json.loads(will.payload)
    assert errors(STATUS, msg) == []
    assert msg["reason"] == "connection_lost"
    assert set(msg) == set(json.loads(offline_message(HUB, "stopped")))


def test_the_status_schema_rejects_an_offset_and_a_partial_status() -> None:
    msg = online(busy_status())
    msg["at"] = msg["at"].replace("Z", "+00:00")
    assert errors(STATUS, msg)
    assert errors(STATUS, {"hub_id": HUB, "state": "offline"})  # the old will


def test_recovery_steps_are_the_ladders() -> None:
    assert set(RecoveryStep.__args__) == {s.value for s in Step}  # type: ignore[attr-defined]


# -- events -------------------------------------------------------------------------------------

# One detail per declared event, as the agent (or the uplink, or the lead's pairing) builds it.
EXAMPLES: dict[str, dict[str, object]] = {
    "storage_pressure": {"state": "blocked", "reason": "disk nearly full: 12 MiB free"},
    "outbox_recovered": {"kind": "empty_file", "salvaged": 0, "lost": 0, "moved_to": None,
                         "detail": "the outbox file was empty"},
    "reading_lost": {"device": CUFF, "characteristic": "2a35", "error": "OperationalError"},
    "decode_error": {"characteristic": "2a9d"},
    "clock_drift": {"device": CUFF, "offset_s": 125.3, "set": True},
    "bond_lost": {"device": CUFF, "advice": "put the cuff in pairing mode and pair it again"},
    "unattributed_readings": {"device": CUFF, "count": 2},
    "bluetoothd_restarted": {},
    "radio_exclusive": {"reason": "connect refused while scanning"},
    "radio_recovery": {"step": "power_cycle", "result": "failed", "reason": "no advertisement "
                       "for 300 s", "error": "org.bluez.Error.Busy", "next_step_in_s": 600},
    "radio_recovered": {"step": "restart_discovery", "step_result": "ok", "steps": 1,
                        "silent_s": 312.4},
    "reading_quarantined": {"seq": 7, "reason": "broker refused it: Not authorized"},
    "device_paired": {"device": CUFF, "patient_id": "patient-1", "kind": "blood_pressure",
                      "user_index": 1, "by": "tech-anna"},
    "device_unpaired": {"device": CUFF, "patient_id": "patient-1", "by": "tech-anna"},
    "device_rebound": {"device": CUFF, "from_patient_id": "patient-1",
                       "to_patient_id": "patient-2", "by": "tech-anna"},
    "reading_assigned": {"reading_id": "0123456789abcdef0123456789abcdef", "device": CUFF,
                         "patient_id": "patient-2", "by": "tech-anna"},
}


def test_every_declared_event_has_an_example() -> None:
    assert set(EXAMPLES) == set(EVENTS)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
async def test_every_event_validates(name: str) -> None:
    uplink = Uplink(MqttConfig(host="127.0.0.1"), HUB, outbox=None,  # type: ignore[arg-type]
                    status=dict)
    await uplink.publish_event(name, EXAMPLES[name])
    (payload,) = uplink._events
    msg = json.loads(payload)
    assert errors(EVENT, msg) == []
    assert msg["schema"] == "rpm-gateway/event/1" and msg["event"] == name
    assert msg["hub_id"] == HUB and msg["at"].endswith("Z")
    assert msg["detail"] == {**dict.fromkeys(_nullable_defaults(name)), **EXAMPLES[name]}


def _nullable_defaults(name: str) -> list[str]:
    return [f for f, info in EVENTS[name].model_fields.items() if not info.is_required()]


async def test_an_event_keeps_the_time_it_happened() -> None:
    # The CLI journals a pairing when it is made; the agent publishes it later, with that time.
    uplink = Uplink(MqttConfig(host="127.0.0.1"), HUB, outbox=None,  # type: ignore[arg-type]
                    status=dict)
    await uplink.publish_event("device_unpaired", {**EXAMPLES["device_unpaired"], "by": None},
                               at="2026-03-01T10:00:00+00:00")
    (payload,) = uplink._events
    msg = json.loads(payload)
    assert msg["at"] == "2026-03-01T10:00:00Z" and msg["detail"]["by"] is None
    assert errors(EVENT, msg) == []


def test_device_paired_without_kind_sends_null() -> None:
    detail = {k: v for k, v in EXAMPLES["device_paired"].items() if k != "kind"}
    msg = json.loads(event_message(HUB, "device_paired", detail))
    assert msg["detail"]["kind"] is None
    assert errors(EVENT, msg) == []


@pytest.mark.parametrize(("name", "detail"), [
    ("no_such_event", {}),
    ("clock_drift", {"i": 1}),  # not its detail
    ("clock_drift", {**EXAMPLES["clock_drift"], "patient": "p"}),  # an undeclared field
    ("device_paired", {**EXAMPLES["device_paired"], "by": ""}),  # nobody
])
async def test_an_undeclared_event_or_detail_is_not_published(
    name: str, detail: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    uplink = Uplink(MqttConfig(host="127.0.0.1"), HUB, outbox=None,  # type: ignore[arg-type]
                    status=dict)
    await uplink.publish_event(name, detail)
    assert not uplink._events
    assert "not published" in caplog.text
    assert "patient-1" not in caplog.text  # the log names fields, never values


def test_the_event_schema_rejects_what_the_model_rejects() -> None:
    good = json.loads(event_message(HUB, "clock_drift", EXAMPLES["clock_drift"]))
    assert errors(EVENT, {**good, "event": "no_such_event"})
    assert errors(EVENT, {**good, "detail": {"i": 1}})
    assert errors(EVENT, {**good, "at": good["at"].replace("Z", "+00:00")})


# Published directly (agent._event, uplink.publish_event), or journalled by the CLI for the
# agent to publish (the pairing registry's {"name": ...} entries, registry.journal(...)).
EMITTED = re.compile(r"""(?:_event\(|publish_event\(|journal\(|\{"name":)\s*["']([a-z_]+)["']""")


def test_every_event_the_gateway_emits_is_declared() -> None:
    used = {m for path in (ROOT / "gateway").rglob("*.py")
            for m in EMITTED.findall(path.read_text())}
    # The pattern finds the agent's and the uplink's calls (a sanity floor, not the list).
    assert {"storage_pressure", "clock_drift", "reading_quarantined", "bluetoothd_restarted"} <= used
    assert used - set(EVENTS) == set(), "declare these events in gateway.messages.EVENTS"


# -- the README is part of the contract ---------------------------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_json_blocks() -> list[Any]:
    return [json.loads(b) for b in re.findall(r"```json\n(.*?)```", README.read_text(), re.S)]


def test_the_readmes_example_messages_validate() -> None:
    validators = {"rpm-gateway/reading/1": READING, "rpm-gateway/status/1": STATUS,
                  "rpm-gateway/event/1": EVENT}
    blocks = _readme_json_blocks()
    assert {b["schema"] for b in blocks} >= {"rpm-gateway/reading/1", "rpm-gateway/status/1"}
    for block in blocks:
        assert errors(validators[block["schema"]], block) == [], block


def test_the_readme_documents_every_event_with_its_fields() -> None:
    text = README.read_text()
    for name, detail in EVENTS.items():
        (row,) = [line for line in text.splitlines() if line.startswith(f"| `{name}` |")]
        for field in detail.model_fields:
            assert f"`{field}`" in row, (name, field)
