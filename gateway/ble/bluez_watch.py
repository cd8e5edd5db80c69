"""Watches bluetoothd and the adapter on D-Bus, so the agent's scanner never silently dies.

bleak's BlueZ backend does not notice when bluetoothd restarts (its cache keeps the old
objects: a "connected" device that is not, GATT objects that no longer exist, "Multiple
Characteristics with this UUID") nor when the adapter stops discovering underneath it (powered
off, unplugged, discovery stopped by another client). This watcher sees each of those on the
bus and tells the agent, which opens a fresh scanner; on a bluetoothd restart it also makes
bleak drop its cache.

Production code: dbus-fast and bleak only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

log = logging.getLogger(__name__)

BLUEZ = "org.bluez"
ADAPTER_INTERFACE = "org.bluez.Adapter1"

# Discovery that stopped stays stopped this long before it counts (our own scanner restart
# stops and starts it within milliseconds).
DISCOVERY_SETTLE_S = 1.0
# Reconnecting to the system bus after it went away (dbus restarted) backs off to this.
RECONNECT_MAX_S = 30.0

Stale = Callable[[str], None]
"""Told why the current scanner can no longer be trusted; the agent opens a new one."""


def reset_bleak_cache() -> bool:
    """Make bleak's BlueZ manager for this loop drop its cached objects and re-read them.

    bleak offers no public way; closing its bus runs its own "bus lost" path, which resets the
    cache, reports its devices disconnected and reconnects with GetManagedObjects on next use.
    Returns whether there was a manager to reset. Checked against bleak 3.1. Only for a
    bluetoothd that went away: it reports every device of this process disconnected.
    """
    try:
        from bleak.backends.bluezdbus import manager as bluez_manager  # noqa: PLC0415
    except ImportError:
        return False
    instances = getattr(bluez_manager, "_global_instances", {})
    instance = instances.get(asyncio.get_running_loop())
    bus = getattr(instance, "_bus", None)
    if bus is None:
        return False
    with contextlib.suppress(Exception):
        bus.disconnect()
    return True


class BluezWatch:
    """Follows org.bluez's owner and the adapter's Discovering/Powered; `run()` until cancelled."""

    def __init__(self, adapter: str | None, stale: Stale) -> None:
        self.adapter_path = f"/org/bluez/{adapter or 'hci0'}"
        self._stale = stale
        self._settle: asyncio.Task[None] | None = None
        self._bus: MessageBus | None = None
        self._gone = False  # bluetoothd left and has not come back yet

    async def run(self) -> None:
        """Watch for as long as the agent runs; a lost system bus is reconnected with back-off."""
        delay = 1.0
        while True:
            try:
                bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
            except Exception as e:  # no system bus (yet): the scanner reports that itself
                log.debug("bluez watch: no system bus (%s); retrying in %.0f s", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            delay = 1.0
            self._bus = bus
            try:
                bus.add_message_handler(self._on_message)
                for rule in (
                    f"type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
                    f"arg0='{BLUEZ}'",
                    f"type='signal',interface='org.freedesktop.DBus.Properties',"
                    f"member='PropertiesChanged',path='{self.adapter_path}'",
                    "type='signal',interface='org.freedesktop.DBus.ObjectManager',"
                    "member='InterfacesAdded'",
                    "type='signal',interface='org.freedesktop.DBus.ObjectManager',"
                    "member='InterfacesRemoved'",
                ):
                    await bus.call(Message(
                        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                        interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                        body=[rule]))
                await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
            except Exception as e:
                log.debug("bluez watch: bus lost (%s)", e)
            finally:
                self._bus = None
                bus.disconnect()
            await asyncio.sleep(delay)

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type != MessageType.SIGNAL:
            return False
        if msg.member == "NameOwnerChanged" and msg.body and msg.body[0] == BLUEZ:
            _name, old, new = msg.body
            if old and not new:
                log.warning("bluetoothd left the system bus (stopped or crashed)")
                reset_bleak_cache()
                self._gone = True
            elif new:
                log.warning("bluetoothd is back on the system bus; rescanning")
                if not self._gone:
                    # Replaced without a gap: the cache is stale. Otherwise it was already
                    # reset when bluetoothd left, and a reset now could cut a session that
                    # connected since.
                    reset_bleak_cache()
                self._gone = False
                self._stale("bluetoothd restarted")
        elif msg.member == "PropertiesChanged" and msg.path == self.adapter_path:
            interface, changed, _invalidated = msg.body
            if interface != ADAPTER_INTERFACE:
                return False
            if "Powered" in changed and changed["Powered"].value is True:
                self._stale("adapter powered on")
            elif "Discovering" in changed and changed["Discovering"].value is False:
                self._check_discovery_later()
            elif "Discovering" in changed and self._settle is not None:
                self._settle.cancel()  # started again (our own scanner restart)
        elif (msg.member == "InterfacesAdded" and msg.body and msg.body[0] == self.adapter_path
              and ADAPTER_INTERFACE in msg.body[1]):
            self._stale("adapter appeared")
        elif (msg.member == "InterfacesRemoved" and msg.body and msg.body[0] == self.adapter_path
              and ADAPTER_INTERFACE in msg.body[1]):
            log.warning("the Bluetooth adapter %s was removed", self.adapter_path.rsplit("/", 1)[-1])
            self._stale("adapter removed")
        return False

    def _check_discovery_later(self) -> None:
        if self._settle is not None:
            self._settle.cancel()
        self._settle = asyncio.get_running_loop().create_task(self._discovery_stopped())

    async def _discovery_stopped(self) -> None:
        await asyncio.sleep(DISCOVERY_SETTLE_S)
        self._settle = None
        self._stale("discovery stopped underneath the scanner")
