"""DIS strings, System ID and Battery Level against health-devices.md §5."""

import contextlib
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.codec.device_info import (
    decode_battery_level,
    decode_string,
    decode_system_id,
    encode_battery_level,
    encode_string,
    encode_system_id,
)
from drivers.codec.errors import DecodeError


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"BP5250", "BP5250"),  # §5: Omron model number (SpeziOmron)
        (b"BLP008_d016\x00\x00", "BLP008_d016"),  # §5: A&D firmware string, NUL padded
        (b"SC-150 \x00 \t\n", "SC-150"),  # NULs and whitespace mixed
        (b"  A&D", "  A&D"),  # only trailing padding goes
        ("Medizin\u00e4".encode(), "Medizin\u00e4"),
        (b"", ""),
    ],
)
def test_decode_string(data: bytes, text: str) -> None:
    assert decode_string(data) == text


def test_decode_string_invalid_utf8() -> None:
    with pytest.raises(DecodeError, match="invalid UTF-8 at byte 2"):
        decode_string(b"AB\xff")


def test_encode_string() -> None:
    assert encode_string("EVOLV") == b"EVOLV"
    with pytest.raises(ValueError, match="UTF-8"):
        encode_string("\ud800")


@pytest.mark.parametrize("level", [0, 57, 100])
def test_battery_level(level: int) -> None:
    assert decode_battery_level(bytes((level,))) == level
    assert encode_battery_level(level) == bytes((level,))


def test_battery_level_errors() -> None:
    with pytest.raises(DecodeError, match=r"battery level: 101 not 0\.\.100"):
        decode_battery_level(b"\x65")
    with pytest.raises(DecodeError, match="battery level: 2 bytes, need 1"):
        decode_battery_level(b"\x01\x02")
    for bad in (-1, 101):
        with pytest.raises(ValueError):
            encode_battery_level(bad)


def test_system_id_in_over_the_air_order() -> None:
    # §5: 40-bit manufacturer id (bytes 0-4) then 24-bit OUI (bytes 5-7), printed byte 0 first.
    data = bytes.fromhex("01 02 03 04 05 5A 09 00")
    assert decode_system_id(data) == "01020304055A0900"
    assert encode_system_id("01020304055a0900") == data


def test_system_id_errors() -> None:
    with pytest.raises(DecodeError, match="system id: 6 bytes, need 8"):
        decode_system_id(bytes(6))
    for bad in ("0102030405", "01 02 03 04 05 5A 09 00", "0102030405060G08", "01020304055A0900\n"):
        with pytest.raises(ValueError, match="16 hex digits"):
            encode_system_id(bad)


_NO_TRAILING_PADDING = st.text().filter(lambda s: s == s.rstrip().rstrip("\x00").rstrip())


@given(_NO_TRAILING_PADDING)
def test_unpadded_string_round_trip(text: str) -> None:
    assert decode_string(encode_string(text)) == text


@given(_NO_TRAILING_PADDING.map(str.encode))
def test_canonical_string_bytes_round_trip(data: bytes) -> None:
    assert encode_string(decode_string(data)) == data


@given(st.integers(0, 100))
def test_battery_round_trip(level: int) -> None:
    assert decode_battery_level(encode_battery_level(level)) == level


@given(st.binary(min_size=8, max_size=8))
def test_system_id_round_trip(data: bytes) -> None:
    assert encode_system_id(decode_system_id(data)) == data


@pytest.mark.parametrize("decode", [decode_string, decode_battery_level, decode_system_id])
@given(data=st.binary(max_size=40))
def test_garbage(decode: Callable[[bytes], object], data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode(data)
