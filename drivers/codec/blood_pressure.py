"""Blood Pressure Measurement 0x2A35, Intermediate Cuff Pressure 0x2A36, Feature 0x2A49 (§4)."""

from __future__ import annotations

from dataclasses import dataclass

from drivers.codec.date_time import DATE_TIME_SIZE, DateTime, decode_date_time_at, encode_date_time
from drivers.codec.errors import DecodeError
from drivers.codec.ieee11073 import SFLOAT_SIZE, MedFloat, encode_sfloat, sfloat_from_int

# §4.1 flags byte; bits 5-7 are RFU here (5 and 6 belong to the Enhanced BPM, §4.4).
FLAG_KPA = 0x01
FLAG_TIMESTAMP = 0x02
FLAG_PULSE_RATE = 0x04
FLAG_USER_ID = 0x08
FLAG_STATUS = 0x10

USER_UNKNOWN = 0xFF  # §4.1
UNIT_MMHG, UNIT_KPA = "mm[Hg]", "kPa"  # UCUM

# §4.1 Measurement Status bits. Bits 3-4 are one 2-bit field, not two flags (§11 pitfall).
STATUS_BODY_MOVEMENT = 1 << 0
STATUS_CUFF_LOOSE = 1 << 1
STATUS_IRREGULAR_PULSE = 1 << 2
STATUS_PULSE_RANGE_SHIFT, STATUS_PULSE_RANGE_MASK = 3, 0b11
STATUS_IMPROPER_POSITION = 1 << 5
_PULSE_RANGE_NAMES = {
    0b01: "pulse_above_range",
    0b10: "pulse_below_range",
    0b11: "pulse_range_reserved",
}

_MIN_SIZE = 1 + 3 * SFLOAT_SIZE


@dataclass(frozen=True)
class BloodPressureMeasurement:
    """One BPM (or ICP, where systolic holds the cuff pressure); status is the raw uint16."""

    kpa: bool
    systolic: MedFloat
    diastolic: MedFloat
    mean_arterial: MedFloat
    timestamp: DateTime | None = None
    pulse_rate: MedFloat | None = None
    user_id: int | None = None
    status: int | None = None

    @property
    def unit(self) -> str:
        """UCUM unit of the three pressures: "mm[Hg]" or "kPa"."""
        return UNIT_KPA if self.kpa else UNIT_MMHG

    def status_flags(self) -> tuple[str, ...]:
        """Names of the set Measurement Status conditions, in bit order; empty if no status."""
        if self.status is None:
            return ()
        names: list[str] = []
        if self.status & STATUS_BODY_MOVEMENT:
            names.append("body_movement")
        if self.status & STATUS_CUFF_LOOSE:
            names.append("cuff_loose")
        if self.status & STATUS_IRREGULAR_PULSE:
            names.append("irregular_pulse")
        pulse_range = (self.status >> STATUS_PULSE_RANGE_SHIFT) & STATUS_PULSE_RANGE_MASK
        if pulse_range:
            names.append(_PULSE_RANGE_NAMES[pulse_range])
        if self.status & STATUS_IMPROPER_POSITION:
            names.append("improper_position")
        return tuple(names)


def _sfloat_at(data: bytes, offset: int) -> MedFloat:
    """The SFLOAT at offset (the caller has checked the length)."""
    return sfloat_from_int(int.from_bytes(data[offset : offset + SFLOAT_SIZE], "little"))


def _decode(data: bytes, what: str) -> BloodPressureMeasurement:
    """The shared BPM/ICP layout of §4.1; RFU flag bits ignored, trailing bytes an error."""
    if len(data) < _MIN_SIZE:
        raise DecodeError(f"{what}: {len(data)} bytes, need at least {_MIN_SIZE}")
    flags = data[0]
    need = (
        _MIN_SIZE
        + (DATE_TIME_SIZE if flags & FLAG_TIMESTAMP else 0)
        + (SFLOAT_SIZE if flags & FLAG_PULSE_RATE else 0)
        + (1 if flags & FLAG_USER_ID else 0)
        + (2 if flags & FLAG_STATUS else 0)
    )
    if len(data) != need:
        excess = "short" if len(data) < need else "trailing bytes"
        raise DecodeError(f"{what}: {len(data)} bytes, flags {flags:#04x} need {need} ({excess})")
    offset = _MIN_SIZE
    timestamp = pulse_rate = user_id = status = None
    if flags & FLAG_TIMESTAMP:
        try:
            timestamp = decode_date_time_at(data, offset)
        except DecodeError as exc:
            raise DecodeError(f"{what}: {exc}") from exc
        offset += DATE_TIME_SIZE
    if flags & FLAG_PULSE_RATE:
        pulse_rate = _sfloat_at(data, offset)
        offset += SFLOAT_SIZE
    if flags & FLAG_USER_ID:
        user_id = data[offset]
        offset += 1
    if flags & FLAG_STATUS:
        status = int.from_bytes(data[offset : offset + 2], "little")
    return BloodPressureMeasurement(
        kpa=bool(flags & FLAG_KPA),
        systolic=_sfloat_at(data, 1),
        diastolic=_sfloat_at(data, 3),
        mean_arterial=_sfloat_at(data, 5),
        timestamp=timestamp,
        pulse_rate=pulse_rate,
        user_id=user_id,
        status=status,
    )


def _encode(m: BloodPressureMeasurement, what: str) -> bytes:
    """The §4.1 bytes of m (no RFU flag bits); ValueError for a value that does not fit."""
    flags = FLAG_KPA if m.kpa else 0
    body = bytearray(encode_sfloat(m.systolic) + encode_sfloat(m.diastolic))
    body += encode_sfloat(m.mean_arterial)
    if m.timestamp is not None:
        flags |= FLAG_TIMESTAMP
        body += encode_date_time(m.timestamp)
    if m.pulse_rate is not None:
        flags |= FLAG_PULSE_RATE
        body += encode_sfloat(m.pulse_rate)
    if m.user_id is not None:
        if not 0 <= m.user_id <= 0xFF:
            raise ValueError(f"{what}: user id {m.user_id} not 0..255")
        flags |= FLAG_USER_ID
        body.append(m.user_id)
    if m.status is not None:
        if not 0 <= m.status <= 0xFFFF:
            raise ValueError(f"{what}: status {m.status:#x} not a uint16")
        flags |= FLAG_STATUS
        body += m.status.to_bytes(2, "little")
    return bytes((flags,)) + bytes(body)


def decode_blood_pressure_measurement(data: bytes) -> BloodPressureMeasurement:
    """A Blood Pressure Measurement 0x2A35."""
    return _decode(data, "blood pressure measurement")


def encode_blood_pressure_measurement(m: BloodPressureMeasurement) -> bytes:
    """The bytes of a Blood Pressure Measurement 0x2A35; ValueError if a value does not fit."""
    return _encode(m, "blood pressure measurement")


def decode_intermediate_cuff_pressure(data: bytes) -> BloodPressureMeasurement:
    """An Intermediate Cuff Pressure 0x2A36: live feedback only, cuff pressure in systolic."""
    return _decode(data, "intermediate cuff pressure")


def encode_intermediate_cuff_pressure(m: BloodPressureMeasurement) -> bytes:
    """The bytes of an Intermediate Cuff Pressure 0x2A36 (same layout as 0x2A35, §4.2)."""
    return _encode(m, "intermediate cuff pressure")


# §4.3 Blood Pressure Feature bits; 5-8 were added by BPS 1.1, 9-15 are RFU.
FEATURE_BODY_MOVEMENT = 1 << 0
FEATURE_CUFF_FIT = 1 << 1
FEATURE_IRREGULAR_PULSE = 1 << 2
FEATURE_PULSE_RATE_RANGE = 1 << 3
FEATURE_MEASUREMENT_POSITION = 1 << 4
FEATURE_MULTIPLE_BOND = 1 << 5
FEATURE_E2E_CRC = 1 << 6
FEATURE_USER_DATA_SERVICE = 1 << 7
FEATURE_USER_FACING_TIME = 1 << 8
BLOOD_PRESSURE_FEATURE_SIZE = 2


@dataclass(frozen=True)
class BloodPressureFeature:
    """Blood Pressure Feature 0x2A49 as the raw uint16 (RFU bits kept), with named bits."""

    raw: int

    @property
    def body_movement_detection(self) -> bool:
        """Bit 0: body movement detection supported."""
        return bool(self.raw & FEATURE_BODY_MOVEMENT)

    @property
    def cuff_fit_detection(self) -> bool:
        """Bit 1: cuff fit detection supported."""
        return bool(self.raw & FEATURE_CUFF_FIT)

    @property
    def irregular_pulse_detection(self) -> bool:
        """Bit 2: irregular pulse detection supported."""
        return bool(self.raw & FEATURE_IRREGULAR_PULSE)

    @property
    def pulse_rate_range_detection(self) -> bool:
        """Bit 3: pulse rate range detection supported."""
        return bool(self.raw & FEATURE_PULSE_RATE_RANGE)

    @property
    def measurement_position_detection(self) -> bool:
        """Bit 4: measurement position detection supported."""
        return bool(self.raw & FEATURE_MEASUREMENT_POSITION)

    @property
    def multiple_bond(self) -> bool:
        """Bit 5: multiple bond support (BPS 1.1)."""
        return bool(self.raw & FEATURE_MULTIPLE_BOND)

    @property
    def e2e_crc(self) -> bool:
        """Bit 6: E2E-CRC support (BPS 1.1)."""
        return bool(self.raw & FEATURE_E2E_CRC)

    @property
    def user_data_service(self) -> bool:
        """Bit 7: User Data Service support (BPS 1.1)."""
        return bool(self.raw & FEATURE_USER_DATA_SERVICE)

    @property
    def user_facing_time(self) -> bool:
        """Bit 8: User Facing Time support (BPS 1.1)."""
        return bool(self.raw & FEATURE_USER_FACING_TIME)


def decode_blood_pressure_feature(data: bytes) -> BloodPressureFeature:
    """A Blood Pressure Feature from exactly 2 bytes (uint16 LE)."""
    if len(data) != BLOOD_PRESSURE_FEATURE_SIZE:
        raise DecodeError(
            f"blood pressure feature: {len(data)} bytes, need {BLOOD_PRESSURE_FEATURE_SIZE}"
        )
    return BloodPressureFeature(int.from_bytes(data, "little"))


def encode_blood_pressure_feature(f: BloodPressureFeature) -> bytes:
    """The 2 bytes of a Blood Pressure Feature; ValueError if raw is not a uint16."""
    if not 0 <= f.raw <= 0xFFFF:
        raise ValueError(f"blood pressure feature: raw {f.raw:#x} not a uint16")
    return f.raw.to_bytes(BLOOD_PRESSURE_FEATURE_SIZE, "little")
