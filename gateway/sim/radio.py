"""The virtual radio: one in-process bumble LocalLink, the hub's central device, and its peers.

Everything runs in the caller's asyncio loop (bumble schedules link traffic with
``loop.call_soon``), so a ``VirtualRadio`` must be created and entered inside a running loop.

Two quirks of bumble's LocalLink shape this module (design.md §6):

* The link routes LE data by *random* address only, so every device here, hub and peripherals,
  is given its address as a random (static) address and no public address. SMP is told to use
  the random address as identity address, so a bond is stored under exactly the address the
  next connection comes from; otherwise re-encryption fails with "keys not found".
* bumble's controller ignores LE Create Connection Cancel, so a connection attempt that timed
  out would stay pending and complete later as a ghost connection. The hub's controller
  implements the cancel as a real controller does (Core Vol 4 Part E §7.8.13).

And one of bumble's central: once it holds a peer's IRK it scans for a resolvable address
before every reconnection. The simulated devices keep static addresses and do not distribute
an IRK (drivers.simulated.device), so reconnections go straight to the address.

The hub's controller may also live in another process (``VirtualRadio(hci="tcp:HOST:PORT")``):
then the hub's host reaches it over bumble's HCI-over-TCP transport, served by
``rpm-gateway simulate`` (gateway.sim.hci_server), and the peripherals live over there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import struct
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self, TypeVar

from bleak.uuids import normalize_uuid_str
from bumble import hci, ll
from bumble.controller import Controller
from bumble.core import BaseBumbleError
from bumble.device import Advertisement, Connection, Device, DeviceConfiguration
from bumble.host import Host
from bumble.link import LocalLink
from bumble.pairing import PairingConfig
from bumble.transport import open_transport
from bumble.transport.common import AsyncPipeSink, Transport

log = logging.getLogger(__name__)

DEFAULT_HUB_ADDRESS = "C0:FF:EE:00:00:01"
"""The hub's fixed address on the virtual link (a static random address: top bits 11)."""

DEFAULT_OP_TIMEOUT_S = 10.0
"""Upper bound for one radio operation (power on, scan start, one GATT request...)."""

# Core Vol 3 Part C §11 AD types used by health devices.
_AD_UUID16 = (0x02, 0x03)
_AD_UUID32 = (0x04, 0x05)
_AD_UUID128 = (0x06, 0x07)
_AD_SHORT_NAME = 0x08
_AD_COMPLETE_NAME = 0x09
_AD_TX_POWER = 0x0A
_AD_SERVICE_DATA16 = 0x16
_AD_SERVICE_DATA32 = 0x20
_AD_SERVICE_DATA128 = 0x21
_AD_MANUFACTURER = 0xFF

_CONNECT_GRACE_S = 0.5  # time for bumble to cancel a timed-out connection attempt itself


def _uuid_str(raw_le: bytes) -> str:
    """A little-endian 16/32/128-bit UUID from an AD structure in bleak's 128-bit string form."""
    text = raw_le[::-1].hex()
    return normalize_uuid_str(str(uuid.UUID(text)) if len(raw_le) == 16 else text)


@dataclass(frozen=True)
class Advert:
    """One advertisement as the hub's controller reported it, with its AD structures parsed."""

    address: str
    rssi: int
    data: bytes
    local_name: str | None = None
    service_uuids: tuple[str, ...] = ()
    manufacturer_data: Mapping[int, bytes] = field(default_factory=dict)
    service_data: Mapping[str, bytes] = field(default_factory=dict)
    tx_power: int | None = None

    @classmethod
    def parse(cls, address: str, rssi: int, data: bytes) -> Advert:
        """Parse raw advertising data (length, type, value structures); bad tails are ignored."""
        name: str | None = None
        uuids: list[str] = []
        manufacturer: dict[int, bytes] = {}
        service_data: dict[str, bytes] = {}
        tx_power: int | None = None
        offset = 0
        while offset < len(data):
            length = data[offset]
            if length == 0 or offset + 1 + length > len(data):
                break  # zero padding or a truncated structure ends the significant part
            ad_type, value = data[offset + 1], data[offset + 2 : offset + 1 + length]
            offset += 1 + length
            if ad_type in _AD_UUID16:
                uuids += [_uuid_str(value[i : i + 2]) for i in range(0, len(value) - 1, 2)]
            elif ad_type in _AD_UUID32:
                uuids += [_uuid_str(value[i : i + 4]) for i in range(0, len(value) - 3, 4)]
            elif ad_type in _AD_UUID128:
                uuids += [_uuid_str(value[i : i + 16]) for i in range(0, len(value) - 15, 16)]
            elif ad_type in (_AD_SHORT_NAME, _AD_COMPLETE_NAME):
                # A complete name wins over a shortened one, whatever the order.
                if name is None or ad_type == _AD_COMPLETE_NAME:
                    name = value.decode("utf-8", errors="replace")
            elif ad_type == _AD_TX_POWER and len(value) == 1:
                tx_power = struct.unpack("b", value)[0]
            elif ad_type == _AD_MANUFACTURER and len(value) >= 2:
                manufacturer[int.from_bytes(value[:2], "little")] = bytes(value[2:])
            elif ad_type == _AD_SERVICE_DATA16 and len(value) >= 2:
                service_data[_uuid_str(value[:2])] = bytes(value[2:])
            elif ad_type == _AD_SERVICE_DATA32 and len(value) >= 4:
                service_data[_uuid_str(value[:4])] = bytes(value[4:])
            elif ad_type == _AD_SERVICE_DATA128 and len(value) >= 16:
                service_data[_uuid_str(value[:16])] = bytes(value[16:])
        return cls(
            address=address,
            rssi=rssi,
            data=bytes(data),
            local_name=name,
            service_uuids=tuple(uuids),
            manufacturer_data=manufacturer,
            service_data=service_data,
            tx_power=tx_power,
        )


AdvertListener = Callable[[Advert], None]
"""Called for every advertisement the hub hears while it scans."""


class Medium(Protocol):
    """Where peripherals put their controllers: a VirtualRadio, or the simulate process's field."""

    @property
    def link(self) -> LocalLink:
        """The shared in-process link."""
        ...

    @property
    def op_timeout(self) -> float:
        """Upper bound for one radio operation, seconds."""
        ...


class Peripheral(Protocol):
    """Anything that can join a VirtualRadio as a remote device (see drivers.simulated)."""

    @property
    def address(self) -> str:
        """The peripheral's address on the link, upper case with colons."""
        ...

    @property
    def rssi(self) -> int:
        """The signal strength the hub reports for this peripheral, dBm."""
        ...

    async def attach(self, radio: Medium) -> None:
        """Switch on: create the bumble device on radio.link and start behaving."""
        ...

    async def detach(self) -> None:
        """Switch off: drop links, stop advertising, leave the link."""
        ...


_P = TypeVar("_P", bound=Peripheral)


class _HubController(Controller):
    """bumble's controller, plus a working LE Create Connection Cancel."""

    rssi_of: Callable[[hci.Address], int | None] | None = None
    """The signal strength to report per advertiser (bumble reports -50 dBm for all)."""

    def send_hci_packet(self, packet: hci.HCI_Packet) -> None:
        """Send to the host, with each advertiser's own RSSI in advertising reports."""
        super().send_hci_packet(self._with_rssi(packet))

    def _with_rssi(self, packet: hci.HCI_Packet) -> hci.HCI_Packet:
        """The packet, its advertising reports carrying `rssi_of` where it knows better."""
        rssi_of = self.rssi_of
        if rssi_of is None:
            return packet
        if isinstance(packet, hci.HCI_LE_Advertising_Report_Event):
            return hci.HCI_LE_Advertising_Report_Event(
                [dataclasses.replace(r, rssi=_or(rssi_of(r.address), r.rssi))
                 for r in packet.reports])
        if isinstance(packet, hci.HCI_LE_Extended_Advertising_Report_Event):
            return hci.HCI_LE_Extended_Advertising_Report_Event(
                [dataclasses.replace(r, rssi=_or(rssi_of(r.address), r.rssi))
                 for r in packet.reports])
        return packet

    def on_hci_le_create_connection_cancel_command(
        self, _command: hci.HCI_LE_Create_Connection_Cancel_Command
    ) -> hci.HCI_StatusReturnParameters:
        """Drop the pending connection and report it as cancelled (Core Vol 4 Part E §7.8.13)."""
        pending = self.pending_le_connection
        self.pending_le_connection = None
        if pending is not None:
            # The failed LE Connection Complete must follow the Command Complete event that
            # the caller sends when this handler returns, hence call_soon.
            asyncio.get_running_loop().call_soon(self._report_cancelled, pending.peer_address)
        return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.SUCCESS)

    def _report_cancelled(self, peer_address: hci.Address) -> None:
        """Tell the host that its pending connection ended with Unknown Connection Identifier."""
        self.send_hci_packet(
            hci.HCI_LE_Connection_Complete_Event(
                status=hci.HCI_ErrorCode.UNKNOWN_CONNECTION_IDENTIFIER_ERROR,
                connection_handle=0,
                role=hci.Role.CENTRAL,
                peer_address_type=peer_address.address_type,
                peer_address=peer_address,
                connection_interval=0,
                peripheral_latency=0,
                supervision_timeout=0,
                central_clock_accuracy=0,
            )
        )

    def release(self) -> None:
        """The host is gone: every link drops as on a supervision timeout; leave the link.

        What the peripherals see when the hub's process dies: a disconnection with reason
        Connection Timeout (Core Vol 6 Part B §4.5.2), as a real central that vanished causes.
        """
        self.host = None
        self.pending_le_connection = None
        self.le_scan_enable = False
        for connection in list(self.le_connections.values()):
            with contextlib.suppress(BaseBumbleError):
                connection.send_ll_control_pdu(
                    ll.TerminateInd(hci.HCI_ErrorCode.CONNECTION_TIMEOUT_ERROR)
                )
        self.le_connections.clear()
        if self in self.link.controllers:
            self.link.remove_controller(self)


def _or(value: int | None, default: int) -> int:
    """`value` unless it is None."""
    return default if value is None else value


def link_address(address: str) -> hci.Address:
    """The bumble address used on the link for a "AA:BB:CC:DD:EE:FF" string (always random)."""
    return hci.Address(address.upper(), hci.Address.RANDOM_DEVICE_ADDRESS)


_D = TypeVar("_D", bound=Device)


def make_device(
    link: LocalLink,
    name: str,
    address: str,
    *,
    device_class: type[_D],
    controller_class: type[Controller] = Controller,
) -> tuple[_D, Controller]:
    """A bumble Device and its own controller on `link`, addressed the way the link needs."""
    controller = controller_class(name, link=link)
    host = Host(controller, AsyncPipeSink(controller))
    return device_class(config=device_configuration(name, address), host=host), controller


def device_configuration(name: str, address: str) -> DeviceConfiguration:
    """A bumble device configuration addressed the way the link needs (see the module doc)."""
    return DeviceConfiguration(
        name=name,
        address=link_address(address),
        identity_address_type=PairingConfig.AddressType.RANDOM,
        # A stable IRK per address (bumble's default is all zeros for every device).
        irk=(bytes(link_address(address)) * 3)[:16],
    )


def parse_hci_link(spec: str) -> tuple[str, int]:
    """HOST and PORT of a "tcp:HOST:PORT" link to `rpm-gateway simulate` (ValueError if not)."""
    kind, _, rest = spec.partition(":")
    host, _, port = rest.rpartition(":")
    if kind != "tcp" or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"radio link {spec!r}: expected tcp:HOST:PORT, e.g. tcp:127.0.0.1:7000")
    return host, int(port)


class VirtualRadio:
    """An in-process Bluetooth LE medium with the hub's central on it; an async context manager.

    ``async with VirtualRadio() as radio:`` then ``await radio.add_peripheral(device)``, and
    pass ``backend=VirtualScannerBackend, radio=radio`` (or ``VirtualClientBackend``) to bleak.

    With ``hci="tcp:HOST:PORT"`` the hub's controller and the peripherals are in another
    process (`rpm-gateway simulate`); only the hub's host runs here, and peripherals cannot be
    added from this side.
    """

    def __init__(
        self,
        hub_address: str = DEFAULT_HUB_ADDRESS,
        *,
        op_timeout: float = DEFAULT_OP_TIMEOUT_S,
        hci: str | None = None,
    ) -> None:
        self.hub_address = hub_address.upper()
        self.op_timeout = op_timeout
        self.hci = hci
        self._remote = parse_hci_link(hci) if hci is not None else None
        self._transport: Transport | None = None
        self._link: LocalLink | None = None
        self._hub: Device | None = None
        self._hub_controller: Controller | None = None
        self._peripherals: dict[str, Peripheral] = {}
        self._listeners: dict[AdvertListener, None] = {}
        self._scan_lock = asyncio.Lock()
        # bumble's Device allows one pending LE connection; a real kernel queues them.
        self._connect_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        """Power on the hub's controller; must run inside the loop that will use the radio."""
        if self._remote is not None:
            self._hub = await self._remote_hub(*self._remote)
        else:
            self._link = LocalLink()  # type: ignore[no-untyped-call]  # bumble left it unannotated
            self._hub, self._hub_controller = make_device(
                self._link,
                "rpm-gateway hub",
                self.hub_address,
                device_class=Device,
                controller_class=_HubController,
            )
        try:
            async with asyncio.timeout(self.op_timeout):
                await self._hub.power_on()
        except BaseException:
            self._close_transport()
            raise
        self._hub.on(Device.EVENT_ADVERTISEMENT, self._on_advertisement)
        return self

    async def _remote_hub(self, host: str, port: int) -> Device:
        """The hub's host on a TCP transport to a controller served by `rpm-gateway simulate`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.op_timeout
        while True:
            try:
                # The simulate process may still be starting: retry refusals until the deadline.
                async with asyncio.timeout_at(deadline):
                    self._transport = await open_transport(f"tcp-client:{host}:{port}")
                break
            except OSError as e:
                if loop.time() >= deadline:
                    raise ConnectionError(
                        f"virtual radio: nothing serves HCI on {self.hci} (start `rpm-gateway "
                        f"simulate --listen {host}:{port}` first): {e or type(e).__name__}"
                    ) from e
                await asyncio.sleep(0.2)
        terminated = getattr(self._transport.source, "terminated", None)
        if isinstance(terminated, asyncio.Future):
            terminated.add_done_callback(self._on_link_lost)
        config = device_configuration("rpm-gateway hub", self.hub_address)
        return Device(config=config, host=Host(self._transport.source, self._transport.sink))

    def _on_link_lost(self, _future: object) -> None:
        """The simulate process hung up (stopped, or took another hub): say so once."""
        if self._transport is not None:  # not our own close
            log.error("virtual radio: the link to %s is gone (did `rpm-gateway simulate` "
                      "stop?); restart the agent once it runs again", self.hci)

    def _close_transport(self) -> None:
        """Close the TCP transport to a remote controller, if there is one."""
        transport, self._transport = self._transport, None
        sink = getattr(transport, "sink", None)
        if sink is not None and hasattr(sink, "close"):
            sink.close()  # the TCP stream: the simulate process sees the hub go

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Switch every peripheral off, drop the hub's links and leave nothing scheduled."""
        for peripheral in list(self._peripherals.values()):
            await self.remove_peripheral(peripheral)
        hub, self._hub = self._hub, None
        if hub is None:
            return
        self._listeners.clear()
        with contextlib.suppress(BaseBumbleError, TimeoutError):
            async with asyncio.timeout(self.op_timeout):
                if hub.is_scanning:
                    await hub.stop_scanning()
                for connection in list(hub.connections.values()):
                    await connection.disconnect()
                await hub.power_off()
        self._close_transport()
        if self._link is not None and self._hub_controller is not None:
            self._link.remove_controller(self._hub_controller)

    # -- for peripherals ---------------------------------------------------------------------

    @property
    def link(self) -> LocalLink:
        """The shared link; peripherals put their controllers on it (see make_device)."""
        if self._remote is not None:
            raise RuntimeError(f"the peripherals of this radio live behind {self.hci}")
        if self._link is None:
            raise RuntimeError("VirtualRadio is not entered: use `async with VirtualRadio()`")
        return self._link

    @property
    def hub(self) -> Device:
        """The hub's bumble central device (what BlueZ would be on the Pi)."""
        if self._hub is None:
            raise RuntimeError("VirtualRadio is not entered: use `async with VirtualRadio()`")
        return self._hub

    @property
    def peripherals(self) -> Mapping[str, Peripheral]:
        """The peripherals switched on, by address."""
        return dict(self._peripherals)

    async def add_peripheral(self, peripheral: _P) -> _P:
        """Switch a peripheral on in range of the hub; returns it for chaining."""
        address = peripheral.address.upper()
        if address in self._peripherals or address == self.hub_address:
            raise ValueError(f"address {address} is already on this radio")
        self._peripherals[address] = peripheral
        try:
            async with asyncio.timeout(self.op_timeout):
                await peripheral.attach(self)
        except BaseException:
            self._peripherals.pop(address, None)
            raise
        return peripheral

    async def remove_peripheral(self, peripheral: Peripheral) -> None:
        """Switch a peripheral off (its links drop as if it went out of range)."""
        if self._peripherals.pop(peripheral.address.upper(), None) is None:
            return
        async with asyncio.timeout(self.op_timeout):
            await peripheral.detach()

    # -- for the bleak backends ----------------------------------------------------------------

    async def start_scan(self, listener: AdvertListener) -> None:
        """Report adverts to listener; the hub scans while at least one listener is registered."""
        async with self._scan_lock:
            self._listeners[listener] = None
            hub = self.hub
            if not hub.is_scanning:
                try:
                    async with asyncio.timeout(self.op_timeout):
                        await hub.start_scanning(active=True, filter_duplicates=False)
                except BaseException:
                    self._listeners.pop(listener, None)
                    raise

    async def stop_scan(self, listener: AdvertListener) -> None:
        """Stop reporting to listener; the hub stops scanning with the last one."""
        async with self._scan_lock:
            if listener not in self._listeners:
                return
            del self._listeners[listener]
            if self._listeners:
                return
            hub = self.hub
            if hub.is_scanning:
                async with asyncio.timeout(self.op_timeout):
                    await hub.stop_scanning()

    def _on_advertisement(self, advertisement: Advertisement) -> None:
        """Fan one controller report out to the listeners."""
        if advertisement.is_scan_response:
            # bumble's controller answers every scan request with a copy of the advert data,
            # and the accumulator glues both together: the first report already has it all.
            return
        address = advertisement.address.to_string(with_type_qualifier=False)
        peripheral = self._peripherals.get(address)
        rssi = peripheral.rssi if peripheral is not None else advertisement.rssi
        advert = Advert.parse(address, rssi, advertisement.data_bytes)
        for listener in list(self._listeners):
            try:
                listener(advert)
            except Exception:
                # One broken callback must not stop the others or bumble's event loop.
                log.exception("advertisement listener failed")

    async def connect(self, address: str, timeout: float) -> Connection:
        """An LE link to `address` as central, within `timeout` seconds (queue time included).

        Raises bumble's TimeoutError when the peer does not show up in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with asyncio.timeout_at(deadline):
            await self._connect_lock.acquire()
        try:
            remaining = max(deadline - loop.time(), 0.001)
            # bumble's own timeout does the work: it cancels the pending connection in the
            # controller before giving up, so no ghost connection appears later. asyncio's
            # timeout, a little longer, only guards against a wedged stack.
            async with asyncio.timeout(remaining + _CONNECT_GRACE_S):
                return await self.hub.connect(
                    link_address(address),
                    timeout=remaining,
                    own_address_type=hci.OwnAddressType.RANDOM,
                )
        except (asyncio.CancelledError, TimeoutError):
            self._abandon_pending_connection()
            raise
        finally:
            self._connect_lock.release()

    def _abandon_pending_connection(self) -> None:
        """Forget a connection attempt whose caller was cancelled (task cancel, outer timeout)."""
        controller = self._hub_controller
        if controller is None:
            if self._hub is not None and self._remote is not None:
                # The controller is remote: ask it, as a real kernel would (it honours cancel).
                self._spawn_cancel(self._hub)
            return

        def forget() -> None:
            controller.pending_le_connection = None

        forget()
        # The create-connection command may still be queued to the controller (host to
        # controller is call_soon): clear again once it has been handled.
        asyncio.get_running_loop().call_soon(forget)

    def _spawn_cancel(self, hub: Device) -> None:
        """Send LE Create Connection Cancel in the background (best effort)."""

        async def cancel() -> None:
            with contextlib.suppress(BaseBumbleError, TimeoutError, hci.HCI_Error):
                async with asyncio.timeout(self.op_timeout):
                    await hub.cancel_connection()  # type: ignore[no-untyped-call]

        task = asyncio.get_running_loop().create_task(cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def has_bond(self, address: str) -> bool:
        """Whether the hub holds keys for `address` (bumble's in-memory key store, this radio)."""
        keystore = self.hub.keystore
        if keystore is None:
            return False
        async with asyncio.timeout(self.op_timeout):
            return await keystore.get(str(link_address(address))) is not None

    async def remove_bond(self, address: str) -> bool:
        """Delete the hub's keys for `address`; False if there were none."""
        keystore = self.hub.keystore
        if keystore is None or not await self.has_bond(address):
            return False
        async with asyncio.timeout(self.op_timeout):
            await keystore.delete(str(link_address(address)))
        return True
