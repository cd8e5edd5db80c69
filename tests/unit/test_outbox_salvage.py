"""Salvage of a damaged outbox on real files, and the raw page scanner under hypothesis."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gateway.outbox
from gateway.config import OutboxConfig
from gateway.outbox import Outbox, PutResult
from gateway.outbox_pages import SQLITE_MAGIC, scan, wal_damage_of
from gateway.outbox_salvage import _intact, _normal
from gateway.outbox_schema import MIGRATIONS
from tests.conftest import make_item

EXTRA = b"x" * 500
ROWS = 300
WAL_ROWS = 40  # few enough that no checkpoint copied them into the file: they are WAL-only
DELIVERED = 3


def _item_payload(rid: str) -> bytes:
    return make_item(int(rid[2:]), extra=EXTRA).payload


async def _build(where: Path, rows: int, *, crash: bool) -> Path:
    """An outbox with ``rows`` readings, the first few delivered; ``crash``: copied while open
    (the file as a kill -9 leaves it: commits still in the WAL), else after a clean close."""
    live = where / "live" / "o.db"
    target = where / "o.db"
    async with Outbox(live, OutboxConfig()) as ob:
        for n in range(rows):
            assert await ob.put(make_item(n, extra=EXTRA)) is PutResult.STORED
        await ob.mark_delivered([p.seq for p in await ob.pending(DELIVERED)])
        if crash:
            shutil.copy(live, target)
            shutil.copy(live.with_name("o.db-wal"), where / "o.db-wal")
    if not crash:
        shutil.copy(live, target)
    return target


# A cell (one row, ~650 bytes here) that starts up to this far before the damage reaches into it;
# one whose record header (~30 bytes before the reading_id) is hit cannot be read either.
CELL, RECORD_HEADER = 700, 40


def _smash(path: Path, start: int, length: int, seed: int) -> bytes:
    """Overwrite bytes with garbage; returns the original bytes of every cell it may touch."""
    data = bytearray(path.read_bytes())
    touched = bytes(data[max(0, start - CELL) : start + length + RECORD_HEADER])
    data[start : start + length] = random.Random(seed).randbytes(len(data[start : start + length]))
    path.write_bytes(bytes(data))
    return touched


def _ids_in(blob: bytes) -> set[str]:
    return {f"r-{n:06d}" for n in range(ROWS) if f"r-{n:06d}".encode() in blob}


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


# (name, WAL-only commits?, damage) -> the bytes destroyed (ids found there may be lost).
def _damage(kind: str, db: Path) -> bytes:
    wal = db.with_name("o.db-wal")
    if kind == "garbage-header":
        return _smash(db, 0, 100, seed=1)
    if kind.startswith("garbage-4k-mid-file"):
        at = {"": 0.5, "-a": 0.2, "-b": 0.77}[kind.removeprefix("garbage-4k-mid-file")]
        return _smash(db, int(db.stat().st_size * at) + 1000, 4096, seed=2)
    if kind == "truncated":
        data = db.read_bytes()
        cut = len(data) * 6 // 10 + 123
        db.write_bytes(data[:cut])
        return data[cut - CELL :]
    if kind == "garbage-wal-mid":
        return _smash(wal, 32 + 9 * (4096 + 24) + 500, 4096, seed=3)
    if kind == "garbage-wal-header":
        return _smash(wal, 0, 32, seed=4)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "garbage-header",
        "garbage-4k-mid-file",
        "garbage-4k-mid-file-a",
        "garbage-4k-mid-file-b",
        "truncated",
        "garbage-wal-mid",
        "garbage-wal-header",
    ],
)
async def test_every_row_outside_the_damage_comes_back(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    in_wal = kind.startswith("garbage-wal")
    rows = WAL_ROWS if in_wal else ROWS
    db = await _build(tmp_path, rows, crash=in_wal)
    destroyed = _ids_in(_damage(kind, db))
    damaged = _snapshot(tmp_path)
    with caplog.at_level(logging.ERROR, logger="gateway.outbox"):
        async with Outbox(db, OutboxConfig()) as ob:
            report = ob.recovery
            pending = await ob.pending(10_000)
            stats = await ob.stats()
            # Delivered rows keep their delivery: the device re-sending one is a duplicate.
            assert await ob.put(make_item(0, extra=EXTRA)) is PutResult.DUPLICATE
    assert report is not None and report.kind == "corrupt", kind
    expected = {f"r-{n:06d}" for n in range(DELIVERED, rows)} - destroyed
    got = {p.reading_id: p.payload for p in pending}
    assert expected <= set(got), f"{len(expected - set(got))} rows outside the damage lost"
    assert all(payload == _item_payload(rid) for rid, payload in got.items())
    assert stats.delivered == DELIVERED
    assert report.salvaged == len(got) + DELIVERED == stats.salvaged
    assert stats.salvage_lost == report.lost
    assert [p.seq for p in pending] == sorted(p.seq for p in pending)
    # The damaged file is kept for manual recovery exactly as it was found.
    assert report.moved_to is not None
    assert report.moved_to.read_bytes() == damaged["o.db"]
    if in_wal:
        assert report.moved_to.with_name(report.moved_to.name + "-wal").read_bytes() == (
            damaged["o.db-wal"]
        )
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert f"{report.salvaged} reading(s) salvaged" in line and "x" * 20 not in line


async def test_salvaged_outbox_takes_new_readings_after_the_old_seqs(tmp_path: Path) -> None:
    db = await _build(tmp_path, 50, crash=False)
    _damage("garbage-header", db)
    async with Outbox(db, OutboxConfig()) as ob:
        assert await ob.put(make_item(500, extra=EXTRA)) is PutResult.STORED
        seqs = [p.seq for p in await ob.pending(100)]
    assert seqs[-1] > 50 and seqs == sorted(seqs)
    async with Outbox(db, OutboxConfig()) as ob:  # the salvaged file is a healthy file now
        assert ob.recovery is None
        assert len(await ob.pending(100)) == 50 - DELIVERED + 1


async def test_a_row_failing_its_checksum_is_lost_not_salvaged(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with Outbox(path, OutboxConfig()) as ob:
        for n in range(20):
            await ob.put(make_item(n, extra=b' {"systolic": 129}' if n == 5 else EXTRA))
    data = path.read_bytes().replace(b'"systolic": 129', b'"systolic": 929')
    path.write_bytes(b"\0" * 100 + data[100:])  # and a header SQLite refuses
    async with Outbox(path, OutboxConfig()) as ob:
        assert ob.recovery is not None
        assert (ob.recovery.salvaged, ob.recovery.lost) == (19, 1)
        assert "r-000005" not in {p.reading_id for p in await ob.pending(100)}


async def test_zero_length_file_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"")
    with caplog.at_level(logging.ERROR, logger="gateway.outbox"):
        async with Outbox(path, OutboxConfig()) as ob:
            assert ob.recovery is not None and ob.recovery.kind == "empty_file"
            assert ob.recovery.moved_to is None
            assert await ob.put(make_item(1)) is PutResult.STORED  # it starts normally
    assert any("was empty" in r.getMessage() for r in caplog.records)
    async with Outbox(path, OutboxConfig()) as ob:
        assert ob.recovery is None


async def test_zero_length_file_with_a_wal_is_salvaged_from_the_wal(tmp_path: Path) -> None:
    # SQLite itself would delete that WAL on open (it takes a zero-length file for one that
    # crashed before writing anything) and start empty: every commit in the WAL would be gone.
    db = await _build(tmp_path, 10, crash=True)
    db.write_bytes(b"")
    wal = _snapshot(tmp_path)["o.db-wal"]
    async with Outbox(db, OutboxConfig()) as ob:
        assert ob.recovery is not None and ob.recovery.kind == "corrupt"
        assert "empty" in ob.recovery.detail
        assert len(await ob.pending(100)) == 10 - DELIVERED
        moved = ob.recovery.moved_to
    assert moved is not None
    assert moved.with_name(moved.name + "-wal").read_bytes() == wal  # kept, not deleted


# --- the scanner on arbitrary bytes ---------------------------------------------------------

@functools.cache
def _clean_db() -> bytes:
    """A small real v2 file (30 rows with checksums), built once for every example."""
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(Path(tmp) / "clean.db")
        for v in (0, 1):
            for statement in MIGRATIONS[v].split(";"):
                if statement.strip():
                    conn.execute(statement)
        for n in range(30):
            item = make_item(n, extra=os.urandom(8).hex().encode())
            conn.execute(
                "INSERT INTO readings (reading_id, topic, payload, patient_id, kind, measured_at,"
                " measured_day, valid, created_at, checksum) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (item.reading_id, item.topic, item.payload, item.patient_id, item.kind,
                 item.measured_at, item.measured_day, 1, "t",
                 hashlib.sha256(item.payload).hexdigest()),
            )  # fmt: skip
        conn.commit()
        conn.close()
        return (Path(tmp) / "clean.db").read_bytes()


@settings(max_examples=300, deadline=2000)
@given(st.binary(max_size=20_000), st.binary(max_size=20_000))
def test_scanner_on_garbage_finds_nothing_or_rows_and_never_raises(db: bytes, wal: bytes) -> None:
    result = scan(db, wal)
    assert result.max_seq >= 0
    assert wal_damage_of(wal) is None or isinstance(wal_damage_of(wal), str)


@settings(max_examples=300, deadline=2000)
@given(
    page_size=st.sampled_from([512, 1024, 4096]),
    body=st.binary(min_size=8, max_size=4096),
    cells=st.integers(0, 0xFFFF),
)
def test_scanner_on_garbage_leaf_pages(page_size: int, body: bytes, cells: int) -> None:
    # A valid header and pages that claim to be table leaves with arbitrary cells: the parsers
    # of cells, records and overflow chains all run on garbage.
    header = bytearray(100)
    header[:16] = SQLITE_MAGIC
    header[16:18] = page_size.to_bytes(2, "big") if page_size < 65536 else b"\0\1"
    page = bytearray(body.ljust(page_size, b"\0")[:page_size])
    page[0] = 0x0D
    page[3:5] = cells.to_bytes(2, "big")
    first = bytearray(page)
    first[:100] = header
    first[100] = 0x0D
    scan(bytes(first) + bytes(page) * 3)


@settings(max_examples=200, deadline=2000)
@given(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=40))
def test_scanner_never_fabricates_a_row_that_passes_its_checksum(
    flips: list[tuple[int, int]],
) -> None:
    clean = _clean_db()
    original = {seq: rows[0] for seq, rows in scan(clean).rows.items()}
    assert len(original) == 30
    data = bytearray(clean)
    for at, value in flips:
        data[at % len(data)] = value
    for seq, versions in scan(bytes(data)).rows.items():
        for row in versions:
            if _intact(_normal(row)) and seq in original:
                # A row that passes its checksum is the row that was stored (the payload's
                # checksum vouches for the payload; the other columns are only typed).
                assert row.values[2] == original[seq].values[2]


async def test_a_healthy_wal_after_a_crash_is_not_taken_for_damage(tmp_path: Path) -> None:
    # 600 readings reset the WAL several times (checkpoints), so behind the current frames lie
    # frames of older generations; a torn frame at the end is what a crash mid-write leaves.
    db = await _build(tmp_path, 600, crash=True)
    wal = db.with_name("o.db-wal")
    with wal.open("ab") as f:
        f.write(os.urandom(4096 + 24 + 100))
    async with Outbox(db, OutboxConfig()) as ob:
        assert ob.recovery is None
        assert len(await ob.pending(10_000)) == 600 - DELIVERED


class _PowerCut(BaseException):
    """The process stops here (nothing after it runs, no cleanup)."""


async def test_a_recovery_cut_before_moving_the_file_is_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = await _build(tmp_path, 50, crash=False)
    _damage("garbage-header", db)

    def cut(self: Outbox) -> Path:
        raise _PowerCut

    with monkeypatch.context() as m:
        m.setattr(Outbox, "_move_aside", cut)
        with pytest.raises(_PowerCut):
            await Outbox(db, OutboxConfig()).open()
    assert db.exists() and db.with_name("o.db.salvage").exists()
    async with Outbox(db, OutboxConfig()) as ob:
        assert ob.recovery is not None and ob.recovery.salvaged == 50
        assert len(await ob.pending(100)) == 50 - DELIVERED
    assert not db.with_name("o.db.salvage").exists()
    assert len([p for p in _snapshot(tmp_path) if ".corrupt-" in p]) == 1


async def test_a_recovery_cut_after_moving_the_file_is_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = await _build(tmp_path, 50, crash=False)
    _damage("garbage-header", db)
    real_replace = os.replace

    def cut(src: Path, dst: Path) -> None:
        if str(src).endswith(".salvage"):
            raise _PowerCut
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(gateway.outbox.os, "replace", cut)
        with pytest.raises(_PowerCut):
            await Outbox(db, OutboxConfig()).open()
    assert not db.exists() and db.with_name("o.db.salvage").exists()
    async with Outbox(db, OutboxConfig()) as ob:
        assert ob.recovery is not None and ob.recovery.kind == "corrupt"
        assert len(await ob.pending(100)) == 50 - DELIVERED
        assert (await ob.stats()).salvaged == 50
