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
# This release was made after this date, so a hub clock before it is certainly wrong: a Pi has
# no RTC, and without a saved time it boots at 1970 or at its image's build date. Devices are
# not read while the hub clock is before it (Agent): a reading without a time stamp would be
# dated by that clock. Move it forward with each release.
CLOCK_FLOOR = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
# An unsynchronised hub clock that is plausible may still be weeks or months behind (restored
# from the last shutdown after a long time unplugged): a device clock is believed up to this far
# ahead of it, not further (a device clock ten years ahead is not).
UNSYNCED_AHEAD = dt.timedelta(days=400)


def hub_clock_plausible(now: dt.datetime) -> bool:
    """False for a hub clock that is certainly wrong (before this release was made)."""
    return now >= CLOCK_FLOOR


def resolve_measured_at(
    device_time: dt.datetime | None,
    offset_s: float | None,
    received_at: dt.datetime,
    zone: ZoneInfo,
    *,
    hub_synced: bool = True,
) -> tuple[dt.datetime, TimeSource]:
    """UTC measurement time and where it came from; never invents a date.

    A device time is believed when it is plausible: not before 2010 (lost clocks restart at
    1970 or 2000) and not more than two days ahead of a synchronised hub clock; an
    unsynchronised one may be far behind, so then the bound is UNSYNCED_AHEAD past it.
    """
    if device_time is None:
        return received_at, "hub_receipt"
    source: TimeSource = "device_clock"
    local = device_time
    if offset_s is not None:
        # The offset was measured on the device's own wall clock, so correct there first;
        # converting afterwards keeps a DST change between measurement and upload right.
        try:
            local = device_time - dt.timedelta(seconds=offset_s)
        except OverflowError:
            return received_at, "hub_receipt"
        source = "device_clock_corrected"
    try:
        measured = local.replace(tzinfo=zone).astimezone(dt.UTC)
    except OverflowError:  # near year 9999 (legal in the codec): certainly not a real time
        return received_at, "hub_receipt"
    latest = (received_at + LATEST_AHEAD if hub_synced
              else max(received_at, CLOCK_FLOOR) + UNSYNCED_AHEAD)
    if measured < EARLIEST_PLAUSIBLE or measured > latest:
        return received_at, "hub_receipt"
    return measured, source


def reading_id(
    address: str,
    characteristic: str,
    raw: bytes,
    *,
    identified: bool,
    connection: str = "",
    occurrence: int = 0,
) -> str:
    """Stable id: the same measurement gets the same id, distinct measurements never share one.

    `identified`: the value carries what tells one measurement from another (a device time
    stamp with a known date, or a record sequence number, both inside `raw`), so a device
    re-sending a stored record on any later connection hashes to the same id. A stamp whose
    date is unknown (year 0) does not count: a clock that was never set may not even run, and
    two weighings of the same weight would then share their bytes.

    Otherwise nothing in the bytes can tell a re-sent measurement from a new, identical one
    (two weighings of 81.4 kg). The rule then: every frame received is a measurement of its
    own, keyed by the connection it arrived on and its position among identical frames on that
    connection. Distinct measurements never share an id; a device that replays untimestamped
    memory on a later connection yields new ids (no rule can avoid that; README, contract).
    """
    key = f"v1|{address.upper()}|{characteristic.lower()}|{raw.hex()}"
    if not identified:
        key += f"|conn={connection}|n={occurrence}"
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
