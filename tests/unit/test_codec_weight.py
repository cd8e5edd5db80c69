"""Weight Measurement 0x2A9D and Weight Scale Feature 0x2A9E against health-devices.md §3, §12."""

import contextlib
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.codec.date_time import DateTime
from drivers.codec.errors import DecodeError
from drivers.codec.weight import (
    WEIGHT_UNSUCCESSFUL,
    WeightMeasurement,
    WeightScaleFeature,
    decode_weight_measurement,
    decode_weight_scale_feature,
    encode_weight_measurement,
    encode_weight_scale_feature,
)
from tests.unit.strategies import (
    weight_measurement_bytes,
    weight_measurements,
    weight_scale_features,
)

# health-devices.md §12, Weight Measurement 0x2A9D table, rows 1-4 in order.
WORKED_EXAMPLES = [
    # §12 weight row 1: SI, 14000 * 0.005 = 70.000 kg.
    ("00 B0 36", WeightMeasurement(imperial=False, weight_raw=14000)),
    # §12 weight row 2: SI, time, user, BMI+height.
    (
        "0E 8E 3F E9 07 03 0E 07 2D 1E 01 01 01 F4 06",
        WeightMeasurement(
            imperial=False,
            weight_raw=16270,
            timestamp=DateTime(2025, 3, 14, 7, 45, 30),
            user_id=1,
            bmi_raw=257,
            height_raw=1780,
        ),
    ),
    # §12 weight row 3: imperial with time stamp.
    (
        "03 78 46 E9 07 0B 02 06 05 00",
        WeightMeasurement(
            imperial=True, weight_raw=18040, timestamp=DateTime(2025, 11, 2, 6, 5, 0)
        ),
    ),
    # §12 weight row 4: Measurement Unsuccessful.
    ("00 FF FF", WeightMeasurement(imperial=False, weight_raw=WEIGHT_UNSUCCESSFUL)),
]


@pytest.mark.parametrize(("hex_bytes", "expected"), WORKED_EXAMPLES)
def test_worked_examples(hex_bytes: str, expected: WeightMeasurement) -> None:
    data = bytes.fromhex(hex_bytes)
    assert decode_weight_measurement(data) == expected
    assert encode_weight_measurement(expected) == data


def test_row1_scaled_values() -> None:
    # health-devices.md §12, weight row 1.
    m = decode_weight_measurement(bytes.fromhex("00 B0 36"))
    assert (m.successful, m.weight, m.weight_unit) == (True, Decimal("70.000"), "kg")
    assert (m.bmi, m.height, m.height_unit) == (None, None, "m")
    assert str(m.weight) == "70.000"


def test_row2_scaled_values() -> None:
    # health-devices.md §12, weight row 2: 81.35 kg, BMI 25.7, 1.780 m.
    m = decode_weight_measurement(bytes.fromhex("0E 8E 3F E9 07 03 0E 07 2D 1E 01 01 01 F4 06"))
    assert (str(m.weight), m.weight_unit) == ("81.350", "kg")
    assert str(m.bmi) == "25.7"
    assert (str(m.height), m.height_unit) == ("1.780", "m")


def test_row3_imperial_scaled_values() -> None:
    # health-devices.md §12, weight row 3: 180.40 lb (= 81.828 kg with 1 lb = 0.45359237 kg).
    m = decode_weight_measurement(bytes.fromhex("03 78 46 E9 07 0B 02 06 05 00"))
    assert (str(m.weight), m.weight_unit, m.height_unit) == ("180.40", "[lb_av]", "[in_i]")
    assert m.weight is not None
    assert round(m.weight * Decimal("0.45359237"), 3) == Decimal("81.828")


def test_row4_unsuccessful() -> None:
    # health-devices.md §12, weight row 4: never a weight.
    m = decode_weight_measurement(bytes.fromhex("00 FF FF"))
    assert not m.successful
    assert m.weight is None


def test_imperial_height() -> None:
    m = WeightMeasurement(imperial=True, weight_raw=18040, bmi_raw=257, height_raw=701)
    assert (str(m.height), m.height_unit) == ("70.1", "[in_i]")


def test_rfu_flag_bits_ignored_and_not_emitted() -> None:
    # §3.1 bits 4-7 RFU: accepted on decode, dropped on encode.
    m = decode_weight_measurement(bytes.fromhex("F0 B0 36"))
    assert m == WeightMeasurement(imperial=False, weight_raw=14000)
    assert encode_weight_measurement(m) == bytes.fromhex("00 B0 36")


@pytest.mark.parametrize(
    ("hex_bytes", "message"),
    [
        ("", "0 bytes"),
        ("00 B0", "2 bytes, flags 0x00 need 3"),
        ("02 B0 36 E9", "4 bytes, flags 0x02 need 10"),
        ("00 B0 36 00", "4 bytes, flags 0x00 need 3 \\(trailing bytes\\)"),
        ("08 B0 36 01 01 F4", "6 bytes, flags 0x08 need 7"),
        ("02 B0 36 E9 07 0D 0E 07 2D 1E", "month 13"),
    ],
)
def test_bad_bytes(hex_bytes: str, message: str) -> None:
    with pytest.raises(DecodeError, match=f"weight measurement: .*{message}"):
        decode_weight_measurement(bytes.fromhex(hex_bytes))


def test_decode_keeps_bmi_with_unsuccessful_weight() -> None:
    # §3.1 forbids BMI/height after 0xFFFF, but the decoder keeps what a device sent.
    m = decode_weight_measurement(bytes.fromhex("08 FF FF 01 01 F4 06"))
    assert (m.successful, m.bmi_raw, m.height_raw) == (False, 257, 1780)
    with pytest.raises(ValueError, match="unsuccessful"):
        encode_weight_measurement(m)


@pytest.mark.parametrize(
    "m",
    [
        WeightMeasurement(imperial=False, weight_raw=1, bmi_raw=257),
        WeightMeasurement(imperial=False, weight_raw=1, height_raw=1780),
        WeightMeasurement(imperial=False, weight_raw=0x10000),
        WeightMeasurement(imperial=False, weight_raw=1, user_id=256),
        WeightMeasurement(imperial=False, weight_raw=1, bmi_raw=-1, height_raw=0),
        WeightMeasurement(imperial=False, weight_raw=1, timestamp=DateTime(2025, 13, 1, 0, 0, 0)),
    ],
)
def test_encode_rejects(m: WeightMeasurement) -> None:
    with pytest.raises(ValueError):
        encode_weight_measurement(m)


def test_feature_decode() -> None:
    # §3.2: time stamp + multi-user + BMI, weight res 7 (0.005 kg), height res 3 (0.001 m),
    # plus an RFU bit 10 that is ignored.
    raw = 0b111 | 7 << 3 | 3 << 7 | 1 << 10
    f = decode_weight_scale_feature(raw.to_bytes(4, "little"))
    assert f == WeightScaleFeature(True, True, True, 7, 3)
    assert (f.weight_step(imperial=False), f.weight_step(imperial=True)) == (
        Decimal("0.005"),
        Decimal("0.01"),
    )
    assert (f.height_step(imperial=False), f.height_step(imperial=True)) == (
        Decimal("0.001"),
        Decimal("0.1"),
    )
    assert encode_weight_scale_feature(f) == (raw & 0x3FF).to_bytes(4, "little")


def test_feature_unspecified_resolution() -> None:
    f = decode_weight_scale_feature(bytes(4))
    assert f == WeightScaleFeature(False, False, False, 0, 0)
    assert f.weight_step(imperial=False) is None
    assert f.height_step(imperial=True) is None


def test_feature_errors() -> None:
    with pytest.raises(DecodeError, match="weight scale feature: 2 bytes, need 4"):
        decode_weight_scale_feature(bytes(2))
    with pytest.raises(ValueError, match="weight resolution 16"):
        encode_weight_scale_feature(WeightScaleFeature(False, False, False, 16, 0))
    with pytest.raises(ValueError, match="height resolution 8"):
        encode_weight_scale_feature(WeightScaleFeature(False, False, False, 0, 8))


@given(weight_measurements())
def test_round_trip(m: WeightMeasurement) -> None:
    assert decode_weight_measurement(encode_weight_measurement(m)) == m


@given(weight_measurement_bytes())
def test_bytes_round_trip(data: bytes) -> None:
    assert encode_weight_measurement(decode_weight_measurement(data)) == data


@given(weight_scale_features())
def test_feature_round_trip(f: WeightScaleFeature) -> None:
    assert decode_weight_scale_feature(encode_weight_scale_feature(f)) == f


@given(st.integers(0, 0x3FF))
def test_feature_bytes_round_trip(raw: int) -> None:
    data = raw.to_bytes(4, "little")
    assert encode_weight_scale_feature(decode_weight_scale_feature(data)) == data


@given(st.binary(max_size=40))
def test_garbage_measurement(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_weight_measurement(data)


@given(st.integers(0, 0xFF), st.binary(max_size=16))
def test_garbage_measurement_with_flags(flags: int, rest: bytes) -> None:
    # A chosen flags byte reaches the field parsing that random first bytes rarely do.
    with contextlib.suppress(DecodeError):
        decode_weight_measurement(bytes((flags,)) + rest)


@given(st.binary(max_size=40))
def test_garbage_feature(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_weight_scale_feature(data)
