"""Hypothesis strategies for codec values and canonical wire bytes, reusable by other tests.

Value strategies (`sfloats()`, `date_times()`, ...) produce only values the encoders accept.
Byte strategies (`*_bytes()`) build canonical wire bytes with struct, independently of the
encoders, so `encode(decode(b)) == b` checks the codec against a second implementation.
"""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from drivers.codec.blood_pressure import BloodPressureFeature, BloodPressureMeasurement
from drivers.codec.date_time import CurrentTime, DateTime
from drivers.codec.ieee11073 import (
    FLOAT_MANTISSA_MAX,
    FLOAT_NAN,
    FLOAT_NEGATIVE_INFINITY,
    FLOAT_NRES,
    FLOAT_POSITIVE_INFINITY,
    FLOAT_RESERVED,
    SFLOAT_MANTISSA_MAX,
    SFLOAT_NAN,
    SFLOAT_NEGATIVE_INFINITY,
    SFLOAT_NRES,
    SFLOAT_POSITIVE_INFINITY,
    SFLOAT_RESERVED,
    MedFloat,
)
from drivers.codec.weight import WEIGHT_UNSUCCESSFUL, WeightMeasurement, WeightScaleFeature

SFLOAT_SPECIALS = (
    SFLOAT_NAN,
    SFLOAT_NRES,
    SFLOAT_POSITIVE_INFINITY,
    SFLOAT_NEGATIVE_INFINITY,
    SFLOAT_RESERVED,
)
FLOAT_SPECIALS = (
    FLOAT_NAN,
    FLOAT_NRES,
    FLOAT_POSITIVE_INFINITY,
    FLOAT_NEGATIVE_INFINITY,
    FLOAT_RESERVED,
)


def sfloat_numbers() -> st.SearchStrategy[MedFloat]:
    """Finite SFLOATs that encode exactly (mantissa ±2045, exponent -8..7)."""
    return st.builds(
        MedFloat,
        st.integers(-SFLOAT_MANTISSA_MAX, SFLOAT_MANTISSA_MAX),
        st.integers(-8, 7),
    )


def sfloats() -> st.SearchStrategy[MedFloat]:
    """Any encodable SFLOAT, specials included (as the decoder returns them)."""
    return st.one_of(sfloat_numbers(), st.sampled_from(SFLOAT_SPECIALS))


def med_floats() -> st.SearchStrategy[MedFloat]:
    """Any encodable 32-bit FLOAT, specials included (as the decoder returns them)."""
    numbers = st.builds(
        MedFloat,
        st.integers(-FLOAT_MANTISSA_MAX, FLOAT_MANTISSA_MAX),
        st.integers(-128, 127),
    )
    return st.one_of(numbers, st.sampled_from(FLOAT_SPECIALS))


def _date_time_fields() -> st.SearchStrategy[tuple[int, int, int, int, int, int]]:
    """Field tuples inside the §2.1 ranges, unknown (0) year/month/day and Feb 31 included."""
    return st.tuples(
        st.one_of(st.just(0), st.integers(1582, 9999)),
        st.integers(0, 12),
        st.integers(0, 31),
        st.integers(0, 23),
        st.integers(0, 59),
        st.integers(0, 59),
    )


def date_times() -> st.SearchStrategy[DateTime]:
    """Any encodable DateTime, including unknown fields and impossible dates."""
    return _date_time_fields().map(lambda fields: DateTime(*fields))


def date_time_bytes() -> st.SearchStrategy[bytes]:
    """Canonical 7-byte Date Time values, packed with struct."""
    return _date_time_fields().map(lambda f: struct.pack("<HBBBBB", *f))


def current_times() -> st.SearchStrategy[CurrentTime]:
    """Any encodable CurrentTime (RFU adjust-reason bits included, as the decoder keeps them)."""
    return st.builds(
        CurrentTime,
        date_times(),
        st.integers(0, 7),
        st.integers(0, 255),
        st.integers(0, 255),
    )


def _optional(strategy: st.SearchStrategy[int]) -> st.SearchStrategy[int | None]:
    """strategy or None."""
    return st.none() | strategy


@st.composite
def weight_measurements(draw: st.DrawFn) -> WeightMeasurement:
    """Spec-conforming Weight Measurements (no BMI/height when unsuccessful)."""
    weight_raw = draw(st.one_of(st.just(WEIGHT_UNSUCCESSFUL), st.integers(0, 0xFFFF)))
    with_bmi = weight_raw != WEIGHT_UNSUCCESSFUL and draw(st.booleans())
    return WeightMeasurement(
        imperial=draw(st.booleans()),
        weight_raw=weight_raw,
        timestamp=draw(st.none() | date_times()),
        user_id=draw(_optional(st.integers(0, 0xFF))),
        bmi_raw=draw(st.integers(0, 0xFFFF)) if with_bmi else None,
        height_raw=draw(st.integers(0, 0xFFFF)) if with_bmi else None,
    )


@st.composite
def weight_measurement_bytes(draw: st.DrawFn) -> bytes:
    """Canonical Weight Measurement bytes (RFU flag bits clear), packed with struct."""
    flags = draw(st.integers(0, 0x0F))
    weight_raw = draw(st.integers(0, 0xFFFF))
    if weight_raw == WEIGHT_UNSUCCESSFUL:
        flags &= ~0x08
    out = struct.pack("<BH", flags, weight_raw)
    if flags & 0x02:
        out += draw(date_time_bytes())
    if flags & 0x04:
        out += struct.pack("<B", draw(st.integers(0, 0xFF)))
    if flags & 0x08:
        out += struct.pack("<HH", draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF)))
    return out


def weight_scale_features() -> st.SearchStrategy[WeightScaleFeature]:
    """Any encodable WeightScaleFeature (RFU resolution codes included)."""
    return st.builds(
        WeightScaleFeature,
        st.booleans(),
        st.booleans(),
        st.booleans(),
        st.integers(0, 15),
        st.integers(0, 7),
    )


def blood_pressure_measurements() -> st.SearchStrategy[BloodPressureMeasurement]:
    """Any encodable BPM/ICP value."""
    return st.builds(
        BloodPressureMeasurement,
        kpa=st.booleans(),
        systolic=sfloats(),
        diastolic=sfloats(),
        mean_arterial=sfloats(),
        timestamp=st.none() | date_times(),
        pulse_rate=st.none() | sfloats(),
        user_id=_optional(st.integers(0, 0xFF)),
        status=_optional(st.integers(0, 0xFFFF)),
    )


def _canonical_sfloat_raw(raw: int) -> bool:
    """True if raw is a special or its mantissa is within the encodable ±2045."""
    if raw in (0x07FE, 0x07FF, 0x0800, 0x0801, 0x0802):
        return True
    mantissa = raw & 0x0FFF
    return mantissa <= SFLOAT_MANTISSA_MAX or mantissa >= 0x1000 - SFLOAT_MANTISSA_MAX


def sfloat_bytes() -> st.SearchStrategy[bytes]:
    """Canonical 2-byte SFLOATs."""
    return st.integers(0, 0xFFFF).filter(_canonical_sfloat_raw).map(lambda r: struct.pack("<H", r))


@st.composite
def blood_pressure_bytes(draw: st.DrawFn) -> bytes:
    """Canonical BPM/ICP bytes (RFU flag bits clear), packed with struct."""
    flags = draw(st.integers(0, 0x1F))
    out = struct.pack("<B", flags) + b"".join(draw(sfloat_bytes()) for _ in range(3))
    if flags & 0x02:
        out += draw(date_time_bytes())
    if flags & 0x04:
        out += draw(sfloat_bytes())
    if flags & 0x08:
        out += struct.pack("<B", draw(st.integers(0, 0xFF)))
    if flags & 0x10:
        out += struct.pack("<H", draw(st.integers(0, 0xFFFF)))
    return out


def blood_pressure_features() -> st.SearchStrategy[BloodPressureFeature]:
    """Any BloodPressureFeature (RFU bits included, the raw value is kept)."""
    return st.builds(BloodPressureFeature, st.integers(0, 0xFFFF))
