"""Weight Measurement 0x2A9D and Weight Scale Feature 0x2A9E (health-devices.md §3.1-3.2).

Decimals keep the resolution of the field: 16270 * 0.005 kg is Decimal('81.350'), 18040 * 0.01 lb
is Decimal('180.40') (trailing zeros are precision, as the HL7 PHD IG asks; §1.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from drivers.codec.date_time import DATE_TIME_SIZE, DateTime, decode_date_time_at, encode_date_time
from drivers.codec.errors import DecodeError

# §3.1 flags byte; bits 4-7 are RFU.
FLAG_IMPERIAL = 0x01
FLAG_TIMESTAMP = 0x02
FLAG_USER_ID = 0x04
FLAG_BMI_HEIGHT = 0x08

# §3.1: weight 0xFFFF = "Measurement Unsuccessful"; user 0xFF = unknown user.
WEIGHT_UNSUCCESSFUL = 0xFFFF
USER_UNKNOWN = 0xFF

# §3.1 fixed field multipliers (the GATT definition, not the Feature resolution).
WEIGHT_STEP_KG = Decimal("0.005")
WEIGHT_STEP_LB = Decimal("0.01")
BMI_STEP = Decimal("0.1")
HEIGHT_STEP_M = Decimal("0.001")
HEIGHT_STEP_IN = Decimal("0.1")

# UCUM units (§9).
UNIT_KG, UNIT_LB = "kg", "[lb_av]"
UNIT_M, UNIT_IN = "m", "[in_i]"

_UINT16_MAX = 0xFFFF
_UINT8_MAX = 0xFF


@dataclass(frozen=True)
class WeightMeasurement:
    """One Weight Measurement, raw field values as sent; scaled values via properties."""

    imperial: bool
    weight_raw: int
    timestamp: DateTime | None = None
    user_id: int | None = None
    bmi_raw: int | None = None
    height_raw: int | None = None

    @property
    def successful(self) -> bool:
        """False when the scale sent 0xFFFF, "Measurement Unsuccessful"."""
        return self.weight_raw != WEIGHT_UNSUCCESSFUL

    @property
    def weight(self) -> Decimal | None:
        """Weight in weight_unit (kg * 0.005 or lb * 0.01); None if unsuccessful."""
        if not self.successful:
            return None
        return self.weight_raw * (WEIGHT_STEP_LB if self.imperial else WEIGHT_STEP_KG)

    @property
    def weight_unit(self) -> str:
        """UCUM unit of weight: "kg" or "[lb_av]"."""
        return UNIT_LB if self.imperial else UNIT_KG

    @property
    def bmi(self) -> Decimal | None:
        """BMI in kg/m² (* 0.1), or None if not sent."""
        return None if self.bmi_raw is None else self.bmi_raw * BMI_STEP

    @property
    def height(self) -> Decimal | None:
        """Height in height_unit (m * 0.001 or in * 0.1), or None if not sent."""
        if self.height_raw is None:
            return None
        return self.height_raw * (HEIGHT_STEP_IN if self.imperial else HEIGHT_STEP_M)

    @property
    def height_unit(self) -> str:
        """UCUM unit of height: "m" or "[in_i]"."""
        return UNIT_IN if self.imperial else UNIT_M


def decode_weight_measurement(data: bytes) -> WeightMeasurement:
    """A Weight Measurement; RFU flag bits are ignored, trailing bytes are an error."""
    if not data:
        raise DecodeError("weight measurement: 0 bytes, need at least 3")
    flags = data[0]
    need = (
        3
        + (DATE_TIME_SIZE if flags & FLAG_TIMESTAMP else 0)
        + (1 if flags & FLAG_USER_ID else 0)
        + (4 if flags & FLAG_BMI_HEIGHT else 0)
    )
    if len(data) != need:
        what = "short" if len(data) < need else "trailing bytes"
        raise DecodeError(
            f"weight measurement: {len(data)} bytes, flags {flags:#04x} need {need} ({what})"
        )
    weight_raw = int.from_bytes(data[1:3], "little")
    offset = 3
    timestamp = user_id = bmi_raw = height_raw = None
    if flags & FLAG_TIMESTAMP:
        try:
            timestamp = decode_date_time_at(data, offset)
        except DecodeError as exc:
            raise DecodeError(f"weight measurement: {exc}") from exc
        offset += DATE_TIME_SIZE
    if flags & FLAG_USER_ID:
        user_id = data[offset]
        offset += 1
    if flags & FLAG_BMI_HEIGHT:
        # §3.1: BMI and Height always travel together under one flag.
        bmi_raw = int.from_bytes(data[offset : offset + 2], "little")
        height_raw = int.from_bytes(data[offset + 2 : offset + 4], "little")
    # Decoding is lenient about BMI/height with 0xFFFF; only the encoder insists on the spec.
    return WeightMeasurement(
        bool(flags & FLAG_IMPERIAL), weight_raw, timestamp, user_id, bmi_raw, height_raw
    )


def _check_uint(name: str, value: int, top: int) -> None:
    """ValueError unless 0 <= value <= top."""
    if not 0 <= value <= top:
        raise ValueError(f"weight measurement: {name} {value} not 0..{top}")


def encode_weight_measurement(m: WeightMeasurement) -> bytes:
    """The bytes of a spec-conforming Weight Measurement (no RFU bits); ValueError otherwise."""
    if (m.bmi_raw is None) != (m.height_raw is None):
        raise ValueError("weight measurement: BMI and height must be both present or both absent")
    if not m.successful and m.bmi_raw is not None:
        # §3.1: with "Measurement Unsuccessful" only Time Stamp and User ID may follow.
        raise ValueError("weight measurement: BMI/height not allowed with unsuccessful weight")
    _check_uint("weight", m.weight_raw, _UINT16_MAX)
    flags = FLAG_IMPERIAL if m.imperial else 0
    body = bytearray(m.weight_raw.to_bytes(2, "little"))
    if m.timestamp is not None:
        flags |= FLAG_TIMESTAMP
        body += encode_date_time(m.timestamp)
    if m.user_id is not None:
        _check_uint("user id", m.user_id, _UINT8_MAX)
        flags |= FLAG_USER_ID
        body.append(m.user_id)
    if m.bmi_raw is not None and m.height_raw is not None:
        _check_uint("BMI", m.bmi_raw, _UINT16_MAX)
        _check_uint("height", m.height_raw, _UINT16_MAX)
        flags |= FLAG_BMI_HEIGHT
        body += m.bmi_raw.to_bytes(2, "little") + m.height_raw.to_bytes(2, "little")
    return bytes((flags,)) + bytes(body)


# §3.2 Weight Scale Feature bit layout.
_FEATURE_TIMESTAMP = 1 << 0
_FEATURE_MULTIPLE_USERS = 1 << 1
_FEATURE_BMI = 1 << 2
_WEIGHT_RES_SHIFT, _WEIGHT_RES_MASK = 3, 0xF
_HEIGHT_RES_SHIFT, _HEIGHT_RES_MASK = 7, 0x7
WEIGHT_SCALE_FEATURE_SIZE = 4

# §3.2 resolution codes -> (SI step, imperial step); codes not listed are unspecified or RFU.
WEIGHT_RESOLUTIONS: dict[int, tuple[Decimal, Decimal]] = {
    code: (Decimal(kg), Decimal(lb))
    for code, kg, lb in (
        (1, "0.5", "1"),
        (2, "0.2", "0.5"),
        (3, "0.1", "0.2"),
        (4, "0.05", "0.1"),
        (5, "0.02", "0.05"),
        (6, "0.01", "0.02"),
        (7, "0.005", "0.01"),
    )
}
HEIGHT_RESOLUTIONS: dict[int, tuple[Decimal, Decimal]] = {
    code: (Decimal(m), Decimal(inch))
    for code, m, inch in ((1, "0.01", "1"), (2, "0.005", "0.5"), (3, "0.001", "0.1"))
}


@dataclass(frozen=True)
class WeightScaleFeature:
    """Weight Scale Feature 0x2A9E; resolutions are the raw §3.2 codes (0 = unspecified)."""

    timestamp_supported: bool
    multiple_users: bool
    bmi_supported: bool
    weight_resolution: int
    height_resolution: int

    def weight_step(self, imperial: bool) -> Decimal | None:
        """Declared weight resolution in kg or lb; None if unspecified or RFU (display only)."""
        steps = WEIGHT_RESOLUTIONS.get(self.weight_resolution)
        return None if steps is None else steps[imperial]

    def height_step(self, imperial: bool) -> Decimal | None:
        """Declared height resolution in m or in; None if unspecified or RFU (display only)."""
        steps = HEIGHT_RESOLUTIONS.get(self.height_resolution)
        return None if steps is None else steps[imperial]


def decode_weight_scale_feature(data: bytes) -> WeightScaleFeature:
    """A Weight Scale Feature from exactly 4 bytes (uint32 LE); RFU bits 10-31 ignored."""
    if len(data) != WEIGHT_SCALE_FEATURE_SIZE:
        raise DecodeError(
            f"weight scale feature: {len(data)} bytes, need {WEIGHT_SCALE_FEATURE_SIZE}"
        )
    raw = int.from_bytes(data, "little")
    return WeightScaleFeature(
        timestamp_supported=bool(raw & _FEATURE_TIMESTAMP),
        multiple_users=bool(raw & _FEATURE_MULTIPLE_USERS),
        bmi_supported=bool(raw & _FEATURE_BMI),
        weight_resolution=(raw >> _WEIGHT_RES_SHIFT) & _WEIGHT_RES_MASK,
        height_resolution=(raw >> _HEIGHT_RES_SHIFT) & _HEIGHT_RES_MASK,
    )


def encode_weight_scale_feature(f: WeightScaleFeature) -> bytes:
    """The 4 bytes of a Weight Scale Feature; ValueError for a resolution code out of range."""
    if not 0 <= f.weight_resolution <= _WEIGHT_RES_MASK:
        raise ValueError(f"weight scale feature: weight resolution {f.weight_resolution} not 0..15")
    if not 0 <= f.height_resolution <= _HEIGHT_RES_MASK:
        raise ValueError(f"weight scale feature: height resolution {f.height_resolution} not 0..7")
    raw = (
        (_FEATURE_TIMESTAMP if f.timestamp_supported else 0)
        | (_FEATURE_MULTIPLE_USERS if f.multiple_users else 0)
        | (_FEATURE_BMI if f.bmi_supported else 0)
        | f.weight_resolution << _WEIGHT_RES_SHIFT
        | f.height_resolution << _HEIGHT_RES_SHIFT
    )
    return raw.to_bytes(WEIGHT_SCALE_FEATURE_SIZE, "little")
