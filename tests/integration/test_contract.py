"""Every message a running agent publishes validates against the checked-in schema, formats on.

A clinic subscribes to ``rpm/<hub_id>/#`` and validates each message with the schema files in
schema/ (jsonschema, Draft 2020-12, format checking with rfc3339-validator). Here the agent runs
against a real mosquitto with simulated devices: in this process, stopped cleanly (the offline
message), and as `rpm-gateway run` killed with SIGKILL (the broker's last will).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from drivers.codec.blood_pressure import BloodPressureMeasurement
from drivers.simulated.blood_pressure import demo_cuff
from drivers.simulated.weight_scale import demo_scale
from gateway.broker import LocalBroker
from gateway.config import GatewayConfig, parse_config
from gateway.sim.radio import VirtualRadio
from tests.conftest import MqttSubscriber
from tests.integration import tiers
from tests.integration.hub_toml import FAST_RADIO, devices, hub_toml
from tests.integration.test_pipeline import bp as pipeline_bp
from tests.schemas import EVENT, READING, STATUS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HUB = "hub-contract"
ZONE = "America/New_York"  # the patient's home: not the machine's, not UTC
CUFF = "C0:00:00:00:BC:01"
SCALE = "C0:00:00:00:5C:01"
NEIGHBOUR = "C0:00:00:00:BC:99"
Subscribe = Callable[..., Awaitable[MqttSubscriber]]




SCHEMAS = {"readings": READING, "status": STATUS, "events": EVENT}


def by_topic(sub: MqttSubscriber) -> dict[str, list[dict[str, Any]]]:
    """The messages received so far, by the topic's last level."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in SCHEMAS}
    for m in sub.messages:
        suffix = str(m.topic).removeprefix(f"rpm/{HUB}/")
        out.setdefault(suffix, []).append(json.loads(bytes(m.payload)))
    return out


def assert_all_valid(messages: dict[str, list[dict[str, Any]]]) -> None:
    assert set(messages) == set(SCHEMAS), f"unexpected topics: {set(messages) - set(SCHEMAS)}"
    problems = [
        f"{topic} #{n}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
        for topic, payloads in messages.items()
        for n, payload in enumerate(payloads)
        for e in SCHEMAS[topic].iter_errors(payload)
    ]
    assert problems == [], "\n".join(problems[:20])


def events(messages: dict[str, list[dict[str, Any]]]) -> set[str]:
    return {e["event"] for e in messages["events"]}


def bp(sys_: int, dia: int, mean: int, pulse: int, minutes_ago: int,
       user: int = 1) -> BloodPressureMeasurement:
    """A cuff reading stamped `minutes_ago` on a clock showing the patient's local time."""
    return pipeline_bp(sys_, dia, mean, pulse, minutes_ago, user=user, zone=ZoneInfo(ZONE))


def config(tmp_path: Path, broker: LocalBroker) -> GatewayConfig:
    return parse_config(hub_toml(HUB, tmp_path, broker, zone=ZONE, extra=devices(
        (CUFF, "patient-1", 1), (SCALE, "patient-1"))))


async def test_every_message_of_a_running_agent_and_its_clean_stop_validates(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    sub = await mqtt_subscriber(mosquitto, f"rpm/{HUB}/#")
    async with VirtualRadio() as radio:
        # Two readings of the patient (user 1), a garbled frame (decode_error), a spouse's
        # reading on the same cuff (unattributed_readings); the cuff clock runs 2 min fast
        # (clock_drift). A neighbour's cuff is on the air too.
        cuff = demo_cuff(CUFF, readings=[bp(128, 82, 97, 64, 9), b"\x1e\x80",
                                         bp(141, 90, 107, 80, 7, user=2), bp(121, 78, 92, 66, 5)],
                         clock_offset_s=120)
        await radio.add_peripheral(cuff)
        await radio.add_peripheral(demo_scale(SCALE, readings=2))
        await radio.add_peripheral(demo_cuff(NEIGHBOUR, readings=1, bonding_required=False))

        def settled(_: object) -> bool:
            got = by_topic(sub)
            return (len(got["readings"]) >= 4
                    and {"clock_drift", "decode_error", "unattributed_readings"} <= events(got)
                    and any(s.get("commit_window_ms") and s.get("outbox")
                            and all(d["sessions_ok"] >= 1 for d in s["devices"].values())
                            and s["unknown_devices_seen"] >= 1 for s in got["status"]))

        async with tiers.running_agent(config(tmp_path, mosquitto), radio):
            await sub.wait_until(settled, timeout=30)
        # Stopped cleanly: the goodbye replaces the retained online status.
        await sub.wait_until(lambda _: by_topic(sub)["status"][-1]["state"] == "offline", timeout=10)
    got = by_topic(sub)
    assert_all_valid(got)
    cuff_readings = [r for r in got["readings"] if r["device"]["address"] == CUFF]
    assert len(cuff_readings) == 2
    for r in cuff_readings:
        assert r["device_time"] is not None and r["timezone"] == ZONE
        assert r["time_source"] == "device_clock_corrected"
    # The cuff's wall clock is the patient's: the instant is that time in New York, in UTC.
    first = cuff_readings[0]
    local = dt.datetime.fromisoformat(first["device_time"]) - dt.timedelta(
        seconds=first["device_clock_offset_s"])
    expected = local.replace(tzinfo=ZoneInfo(ZONE)).astimezone(dt.UTC)
    assert abs(dt.datetime.fromisoformat(first["measured_at"]) - expected) < dt.timedelta(seconds=1)
    statuses = got["status"]
    assert statuses[0]["state"] == "online"
    assert statuses[-1] == {"schema": "rpm-gateway/status/1", "hub_id": HUB, "state": "offline",
                            "at": statuses[-1]["at"], "reason": "stopped"}
    assert all(e["hub_id"] == HUB and e["schema"] == "rpm-gateway/event/1" for e in got["events"])


def process_config(tmp_path: Path, broker: LocalBroker) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(hub_toml(HUB, tmp_path / "state", broker, zone=ZONE, log_level="info",
                             radio=FAST_RADIO + f"""
[[radio.simulated]]
profile = "weight_scale"
address = "{SCALE}"
readings = 2
interval_s = 0.3
clock_offset_s = 300
[[radio.simulated]]
profile = "blood_pressure"
address = "{CUFF}"
readings = 2
interval_s = 0.4
bonding_required = true
""", extra=devices((SCALE, "patient-1"), (CUFF, "patient-1"))))
    return path


async def test_the_last_will_of_a_killed_agent_validates(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    sub = await mqtt_subscriber(mosquitto, f"rpm/{HUB}/#")
    started = dt.datetime.now(dt.UTC).replace(microsecond=0)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "run", "--config", str(process_config(tmp_path, mosquitto)),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        await sub.wait_until(lambda _: len(by_topic(sub)["readings"]) >= 4
                             and "clock_drift" in events(by_topic(sub))
                             and any(s["state"] == "online" for s in by_topic(sub)["status"]),
                             timeout=30)
        proc.kill()  # SIGKILL: no goodbye; the broker sees the connection drop
        await proc.wait()
        await sub.wait_until(lambda _: by_topic(sub)["status"][-1]["state"] == "offline", timeout=10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    got = by_topic(sub)
    assert_all_valid(got)
    will = got["status"][-1]
    assert will["reason"] == "connection_lost"
    assert set(will) == {"schema", "hub_id", "state", "at", "reason"}
    # Fixed when the connection opened: after the process started, before it was killed.
    assert started <= dt.datetime.fromisoformat(will["at"]) <= dt.datetime.now(dt.UTC)
    assert {r["timezone"] for r in got["readings"]} == {ZONE}
