"""SQLite store-and-forward outbox: the source of truth for every reading until the broker's PUBACK.

A reading is committed (WAL, ``synchronous=FULL``: it survives a power cut, not only a killed
process) before anything else is done with it, and leaves the pending set only through
:meth:`Outbox.mark_delivered`, which the uplink calls after the PUBACK. Delivered rows are kept
for ``keep_delivered_days`` so a device that re-sends an old measurement is recognised as a
duplicate and so days-with-data can be counted.

All SQLite work runs on one dedicated worker thread with one connection: the event loop never
waits on the disk, and the single thread serialises writers, so ``seq`` order is commit order.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from gateway.config import OutboxConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1

# Each entry upgrades the schema from version <key> to <key> + 1, inside one transaction.
_MIGRATIONS: dict[int, str] = {
    0: """
    CREATE TABLE readings (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: seq is never reused
        reading_id   TEXT    NOT NULL UNIQUE,
        topic        TEXT    NOT NULL,
        payload      BLOB    NOT NULL,
        patient_id   TEXT    NOT NULL,
        kind         TEXT    NOT NULL,
        measured_at  TEXT    NOT NULL,
        measured_day TEXT    NOT NULL,
        valid        INTEGER NOT NULL CHECK (valid IN (0, 1)),
        created_at   TEXT    NOT NULL,
        delivered_at TEXT
    );
    -- Partial indexes: the pending set stays small and fast however much history is kept.
    CREATE INDEX readings_pending ON readings (seq) WHERE delivered_at IS NULL;
    CREATE INDEX readings_delivered ON readings (delivered_at) WHERE delivered_at IS NOT NULL;
    CREATE INDEX readings_days ON readings (patient_id, measured_day) WHERE valid = 1;
    -- Drops and rejections are persisted: a reboot must not hide that readings were lost.
    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    """,
}

# A WAL that grew during a backlog is truncated back to this after checkpoints (SD card space).
_JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024
_BUSY_TIMEOUT_MS = 5_000
_TOPIC_FORBIDDEN = frozenset("+#\x00")


class OutboxError(Exception):
    """Base class of the outbox's errors."""


class StorageError(OutboxError):
    """SQLite failed to read or write the outbox; the operation did not happen."""


class OutboxFullError(StorageError):
    """The disk (or the database's size limit) is full: the reading was NOT stored."""


class SchemaVersionError(OutboxError):
    """The database was written by a newer gateway version; it is left untouched."""


class OutboxClosedError(OutboxError):
    """The outbox is not open."""


class PutResult(enum.Enum):
    """What :meth:`Outbox.put` did with a reading."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # already present (pending or delivered): not stored or sent again
    REJECTED_FULL = "rejected_full"  # the size policy refused it; the device must keep it


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One reading handed to the outbox."""

    reading_id: str
    topic: str  # the topic suffix below <prefix>/<hub_id>/, e.g. "readings"
    payload: bytes
    patient_id: str
    kind: str
    measured_at: str  # UTC ISO-8601
    measured_day: str  # patient-local YYYY-MM-DD
    valid: bool


@dataclass(frozen=True, slots=True)
class Pending:
    """A stored reading not yet acknowledged by the broker."""

    seq: int
    reading_id: str
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A snapshot of the outbox for status reports."""

    pending: int
    oldest_pending: str | None  # created_at (UTC ISO) of the oldest undelivered reading
    delivered: int
    db_bytes: int
    rejected_full: int  # new readings refused by the reject_new policy, ever
    dropped: int  # undelivered readings deleted (drop_oldest, or older than the age limit), ever


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    # One fixed format everywhere, so timestamps compare correctly as text in SQL.
    return t.astimezone(UTC).isoformat(timespec="microseconds")


def _translate(e: sqlite3.Error) -> StorageError:
    code = getattr(e, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL:
        return OutboxFullError(f"outbox storage is full: {e}")
    return StorageError(f"outbox storage failed: {e}")


class Outbox:
    """SQLite store-and-forward queue of readings; use as ``async with Outbox(path, cfg) as ob``."""

    def __init__(
        self, path: Path, cfg: OutboxConfig, *, clock: Callable[[], datetime] = _utc_now
    ) -> None:
        self._path = path
        self._cfg = cfg
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stored = asyncio.Event()

    @property
    def path(self) -> Path:
        """Where the database file lives."""
        return self._path

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Open (or create) the database, checking its integrity and schema version."""
        if self._executor is not None:
            raise OutboxError("outbox is already open")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        try:
            self._conn = await self._run_raw(self._open_sync)
        except BaseException:
            self._executor.shutdown(wait=True)
            self._executor = None
            raise

    async def close(self) -> None:
        """Close the database; waits for the operation in progress to finish."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=True)

    async def put(self, item: OutboxItem) -> PutResult:
        """Store a reading durably; returns only after the COMMIT has reached the disk."""
        if not item.reading_id or not item.topic or _TOPIC_FORBIDDEN & set(item.topic):
            raise ValueError("reading_id and a topic suffix without MQTT wildcards are required")
        result = await self._run(self._put_sync, item)
        if result is PutResult.STORED:
            self._stored.set()
        return result

    async def pending(self, limit: int, after_seq: int = 0) -> list[Pending]:
        """Up to ``limit`` undelivered readings with seq > ``after_seq``, in seq order."""
        return await self._run(self._pending_sync, limit, after_seq)

    async def mark_delivered(self, seqs: Sequence[int]) -> None:
        """Record the broker's PUBACK for these rows; unknown or already delivered seqs are ignored."""
        if seqs:
            await self._run(self._mark_delivered_sync, list(seqs))

    async def wait_for_pending(self) -> None:
        """Return once put() has stored something since the previous wake-up of this waiter."""
        # Cleared on wake-up, before the caller re-queries: a put that commits while the caller
        # is querying sets the event again, so the next wait returns at once and nothing is missed.
        await self._stored.wait()
        self._stored.clear()

    async def stats(self) -> OutboxStats:
        """Counts for status reports."""
        return await self._run(self._stats_sync)

    async def days_with_data(self, patient_id: str, since_day: str, until_day: str) -> list[str]:
        """Distinct patient-local days (inclusive range) with at least one valid reading."""
        return await self._run(self._days_sync, patient_id, since_day, until_day)

    async def prune(self) -> None:
        """Delete old delivered rows and apply the pending size/age policy (logged at WARNING)."""
        await self._run(self._prune_sync)

    # --- worker-thread side -------------------------------------------------------------------

    async def _run_raw(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise OutboxClosedError("outbox is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        # If the caller is cancelled, the operation may or may not have run (it completes once
        # started): a cancelled put retried later returns STORED or DUPLICATE, both safe.
        # The connection is bound now: work queued before close() still runs before it.
        conn = self._conn
        if conn is None:
            raise OutboxClosedError("outbox is not open")
        return await self._run_raw(functools.partial(self._guarded, conn, fn, *args))

    @staticmethod
    def _guarded(conn: sqlite3.Connection, fn: Callable[..., T], *args: object) -> T:
        try:
            return fn(conn, *args)
        except BaseException as e:
            if conn.in_transaction:
                # SQLITE_FULL/IOERR may already have rolled back; a second rollback is harmless.
                with contextlib.suppress(sqlite3.Error):
                    conn.rollback()
            if isinstance(e, sqlite3.Error):
                raise _translate(e) from e
            raise

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves, so every write
        # transaction takes the write lock up front and its boundaries are explicit.
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        return conn

    def _open_sync(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = None
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._checked_connection()
            version = self._schema_version(conn)  # before WAL: a newer file is left untouched
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(f"cannot use WAL journal mode on {self._path} (got {mode})")
            # FULL: in WAL mode, NORMAL may lose the last commits on power loss.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
            self._migrate(conn, version)
            # The file may be new (first start, or after moving a corrupt one aside).
            self._fsync_dir(self._path.parent)
            return conn
        except BaseException as e:
            if conn is not None:
                conn.close()
            if isinstance(e, sqlite3.Error):
                raise _translate(e) from e
            raise

    def _checked_connection(self) -> sqlite3.Connection:
        conn = self._connect()
        try:
            result = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
            problem = None if result == ["ok"] else "; ".join(str(r) for r in result[:5])
        except sqlite3.DatabaseError as e:  # e.g. "file is not a database"
            problem = str(e)
        if problem is None:
            return conn
        conn.close()
        aside = self._move_aside()
        # The agent must keep collecting readings; the old file is kept for manual recovery.
        log.error(
            "outbox %s is corrupt (%s); moved it to %s and started a new, empty outbox",
            self._path,
            problem,
            aside,
        )
        return self._connect()

    def _move_aside(self) -> Path:
        stamp = self._clock().astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = self._path.with_name(f"{self._path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside = self._path.with_name(f"{self._path.name}.corrupt-{stamp}-{n}")
            n += 1
        os.replace(self._path, aside)
        # Keep the WAL next to the moved file under SQLite's naming: it may hold the last commits.
        wal = self._path.with_name(self._path.name + "-wal")
        if wal.exists():
            os.replace(wal, aside.with_name(aside.name + "-wal"))
        # The shared-memory index is rebuilt from the WAL; a stale one must not be reused.
        self._path.with_name(self._path.name + "-shm").unlink(missing_ok=True)
        return aside

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        # A new file's directory entry must be durable too, or a power cut can lose the file.
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _schema_version(self, conn: sqlite3.Connection) -> int:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self._path} has schema version {version}, newer than this gateway's "
                f"{SCHEMA_VERSION}: upgrade the gateway (the file was not changed)"
            )
        return version

    def _migrate(self, conn: sqlite3.Connection, version: int) -> None:
        while version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _MIGRATIONS[version].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                version += 1
                conn.execute(f"PRAGMA user_version = {version}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            log.info("outbox %s: schema migrated to version %d", self._path, version)

    def _put_sync(self, conn: sqlite3.Connection, item: OutboxItem) -> PutResult:
        now = self._clock()
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute(
            "SELECT 1 FROM readings WHERE reading_id = ?", (item.reading_id,)
        ).fetchone():
            conn.execute("ROLLBACK")
            log.debug("outbox: duplicate reading %s", item.reading_id)
            return PutResult.DUPLICATE
        pending = self._pending_count(conn)
        if self._cfg.when_full == "reject_new":
            reason = self._full_reason(pending)
            if reason is not None:
                total = self._bump(conn, "rejected_full", 1)
                conn.execute("COMMIT")
                log.warning(
                    "outbox full (%s, when_full=reject_new): rejected a new reading; "
                    "%d rejected so far",
                    reason,
                    total,
                )
                log.debug(
                    "outbox: rejected reading %s of patient %s", item.reading_id, item.patient_id
                )
                return PutResult.REJECTED_FULL
        conn.execute(
            "INSERT INTO readings (reading_id, topic, payload, patient_id, kind, measured_at,"
            " measured_day, valid, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                item.reading_id,
                item.topic,
                item.payload,
                item.patient_id,
                item.kind,
                item.measured_at,
                item.measured_day,
                int(item.valid),
                _iso(now),
            ),
        )
        if self._cfg.when_full == "drop_oldest" and pending + 1 > self._cfg.max_pending:
            self._drop_oldest(conn, pending + 1 - self._cfg.max_pending, "over max_pending")
        conn.execute("COMMIT")
        log.debug("outbox: stored reading %s", item.reading_id)
        return PutResult.STORED

    def _full_reason(self, pending: int) -> str | None:
        if pending >= self._cfg.max_pending:
            return f"{pending} pending >= max_pending {self._cfg.max_pending}"
        return None

    def _drop_oldest(self, conn: sqlite3.Connection, count: int, why: str) -> None:
        dropped = conn.execute(
            "DELETE FROM readings WHERE seq IN (SELECT seq FROM readings"
            " WHERE delivered_at IS NULL ORDER BY seq LIMIT ?)",
            (count,),
        ).rowcount
        self._log_dropped(conn, dropped, why)

    def _log_dropped(self, conn: sqlite3.Connection, dropped: int, why: str) -> None:
        if dropped > 0:
            total = self._bump(conn, "dropped", dropped)
            log.warning(
                "outbox: dropped %d undelivered reading(s) (%s, when_full=%s); "
                "%d dropped so far",
                dropped,
                why,
                self._cfg.when_full,
                total,
            )

    @staticmethod
    def _bump(conn: sqlite3.Connection, name: str, by: int) -> int:
        row = conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value RETURNING value",
            (name, by),
        ).fetchone()
        return int(row[0])

    @staticmethod
    def _pending_count(conn: sqlite3.Connection) -> int:
        return int(
            conn.execute("SELECT COUNT(*) FROM readings WHERE delivered_at IS NULL").fetchone()[0]
        )

    @staticmethod
    def _oldest_pending(conn: sqlite3.Connection) -> str | None:
        row = conn.execute(
            "SELECT created_at FROM readings WHERE delivered_at IS NULL ORDER BY seq LIMIT 1"
        ).fetchone()
        return None if row is None else str(row[0])

    @staticmethod
    def _pending_sync(conn: sqlite3.Connection, limit: int, after_seq: int) -> list[Pending]:
        rows = conn.execute(
            "SELECT seq, reading_id, topic, payload FROM readings"
            " WHERE delivered_at IS NULL AND seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
        return [Pending(int(s), str(r), str(t), bytes(p)) for s, r, t, p in rows]

    def _mark_delivered_sync(self, conn: sqlite3.Connection, seqs: list[int]) -> None:
        now = _iso(self._clock())
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE readings SET delivered_at = ? WHERE seq = ? AND delivered_at IS NULL",
            [(now, s) for s in seqs],
        )
        conn.execute("COMMIT")

    def _stats_sync(self, conn: sqlite3.Connection) -> OutboxStats:
        delivered = conn.execute(
            "SELECT COUNT(*) FROM readings WHERE delivered_at IS NOT NULL"
        ).fetchone()[0]
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        size = 0
        for p in (self._path, self._path.with_name(self._path.name + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                size += p.stat().st_size
        return OutboxStats(
            pending=self._pending_count(conn),
            oldest_pending=self._oldest_pending(conn),
            delivered=int(delivered),
            db_bytes=size,
            rejected_full=int(counters.get("rejected_full", 0)),
            dropped=int(counters.get("dropped", 0)),
        )

    @staticmethod
    def _days_sync(conn: sqlite3.Connection, patient_id: str, since: str, until: str) -> list[str]:
        rows = conn.execute(
            "SELECT DISTINCT measured_day FROM readings"
            " WHERE patient_id = ? AND valid = 1 AND measured_day BETWEEN ? AND ?"
            " ORDER BY measured_day",
            (patient_id, since, until),
        ).fetchall()
        return [str(r[0]) for r in rows]

    def _prune_sync(self, conn: sqlite3.Connection) -> None:
        now = self._clock()
        cfg = self._cfg
        conn.execute("BEGIN IMMEDIATE")
        removed = conn.execute(
            "DELETE FROM readings WHERE delivered_at IS NOT NULL AND delivered_at < ?",
            (_iso(now - timedelta(days=cfg.keep_delivered_days)),),
        ).rowcount
        # Age is a time-to-live whatever the policy: a reading undelivered for this long is
        # no use to the clinic, and keeping it would let one dead broker fill the disk.
        expired = conn.execute(
            "DELETE FROM readings WHERE delivered_at IS NULL AND created_at < ?",
            (_iso(now - timedelta(days=cfg.max_pending_age_days)),),
        ).rowcount
        self._log_dropped(conn, expired, f"undelivered for over {cfg.max_pending_age_days} days")
        excess = self._pending_count(conn) - cfg.max_pending
        if cfg.when_full == "drop_oldest" and excess > 0:
            self._drop_oldest(conn, excess, "over max_pending")
        elif excess >= 0:
            reason = self._full_reason(self._pending_count(conn))
            log.warning(
                "outbox full (%s, when_full=reject_new): new readings are being rejected", reason
            )
        conn.execute("COMMIT")
        if removed:
            log.info("outbox: pruned %d delivered reading(s) older than %d days",
                     removed, cfg.keep_delivered_days)
