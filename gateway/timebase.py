"""Time rules: which clock a reading's time comes from, and whether the hub clock is trusted."""

from __future__ import annotations

import ctypes
import datetime as dt
import functools
import hashlib
from zoneinfo import ZoneInfo

from gateway.models import TimeSource

# hass-omron rejects record times before 2010 ("likely empty/corrupt slot") and more than
# two days ahead ("clock sync issue?"); field-lessons.md §3.2. Devices with a lost clock
# fall back to epochs such as 1970 or 2000 (health-devices.md §2.5).
EARLIEST_PLAUSIBLE = dt.datetime(2010, 1, 1, tzinfo=dt.UTC)
LATEST_AHEAD = dt.timedelta(days=2)


def resolve_measured_at(
    device_time: dt.datetime | None,
    offset_s: float | None,
    received_at: dt.datetime,
    zone: ZoneInfo,
) -> tuple[dt.datetime, TimeSource]:
    """UTC measurement time and where it came from; never invents a date."""
    if device_time is None:
        return received_at, "hub_receipt"
    source: TimeSource = "device_clock"
    local = device_time
    if offset_s is not None:
        # The offset was measured on the device's own wall clock, so correct there first;
        # converting afterwards keeps a DST change between measurement and upload right.
        local = device_time - dt.timedelta(seconds=offset_s)
        source = "device_clock_corrected"
    measured = local.replace(tzinfo=zone).astimezone(dt.UTC)
    if measured < EARLIEST_PLAUSIBLE or measured > received_at + LATEST_AHEAD:
        return received_at, "hub_receipt"
    return measured, source


def reading_id(address: str, characteristic: str, raw: bytes, *, received_at: dt.datetime | None) -> str:
    """Stable id: the same bytes from the same device are the same measurement.

    The raw value holds the device time stamp (and user slot), so a re-sent stored record
    hashes the same. A value without a time stamp cannot be told from a genuine repeat
    (two weighings can be byte-identical), so then the receipt time joins the key.
    """
    key = f"v1|{address.upper()}|{characteristic.lower()}|{raw.hex()}"
    if received_at is not None:
        key += "|" + received_at.astimezone(dt.UTC).isoformat(timespec="seconds")
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h>: only `status` is read; the tail is padding.
    _fields_ = [("modes", ctypes.c_int), ("_pad0", ctypes.c_long * 6),
                ("status", ctypes.c_int), ("_pad1", ctypes.c_long * 40)]


_TIME_ERROR = 5  # adjtimex(2): clock not synchronised


@functools.cache
def _libc() -> ctypes.CDLL | None:
    # The process's own symbols include libc's; ctypes.util.find_library would run ldconfig
    # (a subprocess) on every call, and this is asked at the start of every device session.
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def hub_clock_synced() -> bool:
    """True when the kernel says the clock is NTP-synchronised (adjtimex is not TIME_ERROR)."""
    libc = _libc()
    if libc is None:
        return False
    try:
        state = int(libc.adjtimex(ctypes.byref(_Timex())))
    except AttributeError:  # no adjtimex: not Linux
        return False
    return state not in (-1, _TIME_ERROR)
