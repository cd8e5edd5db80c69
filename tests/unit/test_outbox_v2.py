"""Outbox schema v2 on real files: migration from v1, checksums, quarantine, unattributed readings."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from gateway.config import OutboxConfig
from gateway.outbox import SCHEMA_VERSION, Outbox, PutResult
from gateway.outbox_schema import MIGRATIONS
from tests.conftest import Clock, make_item, small


def _v1_file(path: Path, rows: int, *, deliver: int = 0, delete_last: int = 0) -> None:
    """A database exactly as the v1 gateway wrote it."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for statement in MIGRATIONS[0].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    for n in range(rows):
        item = make_item(n)
        conn.execute(
            "INSERT INTO readings (reading_id, topic, payload, patient_id, kind, measured_at,"
            " measured_day, valid, created_at, delivered_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (item.reading_id, item.topic, item.payload, item.patient_id, item.kind,
             item.measured_at, item.measured_day, 1, "2026-03-01T12:00:00.000000+00:00",
             "2026-03-01T12:00:01.000000+00:00" if n < deliver else None),
        )  # fmt: skip
    conn.execute("INSERT INTO counters VALUES ('dropped', 4)")
    if delete_last:
        conn.execute(
            "DELETE FROM readings WHERE seq > (SELECT MAX(seq) FROM readings) - ?", (delete_last,)
        )
    conn.close()


def _change_on_disk(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1, "the test needs exactly one copy of the bytes it changes"
    path.write_bytes(data.replace(old, new))


async def test_v1_file_upgrades_in_place(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    _v1_file(path, 10, deliver=3, delete_last=2)  # seqs 9 and 10 were used, then deleted
    async with Outbox(path, OutboxConfig()) as ob:
        assert [p.reading_id for p in await ob.pending(100)] == [
            f"r-{n:06d}" for n in range(3, 8)
        ]
        stats = await ob.stats()
        assert (stats.pending, stats.delivered, stats.dropped) == (5, 3, 4)
        assert await ob.put(make_item(1)) is PutResult.DUPLICATE  # delivered history kept
        assert await ob.put(make_item(50)) is PutResult.STORED
        new = (await ob.pending(100))[-1]
        assert new.seq == 11  # a seq is never reused, even across the table rebuild
        # v1 rows have no checksum and are still offered; new rows carry one.
        rows = await ob._run(
            lambda c: c.execute("SELECT seq, checksum FROM readings ORDER BY seq").fetchall()
        )
        assert all(cs is None for seq, cs in rows if seq != 11)
        assert dict(rows)[11] == hashlib.sha256(make_item(50).payload).hexdigest()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


async def test_one_changed_digit_is_quarantined_never_published(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "o.db"
    async with Outbox(path, OutboxConfig()) as ob:
        for n in range(5):
            extra = b' {"systolic": 129}' if n == 2 else b""
            await ob.put(make_item(n, extra=extra))
    # What the fault test did: one digit of a stored payload, past SQLite's own checks.
    _change_on_disk(path, b'"systolic": 129', b'"systolic": 929')
    with caplog.at_level(logging.DEBUG, logger="gateway.outbox"):
        async with Outbox(path, OutboxConfig()) as ob:
            assert ob.recovery is None  # SQLite sees a healthy file
            assert [p.reading_id for p in await ob.pending(3)] == ["r-000000", "r-000001",
                                                                    "r-000003"]  # fmt: skip
            assert [p.reading_id for p in await ob.pending(100)] == [
                "r-000000", "r-000001", "r-000003", "r-000004"
            ]  # fmt: skip
            stats = await ob.stats()
            assert (stats.pending, stats.quarantined, stats.checksum_failures) == (4, 1, 1)
            # Even a broker-refusal retry schedule does not let it out again.
            await ob.quarantine(3, "not authorized", retry_after_s=0)
            assert "r-000002" not in [p.reading_id for p in await ob.pending(100)]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "seq 3" in errors[0].getMessage()
    for r in caplog.records:
        assert "929" not in r.getMessage() and "patient-1" not in r.getMessage()
    async with Outbox(path, OutboxConfig()) as ob:  # the verdict and the count persist
        assert len(await ob.pending(100)) == 4
        assert (await ob.stats()).checksum_failures == 1


async def test_quarantine_holds_a_row_until_due_and_is_idempotent(tmp_path: Path) -> None:
    clock = Clock()
    async with Outbox(tmp_path / "o.db", OutboxConfig(), clock=clock) as ob:
        for n in range(4):
            await ob.put(make_item(n))
        s = [p.seq for p in await ob.pending(10)]
        await ob.quarantine(s[0], "packet too large", retry_after_s=None)
        await ob.quarantine(s[1], "not authorized", retry_after_s=3600)
        await ob.quarantine(s[1], "not authorized", retry_after_s=3600)  # idempotent
        await ob.quarantine(999_999, "unknown seq", retry_after_s=None)  # ignored
        assert [p.seq for p in await ob.pending(10)] == s[2:]
        stats = await ob.stats()
        assert (stats.pending, stats.quarantined) == (2, 2)
        assert stats.oldest_pending is not None
        clock.now += timedelta(seconds=3601)
        assert [p.seq for p in await ob.pending(10)] == s[1:]  # due: offered again, in order
        await ob.mark_delivered([s[1]])
        await ob.quarantine(s[1], "late refusal", retry_after_s=None)  # delivered: ignored
        clock.now += timedelta(days=300)
        assert [p.seq for p in await ob.pending(10)] == s[2:]  # None: never automatically
        stats = await ob.stats()
        assert (stats.pending, stats.quarantined, stats.delivered) == (2, 1, 1)
        reason = await ob._run(
            lambda c: c.execute(
                "SELECT quarantine_reason FROM readings WHERE seq = ?", (s[0],)
            ).fetchone()[0]
        )
        assert reason == "packet too large"


async def test_unattributed_is_kept_counted_never_offered(tmp_path: Path) -> None:
    cfg = small(max_pending=2, when_full="reject_new", keep_delivered_days=31)
    clock = Clock()
    async with Outbox(tmp_path / "o.db", cfg, clock=clock) as ob:
        guest = make_item(7, patient_id=None)  # type: ignore[arg-type]
        assert await ob.put(guest) is PutResult.STORED
        assert await ob.put(guest) is PutResult.DUPLICATE  # de-duplicated like any reading
        # It is no patient's, so it neither fills the bound nor counts as a day with data.
        assert await ob.put(make_item(1)) is PutResult.STORED
        assert await ob.put(make_item(2)) is PutResult.STORED
        assert await ob.put(make_item(3)) is PutResult.REJECTED_FULL
        assert [p.reading_id for p in await ob.pending(10)] == ["r-000001", "r-000002"]
        stats = await ob.stats()
        assert (stats.pending, stats.unattributed) == (2, 1)
        assert await ob.accepting() is not None  # the bound is reached
        await ob.mark_delivered([p.seq for p in await ob.pending(10)])
        assert await ob.accepting() is None
        assert await ob.days_with_data("patient-1", "2026-01-01", "2026-12-31") == ["2026-03-01"]
        # Kept as long as delivered history, then pruned without counting as a drop.
        clock.now += timedelta(days=32)
        await ob.prune()
        stats = await ob.stats()
        assert (stats.unattributed, stats.dropped) == (0, 0)


async def test_unattributed_does_not_wake_the_uplink(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db", OutboxConfig()) as ob:
        await ob.put(make_item(1, patient_id=None))  # type: ignore[arg-type]
        assert not ob._stored.is_set()


async def test_stats_has_every_v2_field(outbox: Outbox) -> None:
    stats = await outbox.stats()
    assert (stats.quarantined, stats.unattributed, stats.checksum_failures, stats.salvaged,
            stats.salvage_lost) == (0, 0, 0, 0, 0)  # fmt: skip


async def test_missing_file_is_a_first_start_not_a_recovery(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db", OutboxConfig()) as ob:
        assert ob.recovery is None


async def test_commit_delay_fault_injection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RPM_GATEWAY_FAULT_COMMIT_DELAY_MS", "120")
    ob = Outbox(tmp_path / "o.db", OutboxConfig())
    monkeypatch.delenv("RPM_GATEWAY_FAULT_COMMIT_DELAY_MS")  # read once, at construction
    async with ob:
        loop_time = asyncio.get_running_loop().time
        start = loop_time()
        await ob.put(make_item(1))
        assert loop_time() - start >= 0.12
        assert await ob.put(make_item(1)) is PutResult.DUPLICATE  # no commit, no delay needed


async def test_wal_limits_follow_the_free_space_floor(tmp_path: Path) -> None:
    # A new file has 2 KiB pages (schema v3): frames of 2048 + 24 bytes, the same byte bound.
    for floor_mb, pages in ((2.0, 506), (0.25, 63)):
        async with Outbox(tmp_path / f"o{floor_mb}.db", OutboxConfig(min_free_mb=floor_mb)) as ob:
            got = await ob._run(
                lambda c: (
                    c.execute("PRAGMA wal_autocheckpoint").fetchone()[0],
                    c.execute("PRAGMA journal_size_limit").fetchone()[0],
                    c.execute("PRAGMA page_size").fetchone()[0],
                )
            )
            assert got[2] == 2048
            assert got[0] == pages
            assert got[0] * (got[2] + 24) <= floor_mb * 1024 * 1024 / 2
            assert got[1] <= floor_mb * 1024 * 1024 / 2
