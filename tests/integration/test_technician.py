"""The field technician's workflow on real parts: scan → pair → readings → unpair, through the
agent's control socket and by the CLI alone; simulated devices, mosquitto, both radio tiers."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from bleak.backends.device import BLEDevice
from bleak.exc import BleakError

from drivers.simulated.blood_pressure import demo_cuff
from drivers.simulated.weight_scale import demo_scale, demo_weight_readings
from gateway import control
from gateway.broker import LocalBroker
from gateway.config import DeviceBinding, parse_config
from gateway.pairings import PairingRegistry
from gateway.sim.radio import VirtualRadio
from gateway.sim.wiring import VirtualBleakRadio
from tests.integration import tiers
from tests.integration.hub_toml import FAST_RADIO, hub_toml
from tests.integration.test_agent_faults import fill, small_filesystem
from tests.integration.test_pipeline import bp, until

pytestmark = pytest.mark.integration
tier = tiers.parametrised()

HUB = "hub-tech"
CUFF = "C0:00:00:00:BC:01"
SCALE = "C0:00:00:00:5C:01"
NEIGHBOUR = "C0:00:00:00:BC:99"
Subscribe = Callable[..., Awaitable[Any]]


def write_config(tmp_path: Path, broker: LocalBroker) -> Path:
    """A hub with nothing paired, its control socket in tmp_path."""
    path = tmp_path / "gateway.toml"
    path.write_text(hub_toml(HUB, tmp_path / "state", broker,
                             control_socket=tmp_path / "control.sock"))
    return path


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`rpm-gateway ARGS` in a process of its own (the loop keeps running the agent)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "100", **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _devices() -> tuple[Any, Any, Any]:
    scale = demo_scale(SCALE, readings=1, pairing_mode=True)
    # Taken a minute ago: a day with data in the period that begins with today's pairing.
    cuff = demo_cuff(CUFF, readings=[bp(128, 82, 97, 64, minutes_ago=1)], bonding_required=True,
                     pairing_mode=True)
    neighbour = demo_cuff(NEIGHBOUR, readings=1, name="Neighbour Cuff", pairing_mode=True)
    return scale, cuff, neighbour


async def test_the_workflow_through_the_running_agent(
    tier: str, tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    readings = await mqtt_subscriber(mosquitto, f"rpm/{HUB}/readings")
    events = await mqtt_subscriber(mosquitto, f"rpm/{HUB}/events")
    path = write_config(tmp_path, mosquitto)
    cfg = parse_config(path.read_text())
    scale, cuff, neighbour = _devices()
    async with VirtualRadio() as radio:
        for d in (scale, cuff, neighbour):
            await radio.add_peripheral(d)
        async with tiers.running_agent(cfg, radio, tier) as (agent, _bluez):
            await until((tmp_path / "control.sock").exists, timeout=10)
            code, out, err = await cli("scan", "--config", str(path), "--seconds", "3", "--json")
            assert code == 0, err
            seen = {r["address"]: r for r in json.loads(out)}
            assert set(seen) >= {SCALE, CUFF, NEIGHBOUR}
            assert seen[CUFF]["driver"] == "sig_blood_pressure"
            assert seen[SCALE]["driver"] == "sig_weight_scale"
            assert not seen[CUFF]["paired"] and seen[CUFF]["patient"] is None
            assert "uses the radio itself" not in err  # the agent did the scan

            # Nothing is read before pairing (default deny).
            await asyncio.sleep(1.5)
            assert readings.payloads() == []

            code, out, err = await cli("pair", CUFF, "--patient", "patient-1", "--config",
                                       str(path), "--json")
            assert code == 0, out + err
            result = json.loads(out)
            assert result["bound"] is True
            steps = {s["step"]: s for s in result["steps"]}
            assert steps["bonded"]["ok"] and steps["clock"]["ok"] and steps["identified"]["ok"]
            assert "SIM-BP1" in steps["identified"]["detail"]
            # The agent reads it without a restart, under the patient it was bound to.
            await readings.wait_for(1, timeout=20)
            assert {r["patient_id"] for r in readings.payloads()} == {"patient-1"}
            assert {r["device"]["address"] for r in readings.payloads()} == {CUFF}

            code, out, err = await cli("pair", SCALE, "--patient", "patient-1", "--config",
                                       str(path))
            assert code == 0, out + err
            assert "✓ bonded" in out and "paired: " in out
            assert max(len(line) for line in out.splitlines()) <= 100
            await readings.wait_for(2, timeout=20)

            # Someone else's patient needs --force; the message says so.
            code, out, err = await cli("pair", CUFF, "--patient", "patient-2", "--config",
                                       str(path))
            assert code == 65
            assert "already bound to patient patient-1" in err and "--force" in err
            assert "Traceback" not in err

            code, out, err = await cli("devices", "--config", str(path), "--json")
            assert code == 0, err
            rows = {r["address"]: r for r in json.loads(out)}
            assert rows[CUFF]["patient"] == "patient-1" and rows[CUFF]["kind"] == "blood_pressure"
            assert rows[CUFF]["last_reading"] is not None
            assert rows[CUFF]["days_with_data"]["days"] == 1

            code, out, err = await cli("status", "--config", str(path), "--json")
            assert code == 0, err
            status = json.loads(out)
            assert status["agent"] == "running"
            assert status["broker"]["state"] == "connected"
            assert status["days_with_data"]["patient-1"]["summary"].startswith("1 of 16 days")

            # Unpair: the scale's next reading is no longer read.
            code, out, err = await cli("unpair", SCALE, "--config", str(path))
            assert code == 0, err
            assert agent.pairings.lookup(SCALE) is None
            before = len(readings.payloads())
            await scale.measure(next(iter(demo_weight_readings(1))), stamp=True)
            await asyncio.sleep(3)
            assert len(readings.payloads()) == before
            await events.wait_for(3, timeout=10)
        names = [e["event"] for e in events.payloads()]
        assert names.count("device_paired") == 2 and "device_unpaired" in names
        paired = next(e for e in events.payloads() if e["event"] == "device_paired")
        assert paired["detail"]["by"]
    # The neighbour's cuff was heard all along and never read.
    assert NEIGHBOUR not in {r["device"]["address"] for r in readings.payloads()}


async def test_a_cuff_that_wants_a_bond_refuses_its_data_until_paired(tmp_path: Path) -> None:
    cuff = demo_cuff(CUFF, readings=1, bonding_required=True, pairing_mode=True)
    async with VirtualRadio() as radio:
        await radio.add_peripheral(cuff)
        bleak = VirtualBleakRadio(radio)
        client = bleak.client(BLEDevice(CUFF, None, None), lambda _: None, 5)
        await client.connect()
        try:
            with pytest.raises(BleakError, match=r"(?i)insufficient"):
                await client.start_notify("00002a35-0000-1000-8000-00805f9b34fb", lambda *_: None)
            await client.pair()
            await client.start_notify("00002a35-0000-1000-8000-00805f9b34fb", lambda *_: None)
        finally:
            await client.disconnect()
        assert await radio.has_bond(CUFF)


async def test_the_cli_works_alone_when_no_agent_runs(tmp_path: Path) -> None:
    env = {"RPM_GATEWAY_DATA_DIR": str(tmp_path / "state")}
    none = str(tmp_path / "no-such.toml")
    code, out, err = await cli("scan", "--radio", "virtual", "--config", none, "--seconds", "3",
                               "--json", env=env)
    assert code == 0, err
    rows = {r["address"]: r for r in json.loads(out)}
    assert {SCALE, CUFF, NEIGHBOUR} <= set(rows)
    for r in rows.values():
        assert {"address", "name", "rssi", "driver", "paired", "patient"} <= set(r)
    code, out, err = await cli("pair", CUFF, "--patient", "patient-9", "--radio", "virtual",
                               "--config", none, env=env)
    assert code == 0, out + err
    assert "uses the radio itself" in err
    registry = json.loads((tmp_path / "state" / "pairings.json").read_text())
    assert [b["address"] for b in registry["bindings"]] == [CUFF]
    assert registry["events"][0]["name"] == "device_paired"  # published by the next agent
    code, out, err = await cli("devices", "--radio", "virtual", "--config", none, env=env)
    assert code == 0, err
    assert CUFF in out and "patient-9" in out and "none yet" in out
    code, out, err = await cli("status", "--radio", "virtual", "--config", none, "--json",
                               env=env)
    assert code == 0, err
    status = json.loads(out)
    assert status["agent"] == "not running"
    assert status["days_with_data"]["patient-9"]["days"] == 0
    # Unknown address, bad patient id, missing config: clear words, script-friendly codes.
    code, _, err = await cli("pair", "C0:00:00:00:00:77", "--patient", "p", "--radio",
                             "virtual", "--config", none, "--timeout", "2", env=env)
    assert code == 1 and "Traceback" not in err
    code, _, err = await cli("pair", "not-an-address", "--patient", "p", "--radio", "virtual",
                             "--config", none, env=env)
    assert code == 65 and "not a Bluetooth address" in err
    code, _, err = await cli("status", "--config", none)
    assert code == 78 and "does not exist" in err
    code, _, err = await cli("unpair", SCALE, "--radio", "virtual", "--config", none, env=env)
    assert code == 65 and "not paired" in err


async def test_pairing_a_glucometer_style_device_asks_the_technician_for_its_pin(
    tmp_path: Path, mosquitto: LocalBroker
) -> None:
    # A display-only device shows six digits; `pair` asks the technician over the control
    # socket and the agent's BlueZ pairing agent types them (the stand-in runs real SMP).
    path = write_config(tmp_path, mosquitto)
    cfg = parse_config(path.read_text())
    cuff = demo_cuff(CUFF, readings=1, bonding_required=True, pairing_io="display_only",
                     pairing_mode=True)
    asked: list[str] = []

    async def technician(what: str, prompt: str) -> str | None:
        asked.append(what)
        async with asyncio.timeout(10):
            while not cuff.pairing_delegate.shown:
                await asyncio.sleep(0.01)
        return f"{cuff.pairing_delegate.shown[-1]:06d}"

    async with VirtualRadio() as radio:
        await radio.add_peripheral(cuff)
        async with tiers.running_agent(cfg, radio, "bluez") as (agent, bluez):
            assert bluez is not None
            await until((tmp_path / "control.sock").exists, timeout=10)
            progress: list[dict[str, Any]] = []
            doc = await control.call(tmp_path / "control.sock", "pair",
                                     {"address": CUFF, "patient": "patient-1"},
                                     progress=progress.append, answer=technician, by="tech7")
            assert doc["ok"], doc
            assert doc["result"]["bound"], doc["result"]["steps"]
            assert asked == ["passkey"]
            assert await bluez.radio.has_bond(CUFF)
            assert agent.pairings.bound(CUFF).entry.paired_by.startswith("tech7")  # type: ignore[union-attr]
            assert any(p.get("step") == "bonded" and p.get("ok") for p in progress)


async def test_two_technicians_pairing_one_device_at_once_bind_it_once(
    tmp_path: Path, mosquitto: LocalBroker
) -> None:
    path = write_config(tmp_path, mosquitto)
    cfg = parse_config(path.read_text())
    cuff = demo_cuff(CUFF, readings=0, bonding_required=True, pairing_mode=True)
    async with VirtualRadio() as radio:
        await radio.add_peripheral(cuff)
        async with tiers.running_agent(cfg, radio, "virtual") as (agent, _):
            await until((tmp_path / "control.sock").exists, timeout=10)
            a, b = await asyncio.gather(*(
                control.call(tmp_path / "control.sock", "pair",
                             {"address": CUFF, "patient": patient}, by=f"tech-{patient}")
                for patient in ("patient-a", "patient-b")))
            bound = agent.pairings.lookup(CUFF)
    outcomes = sorted([a, b], key=lambda d: bool(d.get("ok")))
    refused, done = outcomes
    assert done["ok"] and done["result"]["bound"]
    assert not refused["ok"] and refused["exit"] == 65 and "already bound" in refused["error"]
    assert bound is not None and bound.patient_id == done["result"]["patient"]


async def test_the_cli_never_opens_the_radio_beside_an_agent_it_cannot_reach(
    tmp_path: Path, mosquitto: LocalBroker
) -> None:
    (tmp_path / "not-a-dir").write_text("")
    path = write_config(tmp_path, mosquitto)
    path.write_text(path.read_text().replace(
        f'control_socket = "{tmp_path / "control.sock"}"',
        f'control_socket = "{tmp_path / "not-a-dir" / "control.sock"}"'))
    cfg = parse_config(path.read_text())
    async with VirtualRadio() as radio, tiers.running_agent(cfg, radio, "virtual"):
        await until((tmp_path / "state" / "agent.lock").exists, timeout=10)
        code, _, err = await cli("scan", "--config", str(path), "--seconds", "1")
    assert code == 69
    assert "an agent is running but does not answer" in err


async def test_a_device_unpaired_during_its_session_files_nothing_under_the_patient(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    # The binding goes (another process edits the registry) while the cuff is connected and
    # still measuring: its next reading is kept, unattributed, never the old patient's.
    readings = await mqtt_subscriber(mosquitto, f"rpm/{HUB}/readings")
    state = tmp_path / "state"
    radio_toml = FAST_RADIO.replace("quiet_s = 0.5", "quiet_s = 8")  # the hub stays connected
    cfg = parse_config(hub_toml(HUB, state, mosquitto, radio=radio_toml,
                                control_socket=tmp_path / "control.sock"))
    state.mkdir()
    PairingRegistry(state / "pairings.json").bind(
        DeviceBinding(address=CUFF, patient_id="patient-1"))
    cuff = demo_cuff(CUFF, readings=[bp(128, 82, 97, 64, minutes_ago=2)], quiet_s=10)
    async with VirtualRadio() as radio:
        await radio.add_peripheral(cuff)
        async with tiers.running_agent(cfg, radio, "virtual") as (agent, _):
            await readings.wait_for(1, timeout=20)
            assert CUFF in agent._active  # the session is still open
            PairingRegistry(state / "pairings.json").unbind(CUFF)
            await until(lambda: agent.pairings.lookup(CUFF) is None, timeout=5)
            await cuff.measure(bp(150, 95, 113, 88, minutes_ago=0))
            await until(lambda: agent.status.unattributed == 1, timeout=10)
            await asyncio.sleep(1)
    assert [r["patient_id"] for r in readings.payloads()] == ["patient-1"]


async def test_pairing_on_a_full_disk_binds_nothing_and_says_so(
    tmp_path: Path, mosquitto: LocalBroker
) -> None:
    with small_filesystem(tmp_path / "small", "4m") as state:
        cfg = parse_config(hub_toml(HUB, state, mosquitto,
                                    control_socket=tmp_path / "control.sock"))
        cuff = demo_cuff(CUFF, readings=0, bonding_required=True, pairing_mode=True)
        async with VirtualRadio() as radio:
            await radio.add_peripheral(cuff)
            async with tiers.running_agent(cfg, radio, "virtual") as (agent, _):
                await until((tmp_path / "control.sock").exists, timeout=10)
                filler = fill(state, leave_bytes=0)
                doc = await control.call(tmp_path / "control.sock", "pair",
                                         {"address": CUFF, "patient": "patient-1"})
                assert doc["ok"] and not doc["result"]["bound"]
                assert doc["result"]["exit"] == 73
                bound = doc["result"]["steps"][-1]
                assert bound["step"] == "bound" and bound["ok"] is False
                assert "no space left" in bound["detail"] and bound["advice"]
                assert agent.pairings.lookup(CUFF) is None  # default deny holds
                filler.unlink()  # space again: the same command works
                doc = await control.call(tmp_path / "control.sock", "pair",
                                         {"address": CUFF, "patient": "patient-1"})
                assert doc["ok"] and doc["result"]["bound"], doc
                assert agent.pairings.lookup(CUFF) is not None
