"""BPM 0x2A35, ICP 0x2A36 and BP Feature 0x2A49 against health-devices.md §4, §11, §12."""

import contextlib
from collections.abc import Callable
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.codec.blood_pressure import (
    BloodPressureFeature,
    BloodPressureMeasurement,
    decode_blood_pressure_feature,
    decode_blood_pressure_measurement,
    decode_intermediate_cuff_pressure,
    encode_blood_pressure_feature,
    encode_blood_pressure_measurement,
    encode_intermediate_cuff_pressure,
)
from drivers.codec.date_time import DateTime
from drivers.codec.errors import DecodeError
from drivers.codec.ieee11073 import SFLOAT_NAN, MedFloat
from tests.unit.strategies import (
    blood_pressure_bytes,
    blood_pressure_features,
    blood_pressure_measurements,
)


def mmhg(value: int) -> MedFloat:
    """A whole-number SFLOAT as cuffs send mmHg and beats/min."""
    return MedFloat(value, 0)


# health-devices.md §12, Blood Pressure Measurement 0x2A35 table, rows 1-6 in order.
WORKED_EXAMPLES = [
    # §12 BPM row 1: mmHg, time, pulse, user, status 0x0004 (irregular pulse).
    (
        "1E 80 00 52 00 61 00 E9 07 03 0E 07 34 0A 40 00 01 04 00",
        BloodPressureMeasurement(
            kpa=False,
            systolic=mmhg(128),
            diastolic=mmhg(82),
            mean_arterial=mmhg(97),
            timestamp=DateTime(2025, 3, 14, 7, 52, 10),
            pulse_rate=mmhg(64),
            user_id=1,
            status=0x0004,
        ),
        ("irregular_pulse",),
    ),
    # §12 BPM row 2: MAP NaN, as many cuffs send it.
    (
        "06 8D 00 5B 00 FF 07 E9 07 0B 02 06 10 00 48 00",
        BloodPressureMeasurement(
            kpa=False,
            systolic=mmhg(141),
            diastolic=mmhg(91),
            mean_arterial=SFLOAT_NAN,
            timestamp=DateTime(2025, 11, 2, 6, 16, 0),
            pulse_rate=mmhg(72),
        ),
        (),
    ),
    # §12 BPM row 3: kPa, nothing optional; 16.0 / 10.7 / 12.5 kPa.
    (
        "01 A0 F0 6B F0 7D F0",
        BloodPressureMeasurement(
            kpa=True,
            systolic=MedFloat(160, -1),
            diastolic=MedFloat(107, -1),
            mean_arterial=MedFloat(125, -1),
        ),
        (),
    ),
    # §12 BPM row 4: pulse + status 0x000D (body movement, irregular pulse, pulse above range).
    (
        "14 79 00 4E 00 5B 00 55 00 0D 00",
        BloodPressureMeasurement(
            kpa=False,
            systolic=mmhg(121),
            diastolic=mmhg(78),
            mean_arterial=mmhg(91),
            pulse_rate=mmhg(85),
            status=0x000D,
        ),
        ("body_movement", "irregular_pulse", "pulse_above_range"),
    ),
    # §12 BPM row 5 (Nordic unit-test vector): year 0 (unknown), status 0x0027.
    (
        "1E 8A 00 58 00 78 00 00 00 04 11 14 29 3B 3C 00 01 27 00",
        BloodPressureMeasurement(
            kpa=False,
            systolic=mmhg(138),
            diastolic=mmhg(88),
            mean_arterial=mmhg(120),
            timestamp=DateTime(0, 4, 17, 20, 41, 59),
            pulse_rate=mmhg(60),
            user_id=1,
            status=0x0027,
        ),
        ("body_movement", "cuff_loose", "irregular_pulse", "improper_position"),
    ),
    # §12 BPM row 6 (Nordic unit-test vector): 18.9 / 11 / 15.9 kPa, status 0x0012.
    (
        "15 BD F0 0B 00 9F F0 3C 00 12 00",
        BloodPressureMeasurement(
            kpa=True,
            systolic=MedFloat(189, -1),
            diastolic=MedFloat(11, 0),
            mean_arterial=MedFloat(159, -1),
            pulse_rate=mmhg(60),
            status=0x0012,
        ),
        ("cuff_loose", "pulse_below_range"),
    ),
]


@pytest.mark.parametrize(("hex_bytes", "expected", "flags"), WORKED_EXAMPLES)
def test_worked_examples(
    hex_bytes: str, expected: BloodPressureMeasurement, flags: tuple[str, ...]
) -> None:
    data = bytes.fromhex(hex_bytes)
    decoded = decode_blood_pressure_measurement(data)
    assert decoded == expected
    assert decoded.status_flags() == flags
    assert encode_blood_pressure_measurement(decoded) == data


def test_row3_units_and_values() -> None:
    # health-devices.md §12, BPM row 3: kPa values keep one decimal.
    m = decode_blood_pressure_measurement(bytes.fromhex("01 A0 F0 6B F0 7D F0"))
    assert m.unit == "kPa"
    assert [str(v.value) for v in (m.systolic, m.diastolic, m.mean_arterial)] == [
        "16.0",
        "10.7",
        "12.5",
    ]


def test_row5_year_zero_is_unknown() -> None:
    # health-devices.md §12, BPM row 5 (Nordic unit-test vector); §11: never year 1 or 1970.
    m = decode_blood_pressure_measurement(
        bytes.fromhex("1E 8A 00 58 00 78 00 00 00 04 11 14 29 3B 3C 00 01 27 00")
    )
    assert m.unit == "mm[Hg]"
    assert m.timestamp is not None
    assert m.timestamp.year == 0
    assert m.timestamp.to_datetime() is None


def test_120_mmhg_encodes_as_78_00() -> None:
    # §11 pitfall: bluetooth-sig-python's tests send 120 mmHg as 78 80.
    m = BloodPressureMeasurement(
        kpa=False, systolic=MedFloat.of("120"), diastolic=MedFloat.of(80), mean_arterial=SFLOAT_NAN
    )
    assert encode_blood_pressure_measurement(m) == bytes.fromhex("00 78 00 50 00 FF 07")
    wrong = decode_blood_pressure_measurement(bytes.fromhex("00 78 80 50 00 FF 07"))
    assert wrong.systolic.value == Decimal("0.00000120")


@pytest.mark.parametrize(
    ("status", "flags"),
    [
        # §11 pitfall: bits 3-4 are one 2-bit pulse-range field, improper position is bit 5.
        (0x0008, ("pulse_above_range",)),
        (0x0010, ("pulse_below_range",)),
        (0x0018, ("pulse_range_reserved",)),
        (0x0020, ("improper_position",)),
        (0x0000, ()),
        (0xFFC0, ()),  # RFU bits 6-15 name nothing
        (
            0x003F,
            (
                "body_movement",
                "cuff_loose",
                "irregular_pulse",
                "pulse_range_reserved",
                "improper_position",
            ),
        ),
    ],
)
def test_status_flags(status: int, flags: tuple[str, ...]) -> None:
    m = BloodPressureMeasurement(False, mmhg(120), mmhg(80), SFLOAT_NAN, status=status)
    assert m.status_flags() == flags


def test_no_status_no_flags() -> None:
    assert BloodPressureMeasurement(False, mmhg(120), mmhg(80), SFLOAT_NAN).status_flags() == ()


def test_rfu_flag_bits_ignored_and_not_emitted() -> None:
    # §4.1 flag bits 5-7 RFU (Enhanced BPM bits): accepted on decode, dropped on encode.
    m = decode_blood_pressure_measurement(bytes.fromhex("E1 A0 F0 6B F0 7D F0"))
    assert m == decode_blood_pressure_measurement(bytes.fromhex("01 A0 F0 6B F0 7D F0"))
    assert encode_blood_pressure_measurement(m) == bytes.fromhex("01 A0 F0 6B F0 7D F0")


@pytest.mark.parametrize(
    ("hex_bytes", "message"),
    [
        ("", "0 bytes, need at least 7"),
        ("00 78 00 50 00 FF", "6 bytes, need at least 7"),
        ("02 78 00 50 00 FF 07 E9 07", "9 bytes, flags 0x02 need 14"),
        ("10 78 00 50 00 FF 07 00", "8 bytes, flags 0x10 need 9"),
        ("00 78 00 50 00 FF 07 00", "8 bytes, flags 0x00 need 7 \\(trailing bytes\\)"),
        ("02 78 00 50 00 FF 07 E9 07 03 0E 18 00 00", "hours 24"),
    ],
)
def test_bad_bytes(hex_bytes: str, message: str) -> None:
    with pytest.raises(DecodeError, match=f"blood pressure measurement: .*{message}"):
        decode_blood_pressure_measurement(bytes.fromhex(hex_bytes))


@pytest.mark.parametrize(
    "m",
    [
        BloodPressureMeasurement(False, MedFloat(5000, 0), mmhg(80), SFLOAT_NAN),
        BloodPressureMeasurement(False, mmhg(120), mmhg(80), SFLOAT_NAN, user_id=256),
        BloodPressureMeasurement(False, mmhg(120), mmhg(80), SFLOAT_NAN, status=0x10000),
        BloodPressureMeasurement(False, mmhg(120), mmhg(80), SFLOAT_NAN, pulse_rate=MedFloat(1, 9)),
    ],
)
def test_encode_rejects(m: BloodPressureMeasurement) -> None:
    with pytest.raises(ValueError):
        encode_blood_pressure_measurement(m)


def test_intermediate_cuff_pressure() -> None:
    # §4.2: same layout, current cuff pressure in the systolic slot, the others NaN.
    data = bytes.fromhex("00 96 00 FF 07 FF 07")
    m = decode_intermediate_cuff_pressure(data)
    assert m == BloodPressureMeasurement(False, mmhg(150), SFLOAT_NAN, SFLOAT_NAN)
    assert encode_intermediate_cuff_pressure(m) == data
    with pytest.raises(DecodeError, match="intermediate cuff pressure: 3 bytes"):
        decode_intermediate_cuff_pressure(data[:3])


def test_feature() -> None:
    # §4.3: bits 0-4 classic features, 5 multiple bond (BPS 1.1); bit 9 RFU is kept.
    f = decode_blood_pressure_feature(bytes.fromhex("25 02"))
    assert f == BloodPressureFeature(0x0225)
    assert f.body_movement_detection
    assert not f.cuff_fit_detection
    assert f.irregular_pulse_detection
    assert not f.pulse_rate_range_detection
    assert not f.measurement_position_detection
    assert f.multiple_bond
    assert not (f.e2e_crc or f.user_data_service or f.user_facing_time)
    assert encode_blood_pressure_feature(f) == bytes.fromhex("25 02")
    all_named = BloodPressureFeature(0x01FF)
    assert all_named.cuff_fit_detection and all_named.pulse_rate_range_detection
    assert all_named.measurement_position_detection and all_named.e2e_crc
    assert all_named.user_data_service and all_named.user_facing_time


def test_feature_errors() -> None:
    with pytest.raises(DecodeError, match="blood pressure feature: 3 bytes, need 2"):
        decode_blood_pressure_feature(bytes(3))
    with pytest.raises(ValueError, match="not a uint16"):
        encode_blood_pressure_feature(BloodPressureFeature(0x10000))


@given(blood_pressure_measurements())
def test_round_trip(m: BloodPressureMeasurement) -> None:
    assert decode_blood_pressure_measurement(encode_blood_pressure_measurement(m)) == m
    assert decode_intermediate_cuff_pressure(encode_intermediate_cuff_pressure(m)) == m


@given(blood_pressure_bytes())
def test_bytes_round_trip(data: bytes) -> None:
    assert encode_blood_pressure_measurement(decode_blood_pressure_measurement(data)) == data


@given(blood_pressure_features())
def test_feature_round_trip(f: BloodPressureFeature) -> None:
    assert decode_blood_pressure_feature(encode_blood_pressure_feature(f)) == f


@given(st.binary(min_size=2, max_size=2))
def test_feature_bytes_round_trip(data: bytes) -> None:
    assert encode_blood_pressure_feature(decode_blood_pressure_feature(data)) == data


@pytest.mark.parametrize(
    "decode",
    [
        decode_blood_pressure_measurement,
        decode_intermediate_cuff_pressure,
        decode_blood_pressure_feature,
    ],
)
@given(data=st.binary(max_size=40))
def test_garbage(decode: Callable[[bytes], object], data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode(data)


@given(st.integers(0, 0xFF), st.binary(max_size=20))
def test_garbage_with_flags(flags: int, rest: bytes) -> None:
    # A chosen flags byte reaches the field parsing that random first bytes rarely do.
    with contextlib.suppress(DecodeError):
        decode_blood_pressure_measurement(bytes((flags,)) + rest)
