"""SIG Weight Scale Service (0x181D): a scale that indicates Weight Measurement (0x2A9D)."""

from __future__ import annotations

from decimal import Decimal

from drivers import uuids
from drivers.base import Measurement, Observation
from drivers.codec.weight import WeightMeasurement, decode_weight_measurement
from drivers.standard_profile import StandardProfileDriver

# LOINC codes: health-devices.md §9.1.
LOINC_BODY_WEIGHT = "29463-7"
LOINC_BMI = "39156-5"
LOINC_BODY_HEIGHT = "8302-2"


def _num(v: Decimal | None) -> float | None:
    return None if v is None else float(v)


def weight_observations(m: WeightMeasurement) -> tuple[Observation, ...]:
    """The coded values of one weight measurement, in the unit the scale sent."""
    obs = [Observation(code=LOINC_BODY_WEIGHT, name="Body weight", value=_num(m.weight),
                       unit=m.weight_unit)]
    if m.bmi_raw is not None and m.successful:
        obs.append(Observation(code=LOINC_BMI, name="Body mass index", value=_num(m.bmi),
                               unit="kg/m2"))
    if m.height_raw is not None and m.successful:
        obs.append(Observation(code=LOINC_BODY_HEIGHT, name="Body height", value=_num(m.height),
                               unit=m.height_unit))
    return tuple(obs)


def decode_weight(raw: bytes) -> Measurement:
    """Weight Measurement bytes to a Measurement; DecodeError on bad bytes."""
    m = decode_weight_measurement(raw)
    return Measurement(
        kind="body_weight",
        observations=weight_observations(m),
        valid=m.successful,
        device_time=m.timestamp.to_datetime() if m.timestamp else None,
        user_index=m.user_id,
        characteristic="2a9d",
        raw=bytes(raw),
    )


DRIVER = StandardProfileDriver(
    name="sig_weight_scale",
    version="1.0",
    service=uuids.WEIGHT_SCALE,
    measurement=uuids.WEIGHT_MEASUREMENT,
    decode=decode_weight,
    kind="body_weight",
)
