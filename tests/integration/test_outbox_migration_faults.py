"""The v2 -> v3 migration under real faults: a full disk (a real small tmpfs), and SIGKILL.

The migration rebuilds the readings table in one transaction (gateway/outbox_schema.py, 2), so
it needs about the file's size again in the WAL. On a disk with less room it must fail with the
outbox's full-disk error (the agent exits 73, systemd retries) leaving the v2 file as it was,
and succeed once there is room. Killed at any moment, the file is either still v2 or fully v3,
never anything in between, and never loses a row or reuses a seq.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.config import OutboxConfig
from gateway.outbox import Outbox, OutboxFullError, PutResult
from tests.conftest import make_item
from tests.integration.test_outbox_storage import _fill, _tmpfs
from tests.unit.test_outbox_v3 import _V2_INSERT, _v2_file

REPO = Path(__file__).resolve().parents[2]
_STAMP = "2026-03-01T12:00:00.000000+00:00"


def _big_v2_file(path: Path, rows: int, payload_extra: int) -> list[tuple[object, ...]]:
    """test_outbox_v3's v2 file (every kind of row, deleted top seqs) with ``rows`` more."""
    _v2_file(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        for k in range(100, 100 + rows):
            item = make_item(k, extra=b" " * payload_extra)
            conn.execute(_V2_INSERT, (item.reading_id, item.topic, item.payload, item.patient_id,
                                      item.kind, item.measured_at, item.measured_day, 1, _STAMP,
                                      _STAMP if k % 3 == 0 else None, None, None, None, None))  # fmt: skip
        conn.execute("COMMIT")
        conn.execute("DELETE FROM readings WHERE seq = (SELECT MAX(seq) FROM readings)")
    finally:
        conn.close()  # the last connection: the WAL is checkpointed and removed
    return _rows(path)


def _read(path: Path) -> tuple[str, int, list[tuple[object, ...]], int]:
    """integrity_check, user_version, every row in seq order, the highest seq ever handed out.

    Read-only, so nothing is checkpointed or changed before the outbox opens the file.
    """
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        check = " ".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check"))
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        rows = conn.execute("SELECT * FROM readings ORDER BY seq").fetchall()
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        marks = [0]
        if "sqlite_sequence" in tables:
            marks += [int(r[0]) for r in conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'readings'")]  # fmt: skip
        marks += [int(r[0]) for r in conn.execute(
            "SELECT value FROM counters WHERE name = 'seq_high'")]  # fmt: skip
        return check, version, rows, max(marks)
    finally:
        conn.close()


def _rows(path: Path) -> list[tuple[object, ...]]:
    return _read(path)[2]


async def _put_above(path: Path, old: list[tuple[object, ...]], high: int) -> int:
    async with Outbox(path, OutboxConfig()) as ob:
        assert ob.recovery is None
        assert await ob.put(make_item(999_999)) is PutResult.STORED
        [*_, new] = await ob.pending(1_000_000)
        assert new.reading_id == make_item(999_999).reading_id
    assert new.seq > max(int(str(r[0])) for r in old)
    assert new.seq > high  # above the deleted top seqs too: none is reused
    return new.seq


async def test_migration_on_a_full_disk_fails_cleanly_and_succeeds_with_room(
    tmp_path: Path,
) -> None:
    template = tmp_path / "v2.db"
    before = _big_v2_file(template, rows=1000, payload_extra=1000)
    size = template.stat().st_size
    _, version, _, high = _read(template)
    assert version == 2 and size > 1024 * 1024
    disk = tmp_path / "disk"
    with _tmpfs(disk, "8m"):
        db = disk / "outbox.db"
        shutil.copyfile(template, db)
        filler = _fill(disk, size // 4)  # room for the WAL's first frames, not for a table copy
        assert shutil.disk_usage(disk).free < size
        with pytest.raises(OutboxFullError) as failure:
            async with Outbox(db, OutboxConfig()):
                pass
        # The full-disk error itself, not a failed ROLLBACK's "no transaction is active".
        assert "full" in str(failure.value), str(failure.value)
        check, version, rows, _ = _read(db)
        assert (check, version) == ("ok", 2)
        assert rows == before
        assert not any(".corrupt-" in p.name for p in disk.iterdir())  # not taken for damage
        filler.unlink()
        async with Outbox(db, OutboxConfig()) as ob:
            assert ob.recovery is None
        check, version, rows, _ = _read(db)
        assert (check, version) == ("ok", 3)
        assert rows == before  # every column of every row, seqs included
        await _put_above(db, before, high)


# Opens the outbox (migrating the v2 file) after saying it is about to: the parent's random
# delay is measured from that line, so it falls within the migration, not Python's start-up.
CHILD = """
import asyncio, sys
from pathlib import Path
from gateway.config import OutboxConfig
from gateway.outbox import Outbox

async def main() -> None:
    print("opening", flush=True)
    async with Outbox(Path(sys.argv[1]), OutboxConfig()):
        print("migrated", flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


def _migrate_and_kill(db: Path, delay_s: float) -> bool:
    """Open ``db`` in a child and SIGKILL it ``delay_s`` after it starts; whether it finished."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=REPO, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"opening"
        time.sleep(delay_s)
    finally:
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err.decode(errors="replace")[-2000:]
    return b"migrated" in out


async def test_migration_killed_at_random_moments_keeps_v2_or_v3_whole(tmp_path: Path) -> None:
    template = tmp_path / "v2.db"
    before = _big_v2_file(template, rows=50_000, payload_extra=200)  # ~25 MB
    _, _, _, high = _read(template)
    # How long the open and migration take here: the kills are spread over that span.
    timing = tmp_path / "timing.db"
    shutil.copyfile(template, timing)
    began = time.monotonic()
    async with Outbox(timing, OutboxConfig()):
        took = time.monotonic() - began
    rng = random.Random(20260302)
    seen = set()
    for trial in range(5):
        db = tmp_path / f"trial-{trial}.db"
        shutil.copyfile(template, db)
        finished = _migrate_and_kill(db, rng.uniform(0.0, took * 1.2))
        check, version, rows, _ = _read(db)
        assert check == "ok", f"trial {trial}: {check}"
        assert version in (2, 3), f"trial {trial}: version {version}"
        if finished:
            assert version == 3
        assert rows == before, f"trial {trial} (version {version}): rows changed"
        seen.add(version)
        await _put_above(db, before, high)
        check, version, rows, _ = _read(db)
        assert (check, version) == ("ok", 3)
        # (pending() has quarantined the v2 file's bad-checksum row meanwhile: seqs compared)
        assert [r[0] for r in rows[:-1]] == [r[0] for r in before]
        db.unlink()
    print(f"migration took {took:.2f} s here; versions found after the kills: {sorted(seen)}")
