"""The two radio tiers the integration tests run on.

* ``virtual``: the gateway's own bleak backend on the virtual radio (fast, in-process).
* ``bluez``: bleak's real BlueZ backend, over a private dbus-daemon, against the BlueZ
  stand-in (gateway.sim.bluez) on the same virtual radio: the production radio path.

A test module opts in with ``tier = tiers.parametrised()`` and builds its radio with
``async with tiers.bleak_radio(tier, radio) as (bleak_radio, bluez):`` (bluez is the stand-in,
None on the virtual tier). The bluez tier's node ids carry ``[bluez]``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from bleak import BleakScanner
from bleak.backends.device import BLEDevice

from gateway.agent import Agent
from gateway.ble.bluez_agent import device_path as bluez_device_path
from gateway.ble.bluez_radio import BlueZRadio
from gateway.ble.radio import Radio
from gateway.config import GatewayConfig
from gateway.sim.bluez.bus import PrivateBus, use_as_system_bus
from gateway.sim.bluez.daemon import BluezStandIn
from gateway.sim.bluez.policy import BluezFaults, BluezPolicy
from gateway.sim.radio import VirtualRadio
from gateway.sim.wiring import VirtualBleakRadio

TIERS = ("virtual", "bluez")


def parametrised() -> Any:
    """A module-level fixture `tier` that runs every test using it once per tier."""

    @pytest.fixture(params=TIERS)
    def tier(request: pytest.FixtureRequest) -> Iterator[str]:
        yield str(request.param)

    return tier


@contextlib.asynccontextmanager
async def bleak_radio(
    tier: str,
    radio: VirtualRadio,
    *,
    policy: BluezPolicy | None = None,
    faults: BluezFaults | None = None,
) -> AsyncIterator[tuple[Radio, BluezStandIn | None]]:
    """The gateway's Radio on `radio` for `tier`; on bluez also the running stand-in."""
    if tier == "virtual":
        yield VirtualBleakRadio(radio), None
        return
    async with PrivateBus() as bus:
        with use_as_system_bus(bus.address):
            async with BluezStandIn(radio, bluez_policy=policy, faults=faults) as bluez:
                yield BlueZRadio(None), bluez


@contextlib.asynccontextmanager
async def running_agent(
    cfg: GatewayConfig,
    radio: VirtualRadio,
    tier: str = "virtual",
    *,
    policy: BluezPolicy | None = None,
    faults: BluezFaults | None = None,
) -> AsyncIterator[tuple[Agent, BluezStandIn | None]]:
    """The agent on an open virtual radio through `tier`; stopped cleanly at the end."""
    async with bleak_radio(tier, radio, policy=policy, faults=faults) as (bleak, bluez):
        agent = Agent(cfg, radio=bleak)
        task = asyncio.create_task(agent.run())
        try:
            yield agent, bluez
        finally:
            agent.stop()
            await asyncio.wait_for(task, 15)


async def seen_device(tier: str, address: str, name: str = "") -> BLEDevice:
    """A BLEDevice for `address` as the agent would get it from its scanner on `tier`.

    On BlueZ a device must have been discovered (bluetoothd knows only what it has seen);
    one that is not on the air gets a device object path anyway, as a stale cache would.
    """
    if tier == "virtual":
        return BLEDevice(address, name or None, None)
    found = await BleakScanner.find_device_by_address(address, timeout=3)
    if found is not None:
        return found
    return BLEDevice(address, name or None, {
        "path": bluez_device_path(address), "props": {"Adapter": "/org/bluez/hci0", "Alias": name}})
