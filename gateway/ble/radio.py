"""The one injection point for bleak's backend: BlueZ on the hub (gateway.ble.bluez_radio), the
virtual radio elsewhere (gateway.sim.wiring)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Protocol
from zoneinfo import ZoneInfo

from bleak import BleakClient, BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementDataCallback

from gateway.ble.adapter_control import AdapterControl
from gateway.config import RadioConfig


class Radio(Protocol):
    """Makes bleak scanners and clients for one radio; all BLE objects come from here."""

    kind: str
    control: AdapterControl  # power cycle / daemon restart, for the recovery ladder

    def scanner(self, callback: AdvertisementDataCallback) -> BleakScanner:
        """A scanner that reports every advertisement to `callback`."""
        ...

    def client(
        self, device: BLEDevice, disconnected: Callable[[BleakClient], None], timeout: float
    ) -> BleakClient:
        """A fresh client for one connection (never reuse a client: HA developer docs)."""
        ...

    async def watch(self, stale: Callable[[str], None]) -> None:
        """Tell `stale` (why) whenever the scanner can no longer be trusted; runs until cancelled
        (or returns at once if this radio has nothing to watch)."""
        ...

    async def release_stale(
        self, addresses: set[str], busy: Callable[[], set[str]]
    ) -> list[str]:
        """Drop links the stack holds to bound devices outside any session; the ones dropped."""
        ...

    async def bonds(self) -> set[str]:
        """Addresses the hub holds a bond for (upper case)."""
        ...

    async def forget(self, address: str) -> bool:
        """Remove the bond (and any link) to `address`; False if there was none."""
        ...


@contextlib.asynccontextmanager
async def open_radio(cfg: RadioConfig, zone: ZoneInfo | None = None) -> AsyncIterator[Radio]:
    """The radio the config asks for; the virtual one brings its simulated devices.

    `zone` is the hub's time zone; only the virtual radio uses it (its simulated clocks start
    there; None: UTC).
    """
    if cfg.kind == "bluez":
        # Imported here: dbus-fast exists only on Linux, and a developer's laptop runs the
        # virtual radio without it.
        from gateway.ble.bluez_radio import BlueZRadio  # noqa: PLC0415

        yield BlueZRadio(cfg.adapter)
        return
    # Imported here so bumble never loads on the hub (design.md §4).
    from gateway.sim.wiring import open_virtual_radio  # noqa: PLC0415

    async with open_virtual_radio(cfg, zone) as radio:
        yield radio
