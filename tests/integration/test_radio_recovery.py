"""The radio recovery ladder with real parts: the virtual radio, simulated devices, mosquitto.

The faults are those of the field (field-lessons.md §2.3, §1.1 #99): an adapter that stops
scanning after hours, a controller that only a power cycle brings back, a daemon restart that
is not possible. A neighbour's device that never stops advertising keeps the air busy, so any
silence the agent hears is the fault's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from bumble import hci
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, dbus_property, method

from drivers.simulated.blood_pressure import demo_cuff
from drivers.simulated.weight_scale import demo_scale
from gateway.ble.adapter_control import AdapterControlError, BluezAdapterControl
from gateway.broker import LocalBroker
from gateway.config import GatewayConfig
from gateway.sim.bluez.bus import PrivateBus
from gateway.sim.radio import VirtualRadio
from tests.integration import tiers
from tests.integration.test_pipeline import (
    CUFF,
    HUB,
    NEIGHBOUR,
    READINGS,
    Subscribe,
    bp,
    config,
    running,
    until,
)

pytestmark = pytest.mark.integration
tier = tiers.parametrised()

EVENTS = f"rpm/{HUB}/events"


def fast(cfg: GatewayConfig, silence_s: float = 1.0, **radio: Any) -> GatewayConfig:
    """The config with a short silent period (and any other radio keys)."""
    return cfg.model_copy(update={"radio": cfg.radio.model_copy(
        update={"scan_silence_s": silence_s, **radio})})


class Wedge:
    """A stuck hub controller: it reports no advertisement, or refuses to start scanning.

    With `until_reset` an HCI Reset (what powering the adapter on does) clears it; otherwise
    it lasts until `lift()`.
    """

    def __init__(self, radio: VirtualRadio, *, until_reset: bool, refuse_start: bool = False) -> None:
        self.active = True
        hub = radio.hub
        host = hub.host
        report: Callable[[Any], None] = host.on_hci_le_advertising_report_event
        reset: Callable[..., Awaitable[None]] = host.reset
        start: Callable[..., Awaitable[None]] = hub.start_scanning

        def drop_reports(event: Any) -> None:
            if not self.active:
                report(event)

        async def reset_clears(*args: Any, **kwargs: Any) -> None:
            if until_reset:
                self.active = False
            await reset(*args, **kwargs)

        async def refuse(*args: Any, **kwargs: Any) -> None:
            if self.active and refuse_start:
                raise hci.HCI_Error(hci.HCI_ErrorCode.COMMAND_DISALLOWED_ERROR)
            await start(*args, **kwargs)

        host.on_hci_le_advertising_report_event = drop_reports
        host.reset = reset_clears
        hub.start_scanning = refuse

    def lift(self) -> None:
        self.active = False


def events_named(sub: Any, name: str) -> list[dict[str, Any]]:
    return [p["detail"] for p in sub.payloads() if p["event"] == name]


def steps(sub: Any) -> list[tuple[str, str]]:
    return [(d["step"], d["result"]) for d in events_named(sub, "radio_recovery")]


async def on_air(radio: VirtualRadio) -> None:
    """The cuff (silent until it measures) and a neighbour's scale that always advertises."""
    await radio.add_peripheral(demo_cuff(CUFF, readings=[]))
    await radio.add_peripheral(demo_scale(NEIGHBOUR, readings=[], pairing_mode=True))


async def test_an_adapter_that_stops_scanning_gets_discovery_restarted_and_readings_flow(
    tier: str, tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    readings = await mqtt_subscriber(mosquitto, READINGS)
    events = await mqtt_subscriber(mosquitto, EVENTS)
    async with VirtualRadio() as radio:
        await on_air(radio)
        cuff = radio.peripherals[CUFF]
        async with running(fast(config(tmp_path, mosquitto)), radio, tier) as agent:
            await until(lambda: len(agent.status.unknown_seen) > 0)
            await radio.hub.stop_scanning()  # underneath the agent: nothing is heard any more
            await events.wait_until(lambda _: bool(events_named(events, "radio_recovered")), 10)
            await cuff.measure(bp(126, 81, 96, 70, 0))  # type: ignore[attr-defined]
            await readings.wait_for(1, timeout=15)
            status = agent._status_dict()["radio_recovery"]
    assert steps(events) == [("restart_discovery", "ok")]
    (recovered,) = events_named(events, "radio_recovered")
    assert recovered["step"] == "restart_discovery" and recovered["steps"] == 1
    assert isinstance(status, dict)
    assert status["step"] is None and status["steps_taken"] == 1 and status["steps_failed"] == 0
    assert status["last_step"] == "restart_discovery" and status["last_result"] == "ok"
    assert status["last_advert_age_s"] is not None and status["last_advert_age_s"] < 1
    assert readings.payloads()[0]["observations"][0]["value"] == 126.0


@pytest.mark.parametrize("fault", ["silent", "refuses_to_scan"])
async def test_a_stuck_controller_is_power_cycled_after_discovery_restart_did_not_help(
    tier: str, tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe, fault: str
) -> None:
    readings = await mqtt_subscriber(mosquitto, READINGS)
    events = await mqtt_subscriber(mosquitto, EVENTS)
    async with VirtualRadio() as radio:
        await on_air(radio)
        cuff = radio.peripherals[CUFF]
        async with running(fast(config(tmp_path, mosquitto)), radio, tier) as agent:
            await until(lambda: len(agent.status.unknown_seen) > 0)
            if fault == "refuses_to_scan":
                await radio.hub.stop_scanning()
            Wedge(radio, until_reset=True, refuse_start=fault == "refuses_to_scan")
            await events.wait_until(lambda _: bool(events_named(events, "radio_recovered")), 10)
            await cuff.measure(bp(131, 84, 99, 72, 0))  # type: ignore[attr-defined]
            await readings.wait_for(1, timeout=15)
    first = ("restart_discovery", "ok" if fault == "silent" else "failed")
    assert steps(events) == [first, ("power_cycle", "ok")]
    (recovered,) = events_named(events, "radio_recovered")
    assert recovered["step"] == "power_cycle" and recovered["steps"] == 2
    if fault == "refuses_to_scan":
        (failed, _) = events_named(events, "radio_recovery")
        assert "COMMAND_DISALLOWED" in failed["error"]
        assert "the scanner fails to start" in events_named(events, "radio_recovery")[1]["reason"]


async def test_without_a_bluetoothd_restart_the_ladder_backs_off_and_the_agent_stays_up(
    tier: str, tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.agent")
    readings = await mqtt_subscriber(mosquitto, READINGS)
    events = await mqtt_subscriber(mosquitto, EVENTS)
    async with VirtualRadio() as radio:
        await on_air(radio)
        cuff = radio.peripherals[CUFF]
        async with running(fast(config(tmp_path, mosquitto)), radio, tier) as agent:
            await until(lambda: len(agent.status.unknown_seen) > 0)
            wedge = Wedge(radio, until_reset=False)  # not even a power cycle helps
            await events.wait_until(lambda _: len(steps(events)) >= 3, 10)
            # Back-off after the top: the next step comes 2 s after (1 s before it).
            await until(lambda: agent.status.radio_recovery.steps_taken >= 3)
            failed_at = len(steps(events))
            await asyncio.sleep(1.5)
            assert len(steps(events)) == failed_at
            assert agent.status.radio_recovery.steps_failed == 1
            wedge.lift()
            await events.wait_until(lambda _: bool(events_named(events, "radio_recovered")), 10)
            await cuff.measure(bp(119, 77, 91, 64, 0))  # type: ignore[attr-defined]
            await readings.wait_for(1, timeout=15)
    assert steps(events)[:3] == [("restart_discovery", "ok"), ("power_cycle", "ok"),
                                 ("restart_bluetooth", "failed")]
    bt = events_named(events, "radio_recovery")[2]
    # Virtual radio: no daemon to restart; BlueZ tier: no systemd on the private bus.
    why = "not available" if tier == "virtual" else "nobody serves it on the system bus"
    assert why in bt["error"] and bt["next_step_in_s"] == 2
    (recovered,) = events_named(events, "radio_recovered")
    assert recovered["step"] == "restart_bluetooth" and recovered["step_result"].startswith("failed")
    failures = [r for r in caplog.records
                if r.levelno == logging.WARNING and "restarting bluetooth.service failed" in r.message]
    assert len(failures) == 1


async def test_no_ladder_step_while_the_hub_has_no_paired_device(
    tmp_path: Path, mosquitto: LocalBroker, mqtt_subscriber: Subscribe
) -> None:
    events = await mqtt_subscriber(mosquitto, EVENTS)
    cfg = fast(config(tmp_path, mosquitto), silence_s=0.3).model_copy(update={"devices": ()})
    async with VirtualRadio() as radio, running(cfg, radio) as agent:
        await until(lambda: agent.status.radio == "ok")
        await asyncio.sleep(2)  # more than six silent periods, and nothing on the air
        status = agent._status_dict()["radio_recovery"]
    assert events_named(events, "radio_recovery") == []
    assert isinstance(status, dict)
    assert status["steps_taken"] == 0 and status["step"] is None
    assert status["last_advert_age_s"] is None


# -- BluezAdapterControl over a real (private) D-Bus daemon, with stand-ins for BlueZ and systemd --


class FakeAdapter(ServiceInterface):
    """org.bluez.Adapter1 with a Powered property that records every Set."""

    def __init__(self) -> None:
        super().__init__("org.bluez.Adapter1")
        self.powered = True
        self.sets: list[bool] = []

    @dbus_property()
    def Powered(self) -> "b":  # noqa: F821, UP037  (D-Bus signatures)
        return self.powered

    @Powered.setter
    def Powered(self, value: "b") -> None:  # noqa: F821, UP037
        self.sets.append(value)
        self.powered = value


class FakeSystemd(ServiceInterface):
    """org.freedesktop.systemd1.Manager whose RestartUnit takes the adapter away for a moment."""

    def __init__(self, bus: MessageBus, adapter: FakeAdapter) -> None:
        super().__init__("org.freedesktop.systemd1.Manager")
        self.bus, self.adapter = bus, adapter
        self.restarts: list[tuple[str, str]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @method()
    def RestartUnit(self, name: "s", mode: "s") -> "o":  # noqa: F821, UP037
        self.restarts.append((name, mode))
        self.bus.unexport("/org/bluez/hci0", self.adapter)  # bluetoothd is gone ...
        task = asyncio.get_running_loop().create_task(self._come_back())
        self._tasks.add(task)
        return "/org/freedesktop/systemd1/job/1"

    async def _come_back(self) -> None:
        await asyncio.sleep(0.5)  # ... and back, adapter powered
        self.bus.export("/org/bluez/hci0", self.adapter)


@pytest.fixture
async def system_bus() -> AsyncIterator[str]:
    """The address of a private dbus-daemon standing in for the system bus."""
    async with PrivateBus() as bus:
        yield bus.address


async def serve(address: str, *, systemd: bool) -> tuple[MessageBus, FakeAdapter, FakeSystemd | None]:
    bus = await MessageBus(bus_address=address).connect()
    adapter = FakeAdapter()
    bus.export("/org/bluez/hci0", adapter)
    await bus.request_name("org.bluez")
    manager = None
    if systemd:
        manager = FakeSystemd(bus, adapter)
        bus.export("/org/freedesktop/systemd1", manager)
        await bus.request_name("org.freedesktop.systemd1")
    return bus, adapter, manager


async def test_bluez_adapter_control_power_cycles_and_restarts_over_dbus(system_bus: str) -> None:
    bus, adapter, manager = await serve(system_bus, systemd=True)
    try:
        control = BluezAdapterControl(None, timeout=5, power_off_s=0.05, bus_address=system_bus)
        await control.power_cycle()
        assert adapter.sets == [False, True] and adapter.powered
        await control.restart_bluetooth()  # returns once the adapter is back
        assert manager is not None and manager.restarts == [("bluetooth.service", "replace")]
        assert adapter.powered
    finally:
        bus.disconnect()


async def test_bluez_adapter_control_failures_are_one_error_in_plain_words(system_bus: str) -> None:
    bus, _, _ = await serve(system_bus, systemd=False)
    try:
        with pytest.raises(AdapterControlError, match=r"restart of bluetooth.service: nobody serves"):
            await BluezAdapterControl(timeout=5, bus_address=system_bus).restart_bluetooth()
        with pytest.raises(AdapterControlError, match=r"power cycle of hci7: no such adapter"):
            await BluezAdapterControl("hci7", timeout=5, bus_address=system_bus).power_cycle()
        with pytest.raises(AdapterControlError, match="cannot reach the D-Bus system bus"):
            await BluezAdapterControl(timeout=5, bus_address="unix:path=/nonexistent/bus").power_cycle()
    finally:
        bus.disconnect()
