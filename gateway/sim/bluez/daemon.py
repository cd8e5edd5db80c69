"""The stand-in for bluetoothd: org.bluez on a D-Bus bus, the virtual radio's hub underneath.

``async with BluezStandIn(radio) as bluez:`` owns ``org.bluez`` on the bus named by
``DBUS_SYSTEM_BUS_ADDRESS`` (or ``bus_address``) and answers bleak's BlueZ backend and Agent1
clients as bluetoothd would. Scanning, connections, ATT, MTU exchange, SMP pairing and
re-encryption are real bumble traffic on the radio's link; only the D-Bus face is ours.

Faults for tests: `stop()` is bluetoothd killed (the name and every object vanish without
InterfacesRemoved, links drop, bonds stay in the radio's key store) and `start()` brings it
back; `power(False)`, `remove_adapter()`, and the counters in `faults` (policy.BluezFaults).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from bumble import hci
from bumble.att import ATT_Error
from bumble.core import BaseBumbleError
from bumble.device import Connection
from bumble.pairing import PairingConfig
from dbus_fast import BusType, DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.constants import NameFlag, RequestNameReply

from gateway.sim.bluez import policy
from gateway.sim.bluez.gatt import (
    AttTimeoutError,
    Characteristic,
    GattDatabase,
    att,
    dbus_error_for_att,
    notify_socket,
    write_socket,
)
from gateway.sim.bluez.objects import AdapterProps, DeviceProps, _Bag
from gateway.sim.bluez.pairing import AgentDelegate, AgentOutcome, RegisteredAgent, delegate_factory
from gateway.sim.radio import Advert, VirtualRadio

log = logging.getLogger(__name__)

_EXPIRY_TICK_S = 1.0
CALLS_KEPT = 2000
_UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
_DISCOVERY_FILTERS = ("UUIDs", "RSSI", "Pathloss", "Transport", "DuplicateData", "Discoverable",
                      "Pattern")


def device_path(adapter_path: str, address: str) -> str:
    """BlueZ's object path for a remote device."""
    return f"{adapter_path}/dev_{address.upper().replace(':', '_')}"


@dataclass
class _Remote:
    """One remote device bluetoothd knows of."""

    address: str
    path: str
    props: DeviceProps
    gatt: GattDatabase
    last_seen: float = 0.0
    connection: Connection | None = None
    connecting: asyncio.Task[Connection] | None = None
    pairing: asyncio.Task[None] | None = None
    resolving: asyncio.Task[None] | None = None
    mtu: int = 23
    write_sockets: list[socket.socket] = field(default_factory=list)  # AcquireWrite, this link


class BluezStandIn:
    """bluetoothd's D-Bus face over a VirtualRadio; an async context manager (see module doc)."""

    def __init__(
        self,
        radio: VirtualRadio,
        *,
        bus_address: str | None = None,
        adapter: str = "hci0",
        bluez_policy: policy.BluezPolicy | None = None,
        faults: policy.BluezFaults | None = None,
    ) -> None:
        self.radio = radio
        self.bus_address = bus_address
        self.adapter_path = f"/org/bluez/{adapter}"
        self.policy = bluez_policy or policy.BluezPolicy()
        self.faults = faults or policy.BluezFaults()
        self._bus: MessageBus | None = None
        self._adapter: AdapterProps | None = None
        self._remotes: dict[str, _Remote] = {}  # by path
        self._discovery: dict[str, dict[str, Any]] = {}  # sender -> its discovery filter
        self._filters: dict[str, dict[str, Any]] = {}
        self._scanning = False
        self._agents: dict[str, RegisteredAgent] = {}  # by the D-Bus client (sender)
        self._default_agent: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._expiry: asyncio.Task[None] | None = None
        # (member, path) of the latest method calls, for tests; bounded for long demo runs.
        self.calls: deque[tuple[str, str]] = deque(maxlen=CALLS_KEPT)

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        """Whether the stand-in owns org.bluez right now."""
        return self._bus is not None

    @property
    def discovering(self) -> bool:
        """Whether the adapter is scanning for some client right now."""
        return self._scanning

    async def start(self) -> None:
        """Take org.bluez, export the adapter and every bonded device (bluetoothd starting)."""
        if self._bus is not None:
            return
        if self.bus_address is not None:
            bus = MessageBus(bus_address=self.bus_address, negotiate_unix_fd=True)
        else:
            bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
        await bus.connect()
        bus.add_message_handler(self._on_message)
        await bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="AddMatch", signature="s",
            body=["type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged'"],
        ))
        reply = await bus.request_name(policy.BLUEZ, NameFlag.DO_NOT_QUEUE)
        if reply != RequestNameReply.PRIMARY_OWNER:
            bus.disconnect()
            raise RuntimeError("org.bluez is already owned on this bus (is bluetoothd running?)")
        self._bus = bus
        bus.export("/org/bluez", _Bag(policy.AGENT_MANAGER, {}))
        self.radio.hub.pairing_config_factory = self._pairing_config
        await self.add_adapter()
        self._expiry = asyncio.get_running_loop().create_task(self._expire_loop())

    async def stop(self) -> None:
        """bluetoothd killed: the name and objects vanish (no InterfacesRemoved), links drop."""
        bus, self._bus = self._bus, None
        if bus is None:
            return
        if self._expiry is not None:
            self._expiry.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self._halt_radio()
        self._remotes.clear()
        self._discovery.clear()
        self._agents.clear()
        self._default_agent = None
        self._adapter = None
        bus.disconnect()
        with contextlib.suppress(Exception):
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]

    async def restart(self) -> None:
        """Kill and start again; bonds survive in the radio's key store."""
        await self.stop()
        await self.start()

    async def _halt_radio(self) -> None:
        """Stop scanning and drop every link (what the kernel does when bluetoothd goes)."""
        if self._scanning:
            self._scanning = False
            with contextlib.suppress(BaseBumbleError, TimeoutError):
                await self.radio.stop_scan(self._on_advert)
        for remote in list(self._remotes.values()):
            for task in (remote.connecting, remote.pairing, remote.resolving):
                if task is not None:
                    task.cancel()
            if remote.connection is not None:
                with contextlib.suppress(BaseBumbleError, TimeoutError, hci.HCI_Error):
                    async with asyncio.timeout(self.radio.op_timeout):
                        await remote.connection.disconnect()

    # -- the adapter ----------------------------------------------------------------------------

    async def add_adapter(self) -> None:
        """Export the adapter and the bonded devices (adapter plugged in / bluetoothd start)."""
        bus = self._require_bus()
        if self._adapter is not None:
            return
        self._adapter = AdapterProps(self.radio.hub_address, self._on_powered_set)
        bus.export(self.adapter_path, self._adapter)
        keystore = self.radio.hub.keystore
        if keystore is not None:
            for name, _keys in await keystore.get_all():
                address = hci.Address(name).to_string(with_type_qualifier=False)
                remote = self._remote_for(address)
                remote.props.update(Paired=True, Bonded=True, Trusted=True)

    async def remove_adapter(self) -> None:
        """The adapter vanished (USB dongle pulled): it and its devices are removed."""
        bus = self._require_bus()
        if self._adapter is None:
            return
        await self._halt_radio()
        self._discovery.clear()
        for remote in list(self._remotes.values()):
            self._forget_remote(remote)
        bus.unexport(self.adapter_path)
        self._adapter = None

    async def power(self, on: bool) -> None:
        """Power the adapter off (discovery ends, links drop) or on (the controller is reset)."""
        adapter = self._require_adapter()
        was = bool(adapter.values["Powered"])
        if not on and was:
            await self._halt_radio()
            self._discovery.clear()
            adapter.update(Discovering=False)
            with contextlib.suppress(BaseBumbleError, TimeoutError):
                async with asyncio.timeout(self.radio.op_timeout):
                    await self.radio.hub.power_off()
        elif on and not was:
            # The kernel resets the controller when it powers it (HCI Reset): what clears a
            # controller that stopped reporting, and why a power cycle is the ladder's step 2.
            async with asyncio.timeout(self.radio.op_timeout):
                await self.radio.hub.power_on()
        adapter.update(Powered=on)

    def _on_powered_set(self, on: bool) -> None:
        self._spawn(self.power(on))

    def _require_bus(self) -> MessageBus:
        if self._bus is None:
            raise RuntimeError("the BlueZ stand-in is not running")
        return self._bus

    def _require_adapter(self) -> AdapterProps:
        if self._adapter is None:
            raise DBusError(_UNKNOWN_OBJECT, f"Method call on unknown object {self.adapter_path}")
        return self._adapter

    # -- remote devices ----------------------------------------------------------------------

    def _remote_for(self, address: str, **initial: Any) -> _Remote:
        """The device object for `address`, exported (with `initial` properties) if new."""
        path = device_path(self.adapter_path, address)
        remote = self._remotes.get(path)
        if remote is None:
            bus = self._require_bus()
            props = DeviceProps(address, self.adapter_path)
            props.values.update(initial)  # InterfacesAdded carries what the first advert said
            remote = _Remote(address, path, props, GattDatabase(bus, path, self.policy))
            remote.last_seen = asyncio.get_running_loop().time()
            self._remotes[path] = remote
            bus.export(path, remote.props)
        return remote

    def _forget_remote(self, remote: _Remote) -> None:
        """Unexport a device and its GATT objects (InterfacesRemoved)."""
        self._remotes.pop(remote.path, None)
        if self._bus is not None:
            remote.gatt.clear()
            self._bus.unexport(remote.path)

    def forget_device(self, address: str) -> bool:
        """Drop a device from the cache as bluetoothd does after TemporaryTimeout (fault use)."""
        remote = self._remotes.get(device_path(self.adapter_path, address))
        if remote is None or remote.connection is not None:
            return False
        self._forget_remote(remote)
        return True

    def _on_advert(self, advert: Advert) -> None:
        """One advertisement: the device object appears or its properties change."""
        if self._bus is None or self._adapter is None:
            return
        changes: dict[str, Any] = {}
        if advert.local_name:
            changes["Name"] = advert.local_name
            changes["Alias"] = advert.local_name
        if advert.tx_power is not None:
            changes["TxPower"] = advert.tx_power
        # Real RSSI changes with every advert, so bluetoothd signals it each time; with
        # DuplicateData (bleak's default) the data is signalled on every advert too.
        repeat: dict[str, Any] = {"RSSI": advert.rssi}
        if advert.manufacturer_data:
            repeat["ManufacturerData"] = {
                k: Variant("ay", bytes(v)) for k, v in advert.manufacturer_data.items()}
        if advert.service_data:
            repeat["ServiceData"] = {
                k: Variant("ay", bytes(v)) for k, v in advert.service_data.items()}
        known = device_path(self.adapter_path, advert.address) in self._remotes
        remote = self._remote_for(advert.address, UUIDs=sorted(advert.service_uuids),
                                  **changes, **repeat)
        remote.last_seen = asyncio.get_running_loop().time()
        if not known:
            return
        props = remote.props
        if advert.service_uuids:
            changes["UUIDs"] = sorted(set(props.values["UUIDs"]) | set(advert.service_uuids))
        props.update(**changes)
        props.values.update(repeat)
        props.emit_properties_changed(repeat)

    async def _expire_loop(self) -> None:
        """Remove devices only seen while scanning once they are TemporaryTimeout old."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_EXPIRY_TICK_S)
            now = loop.time()
            for remote in list(self._remotes.values()):
                v = remote.props.values
                busy = remote.connection or remote.connecting or remote.pairing
                if v["Paired"] or v["Bonded"] or busy:
                    continue
                if now - remote.last_seen > self.policy.temporary_timeout_s:
                    log.debug("bluez stand-in: %s expired from the cache", remote.path)
                    self._forget_remote(remote)

    # -- discovery ---------------------------------------------------------------------------

    async def _start_discovery(self, sender: str) -> None:
        adapter = self._require_adapter()
        if not adapter.values["Powered"]:
            raise DBusError(policy.ERR_NOT_READY, "Resource Not Ready")
        if self.faults.in_progress_on_discovery > 0:
            self.faults.in_progress_on_discovery -= 1
            raise DBusError(policy.ERR_IN_PROGRESS, "Operation already in progress")
        if sender in self._discovery:
            raise DBusError(policy.ERR_IN_PROGRESS, "Operation already in progress")
        self._discovery[sender] = self._filters.get(sender, {})
        await self._update_scanning()

    async def _stop_discovery(self, sender: str) -> None:
        self._require_adapter()
        if self._discovery.pop(sender, None) is None:
            raise DBusError(policy.ERR_FAILED, "No discovery started")
        await self._update_scanning()

    async def _update_scanning(self) -> None:
        adapter = self._adapter
        want = bool(self._discovery) and adapter is not None and bool(adapter.values["Powered"])
        if want and not self._scanning:
            self._scanning = True
            await self.radio.start_scan(self._on_advert)
        elif not want and self._scanning:
            self._scanning = False
            await self.radio.stop_scan(self._on_advert)
            for remote in self._remotes.values():
                remote.props.invalidate("RSSI")  # policy: RSSI is invalid once scanning stops
        if adapter is not None:
            adapter.update(Discovering=self._scanning)

    # -- connections -------------------------------------------------------------------------

    async def _connect(self, remote: _Remote) -> None:
        """Device1.Connect: an LE link, re-encrypted when bonded; services resolve after."""
        adapter = self._require_adapter()
        if not adapter.values["Powered"]:
            raise DBusError(policy.ERR_NOT_READY, "Resource Not Ready")
        if remote.connection is not None:
            return
        if remote.connecting is not None or remote.pairing is not None:
            raise DBusError(policy.ERR_IN_PROGRESS, "In Progress")
        if self.faults.in_progress_on_connect > 0:
            self.faults.in_progress_on_connect -= 1
            raise DBusError(policy.ERR_IN_PROGRESS, "Operation already in progress")
        if self.faults.busy_while_discovering and self._scanning:
            raise DBusError(policy.ERR_IN_PROGRESS, "Operation already in progress")
        task = asyncio.get_running_loop().create_task(
            self.radio.connect(remote.address, self.policy.connect_timeout_s))
        remote.connecting = task
        try:
            connection = await task
        except asyncio.CancelledError:
            if task.cancelled() and not _current_cancelling():
                raise DBusError(policy.ERR_FAILED, "Operation canceled") from None
            raise
        except (TimeoutError, BaseBumbleError) as e:
            raise DBusError(policy.ERR_FAILED, "le-connection-abort-by-local") from e
        finally:
            remote.connecting = None
        self._attach(remote, connection)
        if self.faults.abort_by_local_on_connect > 0:
            self.faults.abort_by_local_on_connect -= 1
            await self._drop_link(remote)
            raise DBusError(policy.ERR_FAILED, "le-connection-abort-by-local")
        if remote.props.values["Bonded"]:
            try:
                await att("encryption", connection.encrypt, self.policy.att_timeout_s)
            except (DBusError, ATT_Error) as e:
                await self._drop_link(remote)
                raise DBusError(policy.ERR_FAILED, "Authentication Failed") from e
        remote.resolving = asyncio.get_running_loop().create_task(self._resolve(remote))

    def _attach(self, remote: _Remote, connection: Connection) -> None:
        remote.connection = connection
        remote.mtu = connection.att_mtu

        def lost(reason: int) -> None:
            if remote.connection is connection:
                self._link_lost(remote, reason)

        connection.on(Connection.EVENT_DISCONNECTION, lost)
        remote.props.update(Connected=True)

    async def _resolve(self, remote: _Remote) -> None:
        """MTU exchange and full discovery, then ServicesResolved (what bleak waits for)."""
        connection = remote.connection
        if connection is None:
            return
        try:
            remote.mtu = await att(
                "MTU exchange", lambda: connection.gatt_client.request_mtu(policy.REQUESTED_MTU),
                self.policy.att_timeout_s)
            await att("discovery", lambda: remote.gatt.discover(connection, remote.mtu),
                      self.policy.att_timeout_s)
        except (DBusError, ATT_Error) as e:
            log.debug("bluez stand-in: discovery on %s failed: %s", remote.path, e)
            await self._drop_link(remote)
            return
        finally:
            remote.resolving = None
        if remote.connection is connection:
            remote.props.update(ServicesResolved=True)

    def _link_lost(self, remote: _Remote, reason: int) -> None:
        log.debug("bluez stand-in: %s disconnected (HCI reason %#04x)", remote.path, reason)
        remote.connection = None
        loop = asyncio.get_running_loop()
        for sock in remote.write_sockets:  # acquired write sockets close with the link
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
                sock.close()
        remote.write_sockets.clear()
        if remote.resolving is not None:
            remote.resolving.cancel()
        remote.gatt.link_lost()
        remote.props.update(ServicesResolved=False, Connected=False)
        if not remote.props.values["Bonded"]:
            # Policy: an unbonded device's GATT objects do not outlive the link.
            remote.gatt.clear()

    async def _drop_link(self, remote: _Remote) -> None:
        connection = remote.connection
        if connection is None:
            return
        with contextlib.suppress(BaseBumbleError, TimeoutError, hci.HCI_Error):
            async with asyncio.timeout(self.radio.op_timeout):
                await connection.disconnect()
        if remote.connection is connection:
            self._link_lost(remote, hci.HCI_REMOTE_USER_TERMINATED_CONNECTION_ERROR)

    async def _disconnect(self, remote: _Remote) -> None:
        """Device1.Disconnect: cancels a pending connect or pairing, or drops the link."""
        for task in (remote.connecting, remote.pairing):
            if task is not None:
                task.cancel()
        await self._drop_link(remote)

    # -- pairing -----------------------------------------------------------------------------

    def _pairing_config(self, connection: Connection) -> PairingConfig:
        """bumble asks this for every pairing on the hub: the agent answers the questions."""
        address = connection.peer_address.to_string(with_type_qualifier=False)
        path = device_path(self.adapter_path, address)
        remote = self._remotes.get(path)
        outcome = getattr(remote, "outcome", None) or AgentOutcome()
        make = delegate_factory(self._require_bus(), self._agent, self.policy)
        delegate: AgentDelegate = make(path, outcome)
        return PairingConfig(
            sc=True, mitm=True, bonding=True, delegate=delegate,
            identity_address_type=PairingConfig.AddressType.RANDOM,
        )

    def _agent(self) -> RegisteredAgent | None:
        if self._default_agent is not None and self._default_agent in self._agents:
            return self._agents[self._default_agent]
        return next(iter(self._agents.values()), None)

    async def _pair(self, remote: _Remote) -> None:
        """Device1.Pair: connect if needed, SMP with bonding; Paired/Bonded before the reply."""
        if remote.props.values["Paired"]:
            raise DBusError(policy.ERR_ALREADY_EXISTS, "Already Exists")
        if remote.pairing is not None:
            raise DBusError(policy.ERR_IN_PROGRESS, "In Progress")
        await self._connect(remote)
        connection = remote.connection
        if connection is None:
            raise DBusError(policy.ERR_FAILED, "Not connected")
        outcome = AgentOutcome()
        remote.outcome = outcome  # type: ignore[attr-defined]  # read by _pairing_config
        task = asyncio.get_running_loop().create_task(self._smp(connection))
        remote.pairing = task
        try:
            await task
        except asyncio.CancelledError:
            if _current_cancelling():
                raise
            raise DBusError(policy.ERR_AUTH_CANCELED, "Authentication Canceled") from None
        except (BaseBumbleError, TimeoutError, DBusError, ATT_Error) as e:
            if outcome.timed_out:
                raise DBusError(policy.ERR_AUTH_TIMEOUT, "Authentication Timeout") from e
            if outcome.rejected:
                raise DBusError(policy.ERR_AUTH_REJECTED, "Authentication Rejected") from e
            raise DBusError(policy.ERR_AUTH_FAILED, "Authentication Failed") from e
        finally:
            remote.pairing = None
        remote.props.update(Paired=True, Bonded=True)

    async def _smp(self, connection: Connection) -> None:
        async with asyncio.timeout(self.policy.agent_timeout_s + self.radio.op_timeout):
            await connection.pair()

    async def _elevate(self, remote: _Remote) -> bool:
        """shared/att.c change_security(): pair implicitly so a refused request can be retried."""
        connection = remote.connection
        if not self.policy.auto_elevate_security or connection is None or connection.is_encrypted:
            return False
        try:
            await self._pair(remote)
        except DBusError as e:
            log.debug("bluez stand-in: security elevation on %s failed: %s", remote.path, e)
            return False
        return True

    async def _with_security(self, remote: _Remote, operation: Callable[[], Awaitable[Any]]) -> Any:
        """An ATT exchange, retried once after implicit pairing when refused for security."""
        try:
            return await self._gatt(remote, operation)
        except ATT_Error as e:
            if e.error_code in policy.SECURITY_ERRORS and await self._elevate(remote):
                try:
                    return await self._gatt(remote, operation)
                except ATT_Error as again:
                    raise dbus_error_for_att(again.error_code) from again
            raise dbus_error_for_att(e.error_code) from e

    async def _gatt(self, remote: _Remote, operation: Callable[[], Awaitable[Any]]) -> Any:
        if remote.connection is None:
            raise DBusError(policy.ERR_FAILED, "Not connected")
        try:
            return await att("ATT request", operation, self.policy.att_timeout_s)
        except AttTimeoutError:
            # shared/att.c: a request without an answer is fatal for the bearer.
            await self._drop_link(remote)
            raise

    # -- GATT methods ------------------------------------------------------------------------

    def _characteristic(self, path: str) -> tuple[_Remote, Characteristic]:
        for remote in self._remotes.values():
            char = remote.gatt.characteristics.get(path)
            if char is not None:
                return remote, char
        raise DBusError(_UNKNOWN_OBJECT, f"Method call on unknown object {path}")

    async def _start_notify(self, path: str, sender: str) -> None:
        remote, char = self._characteristic(path)
        if char.acquired:
            raise DBusError(policy.ERR_NOT_PERMITTED, "Notify acquired")
        if sender in char.senders:
            return  # policy: a repeated StartNotify from the same client is a no-op
        if not char.senders and not char.acquired:
            await self._subscribe(remote, char)
        char.senders.add(sender)

    async def _subscribe(self, remote: _Remote, char: Characteristic) -> None:
        flags = char.props.values["Flags"]
        if "notify" not in flags and "indicate" not in flags:
            raise DBusError(policy.ERR_NOT_SUPPORTED, "Operation is not supported")
        connection = remote.connection
        if connection is None:
            raise DBusError(policy.ERR_FAILED, "Not connected")
        await self._with_security(remote, lambda: connection.gatt_client.subscribe(
            char.proxy, char.deliver, prefer_notify="notify" in flags))
        char.props.update(Notifying=True)

    async def _stop_notify(self, path: str, sender: str) -> None:
        remote, char = self._characteristic(path)
        if sender not in char.senders:
            raise DBusError(policy.ERR_FAILED, "No notify session started")
        char.senders.discard(sender)
        if not char.senders and not char.acquired:
            await self._unsubscribe(remote, char)

    async def _unsubscribe(self, remote: _Remote, char: Characteristic) -> None:
        char.props.update(Notifying=False)
        connection = remote.connection
        if connection is not None:
            with contextlib.suppress(DBusError, ATT_Error):
                await self._gatt(remote, lambda: connection.gatt_client.unsubscribe(
                    char.proxy, char.deliver))

    async def _read(self, path: str, options: dict[str, Variant]) -> bytes:
        offset = int(options["offset"].value) if "offset" in options else 0
        for remote in self._remotes.values():
            char = remote.gatt.characteristics.get(path)
            if char is not None:
                value: bytes = await self._with_security(remote, char.proxy.read_value)
                char.props.update(Value=bytes(value))
                return bytes(value)[offset:]
            desc = remote.gatt.descriptors.get(path)
            if desc is not None:
                d_props, d_proxy = desc
                value = await self._with_security(remote, d_proxy.read_value)
                d_props.update(Value=bytes(value))
                return bytes(value)[offset:]
        raise DBusError(_UNKNOWN_OBJECT, f"Method call on unknown object {path}")

    async def _write(self, path: str, value: bytes, options: dict[str, Variant]) -> None:
        kind = str(options["type"].value) if "type" in options else "request"
        for remote in self._remotes.values():
            char = remote.gatt.characteristics.get(path)
            if char is not None:
                await self._with_security(remote, functools.partial(
                    char.proxy.write_value, value, with_response=kind != "command"))
                return
            desc = remote.gatt.descriptors.get(path)
            if desc is not None:
                await self._with_security(remote, functools.partial(
                    desc[1].write_value, value, with_response=True))
                return
        raise DBusError(_UNKNOWN_OBJECT, f"Method call on unknown object {path}")

    async def _acquire_notify(self, path: str) -> tuple[int, int]:
        remote, char = self._characteristic(path)
        if char.acquired or char.senders:
            # gatt-client.c: one way of notifying at a time (acquired, or StartNotify sessions).
            raise DBusError(policy.ERR_NOT_PERMITTED, "Notify acquired" if char.acquired
                            else "Notifying already started")
        fd = notify_socket(char)  # before subscribing: the first value may come at once
        try:
            await self._subscribe(remote, char)
        except BaseException:
            os.close(fd)
            for sock in char.acquired:
                sock.close()
            char.acquired.clear()
            raise
        return fd, remote.mtu

    def _acquire_write(self, path: str) -> tuple[int, int]:
        remote, char = self._characteristic(path)
        if "write-without-response" not in char.props.values["Flags"]:
            raise DBusError(policy.ERR_NOT_SUPPORTED, "Operation is not supported")

        def write(packet: bytes) -> None:
            self._spawn(self._write_command(remote, char, packet))

        fd, sock = write_socket(write)
        remote.write_sockets.append(sock)
        return fd, remote.mtu

    async def _write_command(self, remote: _Remote, char: Characteristic, value: bytes) -> None:
        with contextlib.suppress(DBusError, ATT_Error):
            await self._gatt(remote, functools.partial(
                char.proxy.write_value, value, with_response=False))

    # -- D-Bus plumbing ----------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_message(self, msg: Message) -> bool:
        """Every method call on a BlueZ interface is answered here, with its sender known."""
        if msg.message_type == MessageType.SIGNAL:
            if msg.member == "NameOwnerChanged" and msg.sender == "org.freedesktop.DBus":
                name, _old, new = msg.body
                if not new and name.startswith(":"):
                    self._client_gone(name)
            return False
        if msg.message_type != MessageType.METHOD_CALL or not (msg.interface or "").startswith(
                "org.bluez."):
            return False
        self.calls.append((msg.member or "", msg.path or ""))
        self._spawn(self._answer(msg))
        return True

    async def _answer(self, msg: Message) -> None:
        bus = self._bus
        if bus is None:
            return
        try:
            signature, body = await self._dispatch(msg)
            fds = [body[0]] if signature.startswith("h") else []  # an fd goes as index 0
            reply = Message(
                message_type=MessageType.METHOD_RETURN, reply_serial=msg.serial,
                destination=msg.sender, signature=signature,
                body=[0, *body[1:]] if fds else body, unix_fds=fds)
        except DBusError as e:
            reply = Message.new_error(msg, e.type, e.text)
        except Exception as e:
            log.exception("bluez stand-in: %s.%s failed", msg.interface, msg.member)
            reply = Message.new_error(msg, policy.ERR_FAILED, f"{type(e).__name__}: {e}")
        if msg.flags.value & 1:  # NO_REPLY_EXPECTED
            return
        if self._bus is bus:
            await bus.send(reply)
        for fd in reply.unix_fds:
            os.close(fd)  # dbus-fast has sent its own copy

    async def _dispatch(self, msg: Message) -> tuple[str, list[Any]]:
        interface, member, path, sender = msg.interface, msg.member, msg.path or "", msg.sender
        body = msg.body
        if interface == policy.AGENT_MANAGER and path == "/org/bluez":
            return self._agent_manager(member or "", sender or "", body)
        if interface == policy.ADAPTER:
            if path != self.adapter_path or self._adapter is None:
                raise DBusError(_UNKNOWN_OBJECT, f"Method call on unknown object {path}")
            if member == "StartDiscovery":
                await self._start_discovery(sender or "")
            elif member == "StopDiscovery":
                await self._stop_discovery(sender or "")
            elif member == "SetDiscoveryFilter":
                unknown = [k for k in body[0] if k not in _DISCOVERY_FILTERS]
                if unknown:
                    raise DBusError(policy.ERR_INVALID_ARGUMENTS, "Invalid Arguments in method call")
                self._filters[sender or ""] = dict(body[0])
            elif member == "GetDiscoveryFilters":
                return "as", [list(_DISCOVERY_FILTERS)]
            elif member == "RemoveDevice":
                remote = self._remotes.get(body[0])
                if remote is None:
                    raise DBusError(policy.ERR_DOES_NOT_EXIST, "Does Not Exist")
                await self._disconnect(remote)
                await self.radio.remove_bond(remote.address)
                self._forget_remote(remote)
            else:
                raise _unknown_method(msg)
            return "", []
        if interface == policy.DEVICE:
            remote = self._remotes.get(path)
            if remote is None:
                raise DBusError(_UNKNOWN_OBJECT, f"Method call on unknown object {path}")
            if member == "Connect":
                if self.faults.drop_before_connect > 0:
                    self.faults.drop_before_connect -= 1
                    self._forget_remote(remote)
                    raise DBusError(_UNKNOWN_OBJECT, f"Method call on unknown object {path}")
                await self._connect(remote)
            elif member == "Disconnect":
                await self._disconnect(remote)
            elif member == "Pair":
                await self._pair(remote)
            elif member == "CancelPairing":
                if remote.pairing is None:
                    raise DBusError(policy.ERR_DOES_NOT_EXIST, "Does Not Exist")
                remote.pairing.cancel()
            else:
                raise _unknown_method(msg)
            return "", []
        if interface in (policy.GATT_CHARACTERISTIC, policy.GATT_DESCRIPTOR):
            if member == "ReadValue":
                return "ay", [await self._read(path, body[0])]
            if member == "WriteValue":
                await self._write(path, bytes(body[0]), body[1])
                return "", []
            if member == "StartNotify":
                await self._start_notify(path, sender or "")
                return "", []
            if member == "StopNotify":
                await self._stop_notify(path, sender or "")
                return "", []
            if member == "AcquireNotify":
                fd, mtu = await self._acquire_notify(path)
                return "hq", [fd, mtu]
            if member == "AcquireWrite":
                fd, mtu = self._acquire_write(path)
                return "hq", [fd, mtu]
        raise _unknown_method(msg)

    def _agent_manager(self, member: str, sender: str, body: list[Any]) -> tuple[str, list[Any]]:
        # agent.c keeps one agent per D-Bus client (by sender); the newest default wins.
        if member == "RegisterAgent":
            path, capability = body
            if capability not in ("DisplayOnly", "DisplayYesNo", "KeyboardOnly",
                                  "NoInputNoOutput", "KeyboardDisplay", ""):
                raise DBusError(policy.ERR_INVALID_ARGUMENTS, "Invalid Arguments in method call")
            if sender in self._agents:
                raise DBusError(policy.ERR_ALREADY_EXISTS, "Already Exists")
            self._agents[sender] = RegisteredAgent(sender, path, capability)
        elif member in ("UnregisterAgent", "RequestDefaultAgent"):
            agent = self._agents.get(sender)
            if agent is None or agent.path != body[0]:
                raise DBusError(policy.ERR_DOES_NOT_EXIST, "Does Not Exist")
            if member == "RequestDefaultAgent":
                self._default_agent = sender
            else:
                del self._agents[sender]
                if self._default_agent == sender:
                    self._default_agent = None
        else:
            raise DBusError("org.freedesktop.DBus.Error.UnknownMethod", f"{member} not found")
        return "", []

    def _client_gone(self, sender: str) -> None:
        """A D-Bus client vanished: its discovery, notify sessions and agents end with it."""
        if self._discovery.pop(sender, None) is not None:
            self._spawn(self._update_scanning())
        self._filters.pop(sender, None)
        if self._agents.pop(sender, None) is not None and self._default_agent == sender:
            self._default_agent = None
        for remote in self._remotes.values():
            for char in remote.gatt.client_gone(sender):
                self._spawn(self._unsubscribe(remote, char))

    # -- for tests ---------------------------------------------------------------------------

    def device_props(self, address: str) -> dict[str, Any] | None:
        """A device's current Device1 properties, or None if bluetoothd does not know it."""
        remote = self._remotes.get(device_path(self.adapter_path, address))
        return dict(remote.props.values) if remote is not None else None


def _unknown_method(msg: Message) -> DBusError:
    return DBusError("org.freedesktop.DBus.Error.UnknownMethod",
                     f"Method \"{msg.member}\" with signature \"{msg.signature}\" on interface "
                     f"\"{msg.interface}\" doesn't exist")


def _current_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
