"""The virtual radio as the gateway sees it: only bleak's public API, real ATT/GATT/SMP underneath.

Devices are bumble GATT servers from drivers.simulated; every assertion on bytes compares with
what the project's codec encodes, so these tests also pin the wire format end to end.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest
from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError, BleakGATTProtocolError, BleakGATTProtocolErrorCode
from bleak.uuids import normalize_uuid_16

from drivers.codec.blood_pressure import encode_blood_pressure_measurement
from drivers.codec.weight import encode_weight_measurement
from drivers.simulated import demo_bp_readings, demo_cuff, demo_scale, demo_weight_readings
from gateway.sim.backend import VirtualClientBackend, VirtualScannerBackend
from gateway.sim.radio import Advert, VirtualRadio

BP_SERVICE = normalize_uuid_16(0x1810)
WEIGHT_SERVICE = normalize_uuid_16(0x181D)
BPM = normalize_uuid_16(0x2A35)
WEIGHT_MEASUREMENT = normalize_uuid_16(0x2A9D)
WAIT = 2.0  # bound for waiting on one event; the events themselves take milliseconds


async def find(radio: VirtualRadio, address: str) -> BLEDevice:
    """The device as bleak's scanner reports it."""
    # bleak forwards extra keywords to the backend, though its ExtraArgs type does not list them.
    device = await BleakScanner.find_device_by_address(
        address, timeout=WAIT, backend=VirtualScannerBackend, radio=radio  # type: ignore[call-arg]
    )
    assert device is not None, f"{address} not advertising"
    return device


def client(
    radio: VirtualRadio,
    device: BLEDevice | str,
    on_disconnect: Callable[[BleakClient], None] | None = None,
    **kwargs: object,
) -> BleakClient:
    """A bleak client on the virtual radio."""
    return BleakClient(
        device,
        disconnected_callback=on_disconnect,
        timeout=WAIT,
        backend=VirtualClientBackend,
        radio=radio,
        **kwargs,  # type: ignore[arg-type]
    )


class Inbox:
    """Collects notification payloads and lets a test wait for a number of them."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self._changed = asyncio.Event()

    def __call__(self, _char: BleakGATTCharacteristic, data: bytearray) -> None:
        self.frames.append(bytes(data))
        self._changed.set()

    async def wait_for(self, count: int) -> list[bytes]:
        async with asyncio.timeout(WAIT):
            while len(self.frames) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.frames


async def test_scanner_filters_by_service_uuid_and_reports_advert_fields(radio: VirtualRadio) -> None:
    cuff = await radio.add_peripheral(
        demo_cuff(
            readings=1, manufacturer_data={0x0D8C: b"\x01\x02"}, service_data={0x1810: b"\x07"}, rssi=-71
        )
    )
    await radio.add_peripheral(demo_scale(readings=1))
    seen: dict[str, AdvertisementData] = {}
    got_cuff = asyncio.Event()

    def on_advert(device: BLEDevice, adv: AdvertisementData) -> None:
        seen[device.address] = adv
        got_cuff.set()

    async with BleakScanner(on_advert, [BP_SERVICE], backend=VirtualScannerBackend, radio=radio):
        await asyncio.wait_for(got_cuff.wait(), WAIT)

    assert set(seen) == {cuff.address}  # the scale advertises 0x181D and is filtered out
    adv = seen[cuff.address]
    assert adv.local_name == "SIM Cuff"
    assert adv.service_uuids == [BP_SERVICE]
    assert adv.manufacturer_data == {0x0D8C: b"\x01\x02"}
    assert adv.service_data == {BP_SERVICE: b"\x07"}
    assert adv.rssi == -71


async def test_connect_discovers_services_and_reads_device_information(radio: VirtualRadio) -> None:
    scale = await radio.add_peripheral(demo_scale(readings=1, serial="WS-0042", mtu=185))
    async with client(radio, await find(radio, scale.address)) as c:
        assert c.is_connected
        assert c.mtu_size == 185  # min(517 asked by the hub, 185 offered by the scale)
        assert c.services.get_service(WEIGHT_SERVICE) is not None
        for uuid16, text in ((0x2A29, "Simulated Health"), (0x2A24, "SIM-WS1"), (0x2A25, "WS-0042")):
            assert await c.read_gatt_char(normalize_uuid_16(uuid16)) == text.encode()
        assert await c.read_gatt_char(normalize_uuid_16(0x2A23)) == bytes.fromhex(scale.script.system_id)
        assert await c.read_gatt_char(normalize_uuid_16(0x2A19)) == bytes([78])
        char = c.services.get_characteristic(WEIGHT_MEASUREMENT)
        assert char is not None and char.properties == ["indicate"]
        assert [d.uuid for d in char.descriptors] == [normalize_uuid_16(0x2902)]
    assert not c.is_connected

    # bleak's services= filter reaches the backend: only the asked-for service is discovered.
    async with client(radio, scale.address, services=[WEIGHT_SERVICE]) as c:
        assert [s.uuid for s in c.services] == [WEIGHT_SERVICE]


async def test_indications_carry_the_exact_encoded_bytes(radio: VirtualRadio) -> None:
    readings = demo_bp_readings(3)
    cuff = await radio.add_peripheral(demo_cuff(readings=readings, bonding_required=False))
    inbox = Inbox()
    async with client(radio, await find(radio, cuff.address)) as c:
        await c.start_notify(BPM, inbox)
        frames = await inbox.wait_for(3)
    assert frames == [encode_blood_pressure_measurement(r) for r in readings]
    assert cuff.sent == frames


async def test_unbonded_cccd_write_fails_like_bluez_and_pairing_fixes_it(radio: VirtualRadio) -> None:
    cuff = await radio.add_peripheral(demo_cuff(readings=2, bonding_required=True))
    inbox = Inbox()
    async with client(radio, await find(radio, cuff.address)) as c:
        with pytest.raises(BleakGATTProtocolError) as failure:
            await c.start_notify(BPM, inbox)
        assert failure.value.code == BleakGATTProtocolErrorCode.INSUFFICIENT_ENCRYPTION
        assert "insufficient encryption" in str(failure.value).lower()
        await c.pair()
        await c.start_notify(BPM, inbox)
        await inbox.wait_for(2)
    assert inbox.frames == cuff.sent


async def test_bond_survives_a_reconnection(radio: VirtualRadio) -> None:
    cuff = await radio.add_peripheral(demo_cuff(readings=1, bonding_required=True))
    first, second = Inbox(), Inbox()
    async with client(radio, await find(radio, cuff.address), pair=True) as c:
        await c.start_notify(BPM, first)
        await first.wait_for(1)
    await cuff.wait_disconnected(WAIT)

    await cuff.measure(demo_bp_readings(1)[0])
    # A new client and no pair(): the stored bond encrypts the link, as BlueZ does.
    async with client(radio, await find(radio, cuff.address)) as c:
        await c.start_notify(BPM, second)
        await second.wait_for(1)
    assert first.frames + second.frames == cuff.sent


async def test_device_hanging_up_fires_disconnected_callback(radio: VirtualRadio) -> None:
    scale = await radio.add_peripheral(demo_scale(readings=1, quiet_s=0.05))
    gone: asyncio.Future[BleakClient] = asyncio.get_running_loop().create_future()
    inbox = Inbox()
    c = client(radio, await find(radio, scale.address), gone.set_result)
    await c.connect()
    await c.start_notify(WEIGHT_MEASUREMENT, inbox)
    assert await asyncio.wait_for(gone, WAIT) is c
    assert not c.is_connected
    with pytest.raises(BleakError):  # services are dropped with the link, as on BlueZ
        await c.read_gatt_char(normalize_uuid_16(0x2A29))


async def test_device_switched_off_mid_connection_fires_disconnected_callback(radio: VirtualRadio) -> None:
    scale = await radio.add_peripheral(demo_scale(readings=1))
    gone = asyncio.Event()
    async with client(radio, scale.address, lambda _c: gone.set()) as c:
        await radio.remove_peripheral(scale)  # out of range / batteries out
        await asyncio.wait_for(gone.wait(), WAIT)
        assert not c.is_connected
    assert scale.address not in radio.peripherals


async def test_drop_link_after_cuts_the_transfer_and_the_rest_comes_next_time(radio: VirtualRadio) -> None:
    readings = demo_weight_readings(3)
    scale = await radio.add_peripheral(demo_scale(readings=readings, drop_link_after=1))
    first, second = Inbox(), Inbox()
    dropped = asyncio.Event()
    async with client(radio, await find(radio, scale.address), lambda _c: dropped.set()) as c:
        await c.start_notify(WEIGHT_MEASUREMENT, first)
        await asyncio.wait_for(dropped.wait(), WAIT)
    assert first.frames == [encode_weight_measurement(readings[0])]
    assert scale.unsent == 2  # it kept the unconfirmed ones and advertises again

    async with client(radio, await find(radio, scale.address)) as c:
        await c.start_notify(WEIGHT_MEASUREMENT, second)
        await second.wait_for(2)
    assert second.frames == [encode_weight_measurement(r) for r in readings[1:]]


async def test_two_scanners_share_the_radio(radio: VirtualRadio) -> None:
    cuff = await radio.add_peripheral(demo_cuff(readings=1))
    events = [asyncio.Event(), asyncio.Event()]

    def callback(i: int) -> Callable[[BLEDevice, AdvertisementData], None]:
        def on_advert(device: BLEDevice, _adv: AdvertisementData) -> None:
            if device.address == cuff.address:
                events[i].set()

        return on_advert

    a = BleakScanner(callback(0), backend=VirtualScannerBackend, radio=radio)
    b = BleakScanner(callback(1), backend=VirtualScannerBackend, radio=radio)
    await a.start()
    await b.start()
    await asyncio.wait_for(asyncio.gather(events[0].wait(), events[1].wait()), WAIT)
    await a.stop()
    events[1].clear()
    await asyncio.wait_for(events[1].wait(), WAIT)  # the other one still hears adverts
    assert radio.hub.is_scanning
    await b.stop()
    assert not radio.hub.is_scanning
    assert [d.address for d in b.discovered_devices] == [cuff.address]


async def test_connect_times_out_when_nothing_advertises_and_leaves_no_ghost(radio: VirtualRadio) -> None:
    scale = await radio.add_peripheral(demo_scale(readings=0))
    assert not scale.is_advertising  # nothing to send, not in pairing mode
    c = BleakClient(scale.address, timeout=0.1, backend=VirtualClientBackend, radio=radio)
    with pytest.raises(TimeoutError):
        await c.connect()
    assert not c.is_connected

    await scale.measure(demo_weight_readings(1)[0])
    inbox = Inbox()
    async with client(radio, scale.address) as c:
        await c.start_notify(WEIGHT_MEASUREMENT, inbox)
        await inbox.wait_for(1)
    assert scale.connection_count == 1  # the timed-out attempt never connected later


async def test_cancelled_connect_leaves_no_ghost_connection(radio: VirtualRadio) -> None:
    scale = await radio.add_peripheral(demo_scale(readings=0))
    attempt = asyncio.create_task(client(radio, scale.address).connect())
    async with asyncio.timeout(WAIT):  # until the hub's controller is trying to connect
        while not radio.hub.is_le_connecting:
            await asyncio.sleep(0)
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt

    await scale.measure(demo_weight_readings(1)[0])
    async with client(radio, scale.address) as c:
        assert c.is_connected
    assert scale.connection_count == 1


async def test_connections_to_two_devices_at_once(radio: VirtualRadio) -> None:
    scale = await radio.add_peripheral(demo_scale(readings=2))
    cuff = await radio.add_peripheral(demo_cuff(readings=2, bonding_required=False))

    async def collect(address: str, uuid: str, count: int) -> list[bytes]:
        inbox = Inbox()
        async with client(radio, address) as c:
            await c.start_notify(uuid, inbox)
            return await inbox.wait_for(count)

    scale_frames, cuff_frames = await asyncio.gather(
        collect(scale.address, WEIGHT_MEASUREMENT, 2), collect(cuff.address, BPM, 2)
    )
    assert scale_frames == scale.sent and cuff_frames == cuff.sent


async def test_second_connect_on_a_connected_client_is_refused(radio: VirtualRadio) -> None:
    scale = await radio.add_peripheral(demo_scale(readings=1))
    async with client(radio, scale.address) as c:
        with pytest.raises(BleakError, match="already connected"):
            await c.connect()


async def test_pairing_refused_by_the_device_is_a_bleak_error(radio: VirtualRadio) -> None:
    cuff = await radio.add_peripheral(demo_cuff(readings=1, accept_pairing=False))
    async with client(radio, await find(radio, cuff.address)) as c:
        with pytest.raises(BleakError, match="pairing"):
            await c.pair()
    assert not await radio.has_bond(cuff.address)


async def test_lost_bond_on_the_device_fails_the_connection_with_advice(radio: VirtualRadio) -> None:
    cuff = await radio.add_peripheral(demo_cuff(readings=1, pairing_mode=True))
    async with client(radio, await find(radio, cuff.address), pair=True):
        pass
    await cuff.forget_bonds()  # battery change
    with pytest.raises(BleakError, match="authentication"):
        await client(radio, await find(radio, cuff.address)).connect()

    # unpair() forgets the hub's side too; then pairing again works.
    c = client(radio, cuff.address)
    await c.unpair()
    assert not await radio.has_bond(cuff.address)
    async with client(radio, cuff.address, pair=True) as c:
        assert await radio.has_bond(cuff.address)


async def test_full_cycle_is_fast(radio: VirtualRadio) -> None:
    """scan -> connect -> MTU -> discover -> subscribe -> indication -> disconnect."""
    cuff = await radio.add_peripheral(demo_cuff(readings=1, bonding_required=False))
    started = time.perf_counter()
    inbox = Inbox()
    async with client(radio, await find(radio, cuff.address)) as c:
        await c.start_notify(BPM, inbox)
        await inbox.wait_for(1)
    elapsed = time.perf_counter() - started
    # ~40-70 ms on a 2-core VM; the bound only catches a stall (a timeout or a sleep).
    assert elapsed < 1.0, f"one cycle took {elapsed * 1000:.0f} ms"


def test_advert_parser_handles_every_uuid_width_and_field() -> None:
    """The raw-advert parser behind the scanner (Core Vol 3 Part C §11 AD structures)."""
    u128 = uuid.UUID("12345678-1234-5678-9abc-def012345678")
    data = (
        bytes([2, 0x01, 0x06])  # flags
        + bytes([5, 0x03, 0x10, 0x18, 0x1D, 0x18])  # 16-bit UUIDs 0x1810, 0x181D
        + bytes([17, 0x07]) + u128.bytes[::-1]  # one 128-bit UUID, little-endian
        + bytes([5, 0x05, 0x78, 0x56, 0x34, 0x12])  # 32-bit UUID 0x12345678
        + bytes([2, 0x0A, 0xF6])  # TX power -10 dBm
        + bytes([4, 0x08]) + b"abc"  # shortened name: the complete one wins
        + bytes([4, 0x09]) + b"xyz"
        + bytes([5, 0xFF, 0x8C, 0x0D, 1, 2])  # manufacturer 0x0D8C
        + bytes([4, 0x16, 0x10, 0x18, 7])  # service data for 0x1810
        + bytes(3)  # zero padding ends the significant part
    )
    advert = Advert.parse("AA:BB:CC:DD:EE:FF", -50, data)
    u32 = "12345678-0000-1000-8000-00805f9b34fb"
    assert advert.service_uuids == (BP_SERVICE, WEIGHT_SERVICE, str(u128), u32)
    assert advert.local_name == "xyz"
    assert advert.tx_power == -10
    assert advert.manufacturer_data == {0x0D8C: b"\x01\x02"}
    assert advert.service_data == {BP_SERVICE: b"\x07"}
