"""`rpm-gateway run` as the hub runs it: a real process, real signals, a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.broker import LocalBroker
from tests.integration.hub_toml import devices, hub_toml

pytestmark = pytest.mark.integration

HUB = "hub-proc"
Subscribe = Callable[..., Awaitable[Any]]


def write_config(tmp_path: Path, broker: LocalBroker, radio: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(hub_toml(HUB, tmp_path / "state", broker, radio=radio, log_level="info",
                             extra=devices(("C0:00:00:00:5C:01", "patient-1"),
                                           ("C0:00:00:00:BC:01", "patient-1"))))
    return path


VIRTUAL_TEMPLATE = """
[radio]
kind = "virtual"
quiet_s = 0.5
[[radio.simulated]]
profile = "weight_scale"
address = "C0:00:00:00:5C:01"
readings = {n}
interval_s = 0.3
[[radio.simulated]]
profile = "blood_pressure"
address = "C0:00:00:00:BC:01"
readings = {n}
interval_s = 0.4
bonding_required = true
"""
VIRTUAL = VIRTUAL_TEMPLATE.format(n=2)

# An adapter that does not exist: scanning fails whether or not this machine has BlueZ.
MISSING_ADAPTER = """
[radio]
kind = "bluez"
adapter = "hci99"
"""


@contextlib.asynccontextmanager
async def agent_process(config: Path, env: dict[str, str] | None = None
                        ) -> AsyncIterator[asyncio.subprocess.Process]:
    """`rpm-gateway run --config CONFIG`, its environment plus `env`; killed if still running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "run", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=None if env is None else {**os.environ, **env})
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def stop(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> tuple[int, str]:
    """Signal the process (SIGTERM), then its exit status and everything it logged."""
    proc.send_signal(sig)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_run_delivers_and_stops_cleanly_on_sigterm(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    readings = await mqtt_subscriber(mosquitto, f"rpm/{HUB}/readings")
    status = await mqtt_subscriber(mosquitto, f"rpm/{HUB}/status")
    async with agent_process(write_config(tmp_path, mosquitto, VIRTUAL)) as proc:
        await readings.wait_for(4, timeout=30)
        # The retained status follows each session: the devices' outcome, an empty outbox.
        await status.wait_until(lambda m: any(
            (p.get("outbox") or {}).get("pending") == 0
            and p.get("devices", {}).get("C0:00:00:00:BC:01", {}).get("sessions_ok", 0) >= 1
            and p["devices"]["C0:00:00:00:BC:01"]["battery_level"] == 64  # the cuff's script
            and p.get("radio") == "ok"
            for p in status.payloads()), timeout=10)
        code, log = await stop(proc)
    assert code == 0, log
    assert "Traceback" not in log
    assert "agent stopped" in log
    ids = {p["reading_id"] for p in readings.payloads()}
    assert len(ids) == 4
    # A clean stop says offline itself (a clean DISCONNECT suppresses the will).
    await status.wait_until(lambda m: '"offline"' in bytes(m[-1].payload).decode(), timeout=5)
    # No patient data above debug level.
    assert "patient-1" not in log


async def test_a_missing_radio_is_reported_not_fatal(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    status = await mqtt_subscriber(mosquitto, f"rpm/{HUB}/status")
    async with agent_process(write_config(tmp_path, mosquitto, MISSING_ADAPTER)) as proc:
        await status.wait_until(
            lambda m: any(str(p.get("radio", "")).startswith("unavailable")
                          for p in status.payloads()), timeout=20)
        await asyncio.sleep(0.5)
        assert proc.returncode is None, "the agent must keep running without a radio"
        code, log = await stop(proc)
    assert code == 0
    assert "Bluetooth radio unavailable" in log
    assert "Traceback" not in log


def outbox_rows(state: Path) -> list[tuple[str, bool]]:
    """(reading_id, delivered) of every row, read beside the running agent (WAL allows it)."""
    db = state / "outbox.db"
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        try:
            rows = conn.execute("SELECT reading_id, delivered_at IS NOT NULL FROM readings").fetchall()
        except sqlite3.OperationalError:  # schema not created yet
            return []
    return [(str(r[0]), bool(r[1])) for r in rows]


async def test_kill_9_then_restart_delivers_every_committed_reading_once_by_id(
    tmp_path: Path, broker_factory: Callable[..., Awaitable[LocalBroker]],
    mqtt_subscriber: Subscribe
) -> None:
    broker = await broker_factory(persistence=True)
    sub = await mqtt_subscriber(broker, f"rpm/{HUB}/readings", client_id="clinic", persistent=True)
    await broker.stop()  # the clinic is unreachable while the patient measures
    state = tmp_path / "state"
    async with agent_process(write_config(tmp_path, broker, VIRTUAL_TEMPLATE.format(n=3))) as proc:
        async with asyncio.timeout(30):
            while len(outbox_rows(state)) < 6:
                await asyncio.sleep(0.05)
        proc.kill()  # SIGKILL: no clean shutdown of any kind
        await proc.wait()
    committed = {rid for rid, delivered in outbox_rows(state) if not delivered}
    assert len(committed) == 6
    await broker.start()
    # A fresh agent on the same disk, with devices that have nothing new to send.
    async with agent_process(write_config(tmp_path, broker, VIRTUAL_TEMPLATE.format(n=0))) as proc:
        await sub.wait_until(lambda m: len({json.loads(bytes(x.payload))["reading_id"]
                                            for x in m}) >= 6, timeout=30)
        code, _ = await stop(proc)
    assert code == 0
    assert {p["reading_id"] for p in sub.payloads()} == committed
    assert all(delivered for _, delivered in outbox_rows(state))
