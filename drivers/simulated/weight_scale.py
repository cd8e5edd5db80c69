"""Simulated Weight Scale (Weight Scale Service 0x181D, health-devices.md §3.1-3.2)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from collections.abc import Sequence
from typing import Any, ClassVar

from bumble.gatt import Characteristic, Service

from drivers import uuids
from drivers.codec.date_time import DateTime
from drivers.codec.weight import (
    WeightMeasurement,
    WeightScaleFeature,
    encode_weight_measurement,
    encode_weight_scale_feature,
)
from drivers.simulated.device import SimScript, SimulatedDevice, read_only_characteristic, uuid16

WEIGHT_SCALE_SERVICE = uuids.WEIGHT_SCALE
WEIGHT_MEASUREMENT = uuids.WEIGHT_MEASUREMENT
WEIGHT_SCALE_FEATURE = uuids.WEIGHT_SCALE_FEATURE

# Time stamps, one user slot, no BMI, 0.005 kg resolution (code 7): a typical home scale.
DEFAULT_FEATURE = WeightScaleFeature(
    timestamp_supported=True,
    multiple_users=False,
    bmi_supported=False,
    weight_resolution=7,
    height_resolution=0,
)

DEMO_SCALE_ADDRESS = "D4:5C:A1:E0:00:01"
"""A static random address (top bits 11), as many consumer scales use."""

_KG_STEP = 0.005  # §3.1: SI weight field unit


class SimulatedWeightScale(SimulatedDevice[WeightMeasurement]):
    """A Weight Scale Service peripheral: indicates Weight Measurement, reads Feature."""

    SERVICE_UUID: ClassVar[int] = WEIGHT_SCALE_SERVICE

    def __init__(
        self, script: SimScript[WeightMeasurement], *, feature: WeightScaleFeature = DEFAULT_FEATURE
    ) -> None:
        self.feature = feature
        super().__init__(script)

    def encode(self, reading: WeightMeasurement) -> bytes:
        """Weight Measurement bytes from the project's codec."""
        return encode_weight_measurement(reading)

    def stamped(self, reading: WeightMeasurement, now: DateTime) -> WeightMeasurement:
        """The reading with the device time, if it has none and the scale keeps time."""
        if reading.timestamp is not None or not self.feature.timestamp_supported:
            return reading
        return dataclasses.replace(reading, timestamp=now)

    def profile_service(self) -> tuple[Service, Characteristic[bytes]]:
        """Weight Scale Service: measurement (indicate), feature (read), optional Date Time."""
        measurement = self.subscribable(WEIGHT_MEASUREMENT, Characteristic.Properties.INDICATE)
        feature = read_only_characteristic(WEIGHT_SCALE_FEATURE, encode_weight_scale_feature(self.feature))
        service = Service(
            uuid16(WEIGHT_SCALE_SERVICE),
            [measurement, feature, *self.date_time_characteristic()],
        )
        return service, measurement


def demo_weight_readings(
    count: int, *, start_kg: float = 82.4, seed: int = 7, end: dt.datetime | None = None
) -> list[WeightMeasurement]:
    """`count` daily morning weigh-ins ending yesterday, drifting by a few hundred grams."""
    rng = random.Random(seed)
    end = end or dt.datetime.now().replace(hour=7, minute=12, second=0, microsecond=0)
    readings = []
    kg = start_kg
    for day in range(count, 0, -1):
        kg += rng.uniform(-0.3, 0.25)
        taken = end - dt.timedelta(days=day, minutes=rng.randint(-20, 20))
        readings.append(
            WeightMeasurement(
                imperial=False,
                weight_raw=round(kg / _KG_STEP),
                timestamp=DateTime.from_datetime(taken),
            )
        )
    return readings


def demo_scale(
    address: str = DEMO_SCALE_ADDRESS,
    *,
    readings: int | Sequence[WeightMeasurement | bytes] = 3,
    name: str = "SIM Scale",
    **script: Any,
) -> SimulatedWeightScale:
    """A ready-made scale holding `readings` (a count of demo weigh-ins, or the frames)."""
    frames: list[WeightMeasurement | bytes] = (
        list(demo_weight_readings(readings)) if isinstance(readings, int) else list(readings)
    )
    defaults: dict[str, Any] = {
        "manufacturer": "Simulated Health",
        "model": "SIM-WS1",
        "serial": "WS" + address.replace(":", "")[-6:],
        "firmware": "2.1.0",
        "battery_level": 78,
    }
    return SimulatedWeightScale(
        SimScript[WeightMeasurement](
            address=address, name=name, stored=frames, **{**defaults, **script}
        )
    )
