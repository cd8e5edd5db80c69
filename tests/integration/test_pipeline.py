"""The whole pipeline with real parts: simulated devices on the virtual radio → agent → mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from drivers.codec.blood_pressure import BloodPressureMeasurement
from drivers.codec.date_time import DateTime
from drivers.codec.ieee11073 import MedFloat
from drivers.codec.weight import WeightMeasurement
from drivers.simulated.blood_pressure import demo_cuff
from drivers.simulated.weight_scale import demo_scale
from gateway.agent import Agent
from gateway.broker import LocalBroker
from gateway.config import GatewayConfig, parse_config
from gateway.sim.radio import VirtualRadio
from tests.integration import tiers
from tests.integration.hub_toml import devices, hub_toml

pytestmark = pytest.mark.integration
tier = tiers.parametrised()

HUB = "hub-test"
CUFF = "C0:00:00:00:BC:01"
SCALE = "C0:00:00:00:5C:01"
NEIGHBOUR = "C0:00:00:00:BC:99"
READINGS = f"rpm/{HUB}/readings"
Subscribe = Callable[..., Awaitable[Any]]


def config(tmp_path: Path, broker: LocalBroker, cuff_slot: int | None = None) -> GatewayConfig:
    """Both paired devices bound to patient-1; fast timings so tests take seconds."""
    cuff = (CUFF, "patient-1") if cuff_slot is None else (CUFF, "patient-1", cuff_slot)
    return parse_config(hub_toml(HUB, tmp_path, broker,
                                 extra=devices(cuff, (SCALE, "patient-1"))))


def bp(sys: int, dia: int, mean: int, pulse: int, minutes_ago: int, status: int = 0,
       user: int = 1, zone: ZoneInfo | None = None) -> BloodPressureMeasurement:
    """A cuff reading stamped `minutes_ago` on a clock showing local time (in `zone`)."""
    taken = dt.datetime.now(zone).replace(tzinfo=None, microsecond=0)
    taken -= dt.timedelta(minutes=minutes_ago)
    return BloodPressureMeasurement(
        kpa=False, systolic=MedFloat.of(sys), diastolic=MedFloat.of(dia),
        mean_arterial=MedFloat.of(mean), timestamp=DateTime.from_datetime(taken),
        pulse_rate=MedFloat.of(pulse), user_id=user, status=status)


@contextlib.asynccontextmanager
async def running(cfg: GatewayConfig, radio: VirtualRadio, tier: str = "virtual") -> AsyncIterator[Agent]:
    """The agent on an already-open virtual radio through `tier`; stopped cleanly at the end."""
    async with tiers.running_agent(cfg, radio, tier) as (agent, _bluez):
        yield agent


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition (bounded)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def test_cuff_reading_arrives_with_the_right_values(
    tier: str, tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    sub = await mqtt_subscriber(mosquitto, READINGS)
    async with VirtualRadio() as radio:
        # health-devices.md §12 BPM row 1 values (128/82/97, pulse 64, irregular pulse), stamped now.
        cuff = demo_cuff(CUFF, readings=[bp(128, 82, 97, 64, minutes_ago=3, status=0x0004)],
                         clock_offset_s=120)
        await radio.add_peripheral(cuff)
        async with running(config(tmp_path, mosquitto), radio, tier):
            (msg,) = await sub.wait_for(1, timeout=15)
    r = sub.payloads()[0]
    assert r["patient_id"] == "patient-1"
    assert r["kind"] == "blood_pressure"
    assert [(o["code"], o["value"], o["unit"]) for o in r["observations"]] == [
        ("8480-6", 128.0, "mm[Hg]"), ("8462-4", 82.0, "mm[Hg]"), ("8478-0", 97.0, "mm[Hg]"),
        ("8867-4", 64.0, "/min")]
    assert r["status"] == ["irregular_pulse"]
    assert r["valid"] is True
    assert r["device"]["model"] == "SIM-BP1"
    assert r["device"]["driver"] == "sig_blood_pressure"
    # The cuff clock ran 2 minutes fast; the offset measured at connection corrects it.
    assert r["time_source"] == "device_clock_corrected"
    assert r["device_clock_offset_s"] == pytest.approx(120, abs=2)
    measured = dt.datetime.fromisoformat(r["measured_at"])
    assert abs((dt.datetime.now(dt.UTC) - measured) - dt.timedelta(minutes=5)) < dt.timedelta(seconds=5)
    assert msg.qos == 1
    # The hub set the cuff's clock, and the cuff bonded first (it demands an encrypted link).
    assert cuff.clock_writes


async def test_broker_down_readings_wait_in_the_outbox(
    tier: str, tmp_path: Path, broker_factory: Callable[..., Awaitable[LocalBroker]],
    mqtt_subscriber: Subscribe
) -> None:
    broker = await broker_factory(persistence=True)
    sub = await mqtt_subscriber(broker, READINGS, client_id="clinic", persistent=True)
    await broker.stop()
    async with VirtualRadio() as radio:
        scale = demo_scale(SCALE, readings=3)
        await radio.add_peripheral(scale)
        async with running(config(tmp_path, broker), radio, tier) as agent:
            await until(lambda: agent.status.stored == 3)
            assert agent.outbox is not None
            assert (await agent.outbox.stats()).pending == 3
            assert sub.messages == []
            await broker.start()
            await sub.wait_for(3, timeout=15)
            # Rows are marked delivered in batches just after their PUBACKs.
            async with asyncio.timeout(10):
                while (await agent.outbox.stats()).pending:
                    await asyncio.sleep(0.02)
    ids = [p["reading_id"] for p in sub.payloads()]
    assert len(set(ids)) == 3


async def test_agent_restart_mid_stream_loses_nothing_and_keeps_ids(
    tier: str, tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    sub = await mqtt_subscriber(mosquitto, READINGS)
    async with VirtualRadio() as radio:
        # A scale that replays its whole memory on every connection (derdilla survey, §8.4).
        scale = demo_scale(SCALE, readings=6, resend_stored=True, drop_link_after=3)
        await radio.add_peripheral(scale)
        cfg = config(tmp_path, mosquitto)
        async with running(cfg, radio, tier) as first:
            await until(lambda: first.status.stored >= 3)
        # The first agent is gone mid-stream (the link also dropped after 3). A new one starts
        # on the same disk; the scale re-sends everything on the next measurement.
        await scale.measure(WeightMeasurement(imperial=False, weight_raw=16_400))  # 82.0 kg
        async with running(cfg, radio, tier) as second:
            await sub.wait_until(lambda m: len({_id(x) for x in m}) >= 7, timeout=20)
            await until(lambda: second.status.device(SCALE).sessions_ok >= 1)
    ids = [_id(m) for m in sub.messages]
    assert len(set(ids)) == 7, "six stored readings plus the new one, each exactly once by id"
    # Re-sent stored readings were recognised: the second agent stored only what was new to disk.
    assert second.status.stored == 7 - first.status.stored
    assert second.status.duplicates >= first.status.stored


def _id(message: Any) -> str:
    return str(json.loads(bytes(message.payload))["reading_id"])


async def test_resent_stored_readings_produce_no_new_reading_ids(
    tier: str, tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    sub = await mqtt_subscriber(mosquitto, READINGS)
    async with VirtualRadio() as radio:
        cuff = demo_cuff(CUFF, readings=[bp(121, 78, 91, 85, 30), bp(125, 80, 95, 70, 20)],
                         resend_stored=True)
        await radio.add_peripheral(cuff)
        async with running(config(tmp_path, mosquitto), radio, tier) as agent:
            await sub.wait_for(2, timeout=15)
            await cuff.wait_disconnected(timeout=10)
            await cuff.measure(bp(130, 85, 100, 66, 0))  # a new one; the cuff re-sends all three
            await until(lambda: agent.status.device(CUFF).sessions_ok >= 2, timeout=15)
            await sub.wait_for(3, timeout=10)
            await asyncio.sleep(0.5)  # would a duplicate still arrive?
    ids = [_id(m) for m in sub.messages]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert agent.status.duplicates == 2
    # Identity read on the first connection still names the device on the second.
    assert {p["device"]["serial"] for p in sub.payloads()} == {"BP00BC01"}


async def test_neighbours_device_never_reaches_the_broker(
    tier: str, tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    sub = await mqtt_subscriber(mosquitto, f"rpm/{HUB}/#")
    async with VirtualRadio() as radio:
        ours = demo_cuff(CUFF, readings=[bp(120, 80, 93, 70, 5)], bonding_required=False)
        theirs = demo_cuff(NEIGHBOUR, readings=[bp(150, 95, 113, 90, 5)], bonding_required=False)
        await radio.add_peripheral(ours)
        await radio.add_peripheral(theirs)
        async with running(config(tmp_path, mosquitto), radio, tier) as agent:
            await sub.wait_until(lambda m: any(x.topic.matches(READINGS) for x in m), timeout=15)
            await until(lambda: len(agent.status.unknown_seen) >= 1)
            await asyncio.sleep(1.0)  # give a wrong connection every chance to happen
    readings = [p for m, p in zip(sub.messages, sub.payloads(), strict=True)
                if m.topic.matches(READINGS)]
    assert [r["device"]["address"] for r in readings] == [CUFF]
    assert theirs.connection_count == 0
    assert theirs.sent == []
    assert NEIGHBOUR not in str(agent.status.as_dict())


async def test_garbage_is_counted_and_good_readings_still_flow(
    tier: str, tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    sub = await mqtt_subscriber(mosquitto, READINGS)
    async with VirtualRadio() as radio:
        cuff = demo_cuff(CUFF, readings=[bp(118, 76, 90, 60, 9), b"\x1e\x80", bp(119, 77, 91, 61, 8)])
        await radio.add_peripheral(cuff)
        async with running(config(tmp_path, mosquitto), radio, tier) as agent:
            await sub.wait_for(2, timeout=15)
            await until(lambda: agent.status.decode_errors == 1)
    assert [r["observations"][0]["value"] for r in sub.payloads()] == [118.0, 119.0]


async def test_shared_cuff_only_the_bound_user_slot_is_published(
    tier: str, tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    sub = await mqtt_subscriber(mosquitto, READINGS)
    async with VirtualRadio() as radio:
        # The patient is user 1; a spouse measures on the same cuff as user 2.
        cuff = demo_cuff(CUFF, readings=[bp(140, 90, 107, 80, 6, user=2), bp(122, 79, 93, 66, 5)])
        await radio.add_peripheral(cuff)
        async with running(config(tmp_path, mosquitto, cuff_slot=1), radio, tier) as agent:
            await sub.wait_for(1, timeout=15)
            await until(lambda: agent.status.unattributed == 1)
            await asyncio.sleep(0.3)
    assert [(r["user_index"], r["observations"][0]["value"]) for r in sub.payloads()] == [(1, 122.0)]


async def test_radio_quiet_s_ends_a_session_with_a_device_that_never_hangs_up(
    tier: str, tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    # Some devices stay connected after sending; the configured silence (0.5 s here) must end
    # the session, not a constant in the driver (it used to wait 5 s whatever the config said).
    sub = await mqtt_subscriber(mosquitto, READINGS)
    async with VirtualRadio() as radio:
        cuff = demo_cuff(CUFF, readings=[bp(120, 80, 93, 70, 5)], quiet_s=60, idle_timeout_s=60)
        await radio.add_peripheral(cuff)
        async with running(config(tmp_path, mosquitto), radio, tier) as agent:
            await sub.wait_for(1, timeout=15)
            await until(lambda: agent.status.device(CUFF).sessions_ok == 1, timeout=3)
            assert cuff.connection_count == 1


async def test_every_binding_is_in_the_status_from_the_start_with_its_last_reading(
    tier: str, tmp_path: Path, mosquitto: LocalBroker
) -> None:
    async with VirtualRadio() as radio:
        scale = demo_scale(SCALE, readings=1)
        async with running(config(tmp_path, mosquitto), radio, tier) as agent:
            doc = agent._status_dict()
            devices = doc["devices"]
            assert isinstance(devices, dict)
            assert set(devices) == {CUFF, SCALE}  # before either has advertised
            assert devices[CUFF]["last_reading"] is None
            assert doc["hub_clock_synced"] is True  # hub.trust_clock = true says so from the start
            await radio.add_peripheral(scale)
            await until(lambda: agent.status.device(SCALE).readings == 1, timeout=15)
            assert agent.status.device(SCALE).last_reading is not None
            assert agent.status.device(CUFF).last_reading is None
            # The scale's reading (stamped yesterday) is a day with data in the first period,
            # which begins on the day the hub first ran with these bindings.
            await until(lambda: bool(agent.status.days_with_data), timeout=10)
    ours = agent.status.days_with_data["patient-1"]
    assert ours["needed"] == 16 and ours["days_left"] == 29
    assert (tmp_path / "pairings.json").exists()
