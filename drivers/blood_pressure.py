"""SIG Blood Pressure Service (0x1810): a cuff that indicates BP Measurement (0x2A35)."""

from __future__ import annotations

from drivers import uuids
from drivers.base import Measurement, Observation
from drivers.codec.blood_pressure import (
    BloodPressureMeasurement,
    decode_blood_pressure_measurement,
)
from drivers.codec.ieee11073 import MedFloat
from drivers.standard_profile import StandardProfileDriver

# LOINC codes: health-devices.md §9.1.
LOINC_SYSTOLIC = "8480-6"
LOINC_DIASTOLIC = "8462-4"
LOINC_MEAN_ARTERIAL = "8478-0"
LOINC_PULSE_RATE = "8867-4"


def _num(v: MedFloat) -> float | None:
    value = v.value
    return None if value is None else float(value)


def bp_observations(m: BloodPressureMeasurement) -> tuple[Observation, ...]:
    """The coded values of one cuff measurement, in the unit the cuff sent."""
    obs = [
        Observation(code=LOINC_SYSTOLIC, name="Systolic blood pressure",
                    value=_num(m.systolic), unit=m.unit),
        Observation(code=LOINC_DIASTOLIC, name="Diastolic blood pressure",
                    value=_num(m.diastolic), unit=m.unit),
        Observation(code=LOINC_MEAN_ARTERIAL, name="Mean blood pressure",
                    value=_num(m.mean_arterial), unit=m.unit),
    ]
    if m.pulse_rate is not None:
        obs.append(Observation(code=LOINC_PULSE_RATE, name="Pulse rate",
                               value=_num(m.pulse_rate), unit="/min"))
    return tuple(obs)


def decode_bp(raw: bytes) -> Measurement:
    """BP Measurement bytes to a Measurement; DecodeError on bad bytes."""
    m = decode_blood_pressure_measurement(raw)
    # Many cuffs send MAP as NaN (§4.1); a reading needs systolic and diastolic to count.
    valid = m.systolic.value is not None and m.diastolic.value is not None
    return Measurement(
        kind="blood_pressure",
        observations=bp_observations(m),
        status=m.status_flags(),
        valid=valid,
        device_time=m.timestamp.to_datetime() if m.timestamp else None,
        user_index=m.user_id,
        characteristic="2a35",
        raw=bytes(raw),
    )


DRIVER = StandardProfileDriver(
    name="sig_blood_pressure",
    version="1.0",
    service=uuids.BLOOD_PRESSURE,
    measurement=uuids.BLOOD_PRESSURE_MEASUREMENT,
    decode=decode_bp,
    kind="blood_pressure",
)
