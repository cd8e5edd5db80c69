"""Date Time 0x2A08 and Current Time 0x2A2B codec against health-devices.md §2, §11, §12."""

import contextlib
import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.codec.date_time import (
    ADJUST_EXTERNAL_REFERENCE,
    CurrentTime,
    DateTime,
    decode_current_time,
    decode_date_time,
    decode_date_time_at,
    encode_current_time,
    encode_date_time,
)
from drivers.codec.errors import DecodeError
from tests.unit.strategies import current_times, date_time_bytes, date_times


def test_date_time_example() -> None:
    # health-devices.md §2.3 / §12 Current Time row: its first 7 bytes are the Date Time.
    data = bytes.fromhex("E9 07 03 0E 07 2D 1E")
    decoded = decode_date_time(data)
    assert decoded == DateTime(2025, 3, 14, 7, 45, 30)
    assert decoded.to_datetime() == datetime.datetime(2025, 3, 14, 7, 45, 30)
    assert encode_date_time(decoded) == data


def test_year_zero_stays_unknown() -> None:
    # health-devices.md §12, BPM row 5 (Nordic unit-test vector) time stamp; §11 pitfall:
    # year 0 is "not known", never year 1 or 1970.
    data = bytes.fromhex("00 00 04 11 14 29 3B")
    decoded = decode_date_time(data)
    assert decoded == DateTime(0, 4, 17, 20, 41, 59)
    assert decoded.to_datetime() is None
    assert encode_date_time(decoded) == data


@pytest.mark.parametrize(
    "value",
    [DateTime(2025, 0, 14, 7, 0, 0), DateTime(2025, 3, 0, 7, 0, 0), DateTime(2025, 2, 30, 0, 0, 0)],
)
def test_unknown_or_impossible_dates_give_no_datetime(value: DateTime) -> None:
    # §2.1 month/day 0 = not known; Feb 30 is inside the field ranges but never existed.
    assert value.to_datetime() is None
    assert decode_date_time(encode_date_time(value)) == value


def test_epoch_like_date_is_kept_as_sent() -> None:
    # §2.5: never-set Mi Scale clocks report 1970-01-01 (year bytes B2 07); the codec keeps it,
    # judging plausibility is the session's job.
    decoded = decode_date_time(bytes.fromhex("B2 07 01 01 00 00 00"))
    assert decoded.to_datetime() == datetime.datetime(1970, 1, 1)


@pytest.mark.parametrize(
    ("hex_bytes", "message"),
    [
        ("E9 07 0D 0E 07 2D 1E", "month 13"),
        ("E9 07 03 20 07 2D 1E", "day 32"),
        ("E9 07 03 0E 18 2D 1E", "hours 24"),
        ("E9 07 03 0E 07 3C 1E", "minutes 60"),
        ("E9 07 03 0E 07 2D 3C", "seconds 60"),
        ("01 00 03 0E 07 2D 1E", "year 1 "),
        ("2D 06 03 0E 07 2D 1E", "year 1581"),
        ("10 27 03 0E 07 2D 1E", "year 10000"),
    ],
)
def test_out_of_range_fields(hex_bytes: str, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_date_time(bytes.fromhex(hex_bytes))


@pytest.mark.parametrize("size", [0, 6, 8])
def test_date_time_wrong_length(size: int) -> None:
    with pytest.raises(DecodeError, match=f"{size} bytes, need 7"):
        decode_date_time(bytes(size))


def test_decode_date_time_at_offset() -> None:
    data = bytes.fromhex("AA E9 07 03 0E 07 2D 1E")
    assert decode_date_time_at(data, 1) == DateTime(2025, 3, 14, 7, 45, 30)
    with pytest.raises(DecodeError, match="at offset 2"):
        decode_date_time_at(data, 2)


def test_encode_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="year 1581"):
        encode_date_time(DateTime(1581, 1, 1, 0, 0, 0))
    with pytest.raises(ValueError, match="hours 24"):
        encode_date_time(DateTime(2025, 1, 1, 24, 0, 0))


def test_from_datetime_drops_microseconds() -> None:
    dt = datetime.datetime(2025, 11, 2, 6, 5, 0, 999_999)
    assert DateTime.from_datetime(dt) == DateTime(2025, 11, 2, 6, 5, 0)


def test_current_time_write_example() -> None:
    # health-devices.md §2.3 and §12 "Others", Current Time 0x2A2B (write) row:
    # 2025-03-14 07:45:30, Friday, 0/256 s, manual update.
    data = bytes.fromhex("E9 07 03 0E 07 2D 1E 05 00 01")
    expected = CurrentTime(DateTime(2025, 3, 14, 7, 45, 30), 5, 0, 0x01)
    assert decode_current_time(data) == expected
    assert CurrentTime.from_datetime(datetime.datetime(2025, 3, 14, 7, 45, 30)) == expected
    assert encode_current_time(expected) == data


def test_current_time_fractions_and_reason() -> None:
    dt = datetime.datetime(2025, 3, 16, 23, 59, 59, 500_000)  # a Sunday
    value = CurrentTime.from_datetime(dt, adjust_reason=ADJUST_EXTERNAL_REFERENCE)
    assert value == CurrentTime(DateTime(2025, 3, 16, 23, 59, 59), 7, 128, 0x02)


def test_current_time_bad_day_of_week() -> None:
    with pytest.raises(DecodeError, match="day of week 8"):
        decode_current_time(bytes.fromhex("E9 07 03 0E 07 2D 1E 08 00 01"))
    with pytest.raises(ValueError, match="day of week 8"):
        encode_current_time(CurrentTime(DateTime(2025, 3, 14, 7, 45, 30), 8, 0, 1))


def test_current_time_wrong_length_and_bad_date() -> None:
    with pytest.raises(DecodeError, match="9 bytes, need 10"):
        decode_current_time(bytes(9))
    with pytest.raises(DecodeError, match="month 13"):
        decode_current_time(bytes.fromhex("E9 07 0D 0E 07 2D 1E 05 00 01"))


@given(date_times())
def test_date_time_round_trip(value: DateTime) -> None:
    assert decode_date_time(encode_date_time(value)) == value


@given(date_time_bytes())
def test_date_time_bytes_round_trip(data: bytes) -> None:
    assert encode_date_time(decode_date_time(data)) == data


@given(st.datetimes(min_value=datetime.datetime(1582, 1, 1)))
def test_python_datetime_round_trip(dt: datetime.datetime) -> None:
    assert DateTime.from_datetime(dt).to_datetime() == dt.replace(microsecond=0)


@given(current_times())
def test_current_time_round_trip(value: CurrentTime) -> None:
    assert decode_current_time(encode_current_time(value)) == value


@given(date_time_bytes(), st.integers(0, 7), st.binary(min_size=2, max_size=2))
def test_current_time_bytes_round_trip(date_time: bytes, day: int, tail: bytes) -> None:
    data = date_time + bytes((day,)) + tail
    assert encode_current_time(decode_current_time(data)) == data


@given(st.binary(max_size=40))
def test_garbage_date_time(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_date_time(data)


@given(st.binary(max_size=40))
def test_garbage_current_time(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_current_time(data)


@given(st.binary(min_size=10, max_size=10))
def test_garbage_current_time_full_length(data: bytes) -> None:
    # Random 10-byte values reach the field checks that short garbage never does.
    with contextlib.suppress(DecodeError):
        decode_current_time(data)
