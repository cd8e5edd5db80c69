"""Outbox schema v3 on real files: the migration from v2 keeps every row, seq and count; seqs
are never reused without AUTOINCREMENT; a newer file is still refused untouched."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from gateway.config import OutboxConfig
from gateway.outbox import SCHEMA_VERSION, Outbox, PutResult, SchemaVersionError
from gateway.outbox_counts import count_rows
from gateway.outbox_schema import MIGRATIONS
from tests.conftest import Clock, make_item, small

_V2_INSERT = (
    "INSERT INTO readings (reading_id, topic, payload, patient_id, kind, measured_at,"
    " measured_day, valid, created_at, delivered_at, checksum, quarantined_at,"
    " quarantine_reason, retry_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


def _v2_file(path: Path) -> list[tuple[object, ...]]:
    """A database as the v2 gateway wrote it: every kind of row, and deleted top seqs."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for version in (0, 1):
        for statement in MIGRATIONS[version].split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    stamp = "2026-03-01T12:00:00.000000+00:00"
    for n in range(12):
        item = make_item(n, patient_id=None if n in (4, 5) else "patient-1")  # type: ignore[arg-type]
        delivered = stamp if n < 3 else None
        quarantined = (stamp, "not authorized", None) if n == 6 else (None, None, None)
        conn.execute(_V2_INSERT, (item.reading_id, item.topic, item.payload, item.patient_id,
                                  item.kind, item.measured_at, item.measured_day, int(n != 7),
                                  stamp, delivered, "c" * 64 if n == 8 else None,
                                  *quarantined))  # fmt: skip
    conn.execute("INSERT INTO counters VALUES ('dropped', 2), ('rejected_full', 1)")
    conn.execute("DELETE FROM readings WHERE seq > 10")  # seqs 11 and 12 used, then deleted
    rows = conn.execute("SELECT * FROM readings ORDER BY seq").fetchall()
    conn.close()
    return rows


def _schema(path: Path) -> tuple[int, set[str], str, int]:
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        indexes = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}  # fmt: skip
        table = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'readings'").fetchone()[0]  # fmt: skip
        sequences = conn.execute("SELECT COUNT(*) FROM sqlite_sequence").fetchone()[0]
        return version, indexes, table, sequences
    finally:
        conn.close()


async def test_v2_file_upgrades_keeping_every_row_seq_and_count(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    before = _v2_file(path)
    async with Outbox(path, OutboxConfig()) as ob:
        assert ob._conn is not None
        after = await ob._run(
            lambda c: c.execute("SELECT * FROM readings ORDER BY seq").fetchall()
        )
        assert after == before  # every column of every row, seqs included
        assert ob._counts == await ob._run(count_rows)
        stats = await ob.stats()
        # 12 rows: 3 delivered, 2 unattributed, 7 attributed undelivered of which 1 quarantined
        # and 2 deleted (11, 12); so 5 backlog, 1 quarantined.
        assert (stats.pending, stats.quarantined, stats.unattributed, stats.delivered) == (
            4, 1, 2, 3)  # fmt: skip
        assert (stats.dropped, stats.rejected_full) == (2, 1)
        assert await ob.put(make_item(1)) is PutResult.DUPLICATE  # delivered history kept
        assert await ob.put(make_item(50)) is PutResult.STORED
        assert (await ob.pending(100))[-1].seq == 13  # 11 and 12 were handed out once: never again
        assert await ob.days_with_data("patient-1", "2026-01-01", "2026-12-31") == ["2026-03-01"]
    version, indexes, table, sequences = _schema(path)
    assert version == SCHEMA_VERSION == 3
    assert "AUTOINCREMENT" not in table.upper().split("--")[0]
    assert indexes == {"readings_pending", "readings_days", "readings_unattributed",
                       "readings_quarantined"}  # fmt: skip
    assert sequences == 0
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


async def test_a_seq_is_never_reused_after_the_top_rows_are_pruned(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "o.db"
    cfg = small(keep_delivered_days=2)
    async with Outbox(path, cfg, clock=clock) as ob:
        for n in range(5):
            await ob.put(make_item(n))
        seqs = [p.seq for p in await ob.pending(10)]
        await ob.mark_delivered(seqs)
        clock.now += timedelta(days=3)
        await ob.prune()  # every row gone: the table shows no high-water mark any more
        assert (await ob.stats()).delivered == 0
    async with Outbox(path, cfg, clock=clock) as ob:  # and across a restart
        await ob.put(make_item(99))
        [p] = await ob.pending(10)
        assert p.seq == max(seqs) + 1


async def test_drop_oldest_never_deletes_the_top_row_so_it_frees_no_seq(tmp_path: Path) -> None:
    # drop_oldest writes no high-water mark (Outbox._drop_oldest): the table's own top row
    # keeps it, so that row must survive every drop, whatever kind of row it is. Checked after
    # each put that drops: the newest reading is still there, at the top, above counters'
    # seq_high; the next reading gets a seq above every seq handed out before.
    cfg = small(max_pending=2, when_full="drop_oldest")
    async with Outbox(tmp_path / "o.db", cfg) as ob:

        def table(conn: sqlite3.Connection) -> tuple[int, str, int]:
            top, rid = conn.execute(
                "SELECT seq, reading_id FROM readings ORDER BY seq DESC LIMIT 1").fetchone()
            mark = conn.execute("SELECT COALESCE((SELECT value FROM counters"
                                " WHERE name = 'seq_high'), 0)").fetchone()[0]  # fmt: skip
            return int(top), str(rid), int(mark)

        handed = 0

        async def check(newest: str | None) -> None:
            nonlocal handed
            top, rid, mark = await ob._run(table)
            assert mark < top  # the table's top row shows the high-water mark, not counters
            if newest is not None:
                assert rid == newest  # the reading just stored survived the drop
                assert top > handed
            assert top >= handed
            handed = top
            assert ob._counts == await ob._run(count_rows)

        for n in range(4):  # each put past 2 drops the oldest
            await ob.put(make_item(n))
            await check(make_item(n).reading_id)
        # A quarantined top row: the next put drops the oldest, not it.
        await ob.quarantine((await ob.pending(10))[-1].seq, "refused", retry_after_s=None)
        await ob.put(make_item(10))
        await check(make_item(10).reading_id)
        # A burst committed together, more over the bound than it holds rows.
        await asyncio.gather(*(ob.put(make_item(n)) for n in range(20, 25)))
        await check(make_item(24).reading_id)
        # An unattributed top row (never a candidate) above a dropped attributed one.
        guest = dataclasses.replace(make_item(30), patient_id=None)
        await asyncio.gather(ob.put(make_item(29)), ob.put(guest))
        await check(guest.reading_id)
        # A batch of duplicates only, with the backlog over the bound by an assignment: the
        # put inserts nothing and drops one; the assigned (top) row stays.
        assert (await ob.assign(guest.reading_id, "patient-1")).ok
        await ob.put(make_item(29))
        await check(guest.reading_id)
        assert (await ob.stats()).pending + (await ob.stats()).quarantined == 2
        await ob.put(make_item(40))
        [*_, last] = await ob.pending(10)
        assert last.seq == handed + 1


async def test_a_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with Outbox(path, OutboxConfig()) as ob:
        await ob.put(make_item(1))
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    data = path.read_bytes()
    with pytest.raises(SchemaVersionError):
        async with Outbox(path, OutboxConfig()):
            pass
    assert path.read_bytes() == data


async def test_prune_walk_deletes_only_what_is_due(tmp_path: Path) -> None:
    clock = Clock()
    async with Outbox(tmp_path / "o.db", small(keep_delivered_days=2), clock=clock) as ob:
        items = [make_item(n) for n in range(1200)]  # more than two chunks of the walk
        for start in range(0, 1200, 300):
            await asyncio.gather(*(ob.put(i) for i in items[start : start + 300]))
        seqs = [p.seq for p in await ob.pending(2000)]
        await ob.mark_delivered(seqs[:1000])
        clock.now += timedelta(days=3)
        for n in range(1200, 1205):
            await ob.put(make_item(n))
        await ob.mark_delivered([p.seq for p in await ob.pending(2000)][-5:])
        await ob.prune()
        stats = await ob.stats()
        assert (stats.delivered, stats.pending) == (5, 200)  # the old 1000 gone, nothing else
        assert ob._counts == await ob._run(count_rows)
        assert await ob.put(items[0]) is PutResult.STORED  # pruned: no longer a duplicate
