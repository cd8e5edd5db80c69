"""What several benchmarks share: realistic readings, a quick outbox fill, percentiles, the
simulate process, and a child environment with bytecode kept (as on the hub).

Not a benchmark itself: bench/__main__.py skips modules whose name starts with "_".
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from drivers.base import DeviceInfo
from drivers.blood_pressure import decode_bp
from drivers.codec.blood_pressure import (
    BloodPressureMeasurement,
    encode_blood_pressure_measurement,
)
from drivers.codec.date_time import DateTime
from drivers.codec.ieee11073 import MedFloat
from gateway.config import DeviceBinding, GatewayConfig
from gateway.intake import build_reading, outbox_item
from gateway.outbox import Outbox, OutboxItem

if TYPE_CHECKING:
    from gateway.agent import Agent

HUB = "bench-hub"
CUFF = "C0:00:00:00:BC:01"
SCALE = "C0:00:00:00:5C:01"
ZONE = ZoneInfo("America/New_York")
_INFO = DeviceInfo(manufacturer="Simulated Health", model="SIM-BP1", serial="BP00BC01",
                   firmware="1.4.2", system_id="0102030405060708", battery_level=64)  # fmt: skip
_BINDING = DeviceBinding(address=CUFF, patient_id="patient-0001")


def cuff_readings(count: int, *, start: int = 0) -> list[OutboxItem]:
    """``count`` distinct cuff readings (about 1 KB of JSON each), one a minute from `start`,
    built as the agent builds them; another `start` gives other reading ids."""
    base = dt.datetime(2026, 12, 2, 8, 0)
    out = []
    for n in range(start, start + count):
        taken = base + dt.timedelta(minutes=n)
        raw = encode_blood_pressure_measurement(BloodPressureMeasurement(
            kpa=False, systolic=MedFloat.of(110 + n % 40), diastolic=MedFloat.of(70 + n % 20),
            mean_arterial=MedFloat.of(90 + n % 15), timestamp=DateTime.from_datetime(taken),
            pulse_rate=MedFloat.of(60 + n % 30), user_id=1, status=0))  # fmt: skip
        reading = build_reading(
            decode_bp(raw), hub_id=HUB, binding=_BINDING, address=CUFF, info=_INFO,
            driver_name="sig_blood_pressure", driver_version="1.0.0", clock=None,
            received_at=taken.replace(tzinfo=ZONE).astimezone(dt.UTC), zone=ZONE,
            hub_clock_synced=True,
        )  # fmt: skip
        out.append(outbox_item(reading, ZONE))
    return out


async def fill(outbox: Outbox, items: Sequence[OutboxItem], *, batch: int = 1000) -> None:
    """Put every item; puts handed over together share one commit, so this stays quick."""
    for first in range(0, len(items), batch):
        await asyncio.gather(*(outbox.put(i, confirmed=True) for i in items[first:first + batch]))


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bytecode_env(cache: Path) -> dict[str, str]:
    """This environment with compiled bytecode kept (in `cache`), as on the hub.

    pip compiles every module when it installs the wheel on the hub; a development tree
    installed editable, in an environment with PYTHONDONTWRITEBYTECODE=1, compiles the
    gateway's sources again at every start (about a third of it on this machine).
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cache)
    return env


@contextlib.asynccontextmanager
async def simulate(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[str]:
    """`rpm-gateway simulate ARGS` in its own process; yields the link (or bus) it serves."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "simulate", *args,
        stdout=asyncio.subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            line = (await proc.stdout.readline()).decode().split()
        if len(line) < 2 or line[0] != "READY":
            raise RuntimeError(f"simulate did not start: {line}")
        yield line[1]
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


def hub_toml(data_dir: Path, *, host: str, port: int, radio: str, devices: Sequence[str],
             control_socket: Path | None = None) -> str:
    """A benchmark hub's config: `radio` is the body of its [radio] table, `devices` the
    addresses paired to one patient."""
    socket_line = f'control_socket = "{control_socket}"\n' if control_socket else ""
    paired = "".join(f'[[devices]]\naddress = "{a}"\npatient_id = "patient-bench"\n'
                     for a in devices)
    return (f'log_level = "warning"\n[hub]\nid = "{HUB}"\ndata_dir = "{data_dir}"\n'
            f"{socket_line}trust_clock = true\n[mqtt]\nhost = \"{host}\"\nport = {port}\n"
            f"[radio]\n{radio.strip()}\n{paired}")


@contextlib.asynccontextmanager
async def running_agent(cfg: GatewayConfig) -> AsyncIterator[Agent]:
    """The agent running in this event loop; stopped cleanly on the way out."""
    # Imported here: wear's child processes import this module for its readings alone.
    from gateway.agent import Agent

    agent = Agent(cfg)
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)
