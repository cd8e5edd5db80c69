"""Unattributed readings in the outbox on a real SQLite file: listed, assigned, dropped and counted."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import shutil
import sqlite3
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.base import DeviceInfo, Measurement, Observation
from gateway.config import DeviceBinding, OutboxConfig
from gateway.intake import build_reading, outbox_item
from gateway.models import Reading
from gateway.outbox import AssignOutcome, Outbox, OutboxItem, PutResult, StorageError
from gateway.outbox_counts import count_rows
from tests.conftest import Clock, make_item, small


def guest(n: int, *, day: str = "2026-03-01", slot: int | None = 255) -> OutboxItem:
    """An unattributed cuff reading shaped like intake's: compact JSON, patient_id "" (none)."""
    rid = f"{n:032x}"
    body = {
        "schema": "rpm-gateway/reading/1", "reading_id": rid, "hub_id": "hub-1", "patient_id": "",
        "device": {"address": "AA:BB:CC:00:00:01", "model": "BP-1", "driver": "blood_pressure"},
        "kind": "blood_pressure",
        "observations": [
            {"code": "8480-6", "name": "Systolic blood pressure", "value": 132.0, "unit": "mm[Hg]"},
            {"code": "8462-4", "name": "Diastolic blood pressure", "value": 87.0, "unit": "mm[Hg]"},
            {"code": "8867-4", "name": "Pulse rate", "value": None, "unit": "/min"},
        ],
        "valid": True, "measured_at": f"{day}T07:30:00Z", "user_index": slot, "note": "Grüße",
    }  # fmt: skip
    return OutboxItem(
        reading_id=rid,
        topic="readings",
        payload=json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(),
        patient_id=None,
        kind="blood_pressure",
        measured_at=f"{day}T07:30:00+00:00",
        measured_day=day,
        valid=True,
    )


async def test_unassigned_readings_dropped_at_retention_are_counted_and_survive_reopen(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    cfg = small(keep_delivered_days=31)
    async with Outbox(tmp_path / "o.db", cfg, clock=clock) as ob:
        assert await ob.put(guest(1)) is PutResult.STORED
        assert await ob.put(guest(2)) is PutResult.STORED
        clock.now += timedelta(days=20)
        assert await ob.put(guest(3)) is PutResult.STORED
        assert await ob.put(make_item(4)) is PutResult.STORED
        clock.now += timedelta(days=12)  # 32 days after the first two, 12 after the third
        with caplog.at_level(logging.DEBUG, logger="gateway.outbox"):
            await ob.prune()
        stats = await ob.stats()
        assert (stats.unattributed, stats.unattributed_dropped) == (1, 2)
        assert (stats.pending, stats.dropped) == (1, 0)  # not a drop of a patient's reading
        [line] = [r for r in caplog.records if "unattributed" in r.getMessage()]
        assert line.levelno == logging.INFO
        assert "2 unattributed" in line.getMessage()
        assert "r-00000" not in line.getMessage()  # counts only, no reading ids
    async with Outbox(tmp_path / "o.db", cfg, clock=clock) as ob:
        assert (await ob.stats()).unattributed_dropped == 2
        clock.now += timedelta(days=30)
        await ob.prune()
        assert (await ob.stats()).unattributed_dropped == 3  # added up, not reset
        await ob.prune()  # nothing left to drop: the counter does not move
        assert (await ob.stats()).unattributed_dropped == 3


def body_of(payload: bytes) -> dict[str, object]:
    obj = json.loads(payload)
    assert isinstance(obj, dict)
    return obj


async def test_listed_oldest_first_with_what_a_technician_asks_about(tmp_path: Path) -> None:
    clock = Clock()
    async with Outbox(tmp_path / "o.db", small(keep_delivered_days=31), clock=clock) as ob:
        await ob.put(guest(2, day="2026-02-28", slot=2))
        clock.now += timedelta(hours=1)
        await ob.put(guest(1, slot=255))
        await ob.put(make_item(3))  # a patient's: not listed
        clock.now += timedelta(days=10)
        listed = await ob.unattributed()
        assert [u.reading_id for u in listed] == [f"{2:032x}", f"{1:032x}"]  # stored order
        first = listed[0]
        assert first.device_address == "AA:BB:CC:00:00:01"
        assert (first.kind, first.user_index, first.valid) == ("blood_pressure", 2, True)
        assert (first.measured_at, first.measured_day) == ("2026-02-28T07:30:00Z", "2026-02-28")
        assert first.stored_at == "2026-03-01T12:00:00Z"
        assert first.drops_at == "2026-04-01T12:00:00Z"  # stored + keep_delivered_days
        assert first.days_left == 20  # 20 days 23 hours: whole days
        assert [(o.name, o.value, o.unit) for o in first.observations] == [
            ("Systolic blood pressure", 132.0, "mm[Hg]"),
            ("Diastolic blood pressure", 87.0, "mm[Hg]"),
            ("Pulse rate", None, "/min"),
        ]
        assert (listed[1].user_index, listed[1].damaged) == (255, False)
        assert len(await ob.unattributed(limit=1)) == 1
        with pytest.raises(ValueError, match="limit"):
            await ob.unattributed(limit=0)
        # At the limit: listed with 0 days left until the next prune drops it.
        clock.now += timedelta(days=22)
        assert [u.days_left for u in await ob.unattributed()] == [0, 0]


async def test_assign_publishes_it_with_the_patient_in_the_payload(tmp_path: Path) -> None:
    clock = Clock()
    async with Outbox(tmp_path / "o.db", OutboxConfig(), clock=clock) as ob:
        item = guest(1)
        await ob.put(item)
        await ob.put(make_item(2))
        [old] = await ob.pending(10)
        assert old.reading_id == "r-000002"
        ob._stored.clear()
        clock.now += timedelta(days=3)
        result = await ob.assign(item.reading_id, "patient-7")
        assert result.ok
        assert result.outcome is AssignOutcome.ASSIGNED
        assert (result.reading_id, result.patient_id, result.kind) == (
            item.reading_id, "patient-7", "blood_pressure")  # fmt: skip
        assert (result.device_address, result.measured_at) == (
            "AA:BB:CC:00:00:01", "2026-03-01T07:30:00Z")  # fmt: skip
        assert result.assigned_at == "2026-03-04T12:00:00Z"
        assert ob._stored.is_set()  # the uplink is woken
        # Queued behind what was pending, like a reading stored now: the uplink's cursor
        # (after the seq it sent last) finds it without starting over.
        [fresh] = await ob.pending(10, after_seq=old.seq)
        assert (fresh.reading_id, fresh.seq, fresh.topic) == (item.reading_id, result.seq, "readings")
        assert fresh.seq > old.seq
        sent = body_of(fresh.payload)
        assert sent["patient_id"] == "patient-7"
        # Every other field as it was, in the same order; compact like model_dump_json.
        assert {**body_of(item.payload), "patient_id": "patient-7"} == sent
        assert list(sent) == list(body_of(item.payload))
        assert b", " not in fresh.payload and b": " not in fresh.payload
        assert "Grüße".encode() in fresh.payload  # UTF-8 kept, not \\u escapes
        stats = await ob.stats()
        assert (stats.pending, stats.unattributed) == (2, 0)
        assert await ob.unattributed() == []
        await ob.mark_delivered([old.seq, fresh.seq])
        assert (await ob.stats()).delivered == 2


async def test_assign_twice_unknown_id_and_bad_input(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db", OutboxConfig()) as ob:
        item = guest(1)
        await ob.put(item)
        await ob.put(make_item(2))
        assert (await ob.assign(item.reading_id, "patient-7")).ok
        again = await ob.assign(item.reading_id, "patient-8")
        assert (again.outcome, again.patient_id) == (AssignOutcome.ALREADY_ATTRIBUTED, "patient-7")
        attributed = await ob.assign("r-000002", "patient-8")  # a binding's reading
        assert (attributed.outcome, attributed.patient_id) == (
            AssignOutcome.ALREADY_ATTRIBUTED, "patient-1")  # fmt: skip
        missing = await ob.assign("f" * 32, "patient-7")
        assert (missing.outcome, missing.ok, missing.seq) == (AssignOutcome.NOT_FOUND, False, None)
        for bad in ("", "a b", "x" * 65):
            with pytest.raises(ValueError, match="patient id"):
                await ob.assign(item.reading_id, bad)
        for day in ("20260301", "2026-02-30", "yesterday"):
            with pytest.raises(ValueError, match="measured_day"):
                await ob.assign(item.reading_id, "patient-7", measured_day=day)
        stats = await ob.stats()
        assert (stats.pending, stats.unattributed) == (2, 0)  # nothing else changed
        assert [body_of(p.payload)["patient_id"] for p in await ob.pending(10)] == [
            "patient-1", "patient-7"]  # fmt: skip


async def test_assigned_reading_counts_in_days_with_data(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db", OutboxConfig()) as ob:
        a, b = guest(1, day="2026-03-02"), guest(2, day="2026-03-03")
        await ob.put(a)
        await ob.put(b)
        await ob.put(make_item(3, patient_id="patient-7", day="2026-03-02"))
        assert await ob.days_with_data("patient-7", "2026-03-01", "2026-03-31") == ["2026-03-02"]
        assert (await ob.assign(a.reading_id, "patient-7")).ok  # same day: counted once
        # The patient's zone put it on another local day than the one it was stored under.
        result = await ob.assign(b.reading_id, "patient-7", measured_day="2026-03-04")
        assert result.measured_day == "2026-03-04"
        assert await ob.days_with_data("patient-7", "2026-03-01", "2026-03-31") == [
            "2026-03-02", "2026-03-04"]  # fmt: skip
        assert await ob.days_with_data("patient-1", "2026-03-01", "2026-03-31") == []


async def test_a_resend_after_assign_is_a_duplicate_and_counts_once(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db", OutboxConfig()) as ob:
        item = guest(1)
        await ob.put(item)
        assert (await ob.assign(item.reading_id, "patient-7")).ok
        # The device replays its memory: unattributed again, or claimed by a binding since
        # corrected. The assignment stands; nothing is stored, queued or counted twice.
        assert await ob.put(item) is PutResult.DUPLICATE
        claimed = dataclasses.replace(item, patient_id="patient-1")
        assert await ob.put(claimed, confirmed=True) is PutResult.DUPLICATE
        [row] = await ob.pending(10)
        assert body_of(row.payload)["patient_id"] == "patient-7"
        assert await ob.days_with_data("patient-1", "2026-03-01", "2026-03-31") == []
        assert await ob.days_with_data("patient-7", "2026-03-01", "2026-03-31") == ["2026-03-01"]
        assert (await ob.assign(item.reading_id, "patient-1")).outcome is (
            AssignOutcome.ALREADY_ATTRIBUTED)  # fmt: skip
        stats = await ob.stats()
        assert (stats.pending, stats.unattributed) == (1, 0)


async def test_a_binding_claiming_it_later_queues_it_behind_pending_like_assign(
    tmp_path: Path,
) -> None:
    # The claim path of put() follows the same rule as assign(): a new seq after the pending
    # rows, or the uplink's cursor (past them) would not see it for up to quarantine_retry_s.
    async with Outbox(tmp_path / "o.db", OutboxConfig()) as ob:
        item = guest(1)
        await ob.put(item)
        await ob.put(make_item(2))
        [old] = await ob.pending(10)
        claimed = dataclasses.replace(item, patient_id="patient-1",
                                      payload=item.payload.replace(b'"patient_id":""',
                                                                   b'"patient_id":"patient-1"'))
        assert await ob.put(claimed) is PutResult.STORED
        [fresh] = await ob.pending(10, after_seq=old.seq)
        assert (fresh.reading_id, fresh.payload) == (item.reading_id, claimed.payload)
        assert (await ob.assign(item.reading_id, "patient-7")).outcome is (
            AssignOutcome.ALREADY_ATTRIBUTED)  # fmt: skip
        # Stored unattributed and claimed inside one batch: one row, the claimed one.
        other = guest(5)
        results = await asyncio.gather(
            ob.put(other), ob.put(dataclasses.replace(other, patient_id="patient-1")))
        assert list(results) == [PutResult.STORED, PutResult.STORED]
        stats = await ob.stats()
        assert (stats.pending, stats.unattributed) == (3, 0)


async def test_assign_is_not_refused_by_a_full_outbox_and_drops_nothing(tmp_path: Path) -> None:
    cfg = small(max_pending=2, when_full="reject_new")
    async with Outbox(tmp_path / "o.db", cfg) as ob:
        item = guest(1)
        await ob.put(item)
        await ob.put(make_item(2))
        await ob.put(make_item(3))
        assert await ob.accepting() is not None  # at the bound
        assert (await ob.assign(item.reading_id, "patient-7")).ok
        stats = await ob.stats()
        assert (stats.pending, stats.dropped, stats.rejected_full) == (3, 0, 0)
        assert "3 readings pending" in (await ob.accepting() or "")
    cfg = small(max_pending=2, when_full="drop_oldest")
    async with Outbox(tmp_path / "d.db", cfg) as ob:
        await ob.put(item)
        await ob.put(make_item(2))
        await ob.put(make_item(3))
        assert (await ob.assign(item.reading_id, "patient-7")).ok
        assert ((await ob.stats()).pending, (await ob.stats()).dropped) == (3, 0)
        # The policy takes it from there, counted and logged: the oldest goes, not the
        # reading the technician just assigned (it is the newest in the queue).
        await ob.prune()
        assert [p.reading_id for p in await ob.pending(10)] == ["r-000003", item.reading_id]
        assert (await ob.stats()).dropped == 1


async def test_a_damaged_payload_is_listed_but_never_assigned(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    item = guest(1)
    async with Outbox(path, OutboxConfig()) as ob:
        await ob.put(item)
    with sqlite3.connect(path) as conn:  # one digit changed on the disk
        conn.execute("UPDATE readings SET payload = ?",
                     (item.payload.replace(b"132.0", b"182.0"),))  # fmt: skip
    async with Outbox(path, OutboxConfig()) as ob:
        [listed] = await ob.unattributed()
        assert listed.damaged
        assert (listed.device_address, listed.observations, listed.user_index) == (None, (), None)
        assert listed.kind == "blood_pressure"  # the columns still say what it was
        result = await ob.assign(item.reading_id, "patient-7")
        assert result.outcome is AssignOutcome.DAMAGED
        assert await ob.pending(10) == []
        assert (await ob.stats()).unattributed == 1


@pytest.mark.parametrize("bad", [b"not json", b"[1, 2]", b'{"value": NaN}', b'{"value": 1e999}'])
async def test_a_payload_that_cannot_be_written_back_is_damaged(tmp_path: Path, bad: bytes) -> None:
    # Its checksum matches (so it is not a disk error), but it is no JSON object this outbox
    # could set a patient in and publish: listed as damaged, never assigned, nothing raised.
    item = dataclasses.replace(guest(1), payload=bad)
    async with Outbox(tmp_path / "o.db", OutboxConfig()) as ob:
        await ob.put(item)
        [listed] = await ob.unattributed()
        assert listed.damaged
        assert (await ob.assign(item.reading_id, "patient-7")).outcome is AssignOutcome.DAMAGED
        assert (await ob.stats()).unattributed == 1


async def test_an_assignment_is_durable_and_whole_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    items = [guest(n) for n in range(3)]
    async with Outbox(path, OutboxConfig()) as ob:
        for item in items:
            await ob.put(item)
        assert (await ob.assign(items[1].reading_id, "patient-7")).ok
        assert ob._conn is not None
        assert ob._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    # A second connection (as after a crash and restart) sees the whole assignment or none.
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT reading_id, patient_id, payload, checksum FROM readings ORDER BY seq"
        ).fetchall()
    assert [(r[0], r[1]) for r in rows] == [
        (items[0].reading_id, None), (items[2].reading_id, None), (items[1].reading_id, "patient-7")
    ]  # fmt: skip
    assert body_of(rows[2][2])["patient_id"] == "patient-7"
    assert hashlib.sha256(rows[2][2]).hexdigest() == rows[2][3]  # its checksum matches
    async with Outbox(path, OutboxConfig()) as ob:
        stats = await ob.stats()
        assert (stats.pending, stats.unattributed) == (1, 2)
        assert await ob.accepting() is None
        [row] = await ob.pending(10)
        assert row.reading_id == items[1].reading_id


async def test_a_failed_assign_changes_nothing(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db", OutboxConfig()) as ob:
        item = guest(1)
        await ob.put(item)
        assert ob._conn is not None
        ob._conn.execute("PRAGMA query_only = 1")  # every write fails, as a read-only card
        with pytest.raises(StorageError):
            await ob.assign(item.reading_id, "patient-7")
        ob._conn.execute("PRAGMA query_only = 0")
        stats = await ob.stats()
        assert (stats.pending, stats.unattributed) == (0, 1)
        [listed] = await ob.unattributed()
        assert listed.reading_id == item.reading_id
        assert (await ob.assign(item.reading_id, "patient-7")).ok  # and it works after


async def test_the_real_payload_stays_a_valid_reading(tmp_path: Path) -> None:
    zone = ZoneInfo("Europe/Berlin")
    m = Measurement(
        kind="blood_pressure", characteristic="2a35", raw=b"\x1e\x84\x00\x57\x00\x60\x00\xff",
        observations=(Observation(code="8480-6", name="Systolic blood pressure", value=132.0,
                                  unit="mm[Hg]"),), valid=True, user_index=255,
    )  # fmt: skip
    binding = DeviceBinding(address="AA:BB:CC:00:00:01", patient_id="patient-1", user_index=1)
    reading = build_reading(
        m, hub_id="hub-1", binding=binding, address=binding.address, info=DeviceInfo(),
        driver_name="blood_pressure", driver_version="1", clock=None,
        received_at=datetime(2026, 3, 1, 8, 0, tzinfo=UTC), zone=zone, hub_clock_synced=True,
        attributed=False,
    )  # fmt: skip
    async with Outbox(tmp_path / "o.db", OutboxConfig()) as ob:
        await ob.put(outbox_item(reading, zone))
        [listed] = await ob.unattributed()
        assert (listed.user_index, listed.device_address) == (255, "AA:BB:CC:00:00:01")
        assert (await ob.assign(reading.reading_id, "patient-1")).ok
        [row] = await ob.pending(10)
    published = Reading.model_validate_json(row.payload)
    assert published == reading.model_copy(update={"patient_id": "patient-1"})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.booleans(), min_size=1, max_size=12),  # True: a patient's, False: a guest
    picks=st.sets(st.integers(min_value=0, max_value=11)),
)
def test_any_assigned_subset_keeps_the_counts_consistent(kinds: list[bool], picks: set[int]) -> None:
    async def run(directory: Path) -> None:
        async with Outbox(directory / "o.db", OutboxConfig()) as ob:
            items = [make_item(n) if own else guest(n) for n, own in enumerate(kinds)]
            for item in items:
                await ob.put(item)
            guests = [i for i in items if i.patient_id is None]
            chosen = [g for n, g in enumerate(guests) if n in picks]
            for g in chosen:
                assert (await ob.assign(g.reading_id, "patient-7")).ok
            stats = await ob.stats()
            assert stats.pending == len(items) - len(guests) + len(chosen)
            assert stats.unattributed == len(guests) - len(chosen)
            assert stats.pending + stats.unattributed == len(items)
            pending = await ob.pending(100)
            # The patients' readings in put order, then the assigned ones in assign order.
            assert [p.reading_id for p in pending] == [
                i.reading_id for i in items if i.patient_id is not None
            ] + [g.reading_id for g in chosen]
            assert [u.reading_id for u in await ob.unattributed()] == [
                g.reading_id for g in guests if g not in chosen
            ]
            assert ob._conn is not None
            assert ob._counts == count_rows(ob._conn)  # every count kept exact, none recounted

    with tempfile.TemporaryDirectory() as d:
        asyncio.run(run(Path(d)))


def _crash_copy_with_damaged_wal(src: Path, dst: Path) -> None:
    """The files as a power cut leaves them (copied while open), then the WAL header damaged."""
    shutil.copy(src, dst)
    wal = bytearray(src.with_name(src.name + "-wal").read_bytes())
    wal[0:4] = b"\0\0\0\0"
    dst.with_name(dst.name + "-wal").write_bytes(bytes(wal))


async def test_an_assignment_survives_a_salvage_of_the_file(tmp_path: Path) -> None:
    item = guest(1)
    async with Outbox(tmp_path / "o.db", OutboxConfig()) as ob:
        await ob.put(item)
        for n in range(3):
            await ob.put(make_item(n))
        assert ob._conn is not None
        ob._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the unattributed row: in the file
        assert (await ob.assign(item.reading_id, "patient-7")).ok
        _crash_copy_with_damaged_wal(tmp_path / "o.db", tmp_path / "c.db")
    async with Outbox(tmp_path / "c.db", OutboxConfig()) as ob:
        assert ob.recovery is not None and ob.recovery.kind == "corrupt"
        # The old unattributed copy of the row is still on a page of the file: it must not
        # undo the assignment.
        stats = await ob.stats()
        assert (stats.pending, stats.unattributed) == (4, 0)


async def test_the_unattributed_drop_counter_survives_a_salvage(tmp_path: Path) -> None:
    clock = Clock()
    async with Outbox(tmp_path / "o.db", small(keep_delivered_days=31), clock=clock) as ob:
        await ob.put(guest(1))
        clock.now += timedelta(days=32)
        await ob.prune()
        assert ob._conn is not None
        ob._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the counter: in the file
        await ob.put(make_item(2))
        _crash_copy_with_damaged_wal(tmp_path / "o.db", tmp_path / "c.db")
    async with Outbox(tmp_path / "c.db", OutboxConfig(), clock=clock) as ob:
        assert ob.recovery is not None and ob.recovery.kind == "corrupt"
        assert (await ob.stats()).unattributed_dropped == 1
