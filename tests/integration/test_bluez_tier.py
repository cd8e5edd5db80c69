"""The production radio path under faults: bleak's BlueZ backend against the BlueZ stand-in.

Each test injects one fault users of other BLE gateways report from BlueZ hubs
(field-lessons.md) and checks that the agent survives it and loses nothing: every reading the
simulated device confirmed reaches mosquitto, once.
"""

# No `from __future__ import annotations`: dbus-fast reads _SilentAgent's annotations.
import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusObjectPath, DBusUInt32
from dbus_fast.service import ServiceInterface, dbus_method

from drivers.codec.weight import WeightMeasurement
from drivers.simulated.blood_pressure import demo_cuff
from drivers.simulated.weight_scale import demo_scale
from gateway.agent import Agent
from gateway.broker import LocalBroker
from gateway.config import GatewayConfig
from gateway.sim.bluez.daemon import BluezStandIn
from gateway.sim.bluez.policy import BluezFaults, BluezPolicy
from gateway.sim.radio import VirtualRadio
from tests.integration import tiers
from tests.integration.test_pipeline import CUFF, READINGS, SCALE, Subscribe, bp, config, until

pytestmark = pytest.mark.integration

NEIGHBOUR = "C0:00:00:00:BC:99"


def fast(cfg: GatewayConfig) -> GatewayConfig:
    """Short radio timings so a fault is retried within a test's seconds."""
    radio = cfg.radio.model_copy(update={
        "connect_timeout_s": 3.0, "operation_timeout_s": 2.0, "session_timeout_s": 20.0})
    return cfg.model_copy(update={"radio": radio})


@contextlib.asynccontextmanager
async def on_bluez(
    cfg: GatewayConfig, radio: VirtualRadio, *, policy: BluezPolicy | None = None,
    faults: BluezFaults | None = None,
) -> AsyncIterator[tuple[Agent, BluezStandIn]]:
    async with tiers.running_agent(fast(cfg), radio, "bluez", policy=policy, faults=faults) as (
            agent, bluez):
        assert bluez is not None
        yield agent, bluez


def assert_once_each(sub: Any, n: int) -> None:
    ids = [p["reading_id"] for p in sub.payloads()]
    assert len(ids) == n, ids
    assert len(set(ids)) == n


async def test_bluez_bluetoothd_restart_keeps_bonds_and_loses_nothing(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    # bluetoothd restarted: its objects vanish without InterfacesRemoved and come back; bleak's
    # manager keeps its old cache. Readings taken across the restart must all arrive.
    sub = await mqtt_subscriber(mosquitto, READINGS)
    async with VirtualRadio() as radio:
        cuff = demo_cuff(CUFF, readings=[bp(121, 78, 91, 85, 30)], bonding_required=True)
        await radio.add_peripheral(cuff)
        async with on_bluez(config(tmp_path, mosquitto), radio) as (agent, bluez):
            await sub.wait_for(1, timeout=15)
            await cuff.wait_disconnected(timeout=10)
            await bluez.restart()
            props = bluez.device_props(CUFF)
            assert props is not None and props["Bonded"]  # the bond survived in the store
            await cuff.measure(bp(125, 80, 95, 70, 0))
            await sub.wait_for(2, timeout=30)
            await cuff.measure(bp(126, 81, 96, 71, 0))
            await sub.wait_for(3, timeout=30)
    assert_once_each(sub, 3)
    assert cuff.unsent == 0
    assert agent.status.readings_lost == 0


async def test_bluez_bluetoothd_killed_mid_session_loses_nothing(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    sub = await mqtt_subscriber(mosquitto, READINGS)
    async with VirtualRadio() as radio:
        cuff = demo_cuff(CUFF, readings=[bp(120 + i, 80, 95, 70, 40 - i) for i in range(6)])
        await radio.add_peripheral(cuff)
        async with on_bluez(config(tmp_path, mosquitto), radio) as (_agent, bluez):
            await until(lambda: len(cuff.sent) >= 2, timeout=15)
            await bluez.stop()  # killed in the middle of the transfer
            await asyncio.sleep(1)
            await bluez.start()
            await sub.wait_for(6, timeout=40)
            await asyncio.sleep(0.5)
    assert_once_each(sub, 6)
    assert cuff.unsent == 0


async def test_bluez_adapter_powered_off_and_on(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    sub = await mqtt_subscriber(mosquitto, READINGS)
    async with VirtualRadio() as radio:
        scale = demo_scale(SCALE, readings=1)
        await radio.add_peripheral(scale)
        async with on_bluez(config(tmp_path, mosquitto), radio) as (_agent, bluez):
            await sub.wait_for(1, timeout=15)
            await bluez.power(False)
            await scale.measure(WeightMeasurement(imperial=False, weight_raw=16270))  # 81.35 kg
            await asyncio.sleep(1)
            await bluez.power(True)
            await sub.wait_for(2, timeout=40)
    assert_once_each(sub, 2)


async def test_bluez_adapter_removed_and_plugged_back(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    sub = await mqtt_subscriber(mosquitto, READINGS)
    async with VirtualRadio() as radio:
        cuff = demo_cuff(CUFF, readings=[bp(121, 78, 91, 85, 30)])
        await radio.add_peripheral(cuff)
        async with on_bluez(config(tmp_path, mosquitto), radio) as (agent, bluez):
            await sub.wait_for(1, timeout=15)
            await cuff.wait_disconnected(timeout=10)
            await bluez.remove_adapter()
            await cuff.measure(bp(125, 80, 95, 70, 0))
            await until(lambda: agent.status.radio != "ok", timeout=30)
            await bluez.add_adapter()
            await sub.wait_for(2, timeout=40)
    assert_once_each(sub, 2)


@pytest.mark.parametrize("fault", [
    "in_progress_on_connect", "abort_by_local_on_connect", "drop_before_connect",
])
async def test_bluez_connect_faults_are_retried_and_lose_nothing(
    fault: str, tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    # InProgress ("Operation already in progress"), le-connection-abort-by-local (bleak retries
    # only once Connected went True→False) and a device dropped from bluetoothd's cache
    # between the scan and Connect: each costs an attempt, never a reading.
    sub = await mqtt_subscriber(mosquitto, READINGS)
    faults = BluezFaults(**{fault: 2})
    async with VirtualRadio() as radio:
        cuff = demo_cuff(CUFF, readings=[bp(121, 78, 91, 85, 30), bp(125, 80, 95, 70, 20)])
        await radio.add_peripheral(cuff)
        async with on_bluez(config(tmp_path, mosquitto), radio, faults=faults) as (_agent, bluez):
            await sub.wait_for(2, timeout=40)
            assert getattr(bluez.faults, fault) == 0  # the fault did fire
    assert_once_each(sub, 2)


async def test_bluez_in_progress_on_discovery_is_retried(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    sub = await mqtt_subscriber(mosquitto, READINGS)
    async with VirtualRadio() as radio:
        scale = demo_scale(SCALE, readings=2)
        await radio.add_peripheral(scale)
        faults = BluezFaults(in_progress_on_discovery=1)
        async with on_bluez(config(tmp_path, mosquitto), radio, faults=faults):
            await sub.wait_for(2, timeout=30)
    assert_once_each(sub, 2)


async def test_bluez_scanning_while_connecting_refused_by_the_adapter(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    # Some controllers cannot scan and initiate at once: Connect answers InProgress for as
    # long as discovery runs. The agent must stop scanning to connect, then scan again.
    sub = await mqtt_subscriber(mosquitto, READINGS)
    async with VirtualRadio() as radio:
        cuff = demo_cuff(CUFF, readings=[bp(121, 78, 91, 85, 30)])
        await radio.add_peripheral(cuff)
        faults = BluezFaults(busy_while_discovering=True)
        events = await mqtt_subscriber(mosquitto, "rpm/hub-test/events")
        async with on_bluez(config(tmp_path, mosquitto), radio, faults=faults) as (agent, bluez):
            await sub.wait_for(1, timeout=40)
            await cuff.wait_disconnected(timeout=10)
            await cuff.measure(bp(125, 80, 95, 70, 0))
            await sub.wait_for(2, timeout=40)
            await until(lambda: bluez.discovering, timeout=10)  # scanning again afterwards
            assert agent._gate.exclusive
            assert agent.status.device(CUFF).sessions_ok == 2
    assert_once_each(sub, 2)
    learnt = [p for p in events.payloads() if p["event"] == "radio_exclusive"]
    assert len(learnt) == 1


async def test_bluez_att_request_never_answered(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    # The device accepts the link, then answers nothing (BlueZ has no timeout on D-Bus GATT
    # calls of its own below 30 s): the session gives up at the operation timeout, the next
    # connection reads everything.
    sub = await mqtt_subscriber(mosquitto, READINGS)
    async with VirtualRadio() as radio:
        scale = demo_scale(SCALE, readings=2, never_answer_connections=1)
        await radio.add_peripheral(scale)
        async with on_bluez(config(tmp_path, mosquitto), radio) as (agent, _bluez):
            await sub.wait_for(2, timeout=45)
            assert agent.status.device(SCALE).sessions_failed >= 1
    assert_once_each(sub, 2)


class _SilentAgent(ServiceInterface):
    """A stale desktop agent that registered as default and never answers."""

    def __init__(self) -> None:
        super().__init__("org.bluez.Agent1")
        self.asked = 0

    @dbus_method()
    async def RequestConfirmation(self, device: DBusObjectPath, passkey: DBusUInt32) -> None:
        self.asked += 1
        await asyncio.Event().wait()

    @dbus_method()
    def Cancel(self) -> None:
        pass


async def test_bluez_numeric_comparison_bonds_through_our_agent_only_for_that_device(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    # A cuff with a display and a yes/no button pairs by numeric comparison. Implicit pairing
    # (security elevation) meets a stale default agent that never answers; the agent's own
    # Agent1 then pairs exactly that device, and the neighbour's is never bonded.
    sub = await mqtt_subscriber(mosquitto, READINGS)
    policy = BluezPolicy(agent_timeout_s=1.0)
    async with VirtualRadio() as radio:
        cuff = demo_cuff(CUFF, readings=[bp(121, 78, 91, 85, 30)], bonding_required=True,
                         pairing_io="display_yes_no")
        neighbour = demo_cuff(NEIGHBOUR, readings=1, bonding_required=True,
                              pairing_io="display_yes_no")
        await radio.add_peripheral(cuff)
        async with tiers.bleak_radio("bluez", radio, policy=policy) as (bleak, bluez):
            assert bluez is not None
            stale = await _register_stale_agent()
            agent = Agent(fast(config(tmp_path, mosquitto)), radio=bleak)
            task = asyncio.create_task(agent.run())
            try:
                await radio.add_peripheral(neighbour)
                await sub.wait_for(1, timeout=40)
            finally:
                agent.stop()
                await asyncio.wait_for(task, 15)
            assert stale[1].asked >= 1  # the stale agent was asked first, and timed out
            stale[0].disconnect()
        assert len(cuff.pairing_delegate.compared) >= 1  # numeric comparison, not Just Works
        assert await radio.has_bond(CUFF)
        # (The agent's refusal of any other device is tested in test_bluez_agent.py.)
    assert_once_each(sub, 1)


async def _register_stale_agent() -> tuple[MessageBus, _SilentAgent]:
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    silent = _SilentAgent()
    bus.export("/stale/agent", silent)
    for member, body in (("RegisterAgent", ["/stale/agent", "DisplayYesNo"]),
                         ("RequestDefaultAgent", ["/stale/agent"])):
        reply = await bus.call(Message(
            destination="org.bluez", path="/org/bluez", interface="org.bluez.AgentManager1",
            member=member, signature="os" if len(body) == 2 else "o", body=body))
        assert reply is not None and reply.message_type == MessageType.METHOD_RETURN, reply
    return bus, silent


async def test_bluez_not_paired_without_security_elevation_pairs_and_delivers(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    # With BlueZ's implicit pairing off, an encrypted CCCD write answers NotPermitted "Not
    # paired"; needs_pairing() must see it (it did not), so the driver pairs and retries.
    sub = await mqtt_subscriber(mosquitto, READINGS)
    async with VirtualRadio() as radio:
        cuff = demo_cuff(CUFF, readings=[bp(121, 78, 91, 85, 30)], bonding_required=True)
        await radio.add_peripheral(cuff)
        policy = BluezPolicy(auto_elevate_security=False)
        async with on_bluez(config(tmp_path, mosquitto), radio, policy=policy) as (_a, bluez):
            await sub.wait_for(1, timeout=30)
            assert ("Pair", "/org/bluez/hci0/dev_C0_00_00_00_BC_01") in bluez.calls
        assert await radio.has_bond(CUFF)
    assert_once_each(sub, 1)


async def test_bluez_two_devices_pairing_at_once_both_bond(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    # Review finding: each pair() registered its own agent as bluetoothd's default, and an
    # agent answers only for its own device: two first pairings at once refused each other.
    sub = await mqtt_subscriber(mosquitto, READINGS)
    async with VirtualRadio() as radio:
        first = demo_cuff(CUFF, readings=[bp(121, 78, 91, 85, 30)], bonding_required=True,
                          pairing_io="display_yes_no")
        second = demo_cuff(SCALE, name="SIM Cuff 2", readings=[bp(131, 88, 99, 75, 30)],
                           bonding_required=True, pairing_io="display_yes_no")
        await radio.add_peripheral(first)
        await radio.add_peripheral(second)
        policy = BluezPolicy(auto_elevate_security=False)  # both go through our pair()
        async with on_bluez(config(tmp_path, mosquitto), radio, policy=policy) as (agent, _b):
            await sub.wait_for(2, timeout=40)
            assert agent.status.device(CUFF).sessions_failed == 0
            assert agent.status.device(SCALE).sessions_failed == 0
        assert await radio.has_bond(CUFF) and await radio.has_bond(SCALE)
    assert_once_each(sub, 2)


async def test_bluez_a_cuff_that_forgot_its_bond_is_reported_and_keeps_its_memory(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    # A battery change or factory reset wipes the cuff's keys: re-encryption with the hub's
    # stored key fails. The agent must say "bond lost" (with pairing-mode advice), once, and
    # never take the cuff's records without a bond.
    sub = await mqtt_subscriber(mosquitto, READINGS)
    events = await mqtt_subscriber(mosquitto, "rpm/hub-test/events")
    async with VirtualRadio() as radio:
        cuff = demo_cuff(CUFF, readings=3, bonding_required=True, forget_bond_after=1,
                         drop_link_after=1)
        await radio.add_peripheral(cuff)
        async with on_bluez(config(tmp_path, mosquitto), radio) as (agent, _bluez):
            await sub.wait_for(1, timeout=20)
            await events.wait_until(
                lambda _: any(p["event"] == "bond_lost" for p in events.payloads()), 30)
            assert "pairing mode" in str(agent.status.device(CUFF).last_error)
            assert cuff.unsent == 2  # still on the cuff, not taken over an unbonded link
    assert_once_each(sub, 1)
    assert len([p for p in events.payloads() if p["event"] == "bond_lost"]) == 1
