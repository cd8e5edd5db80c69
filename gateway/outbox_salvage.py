"""Copy every readable row of a damaged outbox file into the new outbox that replaces it.

SQLite is asked first, one range of seqs at a time (read-only, so the file kept for manual
recovery is not changed): its copy of a row is the row's current state. Where it cannot answer
(a damaged page under that range, or a header so damaged it refuses the whole file), and for
rows it does not return (a damaged interior page hides a subtree without an error; commits in a
damaged WAL that it skips), the raw page scanner of :mod:`gateway.outbox_pages` supplies them.
Every row keeps its seq and state: pending rows stay pending, delivered rows keep
``delivered_at`` (so a device re-sending one is still recognised as a duplicate), quarantined
and unattributed rows stay so. A row whose checksum does not match its payload is not copied:
it is counted as lost.

Known limit: a page the database freed still holds its old cells until it is reused, so a row
deleted earlier can come back, mostly a delivered row pruned after ``keep_delivered_days``: it
comes back delivered and is not published again. Only a pending row deleted by the size policy
could be published once more, with its own ``reading_id`` (the consumer de-duplicates); losing
a reading the scanner could read would be worse.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.outbox_pages import RawRow, ScanResult, Value, scan_files
from gateway.outbox_schema import COLUMNS, SEQ_HIGH  # SEQ_HIGH == 'seq_high'

_CHUNK = 256  # seqs per SQLite query: a damaged page costs SQLite's answer for this range only
_SQLITE_ORDER = -0.5  # newer than the database file's pages, older than any WAL frame
_CARRIED_COUNTERS = ("rejected_full", "dropped", "checksum_failures", "salvaged", "salvage_lost",
                     "unattributed_dropped")

Row = tuple[Value, ...]  # reading_id .. retry_at (14 columns)


@dataclass(frozen=True, slots=True)
class Salvage:
    """What a salvage copied: rows copied (of which pending) and rows found but unreadable."""

    salvaged: int
    pending: int
    lost: int


def salvage_into(conn: sqlite3.Connection, damaged: Path, *, wal_damaged: bool) -> Salvage:
    """Copy the readable rows of ``damaged`` (and its -wal) into the open outbox ``conn``."""
    wal = damaged.with_name(damaged.name + "-wal")
    had_wal = wal.exists()
    scanned = scan_files(damaged, wal if had_wal else None)
    try:
        # SQLite deletes the WAL of a zero-length file (even read-only): the scanner alone.
        by_sqlite, counters = (
            _read_with_sqlite(damaged, scanned.max_seq) if damaged.stat().st_size else ({}, {})
        )
    finally:
        # The read-only connection may have created an empty WAL and a wal-index: leave the
        # kept files as they were.
        damaged.with_name(damaged.name + "-shm").unlink(missing_ok=True)
        if not had_wal and wal.exists() and wal.stat().st_size == 0:
            wal.unlink()
    chosen: dict[int, Row] = {}
    lost = 0
    for seq in sorted({*scanned.rows, *scanned.undecodable, *by_sqlite}):
        candidates = _candidates(seq, scanned, by_sqlite, wal_damaged=wal_damaged)
        good = [(order, row) for order, row in candidates if _intact(row)]
        if good:
            # Delivery is one-way: a delivered copy is the newer truth whatever its source.
            chosen[seq] = max(good, key=lambda c: (c[1][9] is not None, c[0]))[1]
        elif candidates or seq in scanned.undecodable:
            lost += 1
    # A reading is stored again under a higher seq only as its newer state (assigned to a
    # patient, claimed by a corrected binding, or re-sent after its old row was pruned): an
    # older copy of its row the scanner found on a freed page must not win over it.
    newest: dict[Value, int] = {}
    for seq, row in chosen.items():
        newest[row[0]] = max(seq, newest.get(row[0], seq))
    chosen = {seq: row for seq, row in chosen.items() if newest[row[0]] == seq}
    high = max([scanned.max_seq, *chosen], default=0)
    conn.execute("BEGIN IMMEDIATE")
    try:
        salvaged = pending = 0
        for seq, row in chosen.items():
            cur = conn.execute(
                "INSERT OR IGNORE INTO readings (seq, reading_id, topic, payload, patient_id,"
                " kind, measured_at, measured_day, valid, created_at, delivered_at, checksum,"
                " quarantined_at, quarantine_reason, retry_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, *row),
            )
            if cur.rowcount == 1:
                salvaged += 1
                pending += row[9] is None and row[3] is not None
        for name, value in counters.items():
            conn.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (name, value),
            )
        # A seq seen in the old file is never handed out again, even for a row that was lost.
        conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = MAX(value, excluded.value)",
            (SEQ_HIGH, high),
        )
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return Salvage(salvaged=salvaged, pending=pending, lost=lost)


def _candidates(
    seq: int, scanned: ScanResult, by_sqlite: dict[int, Row], *, wal_damaged: bool
) -> list[tuple[float, Row]]:
    # SQLite's copy is the current state of the row, unless the WAL is damaged: then frames
    # it skipped may be newer. The scanner's copies always count too: a damaged interior page
    # can make SQLite answer a range without error yet without every row in it.
    out: list[tuple[float, Row]] = []
    if seq in by_sqlite:
        out.append((_SQLITE_ORDER if wal_damaged else float("inf"), by_sqlite[seq]))
    out += [(r.order, _normal(r)) for r in scanned.rows.get(seq, [])]
    return out


def _normal(r: RawRow) -> Row:
    return _pad(r.values)


def _pad(values: Sequence[Value]) -> Row:
    # A v1 row has no checksum, quarantine or retry columns: all NULL.
    return (*values, *([None] * (len(COLUMNS) - 1 - len(values))))


_TEXT, _OPT = (str,), (str, type(None))
_ROW_TYPES = (_TEXT, _TEXT, (bytes,), _OPT, _TEXT, _TEXT, _TEXT, (int,), _TEXT,
              _OPT, _OPT, _OPT, _OPT, _OPT)  # fmt: skip


def _intact(row: Row) -> bool:
    if len(row) != len(_ROW_TYPES) or not all(
        isinstance(v, types) for v, types in zip(row, _ROW_TYPES, strict=True)
    ):
        return False
    if row[7] not in (0, 1) or not row[0] or not row[1]:
        return False
    checksum, payload = row[10], row[2]
    assert isinstance(payload, bytes)
    return checksum is None or hashlib.sha256(payload).hexdigest() == checksum


def _read_with_sqlite(path: Path, max_seq: int) -> tuple[dict[int, Row], dict[str, int]]:
    """The rows SQLite can still read (range by range), and the old file's counters."""
    rows: dict[int, Row] = {}
    counters: dict[str, int] = {}
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=1)
    except sqlite3.Error:
        return rows, counters
    try:
        with contextlib.suppress(sqlite3.Error):
            for name, value in conn.execute("SELECT name, value FROM counters"):
                if name in _CARRIED_COUNTERS and isinstance(value, int) and value > 0:
                    counters[name] = value
        # The high-water mark: v3 keeps it in counters, v1 and v2 in sqlite_sequence.
        for probe in ("SELECT MAX(seq) FROM readings", "SELECT seq FROM sqlite_sequence"
                      " WHERE name = 'readings'",
                      "SELECT value FROM counters WHERE name = 'seq_high'"):  # fmt: skip
            with contextlib.suppress(sqlite3.Error, TypeError, ValueError):
                max_seq = max(max_seq, int(conn.execute(probe).fetchone()[0]))
        for chunk in range(max_seq // _CHUNK + 1):
            try:
                found = conn.execute(
                    "SELECT * FROM readings WHERE seq >= ? AND seq < ? ORDER BY seq",
                    (chunk * _CHUNK, (chunk + 1) * _CHUNK),
                ).fetchall()
            except sqlite3.Error:
                continue  # a damaged page under this range: the scanner's copies stand
            for r in found:
                if len(r) in (11, len(COLUMNS)) and isinstance(r[0], int):
                    rows[r[0]] = _pad(tuple(r[1:]))
    finally:
        conn.close()
    return rows, counters
