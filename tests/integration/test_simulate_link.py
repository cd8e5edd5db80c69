"""The split virtual radio in one loop: the hub's host over HCI/TCP, the devices on a DeviceField.

What the simulate process must do when the agent dies: drop the hub's links (the devices see a
disconnection and keep what was never confirmed), and give the next agent a fresh controller.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.device import BLEDevice
from bleak.exc import BleakError, BleakGATTProtocolError
from bleak.uuids import normalize_uuid_16

from drivers.simulated import demo_cuff, demo_scale
from gateway.sim.backend import VirtualClientBackend, VirtualScannerBackend
from gateway.sim.field import DeviceField
from gateway.sim.radio import VirtualRadio, parse_hci_link

pytestmark = pytest.mark.integration

WEIGHT_MEASUREMENT = normalize_uuid_16(0x2A9D)
BPM = normalize_uuid_16(0x2A35)
SCALE = "C0:00:00:00:5C:01"
CUFF = "C0:00:00:00:BC:01"
WAIT = 3.0


@pytest.fixture
async def field() -> AsyncIterator[DeviceField]:
    """A device field serving the hub's controller on a free loopback port."""
    async with DeviceField() as f:
        yield f


async def served(field: DeviceField) -> str:
    """Start serving; the link string an agent would be configured with."""
    host, port = await field.serve("127.0.0.1", 0)
    return f"tcp:{host}:{port}"


async def find(radio: VirtualRadio, address: str) -> BLEDevice:
    """The device as bleak's scanner reports it through the remote controller."""
    device = await BleakScanner.find_device_by_address(
        address, timeout=WAIT, backend=VirtualScannerBackend, radio=radio  # type: ignore[call-arg]
    )
    assert device is not None, f"{address} not advertising"
    return device


def client(radio: VirtualRadio, device: BLEDevice) -> BleakClient:
    """A bleak client on the remote-controller radio."""
    return BleakClient(device, timeout=WAIT, backend=VirtualClientBackend, radio=radio)


def kill(radio: VirtualRadio) -> None:
    """What kill -9 of the agent does to the socket: gone, no HCI goodbye."""
    transport: Any = radio._transport
    transport.sink.transport.abort()


async def until(condition: Any, timeout: float = WAIT) -> None:
    """Poll a condition (bounded)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_killed_hub_drops_its_links_and_the_next_one_gets_the_rest(
    field: DeviceField,
) -> None:
    scale = await field.add_peripheral(demo_scale(SCALE, readings=20))
    link = await served(field)
    got: list[bytes] = []
    first_frame = asyncio.Event()

    def on_frame(_c: BleakGATTCharacteristic, data: bytearray) -> None:
        got.append(bytes(data))
        first_frame.set()

    radio = VirtualRadio(hci=link)
    await radio.__aenter__()
    c = client(radio, await find(radio, SCALE))
    await c.connect()
    await c.start_notify(WEIGHT_MEASUREMENT, on_frame)
    await asyncio.wait_for(first_frame.wait(), WAIT)
    kill(radio)
    await until(lambda: not scale.is_connected)
    assert 1 <= len(scale.sent) < 20, "killed mid-transfer"
    assert scale.unsent == 20 - len(scale.sent)  # the device kept what was never confirmed
    await until(lambda: scale.is_advertising)  # and offers it again
    confirmed_first = list(scale.sent)

    # The next agent: a fresh controller (its HCI Reset and set-up work), the rest arrives.
    rest: list[bytes] = []
    async with VirtualRadio(hci=link) as second, client(second, await find(second, SCALE)) as c2:
        await c2.start_notify(WEIGHT_MEASUREMENT, lambda _c, d: rest.append(bytes(d)))
        await scale.wait_sent(20, WAIT)
    assert field.server.sessions == 2
    assert scale.sent[: len(confirmed_first)] == confirmed_first
    assert set(rest) >= set(scale.sent[len(confirmed_first):])
    assert len(set(scale.sent)) == 20  # every record confirmed exactly once overall


async def test_a_bonded_cuff_accepts_re_pairing_from_a_hub_that_lost_its_keys(
    field: DeviceField,
) -> None:
    cuff = await field.add_peripheral(demo_cuff(CUFF, readings=2, bonding_required=True))
    link = await served(field)
    for round_ in range(2):  # the second hub has an empty key store, the cuff still has keys
        async with VirtualRadio(hci=link) as radio, client(radio, await find(radio, CUFF)) as c:
            await c.pair()
            assert await radio.has_bond(CUFF)
            await c.start_notify(BPM, lambda _c, _d: None)
            await cuff.wait_sent(2 + round_, WAIT)
        await cuff.wait_disconnected(WAIT)
        await cuff.measure(demo_cuff(readings=1).script.stored[0])


async def test_a_second_hub_host_takes_over_from_a_silent_one(field: DeviceField) -> None:
    await field.add_peripheral(demo_scale(SCALE, readings=1))
    link = await served(field)
    async with VirtualRadio(hci=link) as first:
        async with VirtualRadio(hci=link) as second:
            assert field.server.sessions == 2
            await find(second, SCALE)
        assert not first.hub.connections  # hung up on; closing it below is harmless


async def test_a_garbled_hci_stream_drops_that_host_only(field: DeviceField) -> None:
    await field.add_peripheral(demo_scale(SCALE, readings=1))
    host, port = parse_hci_link(await served(field))
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\x7f" * 8)  # no HCI packet type 0x7f
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), WAIT) == b""  # hung up
    writer.close()
    async with VirtualRadio(hci=f"tcp:{host}:{port}") as radio:
        await find(radio, SCALE)


async def test_nothing_serving_the_link_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ConnectionError, match="rpm-gateway simulate"):
        async with VirtualRadio(hci=f"tcp:127.0.0.1:{port}", op_timeout=0.5):
            pass


@pytest.mark.parametrize("spec", ["127.0.0.1:7000", "tcp:7000", "udp:1.2.3.4:5", "tcp:h:0",
                                  "tcp:h:70000", "tcp:h:x"])
def test_link_spec_must_be_tcp_host_port(spec: str) -> None:
    with pytest.raises(ValueError, match="tcp:HOST:PORT"):
        parse_hci_link(spec)
    assert parse_hci_link("tcp:127.0.0.1:7000") == ("127.0.0.1", 7000)


async def test_adverts_carry_each_devices_own_rssi_across_the_link(field: DeviceField) -> None:
    await field.add_peripheral(demo_scale(SCALE, readings=1, rssi=-71))
    await field.add_peripheral(demo_cuff(CUFF, readings=1, rssi=-48))
    async with VirtualRadio(hci=await served(field)) as radio:
        seen: dict[str, int] = {}
        async with BleakScanner(lambda d, a: seen.__setitem__(d.address, a.rssi),
                                backend=VirtualScannerBackend, radio=radio):
            await until(lambda: len(seen) == 2)
    assert seen == {SCALE: -71, CUFF: -48}


async def test_scripted_att_errors_last_n_connections_then_the_device_behaves(
    field: DeviceField,
) -> None:
    scale = await field.add_peripheral(demo_scale(SCALE, readings=1, att_error_connections=1))
    async with VirtualRadio(hci=await served(field)) as radio:
        async with client(radio, await find(radio, SCALE)) as c:
            with pytest.raises(BleakGATTProtocolError) as e:
                await c.read_gatt_char(normalize_uuid_16(0x2A29))  # Manufacturer Name
            assert e.value.code == 0x0E  # Unlikely Error
            with pytest.raises(BleakGATTProtocolError):
                await c.read_gatt_char(normalize_uuid_16(0x2A19))  # Battery Level
            with pytest.raises(BleakGATTProtocolError):
                await c.start_notify(WEIGHT_MEASUREMENT, lambda _c, _d: None)
        await scale.wait_disconnected(WAIT)
        assert scale.unsent == 1  # nothing given away
        got: list[bytes] = []
        async with client(radio, await find(radio, SCALE)) as c:
            assert bytes(await c.read_gatt_char(normalize_uuid_16(0x2A29))) == b"Simulated Health"
            await c.start_notify(WEIGHT_MEASUREMENT, lambda _c, d: got.append(bytes(d)))
            await scale.wait_sent(1, WAIT)
    assert got == scale.sent


async def test_a_never_answering_device_holds_the_link_and_says_nothing(field: DeviceField) -> None:
    scale = await field.add_peripheral(demo_scale(SCALE, readings=1, never_answer_connections=1,
                                                  idle_timeout_s=0.5))
    async with VirtualRadio(hci=await served(field), op_timeout=0.5) as radio:
        async with client(radio, await find(radio, SCALE)) as c:  # setup is answered
            with pytest.raises(TimeoutError):
                await c.read_gatt_char(normalize_uuid_16(0x2A29))
            with pytest.raises(TimeoutError):
                await c.start_notify(WEIGHT_MEASUREMENT, lambda _c, _d: None)
            await asyncio.sleep(1.0)  # longer than idle_timeout_s: a silent device does not hang up
            assert c.is_connected and scale.is_connected
        await scale.wait_disconnected(WAIT)
        assert scale.unsent == 1
        async with client(radio, await find(radio, SCALE)) as c:
            await c.start_notify(WEIGHT_MEASUREMENT, lambda _c, _d: None)
            await scale.wait_sent(1, WAIT)


async def test_a_device_silent_from_connect_fails_the_connection_setup(field: DeviceField) -> None:
    await field.add_peripheral(demo_scale(SCALE, readings=1, never_answer_connections=1,
                                          never_answer_from="connect"))
    async with VirtualRadio(hci=await served(field), op_timeout=0.5) as radio:
        c = BleakClient(await find(radio, SCALE), timeout=1.0, backend=VirtualClientBackend,
                        radio=radio)
        with pytest.raises(TimeoutError):
            await c.connect()  # the MTU exchange is never answered


async def test_a_cuff_that_forgets_its_bond_refuses_the_hubs_keys(field: DeviceField) -> None:
    cuff = await field.add_peripheral(demo_cuff(CUFF, readings=3, bonding_required=True,
                                                forget_bond_after=1, drop_link_after=1))
    async with VirtualRadio(hci=await served(field)) as radio:
        async with client(radio, await find(radio, CUFF)) as c:
            await c.pair()
            await c.start_notify(BPM, lambda _c, _d: None)
            await cuff.wait_sent(1, WAIT)
        await cuff.wait_disconnected(WAIT)
        assert cuff.unsent == 2 and await radio.has_bond(CUFF)
        with pytest.raises(BleakError, match="authentication"):
            await client(radio, await find(radio, CUFF)).connect()
        assert cuff.unsent == 2  # what it still holds stays on the device
