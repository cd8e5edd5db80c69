"""Date Time 0x2A08 and Current Time 0x2A2B (health-devices.md §2.1-2.3)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from drivers.codec.errors import DecodeError

DATE_TIME_SIZE = 7
CURRENT_TIME_SIZE = 10

# §2.1: 0 means "not known" for year, month and day; known years are 1582..9999.
YEAR_UNKNOWN = 0
YEAR_MIN, YEAR_MAX = 1582, 9999

# §2.3 Adjust Reason bits; 4-7 are RFU.
ADJUST_MANUAL = 0x01
ADJUST_EXTERNAL_REFERENCE = 0x02
ADJUST_TIME_ZONE = 0x04
ADJUST_DST = 0x08

# §2.2: 0 = unknown, 1 = Monday .. 7 = Sunday (same as date.isoweekday()).
DAY_OF_WEEK_UNKNOWN = 0
DAY_OF_WEEK_MAX = 7


@dataclass(frozen=True)
class DateTime:
    """Device wall-clock time with no zone; year/month/day 0 mean unknown and are kept as sent."""

    year: int
    month: int
    day: int
    hours: int
    minutes: int
    seconds: int

    def to_datetime(self) -> datetime.datetime | None:
        """A naive datetime, or None if the date is unknown or impossible (never invented)."""
        if not YEAR_MIN <= self.year <= YEAR_MAX or self.month == 0 or self.day == 0:
            return None
        try:
            return datetime.datetime(
                self.year, self.month, self.day, self.hours, self.minutes, self.seconds
            )
        except ValueError:
            # e.g. Feb 30: valid per field ranges of §2.1, but no such day exists.
            return None

    @classmethod
    def from_datetime(cls, dt: datetime.datetime) -> DateTime:
        """The wall-clock fields of dt (any tzinfo is ignored, microseconds dropped)."""
        return cls(dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second)


def _field_error(v: DateTime) -> str | None:
    """What is out of range in v per §2.1, or None."""
    if not (v.year == YEAR_UNKNOWN or YEAR_MIN <= v.year <= YEAR_MAX):
        return f"year {v.year} not 0 or {YEAR_MIN}..{YEAR_MAX}"
    limits = (
        ("month", v.month, 12),
        ("day", v.day, 31),
        ("hours", v.hours, 23),
        ("minutes", v.minutes, 59),
        ("seconds", v.seconds, 59),
    )
    for name, value, top in limits:
        if not 0 <= value <= top:
            return f"{name} {value} not 0..{top}"
    return None


def decode_date_time_at(data: bytes, offset: int) -> DateTime:
    """The 7-byte Date Time that starts at offset (for time stamps inside measurements)."""
    if offset < 0 or len(data) < offset + DATE_TIME_SIZE:
        raise DecodeError(
            f"date time: need {DATE_TIME_SIZE} bytes at offset {offset}, have {len(data)}"
        )
    raw = data[offset : offset + DATE_TIME_SIZE]
    value = DateTime(int.from_bytes(raw[0:2], "little"), raw[2], raw[3], raw[4], raw[5], raw[6])
    error = _field_error(value)
    if error is not None:
        raise DecodeError(f"date time: {error} in {raw.hex(' ')}")
    return value


def decode_date_time(data: bytes) -> DateTime:
    """A Date Time from exactly 7 bytes: year uint16 LE, month, day, hours, minutes, seconds."""
    if len(data) != DATE_TIME_SIZE:
        raise DecodeError(f"date time: {len(data)} bytes, need {DATE_TIME_SIZE}")
    return decode_date_time_at(data, 0)


def encode_date_time(v: DateTime) -> bytes:
    """The 7 bytes of a Date Time; ValueError for a field out of its §2.1 range."""
    error = _field_error(v)
    if error is not None:
        raise ValueError(f"date time: {error}")
    return v.year.to_bytes(2, "little") + bytes((v.month, v.day, v.hours, v.minutes, v.seconds))


@dataclass(frozen=True)
class CurrentTime:
    """Current Time 0x2A2B: Date Time, day of week, 1/256 s fractions, adjust reason bits."""

    date_time: DateTime
    day_of_week: int
    fractions256: int
    adjust_reason: int

    @classmethod
    def from_datetime(
        cls, dt: datetime.datetime, adjust_reason: int = ADJUST_MANUAL
    ) -> CurrentTime:
        """The Current Time to write for dt (wall-clock fields; tzinfo ignored)."""
        fractions = dt.microsecond * 256 // 1_000_000
        return cls(DateTime.from_datetime(dt), dt.isoweekday(), fractions, adjust_reason)


def decode_current_time(data: bytes) -> CurrentTime:
    """A Current Time from exactly 10 bytes; RFU adjust-reason bits are kept as sent."""
    if len(data) != CURRENT_TIME_SIZE:
        raise DecodeError(f"current time: {len(data)} bytes, need {CURRENT_TIME_SIZE}")
    day_of_week = data[7]
    if day_of_week > DAY_OF_WEEK_MAX:
        raise DecodeError(f"current time: day of week {day_of_week} not 0..{DAY_OF_WEEK_MAX}")
    return CurrentTime(decode_date_time_at(data, 0), day_of_week, data[8], data[9])


def encode_current_time(v: CurrentTime) -> bytes:
    """The 10 bytes of a Current Time; ValueError for a field out of range."""
    if not 0 <= v.day_of_week <= DAY_OF_WEEK_MAX:
        raise ValueError(f"current time: day of week {v.day_of_week} not 0..{DAY_OF_WEEK_MAX}")
    for name, value in (("fractions256", v.fractions256), ("adjust reason", v.adjust_reason)):
        if not 0 <= value <= 0xFF:
            raise ValueError(f"current time: {name} {value} not 0..255")
    return encode_date_time(v.date_time) + bytes((v.day_of_week, v.fractions256, v.adjust_reason))
