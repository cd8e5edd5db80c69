"""SFLOAT/FLOAT codec against health-devices.md §1.1/§1.2, plus round-trips and garbage."""

import contextlib
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.codec.errors import DecodeError
from drivers.codec.ieee11073 import (
    FLOAT_NAN,
    FLOAT_NEGATIVE_INFINITY,
    FLOAT_NRES,
    FLOAT_POSITIVE_INFINITY,
    FLOAT_RESERVED,
    SFLOAT_NAN,
    SFLOAT_NEGATIVE_INFINITY,
    SFLOAT_NRES,
    SFLOAT_POSITIVE_INFINITY,
    SFLOAT_RESERVED,
    MedFloat,
    Special,
    decode_float,
    decode_sfloat,
    encode_float,
    encode_sfloat,
    sfloat_from_int,
    sfloat_to_int,
)
from tests.unit.strategies import med_floats, sfloats

# health-devices.md §1.1, "Worked examples" table: bytes on air, mantissa, exponent, value.
SFLOAT_EXAMPLES = [
    ("80 00", 128, 0, "128"),  # §1.1 row 1 (128 mmHg)
    ("14 F0", 20, -1, "2.0"),  # §1.1 row 2
    ("C8 E0", 200, -2, "2.00"),  # §1.1 row 3
    ("02 10", 2, 1, "2E+1"),  # §1.1 row 4 (20)
    ("2E 0B", -1234, 0, "-1234"),  # §1.1 row 5
    ("A0 F0", 160, -1, "16.0"),  # §1.1 row 6 (16.0 kPa)
    ("E7 FF", -25, -1, "-2.5"),  # §1.1 row 7
    ("69 B0", 105, -5, "0.00105"),  # §1.1 row 8 (glucose in kg/L)
]


@pytest.mark.parametrize(("hex_bytes", "mantissa", "exponent", "value"), SFLOAT_EXAMPLES)
def test_sfloat_worked_examples(hex_bytes: str, mantissa: int, exponent: int, value: str) -> None:
    data = bytes.fromhex(hex_bytes)
    decoded = decode_sfloat(data)
    assert decoded == MedFloat(mantissa, exponent)
    assert decoded.value is not None
    assert str(decoded.value) == value
    assert encode_sfloat(decoded) == data


def test_sfloat_exponent_keeps_precision() -> None:
    # §1.1: 0x0002, 0xF014 and 0xE0C8 all equal 2 but mean "2", "2.0" and "2.00".
    values = [decode_sfloat(bytes.fromhex(h)).value for h in ("02 00", "14 F0", "C8 E0")]
    assert values == [Decimal(2)] * 3
    assert [str(v) for v in values] == ["2", "2.0", "2.00"]


# health-devices.md §1.1 reserved-values table (whole 16-bit value, exponent 0).
SFLOAT_SPECIAL_EXAMPLES = [
    ("FF 07", Special.NAN, SFLOAT_NAN, 2047),
    ("00 08", Special.NRES, SFLOAT_NRES, -2048),
    ("FE 07", Special.POSITIVE_INFINITY, SFLOAT_POSITIVE_INFINITY, 2046),
    ("02 08", Special.NEGATIVE_INFINITY, SFLOAT_NEGATIVE_INFINITY, -2046),
    ("01 08", Special.RESERVED, SFLOAT_RESERVED, -2047),
]


@pytest.mark.parametrize(("hex_bytes", "special", "constant", "mantissa"), SFLOAT_SPECIAL_EXAMPLES)
def test_sfloat_specials(
    hex_bytes: str, special: Special, constant: MedFloat, mantissa: int
) -> None:
    data = bytes.fromhex(hex_bytes)
    decoded = decode_sfloat(data)
    assert decoded == MedFloat(mantissa, 0, special) == constant
    assert decoded.value is None
    with pytest.raises(ValueError, match="no numeric value"):
        float(decoded)
    assert encode_sfloat(decoded) == data


def test_sfloat_special_mantissa_with_nonzero_exponent_is_a_number() -> None:
    # §1.1 strict reading (Wireshark, nRF-SDK): only the whole 16-bit value is special.
    assert decode_sfloat(bytes.fromhex("FF 17")) == MedFloat(2047, 1)


def test_sfloat_120_mmhg_is_78_00() -> None:
    # §11 pitfall: bluetooth-sig-python biases the exponent and sends 120 mmHg as 78 80.
    assert encode_sfloat(MedFloat.of("120")) == bytes.fromhex("78 00")
    assert decode_sfloat(bytes.fromhex("78 00")) == MedFloat(120, 0)
    assert decode_sfloat(bytes.fromhex("78 80")) == MedFloat(120, -8)


# health-devices.md §1.2 FLOAT examples.
FLOAT_EXAMPLES = [
    ("6C 01 00 FF", 364, -1, "36.4"),  # §1.2 0xFF00016C (36.4 °C)
    ("38 0E 00 FE", 3640, -2, "36.40"),  # §1.2 0xFE000E38
    ("2E FB FF 00", -1234, 0, "-1234"),  # §1.2 0x00FFFB2E
    ("14 00 00 FF", 20, -1, "2.0"),  # §1.2 0xFF000014
]


@pytest.mark.parametrize(("hex_bytes", "mantissa", "exponent", "value"), FLOAT_EXAMPLES)
def test_float_worked_examples(hex_bytes: str, mantissa: int, exponent: int, value: str) -> None:
    data = bytes.fromhex(hex_bytes)
    decoded = decode_float(data)
    assert decoded == MedFloat(mantissa, exponent)
    assert str(decoded.value) == value
    assert encode_float(decoded) == data


# health-devices.md §1.2 reserved-values table.
FLOAT_SPECIAL_EXAMPLES = [
    ("FF FF 7F 00", FLOAT_NAN, Special.NAN),
    ("00 00 80 00", FLOAT_NRES, Special.NRES),
    ("FE FF 7F 00", FLOAT_POSITIVE_INFINITY, Special.POSITIVE_INFINITY),
    ("02 00 80 00", FLOAT_NEGATIVE_INFINITY, Special.NEGATIVE_INFINITY),
    ("01 00 80 00", FLOAT_RESERVED, Special.RESERVED),
]


@pytest.mark.parametrize(("hex_bytes", "constant", "special"), FLOAT_SPECIAL_EXAMPLES)
def test_float_specials(hex_bytes: str, constant: MedFloat, special: Special) -> None:
    data = bytes.fromhex(hex_bytes)
    decoded = decode_float(data)
    assert decoded == constant
    assert decoded.special is special
    assert decoded.value is None
    assert encode_float(decoded) == data


def test_specials_encode_across_widths() -> None:
    # The encoders look only at `special`, so a FLOAT NaN can be sent as an SFLOAT NaN.
    assert encode_sfloat(FLOAT_NAN) == bytes.fromhex("FF 07")
    assert encode_float(SFLOAT_NRES) == bytes.fromhex("00 00 80 00")


@pytest.mark.parametrize(
    ("text", "mantissa", "exponent"),
    [("97", 97, 0), ("16.0", 160, -1), ("2.00", 200, -2), ("-2.5", -25, -1), ("1E+1", 1, 1)],
)
def test_of_keeps_decimal_precision(text: str, mantissa: int, exponent: int) -> None:
    assert MedFloat.of(text) == MedFloat(mantissa, exponent)
    assert MedFloat.of(Decimal(text)) == MedFloat(mantissa, exponent)


def test_of_int_and_bad_input() -> None:
    assert MedFloat.of(128) == MedFloat(128, 0)
    for bad in ("abc", "NaN", "Infinity"):
        with pytest.raises(ValueError):
            MedFloat.of(bad)
    with pytest.raises(TypeError):
        MedFloat.of(1.5)  # type: ignore[arg-type]


def test_float_conversion() -> None:
    assert float(MedFloat(-25, -1)) == -2.5


@pytest.mark.parametrize(
    "value",
    [MedFloat(2046, 0), MedFloat(-2046, 1), MedFloat(1, 8), MedFloat(1, -9), MedFloat(5000, 0)],
)
def test_sfloat_encode_rejects_what_does_not_fit(value: MedFloat) -> None:
    with pytest.raises(ValueError, match="SFLOAT"):
        encode_sfloat(value)


@pytest.mark.parametrize("value", [MedFloat(0x7FFFFE, 0), MedFloat(1, 128), MedFloat(1, -129)])
def test_float_encode_rejects_what_does_not_fit(value: MedFloat) -> None:
    with pytest.raises(ValueError, match="FLOAT"):
        encode_float(value)


@pytest.mark.parametrize("size", [0, 1, 3])
def test_sfloat_wrong_length(size: int) -> None:
    with pytest.raises(DecodeError, match=f"SFLOAT: {size} bytes, need 2"):
        decode_sfloat(bytes(size))


def test_sfloat_int_helpers() -> None:
    assert sfloat_from_int(0xF014) == MedFloat(20, -1)
    assert sfloat_to_int(MedFloat(20, -1)) == 0xF014
    with pytest.raises(DecodeError):
        sfloat_from_int(0x10000)


def test_every_sfloat_raw_value() -> None:
    # Exhaustive: canonical raws (mantissa within ±2045, or a special) survive a round trip;
    # the rest decode to numbers that the encoder refuses to emit.
    for raw in range(0x10000):
        decoded = sfloat_from_int(raw)
        if decoded.special is not None or abs(decoded.mantissa) <= 0x07FD:
            assert sfloat_to_int(decoded) == raw
        else:
            with pytest.raises(ValueError):
                sfloat_to_int(decoded)


@given(sfloats())
def test_sfloat_round_trip(value: MedFloat) -> None:
    assert decode_sfloat(encode_sfloat(value)) == value


@given(med_floats())
def test_float_round_trip(value: MedFloat) -> None:
    assert decode_float(encode_float(value)) == value


@given(st.integers(0, 0xFFFFFFFF))
def test_float_bytes_round_trip(raw: int) -> None:
    data = raw.to_bytes(4, "little")
    decoded = decode_float(data)
    if decoded.special is not None or abs(decoded.mantissa) <= 0x7FFFFD:
        assert encode_float(decoded) == data


@given(st.binary(max_size=40))
def test_garbage_sfloat(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_sfloat(data)


@given(st.binary(max_size=40))
def test_garbage_float(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_float(data)
