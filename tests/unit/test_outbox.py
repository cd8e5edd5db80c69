"""The outbox on a real SQLite file: order, de-duplication, policies, pruning, reopening, corruption."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from gateway.config import OutboxConfig
from gateway.outbox import (
    SCHEMA_VERSION,
    Outbox,
    OutboxClosedError,
    PutResult,
    SchemaVersionError,
)
from tests.conftest import Clock, make_item, small


def _corrupt_copies(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.startswith("o.db.corrupt-")]


async def test_pending_in_put_order_and_paged(outbox: Outbox) -> None:
    for n in range(10):
        assert await outbox.put(make_item(n)) is PutResult.STORED
    first = await outbox.pending(4)
    assert [p.reading_id for p in first] == [f"r-{n:06d}" for n in range(4)]
    assert [p.seq for p in first] == sorted(p.seq for p in first)
    rest = await outbox.pending(100, after_seq=first[-1].seq)
    assert [p.reading_id for p in rest] == [f"r-{n:06d}" for n in range(4, 10)]
    assert rest[0].payload == make_item(4).payload
    assert rest[0].topic == "readings"


async def test_duplicate_while_pending_and_after_delivery(outbox: Outbox) -> None:
    assert await outbox.put(make_item(1)) is PutResult.STORED
    assert await outbox.put(make_item(1)) is PutResult.DUPLICATE
    [p] = await outbox.pending(10)
    await outbox.mark_delivered([p.seq])
    assert await outbox.put(make_item(1)) is PutResult.DUPLICATE
    assert await outbox.pending(10) == []
    stats = await outbox.stats()
    assert (stats.pending, stats.delivered) == (0, 1)


async def test_mark_delivered_is_idempotent_and_partial(outbox: Outbox) -> None:
    for n in range(3):
        await outbox.put(make_item(n))
    seqs = [p.seq for p in await outbox.pending(10)]
    await outbox.mark_delivered([seqs[1]])
    await outbox.mark_delivered([seqs[1], 999_999])  # again, and an unknown seq: no error
    assert [p.seq for p in await outbox.pending(10)] == [seqs[0], seqs[2]]


async def test_wait_for_pending_wakes_on_store_not_on_duplicate(outbox: Outbox) -> None:
    await outbox.put(make_item(1))
    await asyncio.wait_for(outbox.wait_for_pending(), 1)  # the earlier put left it set
    waiter = asyncio.create_task(outbox.wait_for_pending())
    await outbox.put(make_item(1))  # duplicate: nothing new to send
    await asyncio.sleep(0)
    assert not waiter.done()
    await outbox.put(make_item(2))
    await asyncio.wait_for(waiter, 1)


async def test_reject_new_when_max_pending_reached(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db", small(max_pending=3, when_full="reject_new")) as ob:
        for n in range(3):
            assert await ob.put(make_item(n)) is PutResult.STORED
        assert await ob.put(make_item(3)) is PutResult.REJECTED_FULL
        assert await ob.put(make_item(0)) is PutResult.DUPLICATE  # already stored beats "full"
        stats = await ob.stats()
        assert (stats.pending, stats.rejected_full) == (3, 1)
        await ob.mark_delivered([(await ob.pending(1))[0].seq])
        assert await ob.put(make_item(3)) is PutResult.STORED


async def test_age_is_a_time_to_live_under_either_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    cfg = small(max_pending_age_days=7, when_full="reject_new")
    async with Outbox(tmp_path / "o.db", cfg, clock=clock) as ob:
        await ob.put(make_item(0))
        clock.now += timedelta(days=8)
        # An old backlog does not stop new readings from being stored...
        assert await ob.put(make_item(1)) is PutResult.STORED
        with caplog.at_level(logging.WARNING, logger="gateway.outbox"):
            await ob.prune()
        # ...and prune expires what was undelivered for longer than the limit, saying so.
        assert [p.reading_id for p in await ob.pending(10)] == ["r-000001"]
        assert "dropped 1 undelivered" in caplog.text
        assert (await ob.stats()).dropped == 1


async def test_drop_oldest_on_put_and_in_prune(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    cfg = small(max_pending=3, max_pending_age_days=7, when_full="drop_oldest")
    secret = b"SECRET-PAYLOAD-DATA"
    async with Outbox(tmp_path / "o.db", cfg, clock=clock) as ob:
        with caplog.at_level(logging.DEBUG, logger="gateway.outbox"):
            for n in range(5):
                assert await ob.put(make_item(n, extra=secret)) is PutResult.STORED
        assert [p.reading_id for p in await ob.pending(10)] == [f"r-{n:06d}" for n in (2, 3, 4)]
        assert (await ob.stats()).dropped == 2
        # A dropped reading stays forgotten only as long as nothing re-sends it.
        assert await ob.put(make_item(0)) is PutResult.STORED
        clock.now += timedelta(days=8)
        await ob.put(make_item(9))
        with caplog.at_level(logging.WARNING, logger="gateway.outbox"):
            await ob.prune()
        assert [p.reading_id for p in await ob.pending(10)] == ["r-000009"]
        assert (await ob.stats()).dropped == 2 + 1 + 3
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings and all("dropped" in r.getMessage() for r in warnings)
    # Patient data (payloads, patient ids) never appears above DEBUG.
    for r in caplog.records:
        if r.levelno > logging.DEBUG:
            assert "SECRET" not in r.getMessage() and "patient-1" not in r.getMessage()


async def test_prune_removes_old_delivered_keeps_recent_and_pending(tmp_path: Path) -> None:
    clock = Clock()
    async with Outbox(tmp_path / "o.db", small(keep_delivered_days=31), clock=clock) as ob:
        for n in range(3):
            await ob.put(make_item(n))
        seqs = [p.seq for p in await ob.pending(10)]
        await ob.mark_delivered(seqs[:1])
        clock.now += timedelta(days=20)
        await ob.mark_delivered(seqs[1:2])
        clock.now += timedelta(days=15)  # first delivery now 35 days old, second 15
        await ob.prune()
        stats = await ob.stats()
        assert (stats.delivered, stats.pending) == (1, 1)
        # A pruned delivered reading is no longer known: a re-send is stored again.
        assert await ob.put(make_item(0)) is PutResult.STORED
        assert await ob.put(make_item(1)) is PutResult.DUPLICATE


async def test_days_with_data_distinct_valid_in_range(outbox: Outbox) -> None:
    rows = [
        (1, "patient-1", "2026-03-01", True),
        (2, "patient-1", "2026-03-01", True),  # same day twice counts once
        (3, "patient-1", "2026-03-02", False),  # invalid measurement: not a day with data
        (4, "patient-1", "2026-03-05", True),
        (5, "patient-2", "2026-03-03", True),  # another patient
        (6, "patient-1", "2026-04-01", True),  # outside the range
    ]
    for n, patient, day, valid in rows:
        await outbox.put(make_item(n, patient_id=patient, day=day, valid=valid))
    await outbox.mark_delivered([(await outbox.pending(1))[0].seq])  # delivered rows still count
    days = await outbox.days_with_data("patient-1", "2026-03-01", "2026-03-30")
    assert days == ["2026-03-01", "2026-03-05"]


async def test_days_with_data_uses_index(outbox: Outbox) -> None:
    conn = sqlite3.connect(outbox.path)
    try:
        plan = " ".join(
            str(r[-1])
            for r in conn.execute(
                "EXPLAIN QUERY PLAN SELECT DISTINCT measured_day FROM readings"
                " WHERE patient_id = ? AND valid = 1 AND measured_day BETWEEN ? AND ?",
                ("p", "a", "b"),
            )
        )
    finally:
        conn.close()
    assert "readings_days" in plan


async def test_reopen_keeps_pending_and_durability_settings(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "o.db"  # directories are created
    async with Outbox(path, OutboxConfig()) as ob:
        for n in range(5):
            await ob.put(make_item(n))
        await ob.mark_delivered([(await ob.pending(1))[0].seq])
    async with Outbox(path, OutboxConfig()) as ob:
        assert [p.reading_id for p in await ob.pending(10)] == [f"r-{n:06d}" for n in range(1, 5)]
        assert await ob.put(make_item(0)) is PutResult.DUPLICATE
        await ob.put(make_item(5))
        seqs = [p.seq for p in await ob.pending(10)]
        assert seqs == sorted(seqs)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


async def test_synchronous_full_on_the_live_connection(outbox: Outbox) -> None:
    # synchronous is per connection, so ask the outbox's own connection (on its worker thread).
    level = await outbox._run(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])
    assert level == 2  # FULL: a commit survives a power cut, not only a killed process


@pytest.mark.parametrize("damage", ["garbage", "truncated-page"])
async def test_corrupt_file_moved_aside_and_fresh_outbox_created(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "o.db"
    async with Outbox(path, OutboxConfig()) as ob:
        for n in range(200):
            await ob.put(make_item(n, extra=b"x" * 500))
    if damage == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    else:
        data = bytearray(path.read_bytes())
        data[4096 * 2 : 4096 * 4] = b"\xff" * 8192  # smash b-tree pages past the header
        path.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="gateway.outbox"):
        async with Outbox(path, OutboxConfig()) as ob:
            pending = await ob.pending(1000)
            report = ob.recovery
            assert report is not None and report.kind == "corrupt"
            # What could be read came back unchanged (tests/unit/test_outbox_salvage.py has
            # the damage matrix); a file of garbage has nothing to salvage.
            assert len(pending) == report.salvaged
            assert all(p.payload == make_item(int(p.reading_id[2:]), extra=b"x" * 500).payload
                       for p in pending)  # fmt: skip
            if damage == "garbage":
                assert pending == []
            assert await ob.put(make_item(1000)) is PutResult.STORED
    aside = _corrupt_copies(tmp_path)
    assert len(aside) == 1 and aside[0].stat().st_size > 0
    assert report.moved_to == aside[0]
    assert any("corrupt" in r.getMessage() for r in caplog.records)


async def test_newer_schema_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(SchemaVersionError):
        async with Outbox(path, OutboxConfig()):
            pass
    assert path.read_bytes() == before


async def test_closed_outbox_raises_outbox_error(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", OutboxConfig())
    with pytest.raises(OutboxClosedError):
        await ob.put(make_item(1))


async def test_put_rejects_wildcard_topic(outbox: Outbox) -> None:
    with pytest.raises(ValueError, match="wildcards"):
        await outbox.put(make_item(1, topic="readings/#"))
