"""From decoded bytes to the payload: patient, identity, time provenance."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from drivers.base import ClockCheck, DeviceInfo
from drivers.blood_pressure import decode_bp
from drivers.weight_scale import decode_weight
from gateway.config import DeviceBinding
from gateway.intake import belongs_to, build_reading, outbox_item
from gateway.models import Reading

CHICAGO = ZoneInfo("America/Chicago")
BINDING = DeviceBinding(address="AA:BB:CC:DD:EE:01", patient_id="patient-7")
RECEIVED = dt.datetime(2025, 3, 14, 13, 0, tzinfo=dt.UTC)
# health-devices.md §12, BPM row 1: 2025-03-14 07:52:10, 128/82/97, pulse 64, irregular pulse.
BPM = bytes.fromhex("1E800052006100E907030E07340A4000010400")


def build(raw: bytes, clock: ClockCheck | None, synced: bool = True, weight: bool = False) -> Reading:
    m = decode_weight(raw) if weight else decode_bp(raw)
    return build_reading(
        m, hub_id="hub-1", binding=BINDING, address="aa:bb:cc:dd:ee:01",
        info=DeviceInfo(manufacturer="Sim", model="BP-1"), driver_name="sig_blood_pressure",
        driver_version="1.0", clock=clock, received_at=RECEIVED, zone=CHICAGO,
        hub_clock_synced=synced)


def test_payload_fields() -> None:
    r = build(BPM, None)
    assert r.patient_id == "patient-7"
    assert r.device.address == "AA:BB:CC:DD:EE:01"
    assert r.status == ("irregular_pulse",)
    assert r.time_source == "device_clock"
    assert r.measured_at == dt.datetime(2025, 3, 14, 12, 52, 10, tzinfo=dt.UTC)
    assert r.device_time == dt.datetime(2025, 3, 14, 7, 52, 10)
    assert r.raw == BPM.hex()
    assert Reading.model_validate_json(r.to_json()) == r
    assert b'"schema":"rpm-gateway/reading/1"' in r.to_json()


def test_clock_offset_corrects_only_when_hub_clock_synced() -> None:
    clock = ClockCheck(device_time=None, offset_s=120.0, set_ok=True)
    corrected = build(BPM, clock)
    assert corrected.time_source == "device_clock_corrected"
    assert corrected.measured_at == dt.datetime(2025, 3, 14, 12, 50, 10, tzinfo=dt.UTC)
    assert corrected.device_clock_offset_s == 120.0
    unsynced = build(BPM, clock, synced=False)
    assert unsynced.time_source == "device_clock"
    assert unsynced.hub_clock_synced is False


def test_same_bytes_same_id_regardless_of_session() -> None:
    a = build(BPM, None)
    b = build(BPM, ClockCheck(device_time=None, offset_s=5.0, set_ok=True))
    assert a.reading_id == b.reading_id


def test_outbox_item_day_is_patient_local() -> None:
    # 2025-03-15 03:30 UTC is still the 14th in Chicago.
    late = dt.datetime(2025, 3, 14, 22, 30)
    raw = bytes.fromhex("0E8E3F") + late.year.to_bytes(2, "little") + bytes(
        [late.month, late.day, late.hour, late.minute, 0]) + bytes.fromhex("010101F406")
    r = build(raw, None, weight=True)
    item = outbox_item(r, CHICAGO)
    assert item.measured_day == "2025-03-14"
    assert item.measured_at.startswith("2025-03-15T03:30")
    assert item.valid is True


def test_user_slot_attribution() -> None:
    slot1 = decode_bp(BPM)  # the row 1 reading is filed under user 1
    assert slot1.user_index == 1
    assert belongs_to(BINDING, slot1)  # a binding without a slot takes every reading
    assert belongs_to(BINDING, slot1)  # binding without a slot: the device is the patient's
    assert belongs_to(BINDING.model_copy(update={"user_index": 1}), slot1)
    assert not belongs_to(BINDING.model_copy(update={"user_index": 2}), slot1)
    no_slot = decode_bp(bytes.fromhex("01A0F06BF07DF0"))  # §12 BPM row 3: no user id field
    assert belongs_to(BINDING.model_copy(update={"user_index": 2}), no_slot)


# BPM row 1 with user id 0xFF: the device's own "unknown user" (health-devices.md §4.1), a guest.
GUEST = BPM[:-3] + b"\xff" + BPM[-2:]


def test_unknown_user_is_never_filed_under_a_slot_binding() -> None:
    guest = decode_bp(GUEST)
    assert guest.user_index == 255  # kept as sent, not turned into "cannot tell"
    assert not belongs_to(BINDING.model_copy(update={"user_index": 1}), guest)
    assert belongs_to(BINDING, guest)  # the technician bound the whole device to one person


def test_unattributed_reading_has_no_patient_and_stays_out_of_the_patients_rows() -> None:
    m = decode_bp(GUEST)
    r = build_reading(
        m, hub_id="hub-1", binding=BINDING, address="aa:bb:cc:dd:ee:01", info=DeviceInfo(),
        driver_name="sig_blood_pressure", driver_version="1.0", clock=None,
        received_at=RECEIVED, zone=CHICAGO, hub_clock_synced=True, attributed=False)
    assert r.patient_id == ""
    assert r.user_index == 255
    assert outbox_item(r, CHICAGO).patient_id is None


def test_timestamped_reading_id_is_the_same_on_every_connection() -> None:
    a = build(BPM, None)
    b = build_reading(
        decode_bp(BPM), hub_id="hub-1", binding=BINDING, address="aa:bb:cc:dd:ee:01",
        info=DeviceInfo(), driver_name="sig_blood_pressure", driver_version="1.0", clock=None,
        received_at=RECEIVED + dt.timedelta(days=1), zone=CHICAGO, hub_clock_synced=True,
        connection="another", occurrence=2)
    assert a.reading_id == b.reading_id


def test_a_stamp_with_an_unknown_date_does_not_merge_two_days() -> None:
    # Found in review: a never-set clock (year 0, maybe not even running) gives Monday's and
    # Tuesday's 81.35 kg the same bytes; keyed on the bytes alone, Tuesday's was a "duplicate".
    raw = bytes.fromhex("0E8E3F" "00000000000000" "010101F406")  # §12 weight row 2, date 0
    m = decode_weight(raw)
    assert m.device_time is None

    def rid(connection: str) -> str:
        return build_reading(
            m, hub_id="hub-1", binding=BINDING, address="aa:bb:cc:dd:ee:01", info=DeviceInfo(),
            driver_name="sig_weight_scale", driver_version="1.0", clock=None,
            received_at=RECEIVED, zone=CHICAGO, hub_clock_synced=True, connection=connection,
        ).reading_id

    assert rid("monday") != rid("tuesday")
