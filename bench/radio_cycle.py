"""One device cycle on the production radio path, against the same cycle on the virtual radio.

A cycle is what every session starts with: scan until the device is heard, connect (MTU
exchange, full service discovery), subscribe to the measurement, receive one indication,
disconnect. Baseline: the gateway's own bleak backend straight on bumble (no D-Bus). Ours:
bleak's real BlueZ backend over a private dbus-daemon to the BlueZ stand-in on the same
bumble radio — the D-Bus hops, bleak's BlueZ cache and the stand-in's bookkeeping are the
difference. Both in this process, back to back.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData

from drivers import uuids
from drivers.simulated.weight_scale import demo_scale, demo_weight_readings
from gateway.ble.bluez_radio import BlueZRadio
from gateway.ble.radio import Radio
from gateway.sim.bluez.bus import PrivateBus, use_as_system_bus
from gateway.sim.bluez.daemon import BluezStandIn
from gateway.sim.radio import VirtualRadio
from gateway.sim.wiring import VirtualBleakRadio

SCALE = "C0:00:00:00:5C:01"
WEIGHT = f"0000{uuids.WEIGHT_MEASUREMENT:04x}-0000-1000-8000-00805f9b34fb"


@contextlib.asynccontextmanager
async def _tier(name: str, radio: VirtualRadio) -> AsyncIterator[Radio]:
    if name == "virtual":
        yield VirtualBleakRadio(radio)
        return
    async with PrivateBus() as bus:
        with use_as_system_bus(bus.address):
            async with BluezStandIn(radio):
                yield BlueZRadio(None)


async def _cycle(radio: Radio) -> float:
    """Seconds for scan → connect → discover → subscribe → one indication → disconnect."""
    found: asyncio.Future[BLEDevice] = asyncio.get_running_loop().create_future()

    def seen(device: BLEDevice, _adv: AdvertisementData) -> None:
        if device.address.upper() == SCALE and not found.done():
            found.set_result(device)

    started = time.perf_counter()
    async with radio.scanner(seen):
        device = await asyncio.wait_for(found, 10)
    got = asyncio.Event()
    client = radio.client(device, lambda _c: None, 10.0)
    async with client:
        await client.start_notify(WEIGHT, lambda _c, _d: got.set())
        await asyncio.wait_for(got.wait(), 10)
    return time.perf_counter() - started


async def _measure(name: str, cycles: int) -> list[float]:
    async with VirtualRadio() as radio:
        scale = demo_scale(SCALE, readings=0)
        await radio.add_peripheral(scale)
        async with _tier(name, radio) as bleak_radio:
            times = []
            for reading in demo_weight_readings(cycles + 2):
                await scale.measure(reading)
                times.append(await _cycle(bleak_radio))
                await scale.wait_disconnected(timeout=10)
    return times[2:]  # the first cycles warm caches (imports, bleak's BlueZ version check)


async def run(*, quick: bool = False) -> dict[str, Any]:
    """The benchmark; returns its results.json keys."""
    cycles = 10 if quick else 50
    virtual = await _measure("virtual", cycles)
    bluez = await _measure("bluez", cycles)
    v50, b50 = statistics.median(virtual) * 1000, statistics.median(bluez) * 1000
    print(f"baseline (virtual backend)  median {v50:7.1f} ms over {len(virtual)} cycles")
    print(f"ours (BlueZ over D-Bus)     median {b50:7.1f} ms over {len(bluez)} cycles")
    print(f"ratio                       {b50 / v50:7.2f}x")
    return {
        "bluez_cycle_p50_ms": round(b50, 1),
        "virtual_cycle_p50_ms": round(v50, 1),
        "bluez_cycle_ratio": round(b50 / v50, 2),
        "radio_cycle": {"cycles": len(bluez), "bluez_ms": [round(t * 1000, 1) for t in bluez],
                        "virtual_ms": [round(t * 1000, 1) for t in virtual]},
    }
