"""The hub's radio: bleak's BlueZ backend, our pairing agent, the stack watch, adapter control.

Linux only (dbus-fast); gateway.ble.radio.open_radio imports it when radio.kind = "bluez".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bleak import BleakClient, BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementDataCallback

from gateway.ble.adapter_control import AdapterControl, BluezAdapterControl
from gateway.ble.bluez_client import AgentBleakClient
from gateway.ble.bluez_devices import bonded_addresses, release_stale_links, remove_device
from gateway.ble.bluez_watch import BluezWatch


class BlueZRadio:
    """The platform's own bleak backend (BlueZ over D-Bus on the hub)."""

    kind = "bluez"

    def __init__(self, adapter: str | None) -> None:
        self._adapter = adapter
        self.control: AdapterControl = BluezAdapterControl(adapter)

    def scanner(self, callback: AdvertisementDataCallback) -> BleakScanner:
        """A BlueZ scanner on the configured adapter."""
        if self._adapter:
            return BleakScanner(detection_callback=callback, bluez={"adapter": self._adapter})
        return BleakScanner(detection_callback=callback)

    def client(
        self, device: BLEDevice, disconnected: Callable[[BleakClient], None], timeout: float
    ) -> BleakClient:
        """A BlueZ client on the configured adapter."""
        extra: dict[str, Any] = {"bluez": {"adapter": self._adapter}} if self._adapter else {}
        return AgentBleakClient(
            device, disconnected_callback=disconnected, timeout=timeout, adapter=self._adapter,
            **extra)

    async def watch(self, stale: Callable[[str], None]) -> None:
        """Follow bluetoothd and the adapter on D-Bus (gateway.ble.bluez_watch)."""
        await BluezWatch(self._adapter, stale).run()

    async def release_stale(
        self, addresses: set[str], busy: Callable[[], set[str]]
    ) -> list[str]:
        """Disconnect links a dead client of bluetoothd left to our devices (bluez/bluez#89)."""
        return await release_stale_links(self._adapter, addresses, busy)

    async def bonds(self) -> set[str]:
        """Devices bluetoothd has bonded (Device1.Bonded or Paired)."""
        return await bonded_addresses(self._adapter)

    async def forget(self, address: str) -> bool:
        """Adapter1.RemoveDevice: the bond and bluetoothd's record of the device go."""
        return await remove_device(self._adapter, address)
