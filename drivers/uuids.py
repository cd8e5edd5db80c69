"""Bluetooth SIG 16-bit UUIDs used by the drivers, and the one way we spell them."""

from __future__ import annotations

import re

BASE_UUID_TAIL = "-0000-1000-8000-00805f9b34fb"

# Services
DEVICE_INFORMATION = 0x180A
BATTERY = 0x180F
CURRENT_TIME_SERVICE = 0x1805
WEIGHT_SCALE = 0x181D
BLOOD_PRESSURE = 0x1810

# Characteristics
MANUFACTURER_NAME = 0x2A29
MODEL_NUMBER = 0x2A24
SERIAL_NUMBER = 0x2A25
FIRMWARE_REVISION = 0x2A26
HARDWARE_REVISION = 0x2A27
SYSTEM_ID = 0x2A23
BATTERY_LEVEL = 0x2A19
CURRENT_TIME = 0x2A2B
DATE_TIME = 0x2A08
WEIGHT_MEASUREMENT = 0x2A9D
WEIGHT_SCALE_FEATURE = 0x2A9E
BLOOD_PRESSURE_MEASUREMENT = 0x2A35
INTERMEDIATE_CUFF_PRESSURE = 0x2A36
BLOOD_PRESSURE_FEATURE = 0x2A49

_FULL = re.compile(r"^0000([0-9a-f]{4})" + re.escape(BASE_UUID_TAIL) + "$")
_SHORT = re.compile(r"^(0x)?([0-9a-f]{4})$")


def full(uuid16: int) -> str:
    """The 128-bit lower-case form bleak uses for a SIG 16-bit UUID."""
    return f"{uuid16:08x}{BASE_UUID_TAIL}"


def short(uuid: str) -> str:
    """'2a35' for '0x2A35', '2a35' or the full 128-bit form; ValueError otherwise."""
    text = uuid.strip().lower()
    m = _SHORT.match(text) or _FULL.match(text)
    if m is None:
        raise ValueError(f"not a Bluetooth SIG 16-bit UUID: {uuid!r}")
    return m.group(m.lastindex or 1)
