"""bleak backends on the virtual radio: the gateway's bleak calls run real ATT/GATT/SMP in-process.

Wire them with bleak's own ``backend=`` argument; the extra ``radio=`` keyword reaches the
backend's constructor untouched::

    BleakScanner(detection_callback=cb, backend=VirtualScannerBackend, radio=radio)
    BleakClient(device, disconnected_callback=cb, backend=VirtualClientBackend, radio=radio)

Behaviour follows bleak's BlueZ backend where the gateway can tell the difference: a bonded
link is encrypted as soon as it connects, ATT errors become ``BleakGATTProtocolError`` (so an
unencrypted CCCD write to a protected characteristic fails with "Insufficient Encryption"), a
connect that does not complete in time raises ``TimeoutError``, and the disconnected callback
fires whenever an established link goes down, whoever ended it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from bleak.args import SizedBuffer
from bleak.assigned_numbers import CHARACTERISTIC_PROPERTIES, CharacteristicPropertyName
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import (
    AdvertisementData,
    AdvertisementDataCallback,
    BaseBleakScanner,
)
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakError, BleakGATTProtocolError
from bleak.uuids import normalize_uuid_str
from bumble.att import ATT_Error
from bumble.core import UUID, BaseBumbleError
from bumble.core import TimeoutError as BumbleTimeoutError
from bumble.device import Connection
from bumble.gatt import (
    GATT_CLIENT_CHARACTERISTIC_CONFIGURATION_DESCRIPTOR,
    ClientCharacteristicConfigurationBits,
)
from bumble.gatt_client import CharacteristicProxy, DescriptorProxy, ServiceProxy

from gateway.sim.radio import Advert, VirtualRadio

log = logging.getLogger(__name__)

REQUESTED_MTU = 517
"""The ATT MTU the hub asks for (what BlueZ requests)."""

_T = TypeVar("_T")


def _radio_from(radio: object, who: str) -> VirtualRadio:
    """The radio= keyword, checked; bleak gives backends no other channel for it."""
    if not isinstance(radio, VirtualRadio):
        raise BleakError(f"{who} needs radio=<VirtualRadio> (got {radio!r})")
    return radio


def _bleak_uuid(value: UUID) -> str:
    """A bumble UUID in bleak's lower-case 128-bit form."""
    return normalize_uuid_str(value.to_hex_str("-"))


class VirtualScannerBackend(BaseBleakScanner):
    """A bleak scanner backend that listens on a VirtualRadio; several may run at once."""

    def __init__(
        self,
        detection_callback: AdvertisementDataCallback | None,
        service_uuids: list[str] | None,
        scanning_mode: str = "active",
        *,
        radio: VirtualRadio | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(detection_callback, service_uuids)
        # Platform keywords (bluez=, cb=) mean nothing here; scanning is always active, which
        # only changes whether scan responses are merged and the simulated devices send none.
        del scanning_mode, kwargs
        self._radio = _radio_from(radio, "VirtualScannerBackend")
        self._scanning = False

    async def start(self) -> None:
        """Start reporting advertisements (seen_devices is cleared, as bleak requires)."""
        if self._scanning:
            return
        self.seen_devices = {}
        await self._radio.start_scan(self._on_advert)
        self._scanning = True

    async def stop(self) -> None:
        """Stop reporting advertisements."""
        if not self._scanning:
            return
        self._scanning = False
        await self._radio.stop_scan(self._on_advert)

    def _on_advert(self, advert: Advert) -> None:
        """Turn one radio advert into bleak's BLEDevice + AdvertisementData and report it."""
        service_uuids = list(advert.service_uuids)
        if not self.is_allowed_uuid(service_uuids):
            return
        data = AdvertisementData(
            local_name=advert.local_name,
            manufacturer_data=dict(advert.manufacturer_data),
            service_data=dict(advert.service_data),
            service_uuids=service_uuids,
            tx_power=advert.tx_power,
            rssi=advert.rssi,
            platform_data=(advert,),
        )
        device = self.create_or_update_device(
            advert.address, advert.address, advert.local_name, advert, data
        )
        self.call_detection_callbacks(device, data)


class VirtualClientBackend(BaseBleakClient):
    """A bleak client backend that connects over a VirtualRadio as the hub's central."""

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        services: set[str] | None = None,
        *,
        disconnected_callback: Callable[[], None] | None = None,
        timeout: float = 10.0,
        radio: VirtualRadio | None = None,
        **kwargs: Any,
    ) -> None:
        # bluez=, winrt= and anything else platform specific is accepted and ignored.
        del kwargs
        super().__init__(
            address_or_ble_device, disconnected_callback=disconnected_callback, timeout=timeout
        )
        self._radio = _radio_from(radio, "VirtualClientBackend")
        self.address = self.address.upper()
        self._name = (
            address_or_ble_device.name
            if isinstance(address_or_ble_device, BLEDevice) and address_or_ble_device.name
            else self.address.replace(":", "-")
        )
        self._service_filter = [UUID(u) for u in services] if services else []
        self._connection: Connection | None = None
        self._established = False
        self._mtu = 23  # ATT_MTU before the exchange (Core Vol 3 Part F §3.2.8)
        self._subscribers: dict[int, Callable[[bytes], None]] = {}

    # -- properties ------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The advertised name, or the address with dashes (as BlueZ's Alias)."""
        return self._name

    @property
    def mtu_size(self) -> int:
        """The negotiated ATT MTU (23 until the exchange)."""
        return self._mtu

    @property
    def is_connected(self) -> bool:
        """True while the LE link is up."""
        return self._connection is not None

    # -- connection --------------------------------------------------------------------------

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        """Connect, encrypt a bonded link (or pair if asked), exchange MTU, discover services.

        The whole of it is bounded by the client's timeout; running out raises TimeoutError.
        """
        if self._connection is not None:
            raise BleakError("Client is already connected")
        timeout = float(kwargs.get("timeout", self._timeout))
        deadline = asyncio.get_running_loop().time() + timeout
        expired = TimeoutError(
            f"connecting to {self.address} timed out after {timeout:g} s "
            "(is it advertising and in range?)"
        )
        try:
            # The radio bounds this itself (and cleans up the controller when it gives up).
            connection = await self._radio.connect(self.address, timeout)
        except (BumbleTimeoutError, TimeoutError) as e:
            raise expired from e
        except BaseBumbleError as e:
            raise BleakError(f"connecting to {self.address} failed: {e}") from e
        self._connection = connection
        self._mtu = connection.att_mtu
        connection.on(Connection.EVENT_DISCONNECTION, self._on_disconnection)
        try:
            async with asyncio.timeout_at(deadline):
                await self._secure(connection, pair)
                self._mtu = await self._gatt(
                    "MTU exchange", lambda: connection.gatt_client.request_mtu(REQUESTED_MTU)
                )
                self.services = await self._discover(connection)
        except BaseException as e:
            await self._drop(connection)
            if isinstance(e, TimeoutError):
                raise expired from None
            raise
        if self._connection is None:
            raise BleakError(f"{self.address} disconnected during connection setup")
        self._established = True

    async def _secure(self, connection: Connection, pair: bool) -> None:
        """Encrypt with the stored bond, as BlueZ does for a bonded device; else pair if asked."""
        if await self._radio.has_bond(self.address):
            try:
                await self._gatt("encryption", connection.encrypt)
            except BleakError as e:
                raise BleakError(
                    f"authentication failed: {self.address} did not accept the stored bond "
                    f"({e})"
                ) from e
        elif pair:
            await self._pair(connection)

    async def _discover(self, connection: Connection) -> BleakGATTServiceCollection:
        """Primary services, their characteristics and descriptors, as bleak's collection."""
        client = connection.gatt_client
        collection = BleakGATTServiceCollection()
        services: list[ServiceProxy] = await self._gatt(
            "service discovery", lambda: client.discover_services(self._service_filter)
        )
        for service in services:
            bleak_service = BleakGATTService(service, service.handle, _bleak_uuid(service.uuid))
            collection.add_service(bleak_service)
            characteristics: list[CharacteristicProxy[bytes]] = await self._gatt(
                "characteristic discovery",
                functools.partial(client.discover_characteristics, (), service),
            )
            for char in characteristics:
                properties: list[CharacteristicPropertyName] = [
                    name for bit, name in CHARACTERISTIC_PROPERTIES.items() if char.properties & bit
                ]
                bleak_char = BleakGATTCharacteristic(
                    char,
                    char.handle,
                    _bleak_uuid(char.uuid),
                    properties,
                    # ATT Write Command: opcode + handle take 3 bytes of the MTU.
                    lambda: self._mtu - 3,
                    bleak_service,
                )
                collection.add_characteristic(bleak_char)
                descriptors: list[DescriptorProxy] = await self._gatt(
                    "descriptor discovery",
                    functools.partial(client.discover_descriptors, char),
                )
                for descriptor in descriptors:
                    collection.add_descriptor(
                        BleakGATTDescriptor(
                            descriptor, descriptor.handle, _bleak_uuid(descriptor.type), bleak_char
                        )
                    )
        return collection

    async def disconnect(self) -> None:
        """Terminate the link; returns once the hub has seen the disconnection."""
        connection = self._connection
        if connection is None:
            return
        try:
            await self._gatt("disconnect", connection.disconnect)
        except BleakError:
            # The link may have gone down on its own meanwhile: that is a disconnect too.
            if self._connection is not None:
                raise

    async def _drop(self, connection: Connection) -> None:
        """Best-effort teardown after a failed connect; never raises."""
        self._established = False
        try:
            async with asyncio.timeout(self._radio.op_timeout):
                await connection.disconnect()
        except (BaseBumbleError, TimeoutError, asyncio.CancelledError):
            log.debug("teardown of %s after a failed connect did not complete", self.address)
        finally:
            self._forget(connection)

    def _forget(self, connection: Connection) -> None:
        """Clear per-link state once a link is gone."""
        if self._connection is connection:
            self._connection = None
            self.services = None
            self._subscribers.clear()
            self._mtu = 23

    def _on_disconnection(self, reason: int) -> None:
        """bumble's disconnection event: local or remote, the link is gone."""
        connection = self._connection
        if connection is None:
            return
        log.debug("%s disconnected, HCI reason %#04x", self.address, reason)
        established, self._established = self._established, False
        self._forget(connection)
        callback = self._disconnected_callback
        if established and callback is not None:
            # Scheduled, not called here, so a raising callback cannot break bumble's
            # event dispatch (bleak's docs promise it "will be scheduled in the event loop").
            asyncio.get_running_loop().call_soon(callback)

    # -- security ----------------------------------------------------------------------------

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        """Just Works pairing with bonding; a no-op on an encrypted, bonded link."""
        del args, kwargs  # protection level etc. have no meaning for Just Works
        connection = self._require_connection()
        if connection.is_encrypted and await self._radio.has_bond(self.address):
            return
        await self._pair(connection)

    async def _pair(self, connection: Connection) -> None:
        """Run SMP pairing and bonding; the keys land in the radio's key store."""
        try:
            await self._gatt("pairing", connection.pair)
        except BleakGATTProtocolError:
            raise
        except BleakError as e:
            raise BleakError(f"pairing with {self.address} failed: authentication failed ({e})") from e

    async def unpair(self) -> None:
        """Forget the bond (and drop the link, as BlueZ's RemoveDevice does)."""
        await self.disconnect()
        await self._radio.remove_bond(self.address)

    # -- GATT --------------------------------------------------------------------------------

    async def read_gatt_char(
        self, characteristic: BleakGATTCharacteristic, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        """Read a characteristic value (long values with Read Blob, as bumble does)."""
        return await self._read(characteristic.handle, use_cached, f"read {characteristic.uuid}")

    async def read_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        """Read a descriptor value."""
        return await self._read(descriptor.handle, use_cached, f"read {descriptor.uuid}")

    async def _read(self, handle: int, use_cached: bool, what: str) -> bytearray:
        """Read one attribute by handle, or serve the value last read or notified."""
        connection = self._require_connection()
        client = connection.gatt_client
        if use_cached and handle in client.cached_values:
            return bytearray(client.cached_values[handle][1])
        value: bytes = await self._gatt(what, lambda: client.read_value(handle))
        return bytearray(value)

    async def write_gatt_char(
        self, characteristic: BleakGATTCharacteristic, data: SizedBuffer, response: bool
    ) -> None:
        """Write Request (response=True) or Write Command."""
        connection = self._require_connection()
        value = bytes(data)
        await self._gatt(
            f"write {characteristic.uuid}",
            lambda: connection.gatt_client.write_value(
                characteristic.handle, value, with_response=response
            ),
        )

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: SizedBuffer) -> None:
        """Write a descriptor with a Write Request."""
        connection = self._require_connection()
        value = bytes(data)
        await self._gatt(
            f"write {descriptor.uuid}",
            lambda: connection.gatt_client.write_value(descriptor.handle, value, with_response=True),
        )

    async def start_notify(
        self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback, **kwargs: Any
    ) -> None:
        """Enable notifications, or indications when the characteristic only indicates."""
        connection = self._require_connection()
        cccd = self._cccd(characteristic)
        properties = characteristic.properties
        # Notifications win when both exist, as in bleak's other backends.
        if "notify" in properties:
            bits, kind = ClientCharacteristicConfigurationBits.NOTIFICATION, "notifications"
            registry = connection.gatt_client.notification_subscribers
        elif "indicate" in properties:
            bits, kind = ClientCharacteristicConfigurationBits.INDICATION, "indications"
            registry = connection.gatt_client.indication_subscribers
        else:
            raise BleakError(f"{characteristic.uuid} supports neither notify nor indicate")

        def subscriber(value: bytes) -> None:
            callback(bytearray(value))

        handle = characteristic.handle
        self._unregister(connection, handle)
        # Registered before the CCCD write: the device may indicate as soon as it is enabled.
        registry.setdefault(handle, set()).add(subscriber)
        self._subscribers[handle] = subscriber
        try:
            await self._gatt(
                f"enable {kind} on {characteristic.uuid}",
                lambda: connection.gatt_client.write_value(
                    cccd, struct.pack("<H", bits), with_response=True
                ),
            )
        except BaseException:
            self._unregister(connection, handle)
            raise

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        """Disable notifications/indications and drop the callback."""
        connection = self._require_connection()
        cccd = self._cccd(characteristic)
        self._unregister(connection, characteristic.handle)
        await self._gatt(
            f"disable notifications on {characteristic.uuid}",
            lambda: connection.gatt_client.write_value(cccd, b"\x00\x00", with_response=True),
        )

    def _cccd(self, characteristic: BleakGATTCharacteristic) -> int:
        """The handle of a characteristic's Client Characteristic Configuration descriptor."""
        wanted = _bleak_uuid(GATT_CLIENT_CHARACTERISTIC_CONFIGURATION_DESCRIPTOR)
        for descriptor in characteristic.descriptors:
            if descriptor.uuid == wanted:
                return descriptor.handle
        raise BleakError(f"{characteristic.uuid} has no CCCD: it cannot notify or indicate")

    def _unregister(self, connection: Connection, handle: int) -> None:
        """Remove this client's callback for `handle` from bumble's subscriber sets."""
        subscriber = self._subscribers.pop(handle, None)
        if subscriber is None:
            return
        client = connection.gatt_client
        for registry in (client.notification_subscribers, client.indication_subscribers):
            subscribers = registry.get(handle)
            if subscribers is not None:
                subscribers.discard(subscriber)
                if not subscribers:
                    del registry[handle]

    # -- plumbing ----------------------------------------------------------------------------

    def _require_connection(self) -> Connection:
        """The live connection, or bleak's "Not connected" error."""
        if self._connection is None:
            raise BleakError("Not connected")
        return self._connection

    async def _gatt(self, what: str, operation: Callable[[], Awaitable[_T]]) -> _T:
        """Run one bumble operation with the radio's timeout; bumble errors become bleak's."""
        try:
            async with asyncio.timeout(self._radio.op_timeout):
                return await operation()
        except ATT_Error as e:
            raise BleakGATTProtocolError(int(e.error_code)) from e
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._connection is None and task is not None and not task.cancelling():
                # bumble cancels a request's future when the link drops under it; that is a
                # lost connection, not a cancellation of our caller.
                raise BleakError(f"{what}: {self.address} disconnected") from None
            raise
        except TimeoutError:
            raise TimeoutError(
                f"{what} on {self.address}: no answer in {self._radio.op_timeout:g} s"
            ) from None
        except (BaseBumbleError, AssertionError) as e:
            # AssertionError: bumble asserts on internal state (e.g. a request on a dead link).
            raise BleakError(f"{what} on {self.address} failed: {e}") from e

