"""The org.bluez objects' properties, as dbus-fast interfaces.

These are property bags: Get/GetAll/Set, PropertiesChanged, introspection and the
ObjectManager's InterfacesAdded/Removed come from dbus-fast. Method calls are answered by the
stand-in itself (gateway.sim.bluez.daemon), which needs each call's sender (BlueZ keeps
discovery and notify sessions per D-Bus client) and dbus-fast does not pass it to methods.
"""

# No `from __future__ import annotations`: dbus-fast reads these annotations at class creation.
from collections.abc import Callable
from typing import Annotated, Any

from dbus_fast.annotations import (
    DBusBool,
    DBusBytes,
    DBusInt16,
    DBusObjectPath,
    DBusSignature,
    DBusStr,
    DBusUInt16,
)
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property
from dbus_fast.signature import Variant

from gateway.sim.bluez import policy

DBusStrList = Annotated[list[str], DBusSignature("as")]
DBusPathList = Annotated[list[str], DBusSignature("ao")]
DBusManufacturerData = Annotated[dict[int, Variant], DBusSignature("a{qv}")]
DBusServiceData = Annotated[dict[str, Variant], DBusSignature("a{sv}")]


class _Bag(ServiceInterface):
    """Properties held in a dict; `update` stores and signals only what changed."""

    def __init__(self, name: str, values: dict[str, Any]) -> None:
        super().__init__(name)
        self.values = values

    def update(self, **changes: Any) -> None:
        """Store `changes`; emit PropertiesChanged for the ones that differ."""
        changed = {k: v for k, v in changes.items() if self.values.get(k) != v}
        if changed:
            self.values.update(changed)
            self.emit_properties_changed(changed)

    def invalidate(self, *names: str) -> None:
        """Signal that properties no longer hold a value (BlueZ does this for RSSI)."""
        self.emit_properties_changed({}, list(names))


class AdapterProps(_Bag):
    """org.bluez.Adapter1; `on_powered` runs when a client sets Powered."""

    def __init__(self, address: str, on_powered: Callable[[bool], None]) -> None:
        super().__init__(policy.ADAPTER, {
            "Address": address, "AddressType": "public", "Name": "rpm-gateway-hub",
            "Alias": "rpm-gateway-hub", "Powered": True, "Discovering": False,
            "Discoverable": False, "Pairable": True, "UUIDs": [],
            "Roles": ["central", "peripheral"],
        })
        self._on_powered = on_powered

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> DBusStr:
        return str(self.values["Address"])

    @dbus_property(access=PropertyAccess.READ)
    def AddressType(self) -> DBusStr:
        return str(self.values["AddressType"])

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> DBusStr:
        return str(self.values["Name"])

    @dbus_property(access=PropertyAccess.READ)
    def Alias(self) -> DBusStr:
        return str(self.values["Alias"])

    @dbus_property()
    def Powered(self) -> DBusBool:
        return bool(self.values["Powered"])

    @Powered.setter  # type: ignore[no-redef]
    def Powered(self, value: DBusBool) -> None:
        self._on_powered(bool(value))

    @dbus_property(access=PropertyAccess.READ)
    def Discovering(self) -> DBusBool:
        return bool(self.values["Discovering"])

    @dbus_property(access=PropertyAccess.READ)
    def Discoverable(self) -> DBusBool:
        return bool(self.values["Discoverable"])

    @dbus_property(access=PropertyAccess.READ)
    def Pairable(self) -> DBusBool:
        return bool(self.values["Pairable"])

    @dbus_property(access=PropertyAccess.READ)
    def UUIDs(self) -> DBusStrList:
        return list(self.values["UUIDs"])

    @dbus_property(access=PropertyAccess.READ)
    def Roles(self) -> DBusStrList:
        return list(self.values["Roles"])


class DeviceProps(_Bag):
    """org.bluez.Device1 of one remote device."""

    def __init__(self, address: str, adapter_path: str) -> None:
        super().__init__(policy.DEVICE, {
            "Address": address, "AddressType": "random", "Name": "",
            "Alias": address.replace(":", "-"), "Adapter": adapter_path, "Paired": False,
            "Bonded": False, "Trusted": False, "Blocked": False, "Connected": False,
            "ServicesResolved": False, "LegacyPairing": False, "RSSI": -127, "TxPower": 0,
            "UUIDs": [], "ManufacturerData": {}, "ServiceData": {},
        })

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> DBusStr:
        return str(self.values["Address"])

    @dbus_property(access=PropertyAccess.READ)
    def AddressType(self) -> DBusStr:
        return str(self.values["AddressType"])

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> DBusStr:
        return str(self.values["Name"])

    @dbus_property(access=PropertyAccess.READ)
    def Alias(self) -> DBusStr:
        return str(self.values["Alias"])

    @dbus_property(access=PropertyAccess.READ)
    def Adapter(self) -> DBusObjectPath:
        return str(self.values["Adapter"])

    @dbus_property(access=PropertyAccess.READ)
    def Paired(self) -> DBusBool:
        return bool(self.values["Paired"])

    @dbus_property(access=PropertyAccess.READ)
    def Bonded(self) -> DBusBool:
        return bool(self.values["Bonded"])

    @dbus_property()
    def Trusted(self) -> DBusBool:
        return bool(self.values["Trusted"])

    @Trusted.setter  # type: ignore[no-redef]
    def Trusted(self, value: DBusBool) -> None:
        self.update(Trusted=bool(value))

    @dbus_property(access=PropertyAccess.READ)
    def Blocked(self) -> DBusBool:
        return bool(self.values["Blocked"])

    @dbus_property(access=PropertyAccess.READ)
    def Connected(self) -> DBusBool:
        return bool(self.values["Connected"])

    @dbus_property(access=PropertyAccess.READ)
    def ServicesResolved(self) -> DBusBool:
        return bool(self.values["ServicesResolved"])

    @dbus_property(access=PropertyAccess.READ)
    def LegacyPairing(self) -> DBusBool:
        return bool(self.values["LegacyPairing"])

    @dbus_property(access=PropertyAccess.READ)
    def RSSI(self) -> DBusInt16:
        return int(self.values["RSSI"])

    @dbus_property(access=PropertyAccess.READ)
    def TxPower(self) -> DBusInt16:
        return int(self.values["TxPower"])

    @dbus_property(access=PropertyAccess.READ)
    def UUIDs(self) -> DBusStrList:
        return list(self.values["UUIDs"])

    @dbus_property(access=PropertyAccess.READ)
    def ManufacturerData(self) -> DBusManufacturerData:
        return dict(self.values["ManufacturerData"])

    @dbus_property(access=PropertyAccess.READ)
    def ServiceData(self) -> DBusServiceData:
        return dict(self.values["ServiceData"])


class ServiceProps(_Bag):
    """org.bluez.GattService1."""

    def __init__(self, uuid: str, device_path: str, handle: int) -> None:
        super().__init__(policy.GATT_SERVICE, {
            "UUID": uuid, "Device": device_path, "Primary": True, "Includes": [],
            "Handle": handle,
        })

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> DBusStr:
        return str(self.values["UUID"])

    @dbus_property(access=PropertyAccess.READ)
    def Device(self) -> DBusObjectPath:
        return str(self.values["Device"])

    @dbus_property(access=PropertyAccess.READ)
    def Primary(self) -> DBusBool:
        return bool(self.values["Primary"])

    @dbus_property(access=PropertyAccess.READ)
    def Includes(self) -> DBusPathList:
        return list(self.values["Includes"])

    @dbus_property(access=PropertyAccess.READ)
    def Handle(self) -> DBusUInt16:
        return int(self.values["Handle"])


class CharacteristicProps(_Bag):
    """org.bluez.GattCharacteristic1."""

    def __init__(
        self, uuid: str, service_path: str, handle: int, flags: list[str], mtu: int
    ) -> None:
        super().__init__(policy.GATT_CHARACTERISTIC, {
            "UUID": uuid, "Service": service_path, "Value": b"", "Notifying": False,
            "Flags": flags, "Handle": handle, "MTU": mtu,
        })

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> DBusStr:
        return str(self.values["UUID"])

    @dbus_property(access=PropertyAccess.READ)
    def Service(self) -> DBusObjectPath:
        return str(self.values["Service"])

    @dbus_property(access=PropertyAccess.READ)
    def Value(self) -> DBusBytes:
        return bytes(self.values["Value"])

    @dbus_property(access=PropertyAccess.READ)
    def Notifying(self) -> DBusBool:
        return bool(self.values["Notifying"])

    @dbus_property(access=PropertyAccess.READ)
    def Flags(self) -> DBusStrList:
        return list(self.values["Flags"])

    @dbus_property(access=PropertyAccess.READ)
    def Handle(self) -> DBusUInt16:
        return int(self.values["Handle"])

    @dbus_property(access=PropertyAccess.READ)
    def MTU(self) -> DBusUInt16:
        return int(self.values["MTU"])


class DescriptorProps(_Bag):
    """org.bluez.GattDescriptor1."""

    def __init__(self, uuid: str, characteristic_path: str, handle: int) -> None:
        super().__init__(policy.GATT_DESCRIPTOR, {
            "UUID": uuid, "Characteristic": characteristic_path, "Value": b"",
            "Flags": ["read", "write"], "Handle": handle,
        })

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> DBusStr:
        return str(self.values["UUID"])

    @dbus_property(access=PropertyAccess.READ)
    def Characteristic(self) -> DBusObjectPath:
        return str(self.values["Characteristic"])

    @dbus_property(access=PropertyAccess.READ)
    def Value(self) -> DBusBytes:
        return bytes(self.values["Value"])

    @dbus_property(access=PropertyAccess.READ)
    def Flags(self) -> DBusStrList:
        return list(self.values["Flags"])

    @dbus_property(access=PropertyAccess.READ)
    def Handle(self) -> DBusUInt16:
        return int(self.values["Handle"])
