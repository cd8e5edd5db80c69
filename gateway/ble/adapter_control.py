"""Adapter power cycle and bluetoothd restart, through D-Bus only (the recovery ladder's hands).

Only what the hardened service may do as an unprivileged member of group `bluetooth`: set
BlueZ's `org.bluez.Adapter1.Powered` property, and ask systemd to restart `bluetooth.service`
(allowed by a polkit rule). Never the kernel's management socket, rfkill or a USB reset: those
need CAP_NET_ADMIN or root, which the service does not have (bluetooth-auto-recovery needs them,
which is why it is not used).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from dbus_fast.aio import MessageBus

BLUEZ = "org.bluez"
ADAPTER_IFACE = "org.bluez.Adapter1"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER = "org.freedesktop.systemd1.Manager"
BLUETOOTH_UNIT = "bluetooth.service"

DEFAULT_TIMEOUT_S = 30.0
"""Upper bound for one whole power cycle or restart, waiting for the adapter included."""
POWER_OFF_S = 1.0
"""How long the adapter stays off (bluetooth-auto-recovery waits 2 s; BlueZ needs less)."""
POLL_S = 0.25


class AdapterControlError(Exception):
    """A power cycle or a bluetoothd restart failed; the message says what and why."""


class AdapterControl(Protocol):
    """What the recovery ladder may do to the radio beyond restarting discovery."""

    async def power_cycle(self) -> None:
        """Power the adapter off and on again; AdapterControlError if that failed."""
        ...

    async def restart_bluetooth(self) -> None:
        """Restart the Bluetooth daemon; AdapterControlError if that failed or is not possible."""
        ...


class BluezAdapterControl:
    """AdapterControl for BlueZ over the system bus (dbus-fast, as bleak uses).

    `adapter` is e.g. "hci1" (None: "hci0"); `bus_address` is for tests (None: the system bus).
    Each call opens its own short-lived bus connection: recovery is rare and must not depend on
    a connection that may be what went wrong.
    """

    def __init__(self, adapter: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S,
                 power_off_s: float = POWER_OFF_S, bus_address: str | None = None) -> None:
        self.adapter = adapter or "hci0"
        self.path = f"/org/bluez/{self.adapter}"
        self.timeout = timeout
        self.power_off_s = power_off_s
        self._bus_address = bus_address
        self._last_seen: str | None = None  # what the wait for the adapter saw last

    async def power_cycle(self) -> None:
        """Set Adapter1.Powered false, then true, and wait until BlueZ reports it powered."""
        what = f"power cycle of {self.adapter}"
        async with self._bus(what) as bus:
            await self._set_powered(bus, False, what)
            await asyncio.sleep(self.power_off_s)
            await self._set_powered(bus, True, what)
            await self._until_powered(bus, what)

    async def restart_bluetooth(self) -> None:
        """Ask systemd to restart bluetooth.service; wait until the adapter is back and powered."""
        what = f"restart of {BLUETOOTH_UNIT}"
        async with self._bus(what) as bus:
            await self._call(bus, what, destination=SYSTEMD, path=SYSTEMD_PATH,
                             interface=SYSTEMD_MANAGER, member="RestartUnit", signature="ss",
                             body=[BLUETOOTH_UNIT, "replace"])
            # The job runs on: bluetoothd goes away and comes back with the adapter.
            await self._until_powered(bus, what)

    # -- D-Bus plumbing --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _bus(self, what: str) -> AsyncIterator[MessageBus]:
        from dbus_fast import BusType  # noqa: PLC0415  (Linux only; bleak brings it there)
        from dbus_fast.aio import MessageBus  # noqa: PLC0415

        bus: MessageBus | None = None
        self._last_seen = None
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    bus = await MessageBus(bus_address=self._bus_address,
                                           bus_type=BusType.SYSTEM).connect()
                except (OSError, ValueError) as e:
                    raise AdapterControlError(
                        f"{what}: cannot reach the D-Bus system bus ({_describe(e)})") from e
                yield bus
        except TimeoutError as e:
            seen = f" (last seen: {self._last_seen})" if self._last_seen else ""
            raise AdapterControlError(f"{what}: not done within {self.timeout:g} s{seen}") from e
        finally:
            if bus is not None:
                with contextlib.suppress(Exception):
                    bus.disconnect()

    async def _call(self, bus: MessageBus, what: str, **message: Any) -> list[Any]:
        from dbus_fast import Message, MessageType  # noqa: PLC0415

        try:
            reply = await bus.call(Message(**message))
        except (OSError, EOFError) as e:
            raise AdapterControlError(f"{what}: the D-Bus connection failed ({_describe(e)})") from e
        if reply is None:
            raise AdapterControlError(f"{what}: no reply from {message['destination']}")
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise AdapterControlError(f"{what}: {_advice(reply.error_name or 'error', text)}")
        return list(reply.body)

    async def _set_powered(self, bus: MessageBus, on: bool, what: str) -> None:
        from dbus_fast import Variant  # noqa: PLC0415

        await self._call(bus, what, destination=BLUEZ, path=self.path, interface=PROPERTIES_IFACE,
                         member="Set", signature="ssv",
                         body=[ADAPTER_IFACE, "Powered", Variant("b", on)])

    async def _powered(self, bus: MessageBus, what: str) -> bool:
        (value,) = await self._call(bus, what, destination=BLUEZ, path=self.path,
                                    interface=PROPERTIES_IFACE, member="Get", signature="ss",
                                    body=[ADAPTER_IFACE, "Powered"])
        return bool(getattr(value, "value", value))

    async def _until_powered(self, bus: MessageBus, what: str) -> None:
        """Poll Powered until true; "no such adapter yet" is waited through (bluetoothd restarting)."""
        while True:
            try:
                if await self._powered(bus, what):
                    self._last_seen = None
                    return
                self._last_seen = f"{self.adapter} stays powered off"
            except AdapterControlError as e:
                self._last_seen = str(e).removeprefix(f"{what}: ")
            await asyncio.sleep(POLL_S)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _advice(name: str, text: str) -> str:
    """A D-Bus error in words a technician can act on."""
    detail = f"{name}: {text}" if text else name
    short = name.removeprefix("org.freedesktop.DBus.Error.")
    if short in ("ServiceUnknown", "NameHasNoOwner") or short.startswith("Spawn."):
        return f"nobody serves it on the system bus ({detail}); is the service running?"
    if short in ("UnknownObject", "UnknownMethod"):
        return f"no such adapter or object ({detail}); check `bluetoothctl list`"
    if short in ("AccessDenied", "InteractiveAuthorizationRequired"):
        return f"not allowed ({detail}); is the polkit rule for rpm-gateway installed?"
    if name == "org.bluez.Error.Blocked":
        return f"the adapter is blocked ({detail}); check `rfkill list`"
    return detail
