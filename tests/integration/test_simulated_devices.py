"""Scripted behaviour of the simulated scale and cuff, observed from the hub through bleak."""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.exc import BleakGATTProtocolError, BleakGATTProtocolErrorCode
from bleak.uuids import normalize_uuid_16

from drivers.codec.blood_pressure import (
    BloodPressureMeasurement,
    decode_blood_pressure_measurement,
    decode_intermediate_cuff_pressure,
    encode_blood_pressure_measurement,
)
from drivers.codec.date_time import (
    CurrentTime,
    DateTime,
    decode_current_time,
    decode_date_time,
    encode_current_time,
    encode_date_time,
)
from drivers.codec.ieee11073 import MedFloat
from drivers.codec.weight import WeightMeasurement, decode_weight_measurement, encode_weight_measurement
from drivers.simulated import (
    SimScript,
    SimulatedWeightScale,
    demo_bp_readings,
    demo_cuff,
    demo_scale,
    demo_weight_readings,
)
from drivers.simulated.device import SimulatedDevice
from gateway.sim.backend import VirtualClientBackend, VirtualScannerBackend
from gateway.sim.radio import VirtualRadio

BPM = normalize_uuid_16(0x2A35)
ICP = normalize_uuid_16(0x2A36)
WEIGHT_MEASUREMENT = normalize_uuid_16(0x2A9D)
CURRENT_TIME = normalize_uuid_16(0x2A2B)
DATE_TIME = normalize_uuid_16(0x2A08)
WAIT = 2.0  # bound for waiting on one event; the events themselves take milliseconds


def client(radio: VirtualRadio, device: SimulatedDevice[Any] | str, **kwargs: Any) -> BleakClient:
    """A bleak client for a simulated device (by address: it must be advertising)."""
    address = device if isinstance(device, str) else device.address
    return BleakClient(address, timeout=WAIT, backend=VirtualClientBackend, radio=radio, **kwargs)


class Inbox:
    """Notification payloads per characteristic, in arrival order across all of them."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, bytes]] = []
        self._changed = asyncio.Event()

    def __call__(self, char: BleakGATTCharacteristic, data: bytearray) -> None:
        self.frames.append((char.uuid, bytes(data)))
        self._changed.set()

    def of(self, uuid: str) -> list[bytes]:
        return [data for u, data in self.frames if u == uuid]

    async def wait_for(self, uuid: str, count: int) -> list[bytes]:
        async with asyncio.timeout(WAIT):
            while len(self.of(uuid)) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.of(uuid)


async def collect(radio: VirtualRadio, device: SimulatedWeightScale, count: int) -> list[bytes]:
    """One connection's worth of weight indications (the scale hangs up when done)."""
    inbox = Inbox()
    async with client(radio, device) as c:
        await c.start_notify(WEIGHT_MEASUREMENT, inbox)
        await inbox.wait_for(WEIGHT_MEASUREMENT, count)
    await device.wait_disconnected(WAIT)
    return inbox.of(WEIGHT_MEASUREMENT)


async def test_clock_written_by_the_hub_is_what_the_device_reads_back_and_stamps(radio: VirtualRadio) -> None:
    scale = await radio.add_peripheral(demo_scale(readings=0, clock="year0", pairing_mode=True))
    async with client(radio, scale) as c:
        before = decode_current_time(bytes(await c.read_gatt_char(CURRENT_TIME)))
        assert before.date_time.year == 0 and before.day_of_week == 0  # §2.1: "not known"
        hub_now = dt.datetime.now().replace(microsecond=0)
        value = encode_current_time(CurrentTime.from_datetime(hub_now))
        await c.write_gatt_char(CURRENT_TIME, value, response=True)
        after = decode_current_time(bytes(await c.read_gatt_char(CURRENT_TIME)))
    assert scale.clock_writes == [DateTime.from_datetime(hub_now)]
    device_now = after.date_time.to_datetime()
    assert device_now is not None and abs((device_now - hub_now).total_seconds()) <= 1
    assert after.day_of_week == hub_now.isoweekday()

    # A reading taken now carries the corrected clock.
    await scale.measure(WeightMeasurement(imperial=False, weight_raw=16270))
    [frame] = await collect(radio, scale, 1)
    stamp = decode_weight_measurement(frame).timestamp
    assert stamp is not None and stamp.to_datetime() is not None
    assert abs((stamp.to_datetime() - hub_now).total_seconds()) <= 1  # type: ignore[operator]


async def test_clock_offset_and_epoch_start(radio: VirtualRadio) -> None:
    fast = await radio.add_peripheral(demo_scale(readings=0, clock_offset_s=300, pairing_mode=True))
    epoch = await radio.add_peripheral(
        demo_cuff("D4:5C:A1:E0:00:03", readings=0, clock="epoch", pairing_mode=True)
    )
    async with client(radio, fast) as c:
        device_time = decode_current_time(bytes(await c.read_gatt_char(CURRENT_TIME))).date_time.to_datetime()
    assert device_time is not None
    utc_now = dt.datetime.now(dt.UTC).replace(tzinfo=None)  # the default zone of a sim clock
    assert abs((device_time - utc_now).total_seconds() - 300) <= 2
    async with client(radio, epoch) as c:
        epoch_time = decode_current_time(bytes(await c.read_gatt_char(CURRENT_TIME))).date_time
    assert (epoch_time.year, epoch_time.month, epoch_time.day) == (2000, 1, 1)


async def test_date_time_in_the_measurement_service_instead_of_cts(radio: VirtualRadio) -> None:
    cuff = await radio.add_peripheral(demo_cuff(readings=0, time_service="date_time", pairing_mode=True))
    async with client(radio, cuff) as c:
        assert c.services.get_service(normalize_uuid_16(0x1805)) is None
        char = c.services.get_characteristic(DATE_TIME)
        assert char is not None and char.service_uuid == normalize_uuid_16(0x1810)
        target = DateTime(2025, 3, 14, 7, 45, 30)
        await c.write_gatt_char(DATE_TIME, encode_date_time(target), response=True)
        read_back = decode_date_time(bytes(await c.read_gatt_char(DATE_TIME)))
    assert cuff.clock_writes == [target]
    assert read_back.to_datetime() is not None
    assert 0 <= (read_back.to_datetime() - target.to_datetime()).total_seconds() <= 1  # type: ignore[operator]


async def test_read_only_clock_rejects_writes(radio: VirtualRadio) -> None:
    scale = await radio.add_peripheral(demo_scale(readings=0, clock_writable=False, pairing_mode=True))
    async with client(radio, scale) as c:
        char = c.services.get_characteristic(CURRENT_TIME)
        assert char is not None and "write" not in char.properties
        value = encode_current_time(CurrentTime.from_datetime(dt.datetime.now()))
        with pytest.raises(BleakGATTProtocolError) as failure:
            await c.write_gatt_char(CURRENT_TIME, value, response=True)
    assert failure.value.code == BleakGATTProtocolErrorCode.WRITE_NOT_PERMITTED
    assert scale.clock_writes == []


async def test_resend_stored_replays_the_whole_memory_on_every_connection(radio: VirtualRadio) -> None:
    readings = demo_weight_readings(2)
    scale = await radio.add_peripheral(demo_scale(readings=readings, resend_stored=True))
    encoded = [encode_weight_measurement(r) for r in readings]
    assert await collect(radio, scale, 2) == encoded
    assert not scale.is_advertising  # everything delivered once: no news to announce

    new = WeightMeasurement(imperial=False, weight_raw=16300, timestamp=DateTime(2025, 3, 14, 7, 0, 0))
    await scale.measure(new)
    assert await collect(radio, scale, 3) == [*encoded, encode_weight_measurement(new)]


async def test_without_resend_only_new_readings_are_sent(radio: VirtualRadio) -> None:
    readings = demo_weight_readings(2)
    scale = await radio.add_peripheral(demo_scale(readings=readings))
    assert await collect(radio, scale, 2) == [encode_weight_measurement(r) for r in readings]
    new = WeightMeasurement(imperial=True, weight_raw=18040, timestamp=DateTime(2025, 3, 14, 7, 0, 0))
    await scale.measure(new)
    assert await collect(radio, scale, 1) == [encode_weight_measurement(new)]
    assert scale.unsent == 0


async def test_garbage_frames_arrive_unchanged_and_in_order(radio: VirtualRadio) -> None:
    [good] = demo_bp_readings(1)
    garbage = [b"\x00", b"\xff" * 19, b"\x1e\x84"]  # empty flags, all-ones, truncated SFLOAT
    cuff = await radio.add_peripheral(
        demo_cuff(readings=[garbage[0], good, garbage[1], garbage[2]], bonding_required=False)
    )
    inbox = Inbox()
    async with client(radio, cuff) as c:
        await c.start_notify(BPM, inbox)
        frames = await inbox.wait_for(BPM, 4)
    assert frames == [garbage[0], encode_blood_pressure_measurement(good), *garbage[1:]]


async def test_intermediate_cuff_pressure_precedes_each_result_when_subscribed(radio: VirtualRadio) -> None:
    readings = demo_bp_readings(2)
    cuff = await radio.add_peripheral(
        demo_cuff(readings=readings, bonding_required=False, intermediate_frames=3)
    )
    inbox = Inbox()
    async with client(radio, cuff) as c:
        await c.start_notify(ICP, inbox)
        await c.start_notify(BPM, inbox)
        await inbox.wait_for(BPM, 2)
    kinds = [uuid for uuid, _ in inbox.frames]
    assert kinds == [ICP, ICP, ICP, BPM, ICP, ICP, ICP, BPM]
    assert inbox.of(ICP) == cuff.intermediate_sent
    first_result = decode_blood_pressure_measurement(inbox.of(BPM)[0])
    pressures = [float(decode_intermediate_cuff_pressure(f).systolic) for f in inbox.of(ICP)[:3]]
    assert pressures == sorted(pressures, reverse=True)  # the cuff deflates
    assert all(p > float(first_result.systolic) for p in pressures)


async def test_a_kpa_cuff_deflates_in_kpa_with_decimals(radio: VirtualRadio) -> None:
    # Regression (issue 5 item 14): a 12 mmHg step was added to kPa values and truncated, so a
    # 16.5 kPa result came after "cuff pressures" of 52, 40 and 28 kPa.
    reading = BloodPressureMeasurement(
        kpa=True, systolic=MedFloat.of("16.5"), diastolic=MedFloat.of("10.9"),
        mean_arterial=MedFloat.of("12.8"), user_id=1)
    cuff = await radio.add_peripheral(
        demo_cuff(readings=[reading], bonding_required=False, intermediate_frames=3)
    )
    inbox = Inbox()
    async with client(radio, cuff) as c:
        await c.start_notify(ICP, inbox)
        await c.start_notify(BPM, inbox)
        await inbox.wait_for(BPM, 1)
    frames = [decode_intermediate_cuff_pressure(f) for f in inbox.of(ICP)]
    assert all(f.kpa for f in frames)
    assert [f.systolic.value for f in frames] == [Decimal("21.3"), Decimal("19.7"), Decimal("18.1")]


async def test_reading_taken_while_connected_goes_out_on_the_same_link(radio: VirtualRadio) -> None:
    scale = await radio.add_peripheral(demo_scale(readings=1, quiet_s=1.0))
    inbox = Inbox()
    async with client(radio, scale) as c:
        await c.start_notify(WEIGHT_MEASUREMENT, inbox)
        await inbox.wait_for(WEIGHT_MEASUREMENT, 1)
        await scale.measure(WeightMeasurement(imperial=False, weight_raw=16000))
        await inbox.wait_for(WEIGHT_MEASUREMENT, 2)
    assert scale.connection_count == 1


async def test_advertises_only_with_news_or_in_pairing_mode(radio: VirtualRadio) -> None:
    scale = await radio.add_peripheral(demo_scale(readings=0))
    assert not scale.is_advertising
    await scale.set_pairing_mode(True)
    found = await BleakScanner.find_device_by_address(
        scale.address, timeout=WAIT, backend=VirtualScannerBackend, radio=radio  # type: ignore[call-arg]
    )
    assert found is not None and found.name == "SIM Scale"
    await scale.set_pairing_mode(False)
    assert not scale.is_advertising
    await scale.measure(demo_weight_readings(1)[0])
    assert scale.is_advertising


async def test_device_hangs_up_when_the_hub_never_subscribes(radio: VirtualRadio) -> None:
    scale = await radio.add_peripheral(demo_scale(readings=1, idle_timeout_s=0.3))
    gone = asyncio.Event()
    c = client(radio, scale, disconnected_callback=lambda _c: gone.set())
    await c.connect()
    await asyncio.wait_for(gone.wait(), WAIT)
    await scale.wait_disconnected(WAIT)
    assert scale.unsent == 1 and scale.is_advertising  # still has it, still announcing it


async def test_demo_factories_encode_what_the_codec_decodes() -> None:
    for reading in demo_weight_readings(5):
        assert decode_weight_measurement(encode_weight_measurement(reading)) == reading
        assert 70 < float(reading.weight or 0) < 95
    for bp in demo_bp_readings(5):
        assert decode_blood_pressure_measurement(encode_blood_pressure_measurement(bp)) == bp


def test_advertising_data_must_fit_a_legacy_advertisement() -> None:
    with pytest.raises(ValueError, match="legacy advertisement"):
        SimulatedWeightScale(SimScript[WeightMeasurement](address="D4:5C:A1:E0:00:09", name="x" * 30))
