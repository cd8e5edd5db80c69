"""One connected device's GATT database as BlueZ exports it, and the ATT requests behind it.

Object paths follow bluetoothd: ``<device>/serviceXXXX/charYYYY/descZZZZ`` with the handle of
each declaration in hex (src/gatt-client.c), so a client's cached paths stay valid across
reconnections and restarts as long as the device's handles do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from bleak.uuids import normalize_uuid_str
from bumble.att import ATT_Error
from bumble.core import UUID, BaseBumbleError
from bumble.device import Connection
from bumble.gatt import GATT_GENERIC_ACCESS_SERVICE
from bumble.gatt_client import CharacteristicProxy, DescriptorProxy
from dbus_fast import DBusError
from dbus_fast.aio import MessageBus

from gateway.sim.bluez import policy
from gateway.sim.bluez.objects import CharacteristicProps, DescriptorProps, ServiceProps

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Characteristic property bits (Core Vol 3 Part G §3.3.1.1) and BlueZ's flag names for them.
_FLAGS = (
    (0x01, "broadcast"), (0x02, "read"), (0x04, "write-without-response"), (0x08, "write"),
    (0x10, "notify"), (0x20, "indicate"), (0x40, "authenticated-signed-writes"),
    (0x80, "extended-properties"),
)


def _uuid(value: UUID) -> str:
    """A bumble UUID in BlueZ's lower-case 128-bit form."""
    return normalize_uuid_str(value.to_hex_str("-").lower())


def dbus_error_for_att(code: int) -> DBusError:
    """The D-Bus error bluetoothd returns for an ATT error response (gatt-client.c)."""
    if code == policy.ATT_READ_NOT_PERMITTED:
        return DBusError(policy.ERR_NOT_PERMITTED, "Read not permitted")
    if code == policy.ATT_WRITE_NOT_PERMITTED:
        return DBusError(policy.ERR_NOT_PERMITTED, "Write not permitted")
    if code in policy.SECURITY_ERRORS:
        return DBusError(policy.ERR_NOT_PERMITTED, "Not paired")
    if code == policy.ATT_INSUFFICIENT_AUTHORIZATION:
        return DBusError(policy.ERR_NOT_AUTHORIZED, "Not Authorized")
    if code == policy.ATT_INVALID_OFFSET:
        return DBusError(policy.ERR_INVALID_ARGUMENTS, "Invalid offset")
    if code == policy.ATT_INVALID_LENGTH:
        return DBusError(policy.ERR_INVALID_ARGUMENTS, "Invalid Length")
    if code == 0x06:
        return DBusError(policy.ERR_NOT_SUPPORTED, "Not Supported")
    return DBusError(policy.ERR_FAILED, f"Operation failed with ATT error: 0x{code:02x}")


class AttTimeoutError(DBusError):
    """A request the device never answered; bluetoothd then drops the link (shared/att.c)."""


@dataclass
class Characteristic:
    """One exported characteristic: its proxy on the current link and its notify sessions."""

    path: str
    props: CharacteristicProps
    proxy: CharacteristicProxy[bytes]
    senders: set[str] = field(default_factory=set)  # clients with StartNotify sessions
    acquired: list[socket.socket] = field(default_factory=list)  # AcquireNotify sockets

    def deliver(self, value: bytes) -> None:
        """A notification or indication arrived: to the acquired socket, else as a Value change
        (every time, even if equal)."""
        if not self.acquired:
            self.props.values["Value"] = value
            self.props.emit_properties_changed({"Value": value})
            return
        for sock in list(self.acquired):
            try:
                sock.send(value)
            except OSError:
                self.acquired.remove(sock)
                sock.close()


class GattDatabase:
    """The exported GATT objects of one device; rebuilt by `discover` on every connection."""

    def __init__(self, bus: MessageBus, device_path: str, gatt_policy: policy.BluezPolicy) -> None:
        self._bus = bus
        self._device_path = device_path
        self._policy = gatt_policy
        self.services: dict[str, ServiceProps] = {}
        self.characteristics: dict[str, Characteristic] = {}
        self.descriptors: dict[str, tuple[DescriptorProps, DescriptorProxy]] = {}

    def paths(self) -> list[str]:
        """Every exported path, children first (the order InterfacesRemoved should go in)."""
        return [*self.descriptors, *self.characteristics, *self.services]

    async def discover(self, connection: Connection, mtu: int) -> None:
        """Discover everything and export it; objects that still exist keep their path."""
        client = connection.gatt_client
        seen: set[str] = set()
        for service in await client.discover_services():
            if service.uuid == GATT_GENERIC_ACCESS_SERVICE and not self._policy.export_gap:
                continue
            s_path = f"{self._device_path}/service{service.handle:04x}"
            seen.add(s_path)
            if s_path not in self.services:
                props = ServiceProps(_uuid(service.uuid), self._device_path, service.handle)
                self.services[s_path] = props
                self._bus.export(s_path, props)
            for char in await client.discover_characteristics((), service):
                c_path = f"{s_path}/char{char.handle - 1:04x}"
                seen.add(c_path)
                flags = [name for bit, name in _FLAGS if char.properties & bit]
                existing = self.characteristics.get(c_path)
                if existing is None:
                    c_props = CharacteristicProps(_uuid(char.uuid), s_path, char.handle, flags, mtu)
                    self.characteristics[c_path] = Characteristic(c_path, c_props, char)
                    self._bus.export(c_path, c_props)
                else:
                    existing.proxy = char
                    existing.props.update(MTU=mtu)
                for desc in await client.discover_descriptors(char):
                    d_path = f"{c_path}/desc{desc.handle:04x}"
                    seen.add(d_path)
                    if d_path in self.descriptors:
                        self.descriptors[d_path] = (self.descriptors[d_path][0], desc)
                        continue
                    d_props = DescriptorProps(_uuid(desc.type), c_path, desc.handle)
                    self.descriptors[d_path] = (d_props, desc)
                    self._bus.export(d_path, d_props)
        for path in [p for p in self.paths() if p not in seen]:
            self._drop(path)

    def _drop(self, path: str) -> None:
        self.descriptors.pop(path, None)
        char = self.characteristics.pop(path, None)
        if char is not None:
            for sock in char.acquired:
                sock.close()
        self.services.pop(path, None)
        self._bus.unexport(path)

    def clear(self) -> None:
        """Unexport everything (an unbonded device's database does not outlive its link)."""
        for path in self.paths():
            self._drop(path)

    def link_lost(self) -> None:
        """The link went down: notify sessions end, the objects (if kept) stop notifying."""
        for char in self.characteristics.values():
            char.senders.clear()
            for sock in char.acquired:
                sock.close()
            char.acquired.clear()
            char.props.update(Notifying=False)

    def client_gone(self, sender: str) -> list[Characteristic]:
        """A D-Bus client vanished: its notify sessions end; returns the ones left with none."""
        emptied = []
        for char in self.characteristics.values():
            if sender in char.senders:
                char.senders.discard(sender)
                if not char.senders and not char.acquired:
                    emptied.append(char)
        return emptied


async def att(
    what: str,
    operation: Callable[[], Awaitable[_T]],
    timeout: float,
) -> _T:
    """Run one ATT exchange as bluetoothd does: bounded, with errors as D-Bus errors.

    ATT_Error passes through unchanged so the caller can elevate security and retry.
    """
    try:
        async with asyncio.timeout(timeout):
            return await operation()
    except ATT_Error:
        raise
    except TimeoutError:
        raise AttTimeoutError(policy.ERR_FAILED, f"{what}: ATT request timed out") from None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # bumble cancels a pending request's future when the link drops under it.
        raise DBusError(policy.ERR_FAILED, "Not connected") from None
    except (BaseBumbleError, AssertionError, ConnectionError) as e:
        raise DBusError(policy.ERR_FAILED, f"{what} failed: {e}") from e


def write_socket(on_packet: Callable[[bytes], None]) -> tuple[int, socket.socket]:
    """An AcquireWrite socket: each packet the client writes becomes one Write Command."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            packet = ours.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            packet = b""
        if not packet:  # the client closed its end
            loop.remove_reader(ours.fileno())
            ours.close()
            return
        on_packet(packet)

    loop.add_reader(ours.fileno(), readable)
    fd = os.dup(theirs.fileno())
    theirs.close()
    return fd, ours


def notify_socket(char: Characteristic) -> int:
    """An AcquireNotify socket: our end gets every value, the client's fd is returned."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    char.acquired.append(ours)
    fd = os.dup(theirs.fileno())
    theirs.close()
    return fd
