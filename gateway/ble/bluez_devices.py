"""bluetoothd's device objects, asked directly over D-Bus: bonds, removal, stale links.

bleak has no call for "which devices are bonded" or "forget this device" that works without a
connection, and a technician needs both (`scan` shows what is paired, `unpair` removes the
bond). Production code: dbus-fast only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError

BLUEZ = "org.bluez"
DEVICE_INTERFACE = "org.bluez.Device1"
DEFAULT_TIMEOUT_S = 10.0


@contextlib.asynccontextmanager
async def _system_bus(timeout: float) -> AsyncIterator[MessageBus]:
    async with asyncio.timeout(timeout):
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        yield bus
    finally:
        bus.disconnect()


async def _devices(bus: MessageBus, adapter: str | None) -> dict[str, dict[str, Any]]:
    """Device1 properties (plain values) by object path, for the adapter's devices."""
    adapter_path = f"/org/bluez/{adapter or 'hci0'}/"
    reply = await bus.call(Message(destination=BLUEZ, path="/",
                                   interface="org.freedesktop.DBus.ObjectManager",
                                   member="GetManagedObjects"))
    if reply is None or reply.message_type != MessageType.METHOD_RETURN:
        raise DBusError(getattr(reply, "error_name", None) or "org.bluez.Error.Failed",
                        "bluetoothd did not list its devices")
    found: dict[str, dict[str, Any]] = {}
    for path, interfaces in reply.body[0].items():
        device = interfaces.get(DEVICE_INTERFACE)
        if device is not None and path.startswith(adapter_path):
            found[path] = {k: v.value for k, v in device.items()}
    return found


async def bonded_addresses(adapter: str | None, timeout: float = DEFAULT_TIMEOUT_S) -> set[str]:
    """Addresses bluetoothd holds a bond (or a pairing) for, upper case."""
    async with _system_bus(timeout) as bus, asyncio.timeout(timeout):
        devices = await _devices(bus, adapter)
    return {str(d["Address"]).upper() for d in devices.values()
            if d.get("Bonded") or d.get("Paired")}


async def remove_device(adapter: str | None, address: str,
                        timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Adapter1.RemoveDevice: drop the link and the bond; False if bluetoothd had no such device."""
    async with _system_bus(timeout) as bus, asyncio.timeout(timeout):
        for path, props in (await _devices(bus, adapter)).items():
            if str(props.get("Address", "")).upper() != address.upper():
                continue
            reply = await bus.call(Message(
                destination=BLUEZ, path=f"/org/bluez/{adapter or 'hci0'}",
                interface="org.bluez.Adapter1", member="RemoveDevice", signature="o",
                body=[path]))
            if reply is not None and reply.message_type == MessageType.ERROR:
                raise DBusError(reply.error_name or "org.bluez.Error.Failed",
                                str(reply.body[0]) if reply.body else "RemoveDevice failed")
            return True
    return False


async def release_stale_links(
    adapter: str | None, addresses: set[str], busy: Callable[[], set[str]],
    timeout: float = DEFAULT_TIMEOUT_S,
) -> list[str]:
    """Disconnect bound devices BlueZ holds connected while no session of ours uses them.

    bluetoothd keeps a link up when the client that made it dies (bluez/bluez#89): after a
    crash or kill -9 of the agent, the device stays connected to the hub, never advertises,
    and so is never read again. Returns the addresses released.
    """
    released: list[str] = []
    async with _system_bus(timeout) as bus, asyncio.timeout(timeout):
        for path, props in (await _devices(bus, adapter)).items():
            address = str(props.get("Address", "")).upper()
            # `busy` is asked again per device: a session may have begun meanwhile.
            if address in addresses and address not in busy() and props.get("Connected"):
                await bus.call(Message(destination=BLUEZ, path=path,
                                       interface=DEVICE_INTERFACE, member="Disconnect"))
                released.append(address)
    return released
