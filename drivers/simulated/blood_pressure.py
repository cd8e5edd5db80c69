"""Simulated blood pressure cuff (Blood Pressure Service 0x1810, health-devices.md §4.1-4.3)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, ClassVar

from bumble.device import Connection
from bumble.gatt import Characteristic, Service

from drivers import uuids
from drivers.codec.blood_pressure import (
    FEATURE_BODY_MOVEMENT,
    FEATURE_CUFF_FIT,
    FEATURE_IRREGULAR_PULSE,
    BloodPressureFeature,
    BloodPressureMeasurement,
    encode_blood_pressure_feature,
    encode_blood_pressure_measurement,
    encode_intermediate_cuff_pressure,
)
from drivers.codec.date_time import DateTime
from drivers.codec.ieee11073 import SFLOAT_NAN, MedFloat
from drivers.simulated.device import (
    OP_TIMEOUT_S,
    SimScript,
    SimulatedDevice,
    read_only_characteristic,
    uuid16,
)

BLOOD_PRESSURE_SERVICE = uuids.BLOOD_PRESSURE
BLOOD_PRESSURE_MEASUREMENT = uuids.BLOOD_PRESSURE_MEASUREMENT
INTERMEDIATE_CUFF_PRESSURE = uuids.INTERMEDIATE_CUFF_PRESSURE
BLOOD_PRESSURE_FEATURE = uuids.BLOOD_PRESSURE_FEATURE

DEFAULT_FEATURE = BloodPressureFeature(
    FEATURE_BODY_MOVEMENT | FEATURE_CUFF_FIT | FEATURE_IRREGULAR_PULSE
)
"""What a common upper-arm cuff declares: movement, cuff fit and irregular pulse detection."""

DEMO_CUFF_ADDRESS = "D4:5C:A1:E0:00:02"
"""A static random address (top bits 11)."""

# Spacing of the intermediate pressures sent before a result, in the frame's own unit: 12 mmHg
# is 1.6 kPa (1 mmHg = 0.1333 kPa), and kPa values keep one decimal as kPa cuffs display them.
_DEFLATION_STEP = {False: Decimal(12), True: Decimal("1.6")}
_RESOLUTION = {False: Decimal(1), True: Decimal("0.1")}
_DEFAULT_SYSTOLIC = {False: Decimal(120), True: Decimal("16.0")}  # when the result is NaN


class SimulatedBloodPressureMonitor(SimulatedDevice[BloodPressureMeasurement]):
    """A Blood Pressure Service peripheral: BPM indications, optional cuff-pressure notifications."""

    SERVICE_UUID: ClassVar[int] = BLOOD_PRESSURE_SERVICE

    def __init__(
        self,
        script: SimScript[BloodPressureMeasurement],
        *,
        feature: BloodPressureFeature = DEFAULT_FEATURE,
        intermediate_frames: int = 3,
    ) -> None:
        self.feature = feature
        self.intermediate_frames = intermediate_frames
        self.intermediate_sent: list[bytes] = []
        """Intermediate Cuff Pressure payloads notified, in order (the gateway ignores them)."""
        self._icp: Characteristic[bytes] | None = None
        super().__init__(script)

    def encode(self, reading: BloodPressureMeasurement) -> bytes:
        """Blood Pressure Measurement bytes from the project's codec."""
        return encode_blood_pressure_measurement(reading)

    def stamped(
        self, reading: BloodPressureMeasurement, now: DateTime
    ) -> BloodPressureMeasurement:
        """The reading with the device time, if it has none."""
        return reading if reading.timestamp is not None else dataclasses.replace(reading, timestamp=now)

    def profile_service(self) -> tuple[Service, Characteristic[bytes]]:
        """Blood Pressure Service: BPM (indicate), ICP (notify, if any), feature, Date Time."""
        measurement = self.subscribable(BLOOD_PRESSURE_MEASUREMENT, Characteristic.Properties.INDICATE)
        characteristics = [measurement]
        if self.intermediate_frames > 0:
            self._icp = self.subscribable(INTERMEDIATE_CUFF_PRESSURE, Characteristic.Properties.NOTIFY)
            characteristics.append(self._icp)
        characteristics.append(
            read_only_characteristic(BLOOD_PRESSURE_FEATURE, encode_blood_pressure_feature(self.feature))
        )
        characteristics += self.date_time_characteristic()
        return Service(uuid16(BLOOD_PRESSURE_SERVICE), characteristics), measurement

    async def before_frame(
        self, connection: Connection, frame: BloodPressureMeasurement | bytes
    ) -> None:
        """Notify a few falling cuff pressures before a result, to a subscribed hub only."""
        if self._icp is None or isinstance(frame, bytes):
            return
        device = self._require_device()
        for pressure in intermediate_pressures(frame, self.intermediate_frames):
            # §4.2: the current pressure rides in the systolic slot; diastolic and MAP are NaN.
            payload = encode_intermediate_cuff_pressure(
                BloodPressureMeasurement(
                    kpa=frame.kpa,
                    systolic=pressure,
                    diastolic=SFLOAT_NAN,
                    mean_arterial=SFLOAT_NAN,
                    user_id=frame.user_id,
                )
            )
            # Unforced: bumble sends nothing unless this link enabled ICP notifications.
            subscribed = device.gatt_server.read_cccd(connection, self._icp)[0] & 0x01
            async with asyncio.timeout(OP_TIMEOUT_S):
                await device.notify_subscriber(connection, self._icp, payload)
            if subscribed:
                self.intermediate_sent.append(payload)


def intermediate_pressures(frame: BloodPressureMeasurement, count: int) -> list[MedFloat]:
    """`count` falling cuff pressures above the frame's systolic, in the frame's unit."""
    step, resolution = _DEFLATION_STEP[frame.kpa], _RESOLUTION[frame.kpa]
    result = frame.systolic.value
    top = (result if result is not None else _DEFAULT_SYSTOLIC[frame.kpa]) + step * count
    # Quantized so the mantissa fits an SFLOAT (12 bits) whatever precision the result had.
    return [MedFloat.of((top - step * i).quantize(resolution)) for i in range(count)]


def demo_bp_readings(
    count: int, *, seed: int = 11, end: dt.datetime | None = None
) -> list[BloodPressureMeasurement]:
    """`count` daily morning readings ending yesterday, around 128/82 mmHg, pulse ~70."""
    rng = random.Random(seed)
    end = end or dt.datetime.now().replace(hour=7, minute=40, second=0, microsecond=0)
    readings = []
    for day in range(count, 0, -1):
        systolic = rng.randint(118, 138)
        diastolic = rng.randint(74, 88)
        # MAP ≈ DBP + (SBP - DBP) / 3, rounded as cuffs display it.
        mean_arterial = round(diastolic + (systolic - diastolic) / 3)
        taken = end - dt.timedelta(days=day, minutes=rng.randint(-25, 25))
        readings.append(
            BloodPressureMeasurement(
                kpa=False,
                systolic=MedFloat.of(systolic),
                diastolic=MedFloat.of(diastolic),
                mean_arterial=MedFloat.of(mean_arterial),
                timestamp=DateTime.from_datetime(taken),
                pulse_rate=MedFloat.of(rng.randint(62, 78)),
                user_id=1,
                status=0,
            )
        )
    return readings


def demo_cuff(
    address: str = DEMO_CUFF_ADDRESS,
    *,
    readings: int | Sequence[BloodPressureMeasurement | bytes] = 3,
    name: str = "SIM Cuff",
    intermediate_frames: int = 3,
    **script: Any,
) -> SimulatedBloodPressureMonitor:
    """A ready-made cuff holding `readings` (a count of demo readings, or the frames)."""
    frames: list[BloodPressureMeasurement | bytes] = (
        list(demo_bp_readings(readings)) if isinstance(readings, int) else list(readings)
    )
    defaults: dict[str, Any] = {
        "manufacturer": "Simulated Health",
        "model": "SIM-BP1",
        "serial": "BP" + address.replace(":", "")[-6:],
        "firmware": "1.4.2",
        "battery_level": 64,
        "bonding_required": True,
    }
    return SimulatedBloodPressureMonitor(
        SimScript[BloodPressureMeasurement](
            address=address, name=name, stored=frames, **{**defaults, **script}
        ),
        intermediate_frames=intermediate_frames,
    )
