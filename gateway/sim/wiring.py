"""The virtual radio as the agent sees it: bleak objects on bumble, devices from the config."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from zoneinfo import ZoneInfo

from bleak import BleakClient, BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementDataCallback
from bumble.core import BaseBumbleError

from drivers.simulated.blood_pressure import demo_bp_readings, demo_cuff
from drivers.simulated.device import DEFAULT_ZONE
from drivers.simulated.weight_scale import demo_scale, demo_weight_readings
from gateway.ble.adapter_control import AdapterControl, AdapterControlError
from gateway.config import RadioConfig, SimulatedDeviceConfig
from gateway.sim.backend import VirtualClientBackend, VirtualScannerBackend
from gateway.sim.radio import VirtualRadio

log = logging.getLogger(__name__)


class VirtualBleakRadio:
    """Implements gateway.ble.radio.Radio: the same bleak API, the bumble backend underneath."""

    kind = "virtual"

    def __init__(self, radio: VirtualRadio) -> None:
        self.radio = radio
        self.control: AdapterControl = VirtualAdapterControl(radio)

    def scanner(self, callback: AdvertisementDataCallback) -> BleakScanner:
        """A bleak scanner on the virtual radio."""
        return BleakScanner(detection_callback=callback, backend=VirtualScannerBackend,
                            radio=self.radio)

    def client(
        self, device: BLEDevice, disconnected: Callable[[BleakClient], None], timeout: float
    ) -> BleakClient:
        """A bleak client on the virtual radio."""
        return BleakClient(device, disconnected_callback=disconnected, timeout=timeout,
                           backend=VirtualClientBackend, radio=self.radio)

    async def watch(self, stale: Callable[[str], None]) -> None:
        """Nothing to watch: no daemon sits between the agent and the virtual radio."""
        del stale

    async def release_stale(
        self, addresses: set[str], busy: Callable[[], set[str]]
    ) -> list[str]:
        """No stack keeps links for a dead client here: a process's links die with it."""
        del addresses, busy
        return []

    async def bonds(self) -> set[str]:
        """Addresses whose keys are in the virtual hub's key store."""
        return {a.upper() for a in self.radio.peripherals if await self.radio.has_bond(a)}

    async def forget(self, address: str) -> bool:
        """Delete the virtual hub's keys for `address`."""
        return await self.radio.remove_bond(address)


class VirtualAdapterControl:
    """AdapterControl on the virtual radio: the hub's bumble device stands in for the adapter."""

    def __init__(self, radio: VirtualRadio) -> None:
        self.radio = radio
        self.power_cycles = 0

    async def power_cycle(self) -> None:
        """Power the hub's device off and on: as with BlueZ, discovery ends and links drop."""
        hub = self.radio.hub
        try:
            async with asyncio.timeout(self.radio.op_timeout):
                if hub.is_scanning:
                    await hub.stop_scanning()
                for connection in list(hub.connections.values()):
                    await connection.disconnect()
                await hub.power_off()
                await hub.power_on()  # an HCI Reset first, as the kernel does on power-on
        except (BaseBumbleError, TimeoutError) as e:
            raise AdapterControlError(f"power cycle of the virtual hub failed: {e!r}") from e
        self.power_cycles += 1

    async def restart_bluetooth(self) -> None:
        """Not available: there is no bluetoothd behind the virtual radio."""
        raise AdapterControlError("restarting bluetoothd is not available on the virtual radio")


# Per profile: the ready-made device and its realistic readings (this module is sim-only).
_PROFILES: dict[str, tuple[Callable[..., Any], Callable[[int], Sequence[Any]]]] = {
    "blood_pressure": (demo_cuff, demo_bp_readings),
    "weight_scale": (demo_scale, demo_weight_readings),
}


def simulated_device(spec: SimulatedDeviceConfig, zone: ZoneInfo = DEFAULT_ZONE) -> Any:
    """A simulated device for one config entry, with an empty memory (it measures on cue).

    Its clock starts at the wall-clock time in `zone` (the hub's) plus the entry's offset.
    """
    make, _ = _PROFILES[spec.profile]
    extra: dict[str, Any] = {} if spec.name is None else {"name": spec.name}
    return make(spec.address, readings=[], bonding_required=spec.bonding_required,
                clock_offset_s=spec.clock_offset_s, zone=zone, **extra)


async def _measure_on_schedule(device: Any, spec: SimulatedDeviceConfig) -> None:
    _, readings = _PROFILES[spec.profile]
    if spec.pairing_mode_s > 0:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_pairing_mode_for(device, spec.pairing_mode_s))
            tg.create_task(_measure(device, spec, readings))
    else:
        await _measure(device, spec, readings)


async def _pairing_mode_for(device: Any, seconds: float) -> None:
    await device.set_pairing_mode(True)
    await asyncio.sleep(seconds)
    await device.set_pairing_mode(False)


async def _measure(device: Any, spec: SimulatedDeviceConfig, readings: Any) -> None:
    for reading in readings(spec.readings):
        await asyncio.sleep(spec.interval_s)
        # Taken now and stamped by the device's own (possibly wrong) clock, as a real one does.
        await device.measure(dataclasses.replace(reading, timestamp=None), stamp=True)


@contextlib.asynccontextmanager
async def open_virtual_radio(
    cfg: RadioConfig, zone: ZoneInfo | None = None
) -> AsyncIterator[VirtualBleakRadio]:
    """A virtual radio with the config's simulated devices measuring on their schedules.

    `zone` is the hub's time zone, where the simulated clocks are set (None: UTC, the hub
    config's default). With `cfg.link` ("tcp:HOST:PORT") the devices are those of an
    `rpm-gateway simulate` process instead, and their clocks follow its --timezone.
    """
    if cfg.link is not None:
        # The devices (and the hub's controller) live in an `rpm-gateway simulate` process.
        if cfg.simulated:
            log.warning("radio.link is set: the radio.simulated entries are ignored (the "
                        "devices are those of the simulate process)")
        async with VirtualRadio(hci=cfg.link, op_timeout=cfg.operation_timeout_s) as remote:
            log.info("virtual radio up, devices behind %s", cfg.link)
            yield VirtualBleakRadio(remote)
        return
    async with VirtualRadio() as radio:
        devices = [(simulated_device(spec, zone or DEFAULT_ZONE), spec) for spec in cfg.simulated]
        for device, _ in devices:
            await radio.add_peripheral(device)
        tasks = [asyncio.create_task(_measure_on_schedule(d, s), name=f"sim {s.address}")
                 for d, s in devices]
        log.info("virtual radio up with %d simulated device(s)", len(devices))
        try:
            yield VirtualBleakRadio(radio)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
