"""The BlueZ stand-in behaves as bluetoothd does where a client can tell (policy.py, by name).

Driven through bleak's real BlueZ backend and raw D-Bus calls on a private dbus-daemon, with
the simulated devices on the virtual radio behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from bleak import BleakClient, BleakScanner
from bleak.exc import BleakDBusError
from bumble.gatt import Characteristic, CharacteristicValue, Service
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from drivers import uuids
from drivers.simulated.blood_pressure import SimulatedBloodPressureMonitor, demo_cuff
from drivers.simulated.weight_scale import demo_scale
from gateway.ble.bluez_agent import PairingAgent, device_path
from gateway.sim.bluez.bus import PrivateBus, use_as_system_bus
from gateway.sim.bluez.daemon import BluezStandIn
from gateway.sim.bluez.policy import BluezPolicy
from gateway.sim.radio import VirtualRadio

pytestmark = pytest.mark.integration

SCALE = "C0:00:00:00:5C:01"
CUFF = "C0:00:00:00:BC:01"
SCALE_PATH = "/org/bluez/hci0/dev_C0_00_00_00_5C_01"
WEIGHT_MEASUREMENT = f"0000{uuids.WEIGHT_MEASUREMENT:04x}-0000-1000-8000-00805f9b34fb"


@contextlib.asynccontextmanager
async def standin(
    *devices: Any, policy: BluezPolicy | None = None
) -> AsyncIterator[tuple[BluezStandIn, MessageBus]]:
    """The stand-in with `devices` on the air, and a raw client bus to it."""
    async with PrivateBus() as bus, VirtualRadio() as radio:
        for device in devices:
            await radio.add_peripheral(device)
        with use_as_system_bus(bus.address):
            async with BluezStandIn(radio, bluez_policy=policy) as bluez:
                client = await MessageBus(bus_type=BusType.SYSTEM).connect()
                try:
                    yield bluez, client
                finally:
                    client.disconnect()


async def call(bus: MessageBus, path: str, interface: str, member: str, signature: str = "",
               body: list[Any] | None = None) -> Message:
    reply = await bus.call(Message(destination="org.bluez", path=path, interface=interface,
                                   member=member, signature=signature, body=body or []))
    assert reply is not None
    return reply


async def acquire(path: str, member: str) -> tuple[MessageBus, int, int]:
    """AcquireNotify/AcquireWrite on a bus that passes fds: (the bus, the fd, the MTU)."""
    bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
    reply = await bus.call(Message(
        destination="org.bluez", path=path, interface="org.bluez.GattCharacteristic1",
        member=member, signature="a{sv}", body=[{}]))
    assert reply is not None and reply.message_type == MessageType.METHOD_RETURN, reply
    return bus, reply.unix_fds[reply.body[0]], int(reply.body[1])


async def managed(bus: MessageBus) -> dict[str, Any]:
    reply = await call(bus, "/", "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
    return dict(reply.body[0])


async def test_bluez_gatt_objects_follow_bluetoothd() -> None:
    # GAP is not exported; characteristic paths carry the declaration handle; an unbonded
    # device's GATT objects go with its link; the MTU is really exchanged.
    scale = demo_scale(SCALE, readings=1)
    async with standin(scale) as (_bluez, raw):
        device = await BleakScanner.find_device_by_address(SCALE, timeout=5)
        assert device is not None
        async with BleakClient(device, timeout=10) as client:
            services = {s.uuid[4:8] for s in client.services}
            assert "1800" not in services and "181d" in services
            objects = await managed(raw)
            chars = {p: v["org.bluez.GattCharacteristic1"] for p, v in objects.items()
                     if "org.bluez.GattCharacteristic1" in v}
            for path, props in chars.items():
                assert int(path[-4:], 16) == props["Handle"].value - 1  # declaration handle
            assert {p["MTU"].value for p in chars.values()} == {247}  # min(517, device's 247)
        await asyncio.sleep(0.2)
        objects = await managed(raw)
        assert not [p for p in objects if p.startswith(SCALE_PATH + "/")]


async def test_bluez_repeated_start_notify_is_a_no_op_and_stop_without_start_fails() -> None:
    scale = demo_scale(SCALE, readings=2)
    async with standin(scale) as (_bluez, raw):
        device = await BleakScanner.find_device_by_address(SCALE, timeout=5)
        assert device is not None
        got: list[bytes] = []
        async with BleakClient(device, timeout=10) as client:
            char = client.services.get_characteristic(WEIGHT_MEASUREMENT)
            assert char is not None
            path = char.obj[0]
            await client.start_notify(char, lambda _c, d: got.append(bytes(d)))
            again = await call(raw, path, "org.bluez.GattCharacteristic1", "StartNotify")
            assert again.message_type == MessageType.METHOD_RETURN
            again = await call(raw, path, "org.bluez.GattCharacteristic1", "StartNotify")
            assert again.message_type == MessageType.METHOD_RETURN  # same client: no-op
            other = await MessageBus(bus_type=BusType.SYSTEM).connect()
            stop = await call(other, path, "org.bluez.GattCharacteristic1", "StopNotify")
            other.disconnect()
            assert stop.error_name == "org.bluez.Error.Failed"  # that client never started one
            await asyncio.sleep(1.0)
        assert len(got) == 2  # each indication once, though three sessions were asked for


async def test_bluez_bonded_devices_keep_objects_and_reencrypt() -> None:
    cuff = demo_cuff(CUFF, readings=1, bonding_required=True)
    async with standin(cuff) as (bluez, raw):
        device = await BleakScanner.find_device_by_address(CUFF, timeout=5)
        assert device is not None
        for _ in range(2):
            async with BleakClient(device, timeout=10) as client:
                await client.pair()
                assert bluez.device_props(CUFF)["Bonded"]  # type: ignore[index]
        await asyncio.sleep(0.2)
        cuff_path = "/org/bluez/hci0/dev_C0_00_00_00_BC_01"
        assert [p for p in await managed(raw) if p.startswith(cuff_path + "/service")]
        await bluez.restart()  # the bond is kept in the store; the device comes back paired
        raw2 = await MessageBus(bus_type=BusType.SYSTEM).connect()
        objects = await managed(raw2)
        raw2.disconnect()
        assert objects[cuff_path]["org.bluez.Device1"]["Paired"].value is True
        assert bluez.calls.count(("Pair", cuff_path)) == 1  # the second session re-encrypted


async def test_bluez_discovery_sessions_rssi_and_temporary_devices() -> None:
    scale = demo_scale(SCALE, readings=1)
    policy = BluezPolicy(temporary_timeout_s=1.0)
    async with standin(scale, policy=policy) as (_bluez, raw):
        adapter = "/org/bluez/hci0"
        ok = await call(raw, adapter, "org.bluez.Adapter1", "StartDiscovery")
        assert ok.message_type == MessageType.METHOD_RETURN
        twice = await call(raw, adapter, "org.bluez.Adapter1", "StartDiscovery")
        assert twice.error_name == "org.bluez.Error.InProgress"
        deadline = time.monotonic() + 5
        while SCALE_PATH not in await managed(raw):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        stop = await call(raw, adapter, "org.bluez.Adapter1", "StopDiscovery")
        assert stop.message_type == MessageType.METHOD_RETURN
        again = await call(raw, adapter, "org.bluez.Adapter1", "StopDiscovery")
        assert again.error_name == "org.bluez.Error.Failed"  # "No discovery started"
        await asyncio.sleep(2.5)  # past TemporaryTimeout: an unpaired device is forgotten
        assert SCALE_PATH not in await managed(raw)
        gone = await call(raw, SCALE_PATH, "org.bluez.Device1", "Connect")
        assert gone.error_name == "org.freedesktop.DBus.Error.UnknownObject"


async def test_bluez_acquire_notify_hands_a_socket_with_the_mtu() -> None:
    scale = demo_scale(SCALE, readings=1)
    async with standin(scale) as (_bluez, _raw):
        device = await BleakScanner.find_device_by_address(SCALE, timeout=5)
        assert device is not None
        async with BleakClient(device, timeout=10) as client:
            char = client.services.get_characteristic(WEIGHT_MEASUREMENT)
            assert char is not None
            fd_bus, fd, mtu = await acquire(char.obj[0], "AcquireNotify")
            assert mtu == 247
            loop = asyncio.get_running_loop()
            data = await asyncio.wait_for(loop.run_in_executor(None, os.read, fd, 512), 5)
            os.close(fd)
            fd_bus.disconnect()
            assert data[0] & 0x02  # a Weight Measurement with a time stamp


class _CuffWithControlPoint(SimulatedBloodPressureMonitor):
    """A cuff with a vendor write-without-response characteristic (as some send commands)."""

    written: ClassVar[list[bytes]] = []

    def _standard_services(self) -> list[Service]:
        def write(_connection: Any, value: bytes) -> None:
            self.written.append(bytes(value))

        control = Characteristic(
            "12345678-1234-5678-1234-56789abcdef0",
            Characteristic.Properties.WRITE_WITHOUT_RESPONSE, Characteristic.WRITEABLE,
            CharacteristicValue(write=write))
        vendor = Service("12345678-1234-5678-1234-56789abcdef1", [control])
        return [*super()._standard_services(), vendor]


async def test_bluez_acquire_write_turns_each_packet_into_a_write_command() -> None:
    cuff = _CuffWithControlPoint(demo_cuff(CUFF, readings=1).script, intermediate_frames=0)
    async with standin(cuff) as (_bluez, _raw):
        device = await BleakScanner.find_device_by_address(CUFF, timeout=5)
        assert device is not None
        async with BleakClient(device, timeout=10) as client:
            char = client.services.get_characteristic("12345678-1234-5678-1234-56789abcdef0")
            assert char is not None
            fd_bus, fd, mtu = await acquire(char.obj[0], "AcquireWrite")
            assert mtu == 247  # the link's MTU
            os.write(fd, b"\x01\x02")
            os.write(fd, b"\x03")
            deadline = time.monotonic() + 5
            while len(_CuffWithControlPoint.written) < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            os.close(fd)
            fd_bus.disconnect()
    assert _CuffWithControlPoint.written == [b"\x01\x02", b"\x03"]


async def test_bluez_passkey_entry_through_our_agent_bonds_only_with_the_right_digits() -> None:
    # A cuff with a display only shows six digits; the hub types them (the technician's
    # prompt, here a callback reading the cuff's screen). Wrong digits fail the pairing.
    cuff = demo_cuff(CUFF, readings=1, bonding_required=True, pairing_io="display_only")
    async with standin(cuff) as (bluez, _raw):
        device = await BleakScanner.find_device_by_address(CUFF, timeout=5)
        assert device is not None
        path = device_path(CUFF)

        shown = cuff.pairing_delegate.shown

        async def read_screen() -> int:
            """The technician reads the cuff's screen once it shows this pairing's digits."""
            seen = len(agent.requests)
            while len(shown) <= seen:
                await asyncio.sleep(0.01)
            return shown[-1]

        async def wrong() -> int | None:
            return (await read_screen() + 1) % 1_000_000

        async def typed() -> int | None:
            return await read_screen()

        async with PairingAgent(capability="KeyboardDisplay") as agent:
            async with BleakClient(device, timeout=10) as client:
                with agent.expect(path, passkey=wrong), pytest.raises(BleakDBusError):
                    await client.pair()
            assert not await bluez.radio.has_bond(CUFF)
            async with BleakClient(device, timeout=10) as client:
                with agent.expect(path, passkey=typed):
                    await client.pair()
            assert await bluez.radio.has_bond(CUFF)
        assert [r.method for r in agent.requests].count("RequestPasskey") == 2
        assert len(cuff.pairing_delegate.shown) == 2
