"""`rpm-gateway simulate` in one process, `rpm-gateway run` in another, a real mosquitto between.

The devices keep their memory in the simulate process, so the agent can be killed (kill -9)
mid-transfer: the next agent gets everything the devices never saw confirmed. What a device
produced and what the hub confirmed is read from the simulate process's ledger, and compared
by raw bytes with what reached the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.broker import LocalBroker
from gateway.sim.ledger import read_ledger
from tests.integration.test_agent_process import HUB, stop
from tests.integration.test_agent_process import agent_process as agent
from tests.integration.test_agent_process import write_config as agent_config

pytestmark = pytest.mark.integration

SCALE = "C0:00:00:00:5C:01"
CUFF = "C0:00:00:00:BC:01"
Subscribe = Callable[..., Awaitable[Any]]


@contextlib.asynccontextmanager
async def simulate(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """The simulate process and its link ("tcp:HOST:PORT"), read from its READY line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "simulate", "--", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line.startswith("READY tcp:127.0.0.1:"), line
        yield proc, line.split()[1]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def write_config(tmp_path: Path, broker: LocalBroker, link: str) -> Path:
    """An agent on the simulate process's link, both devices bound to one patient."""
    return agent_config(tmp_path, broker, f'[radio]\nkind = "virtual"\nlink = "{link}"\nquiet_s = 0.5\n')


def events(ledger: Path, kind: str) -> list[dict[str, Any]]:
    """The ledger's events of one kind, in order."""
    return [e for e in read_ledger(ledger) if e["event"] == kind] if ledger.exists() else []


def delivered_raw(payloads: list[Any]) -> set[str]:
    """The raw characteristic bytes (hex) of every reading that reached the broker."""
    return {p["raw"] for p in payloads}


async def test_simulate_prints_ready_once_and_stops_cleanly(tmp_path: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        async with simulate("--devices", "scale,cuff,neighbour") as (proc, _link):
            code, err = await stop(proc, sig)
            assert proc.stdout is not None
            rest = await proc.stdout.read()
        assert code == 0, err
        assert "Traceback" not in err
        assert rest == b""  # exactly one line on stdout


async def test_agent_on_the_link_delivers_every_reading_the_devices_produce(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    readings = await mqtt_subscriber(mosquitto, f"rpm/{HUB}/readings")
    async with simulate("--devices", "scale,cuff,neighbour", "--stored", "2", "--readings", "2",
                        "--interval", "0.3", "--bonding", "--ledger", str(ledger)) as (sim, link):
        async with agent(write_config(tmp_path, mosquitto, link)) as proc:
            await readings.wait_for(8, timeout=30)
            code, log = await stop(proc)
        assert code == 0, log
        code, _ = await stop(sim)
    assert code == 0
    produced = events(ledger, "produced")
    assert len(produced) == 12  # 4 per device, the neighbour's included
    paired = {e["payload"] for e in produced if e["device"] in (SCALE, CUFF)}
    assert delivered_raw(readings.payloads()) == paired
    # The neighbour's cuff is never connected: only the paired devices' records are confirmed.
    assert {e["device"] for e in events(ledger, "confirmed")} == {SCALE, CUFF}
    assert {e["device"] for e in events(ledger, "connected")} == {SCALE, CUFF}
    assert "Traceback" not in log


async def test_kill_9_mid_transfer_then_the_next_agent_gets_what_was_never_confirmed(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    readings = await mqtt_subscriber(mosquitto, f"rpm/{HUB}/readings")
    async with simulate("--devices", "scale,cuff", "--stored", "30", "--readings", "4",
                        "--interval", "0.4", "--bonding", "--ledger", str(ledger)) as (sim, link):
        config = write_config(tmp_path, mosquitto, link)
        async with agent(config) as first:
            async with asyncio.timeout(30):
                while len(events(ledger, "confirmed")) < 3:
                    await asyncio.sleep(0.005)
            first.kill()  # SIGKILL, mid-transfer: no goodbye on the link or the broker
            killed_at = time.time()
            await first.wait()
        before = read_ledger(ledger)
        confirmed_before = {(e["device"], e["index"]) for e in before if e["event"] == "confirmed"}
        produced_before = {(e["device"], e["index"]) for e in before if e["event"] == "produced"}
        assert len(confirmed_before) < len(produced_before), "the kill came after the transfer"

        # A record the killed agent confirmed over ATT but had not committed yet is lost by
        # design (the stack confirms first: issue 5 item 2); only those may be missing.
        in_window = {e["payload"] for e in before
                     if e["event"] == "confirmed" and killed_at - e["t"] < 1.0}

        def missing() -> set[str]:
            wanted = {e["payload"] for e in events(ledger, "produced")}
            return wanted - delivered_raw(readings.payloads())

        async with agent(config) as second:  # a new agent, same disk, no bonds: it re-pairs
            await readings.wait_until(lambda _: len(events(ledger, "produced")) == 68
                                      and missing() <= in_window, timeout=40)
            code, log = await stop(second)
        assert code == 0, log
        code, _ = await stop(sim)
    assert code == 0
    assert missing() <= in_window
    after = read_ledger(ledger)
    resent = {(e["device"], e["index"]) for e in after
              if e["event"] == "confirmed" and e["t"] > killed_at}
    assert produced_before - confirmed_before <= resent  # never confirmed: sent again
    # The devices saw the link drop when the agent died, and the next agent connect.
    assert any(e["event"] == "disconnected" and e["t"] >= killed_at for e in after)
    assert {e["device"] for e in after
            if e["event"] == "connected" and e["t"] > killed_at} == {SCALE, CUFF}
    # A measurement that reached the broker twice kept its reading_id.
    ids: dict[str, set[str]] = {}
    for p in readings.payloads():
        ids.setdefault(p["raw"], set()).add(p["reading_id"])
    assert all(len(v) == 1 for v in ids.values())


async def test_simulate_att_error_option_reaches_the_devices_of_the_process(tmp_path: Path) -> None:
    from bleak import BleakClient, BleakScanner
    from bleak.exc import BleakGATTProtocolError
    from bleak.uuids import normalize_uuid_16

    from gateway.sim.backend import VirtualClientBackend, VirtualScannerBackend
    from gateway.sim.radio import VirtualRadio

    weight = normalize_uuid_16(0x2A9D)
    ledger = tmp_path / "ledger.jsonl"
    async with simulate("--devices", "scale", "--stored", "1", "--att-error", "1",
                        "--att-error-on", "cccd", "--att-error-code", "0x80",
                        "--ledger", str(ledger)) as (proc, link), VirtualRadio(hci=link) as radio:
        for attempt in range(2):
            device = await BleakScanner.find_device_by_address(
                SCALE, timeout=5, backend=VirtualScannerBackend, radio=radio)  # type: ignore[call-arg]
            assert device is not None
            async with BleakClient(device, timeout=5, backend=VirtualClientBackend,
                                   radio=radio) as c:
                if attempt == 0:
                    with pytest.raises(BleakGATTProtocolError) as e:
                        await c.start_notify(weight, lambda _c, _d: None)
                    assert e.value.code == 0x80  # as given on the command line
                else:
                    await c.start_notify(weight, lambda _c, _d: None)
                    async with asyncio.timeout(5):
                        while not any(e["event"] == "confirmed" for e in read_ledger(ledger)):
                            await asyncio.sleep(0.05)
        assert (await stop(proc))[0] == 0
