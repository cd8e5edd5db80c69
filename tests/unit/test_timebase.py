"""Time rules: which clock a reading's time comes from; reading ids."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from gateway.timebase import hub_clock_plausible, reading_id, resolve_measured_at

CHICAGO = ZoneInfo("America/Chicago")
RECEIVED = dt.datetime(2025, 3, 14, 13, 0, tzinfo=dt.UTC)


def test_no_device_time_uses_receipt() -> None:
    assert resolve_measured_at(None, None, RECEIVED, CHICAGO) == (RECEIVED, "hub_receipt")


def test_device_local_time_converted_to_utc() -> None:
    # 07:52:10 CDT (UTC-5 after the 2025-03-09 change) is 12:52:10 UTC.
    t, src = resolve_measured_at(dt.datetime(2025, 3, 14, 7, 52, 10), None, RECEIVED, CHICAGO)
    assert (t, src) == (dt.datetime(2025, 3, 14, 12, 52, 10, tzinfo=dt.UTC), "device_clock")


def test_offset_corrects_a_fast_clock() -> None:
    t, src = resolve_measured_at(dt.datetime(2025, 3, 14, 7, 57, 10), 300.0, RECEIVED, CHICAGO)
    assert (t, src) == (dt.datetime(2025, 3, 14, 12, 52, 10, tzinfo=dt.UTC),
                        "device_clock_corrected")


def test_epoch_clock_is_not_believed() -> None:
    # A Mi scale with a never-set clock says 1970 (health-devices.md §8.3).
    assert resolve_measured_at(dt.datetime(1970, 5, 4, 15, 2), None, RECEIVED, CHICAGO) == (
        RECEIVED, "hub_receipt")


def test_future_clock_is_not_believed() -> None:
    future = dt.datetime(2025, 3, 20, 7, 0)
    assert resolve_measured_at(future, None, RECEIVED, CHICAGO)[1] == "hub_receipt"


def test_unsynced_hub_clock_behind_does_not_overrule_a_good_device_clock() -> None:
    # A Pi boots with the time of its last shutdown (no RTC) until NTP syncs: a correct
    # device clock is then "days ahead" of the hub, and must still win over a stale receipt.
    stale = RECEIVED - dt.timedelta(days=20)
    t, src = resolve_measured_at(dt.datetime(2025, 3, 14, 7, 52, 10), None, stale, CHICAGO,
                                 hub_synced=False)
    assert (t, src) == (dt.datetime(2025, 3, 14, 12, 52, 10, tzinfo=dt.UTC), "device_clock")
    # A device clock centuries off is still not believed.
    assert resolve_measured_at(dt.datetime(2150, 1, 1), None, stale, CHICAGO,
                               hub_synced=False)[1] == "hub_receipt"


def test_unsynced_hub_does_not_believe_a_device_ten_years_ahead() -> None:
    # Found by the fault matrix (clock-hub-unsynced-device-off): with trust_clock = false a
    # device clock 10 years ahead was published as 2036.
    now = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
    ahead = dt.datetime(2036, 11, 28, 7, 0)
    assert resolve_measured_at(ahead, None, now, CHICAGO, hub_synced=False) == (now, "hub_receipt")


def test_hub_clock_before_this_release_is_implausible() -> None:
    assert not hub_clock_plausible(dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
    assert not hub_clock_plausible(dt.datetime(1970, 1, 1, tzinfo=dt.UTC))
    assert hub_clock_plausible(dt.datetime(2026, 12, 1, tzinfo=dt.UTC))


def test_reading_id_is_stable_and_specific() -> None:
    raw = bytes.fromhex("1E80005200610 0E907030E07340A4000010400".replace(" ", ""))
    a = reading_id("aa:bb:cc:dd:ee:ff", "2A35", raw, identified=True)
    # A time-stamped record re-sent on any later connection keeps its id.
    assert a == reading_id("AA:BB:CC:DD:EE:FF", "2a35", raw, identified=True,
                           connection="2025-03-15T08:00:00", occurrence=3)
    assert len(a) == 32
    assert a != reading_id("AA:BB:CC:DD:EE:00", "2a35", raw, identified=True)
    assert a != reading_id("AA:BB:CC:DD:EE:FF", "2a35", raw[:-1] + b"\x01", identified=True)


def test_untimestamped_identical_frames_are_distinct_measurements() -> None:
    # Two byte-identical weighings without a time stamp are two readings (openScale PR #1512):
    # on one connection they differ by position, on two connections by the connection.
    raw = bytes.fromhex("00B036")
    ids = {reading_id("AA:BB:CC:DD:EE:FF", "2a9d", raw, identified=False, connection=c,
                      occurrence=n) for c in ("conn-1", "conn-2") for n in (0, 1)}
    assert len(ids) == 4


def test_untimestamped_id_does_not_depend_on_receipt_time() -> None:
    # The old rule added the receipt second: the same frame re-offered a second later by the
    # hub's own retry was a new reading, and two frames within one second collapsed into one.
    raw = bytes.fromhex("00B036")
    first = reading_id("AA:BB:CC:DD:EE:FF", "2a9d", raw, identified=False, connection="c",
                       occurrence=0)
    assert first == reading_id("AA:BB:CC:DD:EE:FF", "2a9d", raw, identified=False,
                               connection="c", occurrence=0)


def test_a_stamp_near_year_9999_is_not_a_crash() -> None:
    # Found in review: 9999-12-31 is legal in the codec; converting it overflowed and the
    # reading was lost as an "internal error".
    late = dt.datetime(9999, 12, 31, 23, 0)
    assert resolve_measured_at(late, None, RECEIVED, ZoneInfo("America/New_York"))[1] == "hub_receipt"
    assert resolve_measured_at(dt.datetime(9999, 12, 31, 12, 0), -172800.0, RECEIVED,
                               CHICAGO)[1] == "hub_receipt"
