"""Simulated clocks keep the hub's time zone, not the machine's (issue 5 item 14)."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from drivers.simulated import SimClock
from gateway.agent import Agent
from gateway.broker import LocalBroker
from gateway.config import parse_config
from gateway.sim.wiring import open_virtual_radio

pytestmark = pytest.mark.integration

NEW_YORK = ZoneInfo("America/New_York")
SCALE = "C0:00:00:00:5C:01"


def test_a_set_clock_starts_at_the_wall_clock_time_of_its_zone() -> None:
    for zone in (NEW_YORK, ZoneInfo("Asia/Kolkata"), ZoneInfo("UTC")):
        device = SimClock("set", zone=zone).now_datetime()
        local = dt.datetime.now(zone).replace(tzinfo=None)
        assert device is not None and abs((device - local).total_seconds()) < 2


async def test_hub_in_new_york_measures_no_drift_on_a_correct_device_clock(
    tmp_path: Path, mosquitto: LocalBroker
) -> None:
    # Regression: the clock started at the machine's local time, so a hub in New York on a UTC
    # machine measured an 18,000 s drift on a device whose clock was right.
    cfg = parse_config(f"""
[hub]
id = "hub-zone"
timezone = "America/New_York"
data_dir = "{tmp_path}"
trust_clock = true
[mqtt]
host = "{mosquitto.host}"
port = {mosquitto.port}
[radio]
kind = "virtual"
quiet_s = 0.5
[[radio.simulated]]
profile = "weight_scale"
address = "{SCALE}"
readings = 1
interval_s = 0.1
clock_offset_s = 0
[[devices]]
address = "{SCALE}"
patient_id = "patient-1"
""")
    async with open_virtual_radio(cfg.radio, cfg.hub.zone) as radio:
        agent = Agent(cfg, radio=radio)
        task = asyncio.create_task(agent.run())
        try:
            async with asyncio.timeout(15):
                while agent.status.device(SCALE).clock_offset_s is None:
                    await asyncio.sleep(0.02)
        finally:
            agent.stop()
            await asyncio.wait_for(task, 15)
    offset = agent.status.device(SCALE).clock_offset_s
    assert offset is not None and abs(offset) < 3
