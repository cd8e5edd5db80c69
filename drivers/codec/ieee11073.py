"""IEEE 11073-20601 SFLOAT (16-bit) and FLOAT (32-bit) medical floats (health-devices.md §1)."""

from __future__ import annotations

import decimal
import enum
from dataclasses import dataclass
from decimal import Decimal

from drivers.codec.errors import DecodeError

SFLOAT_SIZE = 2
FLOAT_SIZE = 4


class Special(enum.Enum):
    """Reserved IEEE 11073 values that are not numbers (§1.1, §1.2)."""

    NAN = "NaN"
    NRES = "NRes"
    POSITIVE_INFINITY = "+INFINITY"
    NEGATIVE_INFINITY = "-INFINITY"
    RESERVED = "reserved"


@dataclass(frozen=True)
class MedFloat:
    """A decimal mantissa * 10**exponent, or a special value; the exponent carries precision.

    For specials `mantissa` is the signed mantissa as sent (it differs between SFLOAT and
    FLOAT, so compare `special`, not the whole object, across widths) and `exponent` is 0.
    """

    mantissa: int
    exponent: int
    special: Special | None = None

    @property
    def value(self) -> Decimal | None:
        """The exact decimal (0xF014 -> Decimal('2.0')), or None for a special value."""
        if self.special is not None:
            return None
        # Built from the digit tuple, not scaleb(), so no context precision can round it.
        digits = tuple(int(d) for d in str(abs(self.mantissa)))
        return Decimal((int(self.mantissa < 0), digits, self.exponent))

    def __float__(self) -> float:
        """The value as a binary float; ValueError for a special value."""
        value = self.value
        if value is None:
            raise ValueError(f"IEEE 11073 {self.special} has no numeric value")
        return float(value)

    @classmethod
    def of(cls, value: str | int | Decimal) -> MedFloat:
        """The exact decimal as mantissa/exponent: "97" -> (97, 0), "2.00" -> (200, -2)."""
        if isinstance(value, float):
            # A binary float has no decimal precision to keep; make the caller pick one.
            raise TypeError("MedFloat.of needs str, int or Decimal, not float")
        try:
            dec = Decimal(value)
        except decimal.InvalidOperation as exc:
            raise ValueError(f"not a decimal number: {value!r}") from exc
        sign, digits, exponent = dec.as_tuple()
        if not isinstance(exponent, int):
            raise ValueError(f"not a finite number: {value!r}; use the Special constants")
        mantissa = int("".join(map(str, digits)))
        return cls(-mantissa if sign else mantissa, exponent)


# Raw reserved values with exponent 0; the raw value equals the mantissa (§1.1 table).
_SFLOAT_SPECIAL_RAW: dict[int, Special] = {
    0x07FF: Special.NAN,
    0x0800: Special.NRES,
    0x07FE: Special.POSITIVE_INFINITY,
    0x0802: Special.NEGATIVE_INFINITY,
    0x0801: Special.RESERVED,
}
# §1.2 table, same pattern on 24-bit mantissas.
_FLOAT_SPECIAL_RAW: dict[int, Special] = {
    0x007FFFFF: Special.NAN,
    0x00800000: Special.NRES,
    0x007FFFFE: Special.POSITIVE_INFINITY,
    0x00800002: Special.NEGATIVE_INFINITY,
    0x00800001: Special.RESERVED,
}
_SFLOAT_RAW_BY_SPECIAL = {special: raw for raw, special in _SFLOAT_SPECIAL_RAW.items()}
_FLOAT_RAW_BY_SPECIAL = {special: raw for raw, special in _FLOAT_SPECIAL_RAW.items()}

# Usable mantissas stop short of the reserved ones (§1.1: Nordic's SFLOAT_MANTISSA_MAX 0x07FD).
SFLOAT_MANTISSA_MAX = 0x07FD
SFLOAT_EXPONENT_MIN, SFLOAT_EXPONENT_MAX = -8, 7
FLOAT_MANTISSA_MAX = 0x7FFFFD
FLOAT_EXPONENT_MIN, FLOAT_EXPONENT_MAX = -128, 127


def _signed(raw: int, bits: int) -> int:
    """Two's complement reading of the low `bits` bits of raw."""
    return raw - (1 << bits) if raw & (1 << (bits - 1)) else raw


def _special_constant(raw: int, bits: int, special: Special) -> MedFloat:
    """The MedFloat a decoder returns for a reserved raw value."""
    return MedFloat(_signed(raw, bits), 0, special)


SFLOAT_NAN = _special_constant(0x07FF, 12, Special.NAN)
SFLOAT_NRES = _special_constant(0x0800, 12, Special.NRES)
SFLOAT_POSITIVE_INFINITY = _special_constant(0x07FE, 12, Special.POSITIVE_INFINITY)
SFLOAT_NEGATIVE_INFINITY = _special_constant(0x0802, 12, Special.NEGATIVE_INFINITY)
SFLOAT_RESERVED = _special_constant(0x0801, 12, Special.RESERVED)
FLOAT_NAN = _special_constant(0x007FFFFF, 24, Special.NAN)
FLOAT_NRES = _special_constant(0x00800000, 24, Special.NRES)
FLOAT_POSITIVE_INFINITY = _special_constant(0x007FFFFE, 24, Special.POSITIVE_INFINITY)
FLOAT_NEGATIVE_INFINITY = _special_constant(0x00800002, 24, Special.NEGATIVE_INFINITY)
FLOAT_RESERVED = _special_constant(0x00800001, 24, Special.RESERVED)


def sfloat_from_int(raw: int) -> MedFloat:
    """The SFLOAT held in a 16-bit integer (exponent in bits 15..12, mantissa in 11..0)."""
    if not 0 <= raw <= 0xFFFF:
        raise DecodeError(f"SFLOAT: raw value {raw:#x} is not a 16-bit integer")
    # Strict reading (§1.1, as Wireshark and nRF-SDK): only the whole 16-bit value is special.
    special = _SFLOAT_SPECIAL_RAW.get(raw)
    if special is not None:
        return _special_constant(raw, 12, special)
    return MedFloat(_signed(raw & 0x0FFF, 12), _signed(raw >> 12, 4))


def sfloat_to_int(v: MedFloat) -> int:
    """The 16-bit integer of an SFLOAT; ValueError if v does not fit exactly."""
    if v.special is not None:
        return _SFLOAT_RAW_BY_SPECIAL[v.special]
    _check_fits("SFLOAT", v, SFLOAT_MANTISSA_MAX, SFLOAT_EXPONENT_MIN, SFLOAT_EXPONENT_MAX)
    return ((v.exponent & 0xF) << 12) | (v.mantissa & 0x0FFF)


def float_from_int(raw: int) -> MedFloat:
    """The FLOAT held in a 32-bit integer (exponent in bits 31..24, mantissa in 23..0)."""
    if not 0 <= raw <= 0xFFFFFFFF:
        raise DecodeError(f"FLOAT: raw value {raw:#x} is not a 32-bit integer")
    special = _FLOAT_SPECIAL_RAW.get(raw)
    if special is not None:
        return _special_constant(raw, 24, special)
    return MedFloat(_signed(raw & 0xFFFFFF, 24), _signed(raw >> 24, 8))


def float_to_int(v: MedFloat) -> int:
    """The 32-bit integer of a FLOAT; ValueError if v does not fit exactly."""
    if v.special is not None:
        return _FLOAT_RAW_BY_SPECIAL[v.special]
    _check_fits("FLOAT", v, FLOAT_MANTISSA_MAX, FLOAT_EXPONENT_MIN, FLOAT_EXPONENT_MAX)
    return ((v.exponent & 0xFF) << 24) | (v.mantissa & 0xFFFFFF)


def _check_fits(kind: str, v: MedFloat, mantissa_max: int, exp_min: int, exp_max: int) -> None:
    """ValueError unless mantissa and exponent fit without rounding or a reserved pattern."""
    if not -mantissa_max <= v.mantissa <= mantissa_max:
        raise ValueError(f"{kind}: mantissa {v.mantissa} outside ±{mantissa_max}")
    if not exp_min <= v.exponent <= exp_max:
        raise ValueError(f"{kind}: exponent {v.exponent} outside {exp_min}..{exp_max}")


def decode_sfloat(data: bytes) -> MedFloat:
    """An SFLOAT from exactly 2 little-endian bytes."""
    if len(data) != SFLOAT_SIZE:
        raise DecodeError(f"SFLOAT: {len(data)} bytes, need {SFLOAT_SIZE}")
    return sfloat_from_int(int.from_bytes(data, "little"))


def encode_sfloat(v: MedFloat) -> bytes:
    """The 2 little-endian bytes of an SFLOAT; ValueError if v does not fit exactly."""
    return sfloat_to_int(v).to_bytes(SFLOAT_SIZE, "little")


def decode_float(data: bytes) -> MedFloat:
    """A FLOAT from exactly 4 little-endian bytes."""
    if len(data) != FLOAT_SIZE:
        raise DecodeError(f"FLOAT: {len(data)} bytes, need {FLOAT_SIZE}")
    return float_from_int(int.from_bytes(data, "little"))


def encode_float(v: MedFloat) -> bytes:
    """The 4 little-endian bytes of a FLOAT; ValueError if v does not fit exactly."""
    return float_to_int(v).to_bytes(FLOAT_SIZE, "little")
