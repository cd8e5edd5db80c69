"""Driver-level decoding: bytes to Measurement, property-tested for round-trips and garbage."""

from __future__ import annotations

import contextlib

from hypothesis import given
from hypothesis import strategies as st

from drivers.base import STATUS_FLAGS
from drivers.blood_pressure import decode_bp
from drivers.codec.blood_pressure import BloodPressureMeasurement, encode_blood_pressure_measurement
from drivers.codec.errors import DecodeError
from drivers.codec.weight import WeightMeasurement, encode_weight_measurement
from drivers.weight_scale import decode_weight
from tests.unit.strategies import blood_pressure_measurements, weight_measurements


@given(blood_pressure_measurements())
def test_bp_measurement_keeps_every_value(m: BloodPressureMeasurement) -> None:
    raw = encode_blood_pressure_measurement(m)
    out = decode_bp(raw)
    assert out.raw == raw
    assert out.kind == "blood_pressure"
    expected = [m.systolic, m.diastolic, m.mean_arterial] + (
        [m.pulse_rate] if m.pulse_rate is not None else [])
    assert [o.value for o in out.observations] == [
        None if v.value is None else float(v.value) for v in expected]
    assert out.valid == (m.systolic.value is not None and m.diastolic.value is not None)
    assert set(out.status) <= {*STATUS_FLAGS, "pulse_range_reserved"}
    assert out.device_time == (m.timestamp.to_datetime() if m.timestamp else None)


@given(weight_measurements())
def test_weight_measurement_keeps_every_value(m: WeightMeasurement) -> None:
    raw = encode_weight_measurement(m)
    out = decode_weight(raw)
    assert out.valid == m.successful
    assert out.observations[0].value == (None if m.weight is None else float(m.weight))
    assert out.observations[0].unit == ("[lb_av]" if m.imperial else "kg")


@given(st.binary(max_size=40))
def test_garbage_raises_only_decode_error(data: bytes) -> None:
    for decode in (decode_bp, decode_weight):
        with contextlib.suppress(DecodeError):
            decode(data)


def test_unknown_user_0xff_is_kept_as_255() -> None:
    # 0xFF is the device saying "a guest", not "I cannot tell": it must stay visible (issue 5).
    # health-devices.md §12 BPM row 1 with its User ID byte (offset 16) set to 0xFF, "unknown user".
    raw = bytearray.fromhex("1E800052006100E907030E07340A4000010400")
    assert decode_bp(bytes(raw)).user_index == 1
    raw[16] = 0xFF
    assert decode_bp(bytes(raw)).user_index == 255
