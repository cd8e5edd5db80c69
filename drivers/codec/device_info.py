"""Device Information strings, System ID 0x2A23 and Battery Level 0x2A19 (health-devices.md §5)."""

from __future__ import annotations

import re

from drivers.codec.errors import DecodeError

BATTERY_LEVEL_MAX = 100  # percent, §5
SYSTEM_ID_SIZE = 8  # §5: 40-bit manufacturer identifier then 24-bit OUI, little-endian

# §5: padding is unverified, so trailing NULs and whitespace are trimmed in any mix.
_TRAILING_PADDING = re.compile(r"[\s\x00]+\Z")
_SYSTEM_ID_HEX = re.compile(r"[0-9A-Fa-f]{16}")


def decode_string(data: bytes) -> str:
    """A UTF-8 DIS string (the whole attribute, no length prefix) with trailing padding trimmed."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"string: invalid UTF-8 at byte {exc.start} of {len(data)}") from exc
    return _TRAILING_PADDING.sub("", text)


def encode_string(s: str) -> bytes:
    """The UTF-8 bytes of s; ValueError for text UTF-8 cannot carry (lone surrogates)."""
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"string: cannot encode as UTF-8 at index {exc.start}") from exc


def decode_battery_level(data: bytes) -> int:
    """Battery Level in percent from exactly 1 byte (0..100)."""
    if len(data) != 1:
        raise DecodeError(f"battery level: {len(data)} bytes, need 1")
    level = data[0]
    if level > BATTERY_LEVEL_MAX:
        raise DecodeError(f"battery level: {level} not 0..{BATTERY_LEVEL_MAX}")
    return level


def encode_battery_level(level: int) -> bytes:
    """The 1 byte of a Battery Level; ValueError outside 0..100."""
    if not 0 <= level <= BATTERY_LEVEL_MAX:
        raise ValueError(f"battery level: {level} not 0..{BATTERY_LEVEL_MAX}")
    return bytes((level,))


def decode_system_id(data: bytes) -> str:
    """System ID as 16 upper-case hex digits in over-the-air order (byte 0 first, not EUI-64).

    §5 says to pick one order and never change it: this is the raw byte order, so the OUI
    is the last 6 digits, byte-reversed.
    """
    if len(data) != SYSTEM_ID_SIZE:
        raise DecodeError(f"system id: {len(data)} bytes, need {SYSTEM_ID_SIZE}")
    return bytes(data).hex().upper()


def encode_system_id(s: str) -> bytes:
    """The 8 bytes of a System ID given as 16 hex digits in over-the-air order."""
    if not _SYSTEM_ID_HEX.fullmatch(s):
        raise ValueError(f"system id: {s!r} is not 16 hex digits")
    return bytes.fromhex(s)
