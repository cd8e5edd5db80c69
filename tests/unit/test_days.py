"""Days with data per patient in 30-day periods anchored at enrolment (gateway.days)."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.base import DeviceInfo
from drivers.weight_scale import decode_weight
from gateway.config import DeviceBinding, OutboxConfig
from gateway.days import DaysWithData, Period, period_on
from gateway.intake import build_reading, outbox_item
from gateway.outbox import Outbox, PutResult
from gateway.pairings import PairingRegistry, enrolled_on
from tests.unit.test_intake import CHICAGO

D = dt.date


def test_periods_are_30_days_from_enrolment() -> None:
    assert period_on(D(2026, 11, 2), D(2026, 11, 2)) == Period(D(2026, 11, 2), D(2026, 12, 1))
    assert period_on(D(2026, 11, 2), D(2026, 12, 1)) == Period(D(2026, 11, 2), D(2026, 12, 1))
    assert period_on(D(2026, 11, 2), D(2026, 12, 2)) == Period(D(2026, 12, 2), D(2026, 12, 31))
    # Before enrolment (a binding provisioned ahead): the first period.
    assert period_on(D(2026, 11, 2), D(2026, 10, 30)).start == D(2026, 11, 2)


@given(st.dates(min_value=D(2020, 1, 1), max_value=D(2030, 1, 1)),
       st.integers(min_value=0, max_value=2000))
def test_today_is_always_in_its_period_and_periods_tile(enrolled: dt.date, offset: int) -> None:
    today = enrolled + dt.timedelta(days=offset)
    p = period_on(enrolled, today)
    assert today in p
    assert (p.end - p.start).days == 29
    assert (p.start - enrolled).days % 30 == 0
    assert period_on(enrolled, p.end + dt.timedelta(days=1)).start == p.end + dt.timedelta(days=1)


def test_words_and_codes() -> None:
    p = Period(D(2026, 11, 2), D(2026, 12, 1))
    nine = DaysWithData(tuple(f"2026-11-{d:02d}" for d in range(2, 11)), p, D(2026, 11, 19))
    assert nine.words() == "9 of 16 days, 12 days left in period"
    assert nine.code == "99445"
    assert DaysWithData(("2026-11-02",), p, D(2026, 12, 1)).words() == (
        "1 of 16 days, last day of period")
    assert DaysWithData(("2026-11-02",), p, D(2026, 12, 1)).code is None
    sixteen = DaysWithData(tuple(f"2026-11-{d:02d}" for d in range(2, 18)), p, D(2026, 11, 30))
    assert sixteen.code == "99454" and sixteen.as_dict()["days_left"] == 1


def test_enrolment_is_recorded_once_atomically_and_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "pairings.json"
    store = PairingRegistry(path)
    assert store.ensure(["aa:bb:cc:dd:ee:01"], D(2026, 11, 2))
    assert store.ensure(["AA:BB:CC:DD:EE:01", "AA:BB:CC:DD:EE:02"], D(2026, 11, 9))
    again = PairingRegistry(path)
    assert again.first_seen("AA:BB:CC:DD:EE:01") == D(2026, 11, 2)  # the first day stays
    assert again.first_seen("aa:bb:cc:dd:ee:02") == D(2026, 11, 9)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    configured = DeviceBinding(address="AA:BB:CC:DD:EE:01", patient_id="p", enrolled=D(2026, 10, 1))
    assert enrolled_on(configured, again, D(2026, 12, 1)) == D(2026, 10, 1)
    assert enrolled_on(DeviceBinding(address="AA:BB:CC:DD:EE:03", patient_id="p"), again,
                       D(2026, 12, 1)) == D(2026, 12, 1)


def test_an_unreadable_registry_file_is_kept_aside_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "pairings.json"
    path.write_text("{not json")
    store = PairingRegistry(path)
    assert store.first_seen("AA:BB:CC:DD:EE:01") is None
    assert (tmp_path / "pairings.json.unreadable").read_text() == "{not json"
    assert store.ensure(["AA:BB:CC:DD:EE:01"], D(2026, 11, 2))
    assert json.loads(path.read_text())["first_seen"] == {"AA:BB:CC:DD:EE:01": "2026-11-02"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_a_failed_write_is_reported_and_the_day_kept(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        store = PairingRegistry(tmp_path / "pairings.json")
        assert not store.ensure(["AA:BB:CC:DD:EE:01"], D(2026, 11, 2))
        assert not store.ensure(["AA:BB:CC:DD:EE:01"], D(2026, 11, 3))  # retried, quietly
        assert store.first_seen("AA:BB:CC:DD:EE:01") == D(2026, 11, 2)
    finally:
        tmp_path.chmod(0o700)
    assert store.ensure([], D(2026, 11, 4))  # space again: written now
    assert PairingRegistry(tmp_path / "pairings.json").first_seen("AA:BB:CC:DD:EE:01") == D(
        2026, 11, 2)


def _weight_at(local: dt.datetime, kg_raw: int = 16270) -> bytes:
    """A Weight Measurement (SI, with time stamp) taken at `local` wall time."""
    return bytes([0x02]) + kg_raw.to_bytes(2, "little") + local.year.to_bytes(2, "little") + bytes(
        [local.month, local.day, local.hour, local.minute, local.second])


async def test_a_simulated_month_counts_each_local_day_once(tmp_path: Path) -> None:
    # Chicago patient enrolled 2026-11-02: period 2026-11-02 .. 2026-12-01.
    binding = DeviceBinding(address="AA:BB:CC:DD:EE:01", patient_id="patient-7")
    taken = [
        dt.datetime(2026, 11, 1, 20, 0),   # the day before the period: not counted
        dt.datetime(2026, 11, 2, 7, 0),    # day 1
        dt.datetime(2026, 11, 2, 19, 0),   # day 1 again (a second reading the same day)
        dt.datetime(2026, 11, 3, 23, 30),  # 05:30 UTC on the 4th, still the 3rd in Chicago
        dt.datetime(2026, 12, 1, 23, 59),  # the period's last local day
        dt.datetime(2026, 12, 2, 0, 1),    # the next period
    ]
    resent = taken[1]  # the scale sends its memory again: same bytes, same id
    async with Outbox(tmp_path / "outbox.db", OutboxConfig()) as outbox:
        results = []
        for local in [*taken, resent]:
            m = decode_weight(_weight_at(local))
            r = build_reading(
                m, hub_id="hub-1", binding=binding, address=binding.address,
                info=DeviceInfo(manufacturer="Sim", model="WS-1"),
                driver_name="sig_weight_scale", driver_version="1.0", clock=None,
                received_at=dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC), zone=CHICAGO,
                hub_clock_synced=True)
            results.append(await outbox.put(outbox_item(r, CHICAGO)))
        assert results[-1] is PutResult.DUPLICATE
        period = period_on(D(2026, 11, 2), D(2026, 11, 20))
        days = await outbox.days_with_data("patient-7", period.start.isoformat(),
                                           period.end.isoformat())
    got = DaysWithData(tuple(days), period, D(2026, 11, 20))
    assert got.days == ("2026-11-02", "2026-11-03", "2026-12-01")
    assert got.words() == "3 of 16 days, 11 days left in period"


def test_a_full_disk_warns_once_and_writes_when_space_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import errno
    import logging

    caplog.set_level(logging.DEBUG, logger="gateway.pairings")
    store = PairingRegistry(tmp_path / "pairings.json")
    real_replace = os.replace

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    for day in range(2, 12):  # ten housekeeping rounds on a full disk
        assert not store.ensure(["AA:BB:CC:DD:EE:01"], D(2026, 11, day))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no litter
    monkeypatch.setattr(os, "replace", real_replace)
    assert store.ensure(["AA:BB:CC:DD:EE:01"], D(2026, 11, 12))
    assert PairingRegistry(tmp_path / "pairings.json").first_seen("AA:BB:CC:DD:EE:01") == D(
        2026, 11, 2)
