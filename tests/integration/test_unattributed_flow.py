"""Unattributed readings end to end: a shared cuff bound to one user slot, the other slot's and
the guest's readings kept on the hub and never published, counted in status, listed by
`rpm-gateway unattributed`, and published under a patient once `rpm-gateway assign` gives them
one, with a `reading_assigned` event; through the running agent's socket and by the CLI alone
on the state directory (the next agent publishes what it assigned)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.simulated.blood_pressure import demo_cuff
from gateway.agent import Agent
from gateway.broker import LocalBroker
from gateway.config import GatewayConfig, parse_config
from gateway.sim.radio import VirtualRadio
from tests.integration import tiers
from tests.integration.hub_toml import devices, hub_toml
from tests.integration.test_pipeline import bp, until
from tests.integration.test_technician import cli
from tests.schemas import EVENT, READING, errors

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HUB = "hub-unattr"
CUFF = "C0:00:00:00:BC:01"
READINGS = f"rpm/{HUB}/readings"
EVENTS = f"rpm/{HUB}/events"
TECH = "tech7"
ME = pwd.getpwuid(os.getuid()).pw_name
# The technician as the agent records them: root (sudo) may say whom it acts for.
BY_AGENT = f"{TECH} (as {ME})" if os.getuid() == 0 else ME
Subscribe = Callable[..., Awaitable[Any]]




@pytest.fixture
def short_dir() -> Iterator[Path]:
    """For the control socket: sun_path is ~107 bytes, pytest's tmp_path can be longer."""
    d = tempfile.mkdtemp(prefix="unattr-", dir="/tmp")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def write_config(tmp_path: Path, sock_dir: Path, broker: LocalBroker) -> tuple[Path, GatewayConfig]:
    """The cuff provisioned in the config for patient-1, user slot 1 only."""
    path = tmp_path / "gateway.toml"
    path.write_text(hub_toml(HUB, tmp_path / "state", broker,
                             control_socket=sock_dir / "control.sock",
                             extra=devices((CUFF, "patient-1", 1))))
    return path, parse_config(path.read_text())


def shared_cuff() -> Any:
    # Slot 2 (the spouse), 255 ("unknown user": a guest) and slot 1 (the patient).
    return demo_cuff(CUFF, readings=[bp(141, 91, 108, 81, 9, user=2),
                                     bp(133, 85, 101, 77, 8, user=0xFF),
                                     bp(122, 79, 93, 66, 7, user=1)])


def systolic(reading: dict[str, Any]) -> float:
    return float(next(o["value"] for o in reading["observations"] if o["code"] == "8480-6"))


async def tech(config: Path, *args: str) -> tuple[int, str, str]:
    """`rpm-gateway ARGS --config CONFIG` as the technician tech7 (under sudo, if root)."""
    return await cli(*args, "--config", str(config), env={"SUDO_USER": TECH})


async def listed(config: Path) -> list[dict[str, Any]]:
    code, out, err = await tech(config, "unattributed", "--json")
    assert code == 0, err
    rows: list[dict[str, Any]] = json.loads(out)
    return rows


@contextlib.asynccontextmanager
async def agent_holding_two(cfg: GatewayConfig, readings: Any) -> AsyncIterator[Agent]:
    """The agent on the shared cuff, once it published the patient's reading and kept two."""
    async with VirtualRadio() as radio:
        await radio.add_peripheral(shared_cuff())
        async with tiers.running_agent(cfg, radio, "virtual") as (agent, _):
            await until(cfg.hub.control_socket.exists, timeout=10)
            await readings.wait_for(1, timeout=20)
            await until(lambda: agent.status.unattributed == 2, timeout=10)
            yield agent


def assigned_events(events: Any) -> list[dict[str, Any]]:
    return [e for e in events.payloads() if e["event"] == "reading_assigned"]


async def test_unattributed_readings_through_the_running_agent(
    tmp_path: Path, short_dir: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    readings = await mqtt_subscriber(mosquitto, READINGS)
    events = await mqtt_subscriber(mosquitto, EVENTS)
    config, cfg = write_config(tmp_path, short_dir, mosquitto)
    async with agent_holding_two(cfg, readings):
        await asyncio.sleep(1.0)  # nothing else is on its way
        # Only the patient's own slot is published.
        assert [(r["user_index"], systolic(r)) for r in readings.payloads()] == [(1, 122.0)]
        assert readings.payloads()[0]["patient_id"] == "patient-1"

        # The status (the agent's, over its socket) counts them.
        code, out, err = await tech(config, "status", "--json")
        assert code == 0, err
        status = json.loads(out)
        assert status["agent"] == "running"
        assert status["unattributed_readings"] == 2
        assert status["outbox"]["unattributed"] == 2
        assert status["outbox"]["pending"] == 0  # kept, but not waiting to be published
        code, out, err = await tech(config, "status")
        assert code == 0, err
        assert "2 unattributed" in out

        # The list: both, with their slots and values, oldest first.
        rows = await listed(config)
        assert [(r["user_index"], r["device_address"], r["kind"]) for r in rows] == [
            (2, CUFF, "blood_pressure"), (255, CUFF, "blood_pressure")]
        values = {r["user_index"]: {o["code"]: o["value"] for o in r["observations"]}
                  for r in rows}
        assert values[2]["8480-6"] == 141.0 and values[2]["8462-4"] == 91.0
        assert values[2]["8867-4"] == 81.0
        assert values[255]["8480-6"] == 133.0 and values[255]["8462-4"] == 85.0
        assert all(r["measured_at"].endswith("Z") and not r["damaged"] for r in rows)
        spouse = next(r for r in rows if r["user_index"] == 2)

        # The table a person reads: 100 columns, the guest's slot in words.
        code, out, err = await tech(config, "unattributed")
        assert code == 0, err
        assert max(len(line) for line in out.splitlines()) <= 100, out
        assert "unknown" in out
        assert "141/91 mmHg" in out and "133/85 mmHg" in out
        assert "rpm-gateway assign" in out
        assert "Traceback" not in err

        # The patient confirms the slot-2 reading was theirs.
        code, out, err = await tech(config, "assign", spouse["reading_id"],
                                    "--patient", "patient-1", "--json")
        assert code == 0, out + err
        result = json.loads(out)
        assert result["assigned"] is True and result["patient"] == "patient-1"
        assert result["reading_id"] == spouse["reading_id"] and result["device"] == CUFF

        await readings.wait_for(2, timeout=15)
        published = readings.payloads()[1]
        assert published["reading_id"] == spouse["reading_id"]
        assert published["patient_id"] == "patient-1"
        assert published["user_index"] == 2 and systolic(published) == 141.0
        assert errors(READING, published) == []

        await events.wait_until(lambda m: assigned_events(events), timeout=15)
        (event,) = assigned_events(events)
        assert event["hub_id"] == HUB
        assert event["detail"] == {"reading_id": spouse["reading_id"], "device": CUFF,
                                   "patient_id": "patient-1", "by": BY_AGENT}
        assert errors(EVENT, event) == []

        # Assigned once: a second time is refused in words, as is an id nobody knows.
        code, out, err = await tech(config, "assign", spouse["reading_id"],
                                    "--patient", "patient-1")
        assert code == 65
        assert "already belongs to patient patient-1" in err
        assert "Traceback" not in err
        code, out, err = await tech(config, "assign", "0" * 32, "--patient", "patient-1")
        assert code == 65
        assert "no unattributed reading" in err and "Traceback" not in err
        code, out, err = await tech(config, "assign", "r-1", "--patient", "patient-1")
        assert code == 65 and "not a reading id" in err

        # Only the guest's reading is left; the counts follow.
        assert [r["user_index"] for r in await listed(config)] == [255]
        code, out, err = await tech(config, "status", "--json")
        assert code == 0, err
        assert json.loads(out)["outbox"]["unattributed"] == 1
        await asyncio.sleep(0.5)
    # Every message on the wire validates, and nothing more was published.
    assert len(readings.payloads()) == 2
    assert all(errors(READING, r) == [] for r in readings.payloads())
    assert all(errors(EVENT, e) == [] for e in events.payloads())
    assert len(assigned_events(events)) == 1


async def test_unattributed_readings_by_the_cli_alone_and_the_next_agent_publishes(
    tmp_path: Path, short_dir: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    readings = await mqtt_subscriber(mosquitto, READINGS)
    events = await mqtt_subscriber(mosquitto, EVENTS)
    config, cfg = write_config(tmp_path, short_dir, mosquitto)
    async with agent_holding_two(cfg, readings):
        rows = await listed(config)
        spouse = next(r for r in rows if r["user_index"] == 2)
        code, out, err = await tech(config, "assign", spouse["reading_id"],
                                    "--patient", "patient-1")
        assert code == 0, out + err
        await readings.wait_for(2, timeout=15)
    assert not cfg.hub.control_socket.exists()  # the agent is gone

    # The CLI alone, on the state directory.
    code, out, err = await tech(config, "status", "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["agent"] == "not running"
    assert status["outbox"]["unattributed"] == 1
    rows = await listed(config)
    assert [(r["user_index"], systolic(r)) for r in rows] == [(255, 133.0)]
    guest = rows[0]
    code, out, err = await tech(config, "unattributed")
    assert code == 0, err
    assert "unknown" in out and max(len(line) for line in out.splitlines()) <= 100

    # The patient confirms the guest's reading was theirs after all.
    code, out, err = await tech(config, "assign", guest["reading_id"], "--patient", "patient-1")
    assert code == 0, out + err
    assert "assigned to patient-1" in out
    assert await listed(config) == []
    code, out, err = await tech(config, "assign", guest["reading_id"], "--patient", "patient-1")
    assert code == 65 and "already belongs to patient patient-1" in err
    code, out, err = await tech(config, "assign", "f" * 32, "--patient", "patient-1")
    assert code == 65 and "no unattributed reading" in err

    # The event waits in the registry's journal for the next agent.
    registry = json.loads((cfg.hub.data_dir / "pairings.json").read_text())
    journalled = [e for e in registry["events"] if e["name"] == "reading_assigned"]
    assert [e["detail"] for e in journalled] == [{
        "reading_id": guest["reading_id"], "device": CUFF, "patient_id": "patient-1",
        "by": TECH}]
    assert journalled[0]["at"].endswith("Z")
    assert len(readings.payloads()) == 2  # nothing is published without an agent

    # A new agent (the cuff is not around now) publishes the reading and the event.
    async with VirtualRadio() as radio, tiers.running_agent(cfg, radio, "virtual"):
        await readings.wait_for(3, timeout=20)
        await events.wait_until(lambda m: len(assigned_events(events)) >= 2, timeout=15)
        await asyncio.sleep(0.5)
    published = readings.payloads()[2]
    assert published["reading_id"] == guest["reading_id"]
    assert published["patient_id"] == "patient-1" and published["user_index"] == 255
    assert systolic(published) == 133.0
    assert errors(READING, published) == []
    later = assigned_events(events)[-1]
    assert later["detail"] == {"reading_id": guest["reading_id"], "device": CUFF,
                               "patient_id": "patient-1", "by": TECH}
    assert later["at"] == journalled[0]["at"]  # when it happened, not when it was published
    assert errors(EVENT, later) == []
    assert len(assigned_events(events)) == 2  # each once
    # Published from the journal: it is taken out of it.
    registry = json.loads((cfg.hub.data_dir / "pairings.json").read_text())
    assert not [e for e in registry["events"] if e["name"] == "reading_assigned"]
    assert len(readings.payloads()) == 3
