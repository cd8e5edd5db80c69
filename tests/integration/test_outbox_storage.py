"""The outbox's storage gate and error classes on real files, processes and a real small filesystem."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import gateway.outbox
from gateway.config import OutboxConfig
from gateway.outbox import Outbox, OutboxFullError, PutResult, StorageError
from tests.conftest import make_item

MIB = 1024 * 1024

# Holds the database's write lock (exclusive locking mode: readers are refused too) until stdin
# closes, as another process (a backup tool, a sqlite3 shell left open) could.
LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA locking_mode = EXCLUSIVE")
conn.execute("BEGIN EXCLUSIVE")
conn.execute("INSERT INTO counters (name, value) VALUES ('locker', 1)")
print("locked", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
conn.close()
"""


async def test_locked_healthy_outbox_is_not_taken_for_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "o.db"
    async with Outbox(path, OutboxConfig()) as ob:
        for n in range(3):
            await ob.put(make_item(n))
    monkeypatch.setattr(gateway.outbox, "_BUSY_TIMEOUT_MS", 300)  # fail fast, same error
    locker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LOCKER, str(path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert locker.stdout is not None
        assert (await asyncio.wait_for(locker.stdout.readline(), 10)).strip() == b"locked"
        with pytest.raises(StorageError, match="locked"):
            async with Outbox(path, OutboxConfig()):
                pass
        assert _moved_aside(tmp_path) == []
        assert path.exists()
    finally:
        await asyncio.wait_for(locker.communicate(b""), 10)
    assert locker.returncode == 0
    async with Outbox(path, OutboxConfig()) as ob:
        assert ob.recovery is None
        assert [p.reading_id for p in await ob.pending(10)] == ["r-000000", "r-000001",
                                                                "r-000002"]  # fmt: skip


def _moved_aside(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if ".corrupt-" in p.name]


@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[None]:
    """A real small filesystem (tmpfs, needs root); skips the test if it cannot be mounted."""
    where.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs at {where} (needs root): {r.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(directory: Path, leave: int) -> Path:
    """Fill the filesystem until ``leave`` bytes are free."""
    st = os.statvfs(directory)
    filler = directory / f"filler-{len(list(directory.iterdir()))}"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


async def test_gate_shuts_on_a_full_disk_and_reopens_by_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.outbox, "_PROBE_INTERVAL_S", 0.0)
    disk = tmp_path / "disk"
    with _tmpfs(disk, "6m"):
        db = disk / "outbox.db"
        async with Outbox(db, OutboxConfig(min_free_mb=1.0)) as ob:
            for n in range(20):
                assert await ob.put(make_item(n, extra=b" " * 1000)) is PutResult.STORED
            assert await ob.accepting() is None
            # Below the floor: no device is read (readings would still fit, but SQLite's WAL
            # needs its room).
            low = _fill(disk, int(0.6 * MIB))
            reason = await ob.accepting()
            assert reason is not None and reason.startswith("disk nearly full: ")
            assert f"MiB free at {disk}, 1.0 MiB needed" in reason
            # Space fills completely: the put fails cleanly, nothing half-written.
            full = _fill(disk, 0)
            stored = 20
            with pytest.raises(OutboxFullError):
                for n in range(20, 2000):
                    await ob.put(make_item(n, extra=b" " * 1000))
                    stored += 1
            assert (await ob.accepting() or "").startswith("disk nearly full")
            # Space comes back: the gate reopens by itself and the database is usable.
            full.unlink()
            low.unlink()
            assert await ob.accepting() is None
            assert await ob.put(make_item(5000)) is PutResult.STORED
            assert len(await ob.pending(10_000)) == stored + 1
        async with Outbox(db, OutboxConfig(min_free_mb=1.0)) as ob:
            assert ob.recovery is None
            assert len(await ob.pending(10_000)) == stored + 1
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            conn.close()


async def test_gate_reports_a_failing_store_until_a_write_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.outbox, "_PROBE_INTERVAL_S", 0.0)

    def broken_disk(self: Outbox, conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    async with Outbox(tmp_path / "o.db", OutboxConfig()) as ob:
        # SQLite's own size cap: SQLITE_FULL with plenty of free space on the disk.
        await ob._run(lambda c: c.execute("PRAGMA max_page_count = 40"))
        with pytest.raises(OutboxFullError):
            for n in range(1000):
                await ob.put(make_item(n, extra=b" " * 4000))
        with monkeypatch.context() as m:
            m.setattr(Outbox, "_probe_sync", broken_disk)
            assert await ob.accepting() == "storage failing: disk I/O error"
            assert await ob.accepting() == "storage failing: disk I/O error"  # probed again
        # The probe (a tiny real write) succeeds again: the gate reopens by itself.
        assert await ob.accepting() is None
        # And a failed put shuts it again until a later write succeeds.
        with pytest.raises(OutboxFullError):
            await ob.put(make_item(2000, extra=b" " * 40_000))
        await ob._run(lambda c: c.execute("PRAGMA max_page_count = 1000000"))
        assert await ob.put(make_item(2001)) is PutResult.STORED
        assert ob._failing is None


async def test_gate_reports_the_reject_new_bound(tmp_path: Path) -> None:
    cfg = OutboxConfig.model_construct(
        **{**OutboxConfig().model_dump(), "max_pending": 3, "when_full": "reject_new"}
    )
    async with Outbox(tmp_path / "o.db", cfg) as ob:
        for n in range(3):
            await ob.put(make_item(n))
        assert await ob.accepting() == (
            "outbox full: 3 readings pending (max_pending, when_full = reject_new)"
        )
    async with Outbox(tmp_path / "o.db", cfg) as ob:  # the count is known from the start
        assert await ob.accepting() is not None
        await ob.mark_delivered([(await ob.pending(1))[0].seq])
        assert await ob.accepting() is None
    drop = OutboxConfig.model_construct(**{**cfg.model_dump(), "when_full": "drop_oldest"})
    async with Outbox(tmp_path / "o.db", drop) as ob:
        await ob.put(make_item(10))
        assert await ob.accepting() is None  # drop_oldest always takes new readings


async def test_accepting_is_cheap(outbox: Outbox) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(1000):
        assert await outbox.accepting() is None
    assert loop.time() - start < 1.0  # a statvfs and a cached count, no SQLite round trip


async def test_wal_stays_near_one_mib_in_normal_use(tmp_path: Path) -> None:
    # The fault test found the WAL wanted ~4 MiB (wal_autocheckpoint's default 1000 pages).
    db = tmp_path / "o.db"
    wal = tmp_path / "o.db-wal"
    largest = 0
    async with Outbox(db, OutboxConfig()) as ob:
        for n in range(1500):
            await ob.put(make_item(n, extra=b" " * 1000))
            if n % 10 == 0:
                await ob.mark_delivered([p.seq for p in await ob.pending(10)])
            largest = max(largest, wal.stat().st_size)
    assert largest <= 1.1 * MIB, f"the WAL grew to {largest / MIB:.2f} MiB"
