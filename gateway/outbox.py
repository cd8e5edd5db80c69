"""SQLite store-and-forward outbox: the source of truth for every reading until the broker's PUBACK.

A reading is committed (WAL, ``synchronous=FULL``: it survives a power cut, not only a killed
process) before anything else is done with it, and leaves the pending set only through
:meth:`Outbox.mark_delivered`, which the uplink calls after the PUBACK. Delivered rows are kept
for ``keep_delivered_days`` so a device that re-sends an old measurement is recognised as a
duplicate and so days-with-data can be counted.

Every payload is stored with its sha256; :meth:`Outbox.pending` verifies it and quarantines a row
whose bytes changed on the disk instead of publishing them. A reading no patient can claim
(``patient_id`` None) is kept and counted, never offered for publishing: listed by
:meth:`Outbox.unattributed`, published once a technician assigns it (:meth:`Outbox.assign`),
dropped and counted after ``keep_delivered_days`` otherwise.
:meth:`Outbox.accepting` is the storage gate asked before every device connection. A corrupt file
is moved aside and its readable rows are salvaged into the new one (:mod:`gateway.outbox_salvage`);
what open() found is in :attr:`Outbox.recovery`.

All SQLite work runs on one dedicated worker thread with one connection: the event loop never
waits on the disk, and the single thread serialises writers, so ``seq`` order is commit order.

Wear (schema v3, gateway/outbox_schema.py): 2 KiB pages for new files, no AUTOINCREMENT (a
seq is still never reused: :meth:`Outbox._high`), no index on delivered_at (prune walks the
table in seq order), and the row counts kept in memory (:mod:`gateway.outbox_counts`).

Fault injection (tests only): ``RPM_GATEWAY_FAULT_COMMIT_DELAY_MS`` set in the environment makes
every put() sleep that long on the worker thread before its COMMIT (a slow SD card). It is read
once, when the Outbox is constructed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, TypeVar

from gateway.config import ID_RE, OutboxConfig
from gateway.outbox_counts import Counts, count_rows
from gateway.outbox_pages import wal_damage
from gateway.outbox_salvage import Salvage, salvage_into
from gateway.outbox_schema import MIGRATIONS, NEW_FILE_PAGE_SIZE, SCHEMA_VERSION, SEQ_HIGH

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = [
    "SCHEMA_VERSION",
    "AssignOutcome",
    "AssignResult",
    "ObservedValue",
    "Outbox",
    "OutboxClosedError",
    "OutboxError",
    "OutboxFullError",
    "OutboxItem",
    "OutboxStats",
    "Pending",
    "PutResult",
    "RecoveryReport",
    "SchemaVersionError",
    "StorageError",
    "UnattributedReading",
]

FAULT_COMMIT_DELAY_ENV = "RPM_GATEWAY_FAULT_COMMIT_DELAY_MS"
_MIB = 1024 * 1024
# SQLite's own disk headroom must fit under cfg.min_free_mb, the gate's floor: below the floor
# no device is read, so everything SQLite needs to commit a session's readings must be there.
# The WAL is checkpointed every _wal_pages(...) pages and truncated back to the same size, so
# it stays at or below min(1 MiB, floor / 2) in normal use: 506 frames x (2048 + 24) bytes
# = 1.0 MiB (a file made before schema v3 keeps 4 KiB pages: 254 frames x (4096 + 24)).
# With the default 2 MiB floor: 1.0 MiB WAL + 32 KiB wal-index (-shm) + the
# database's own growth for one session (a few pages; a reading is ~1 KiB) < 2 MiB. With the
# smallest floor the config allows (0.25 MiB): a 128 KiB WAL (63 frames) + 32 KiB + growth.
_WAL_CEILING = 1 * _MIB
_BUSY_TIMEOUT_MS = 5_000
_PROBE_INTERVAL_S = 1.0  # at most one write probe per second while the store is failing
_TOPIC_FORBIDDEN = frozenset("+#\x00")
# Host parameters per IN (...) query: well under SQLite's limit (32766 since 3.32; 999 before).
_IN_CHUNK = 500
_CHECKSUM_REASON = "checksum mismatch"
# Only these mean the file itself is damaged; every other error (locked, I/O, full) leaves it be.
_CORRUPTION_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
# "Pending" in SQL is always written "delivered_at IS NULL AND patient_id IS NOT NULL", the
# WHERE of the readings_pending partial index, so the planner can use it.


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
    patient_id: str | None  # None: unattributed (stored and counted, never published)
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

    pending: int  # attributed, undelivered, not quarantined
    oldest_pending: str | None  # created_at (UTC ISO) of the oldest of those
    delivered: int
    db_bytes: int
    rejected_full: int  # new readings refused by the reject_new policy, ever
    dropped: int  # undelivered readings deleted (drop_oldest, or older than the age limit), ever
    quarantined: int = 0  # undelivered rows held back now (broker refusal, checksum mismatch)
    unattributed: int = 0  # kept readings no patient can claim (never published)
    checksum_failures: int = 0  # rows whose payload no longer matched its checksum, ever
    salvaged: int = 0  # rows copied out of a corrupt outbox file, ever
    salvage_lost: int = 0  # rows found in a corrupt file that could not be read back, ever
    # Unattributed readings deleted unassigned at the retention limit (keep_delivered_days), ever.
    unattributed_dropped: int = 0


@dataclass(frozen=True, slots=True)
class ObservedValue:
    """One observation of a stored payload, as a person reads it: e.g. 132.0 "mm[Hg]"."""

    code: str  # LOINC
    name: str
    value: float | None  # None: the device sent no usable number
    unit: str  # UCUM


@dataclass(frozen=True, slots=True)
class UnattributedReading:
    """A kept reading no binding claims (another user slot, or the device's "unknown user").

    What a technician needs to ask the patient "was this yours?": the device, the time, the
    slot and the values. Times are UTC ISO-8601 ending in ``Z``.
    """

    reading_id: str
    device_address: str | None  # from the payload; None when it is damaged
    kind: str
    measured_at: str
    measured_day: str  # the local calendar day the reading was stored under
    user_index: int | None  # the device's user slot (255: "unknown user"), None if it sent none
    observations: tuple[ObservedValue, ...]
    valid: bool
    stored_at: str
    drops_at: str  # the first prune() after this instant deletes it, unless it is assigned
    days_left: int  # whole days from the listing until drops_at (0: the next prune may drop it)
    damaged: bool = False  # payload changed on the disk (checksum) or not JSON: not assignable


class AssignOutcome(enum.Enum):
    """What :meth:`Outbox.assign` did."""

    ASSIGNED = "assigned"  # attributed and queued for publishing
    NOT_FOUND = "not_found"  # no reading with that id (never stored, or already dropped)
    ALREADY_ATTRIBUTED = "already_attributed"  # it is a patient's already: nothing changed
    DAMAGED = "damaged"  # the stored payload changed on the disk or is not JSON: kept as it is


@dataclass(frozen=True, slots=True)
class AssignResult:
    """The outcome of an assignment and what an event about it needs (None when not found)."""

    outcome: AssignOutcome
    reading_id: str
    patient_id: str | None = None  # the reading's patient now (for already_attributed: theirs)
    device_address: str | None = None
    kind: str | None = None
    measured_at: str | None = None  # UTC ISO-8601, "Z"
    measured_day: str | None = None
    seq: int | None = None  # its new place in the publishing queue (assigned only)
    assigned_at: str | None = None  # outbox clock, UTC ISO-8601 "Z" (assigned only)

    @property
    def ok(self) -> bool:
        """Whether the reading was assigned now."""
        return self.outcome is AssignOutcome.ASSIGNED


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What open() found wrong with the file: a corrupt one moved aside, or an empty one."""

    kind: Literal["corrupt", "empty_file"]
    moved_to: Path | None  # where the damaged file was kept (corrupt only)
    salvaged: int  # rows copied into the new outbox
    lost: int  # rows seen in the damaged file that could not be read back
    detail: str  # what was wrong (no patient data)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    # One fixed format everywhere, so timestamps compare correctly as text in SQL.
    return t.astimezone(UTC).isoformat(timespec="microseconds")


def _checksum(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _utc_z(text: str) -> str:
    """A stored UTC timestamp ("+00:00" or "Z", any precision) as ISO-8601 ending in "Z"."""
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return text
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _is_day(text: str) -> bool:
    try:
        return date.fromisoformat(text).isoformat() == text  # 3.11 also takes "20260301"
    except ValueError:
        return False


def _payload_object(payload: object, checksum: object) -> dict[str, object] | None:
    """The stored payload as a JSON object, or None when it is damaged or not one."""
    if not isinstance(payload, bytes):
        return None
    if checksum is not None and _checksum(payload) != checksum:
        return None
    try:
        obj = json.loads(payload, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _no_constant(name: str) -> object:
    # NaN / Infinity are not JSON; pydantic never writes them, so their presence is damage.
    raise ValueError(f"not JSON: {name}")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999: could not be written back as JSON
        raise ValueError(f"not a finite number: {text}")
    return value


def _with_patient(obj: dict[str, object], patient_id: str) -> bytes:
    """The payload with patient_id set, every other field as it was (same order), compact.

    Not tied to the payload's field list (the Reading model may gain fields): only patient_id
    changes. Compact like pydantic's model_dump_json, non-ASCII kept as UTF-8 as it does.
    """
    out = dict(obj)
    out["patient_id"] = patient_id
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _observed(obj: dict[str, object]) -> tuple[ObservedValue, ...]:
    found = obj.get("observations")
    out: list[ObservedValue] = []
    for o in found if isinstance(found, list) else []:
        if not isinstance(o, dict):
            continue
        value = o.get("value")
        number = float(value) if isinstance(value, int | float) and not isinstance(
            value, bool) else None  # fmt: skip
        out.append(ObservedValue(code=str(o.get("code", "")), name=str(o.get("name", "")),
                                 value=number, unit=str(o.get("unit", ""))))  # fmt: skip
    return tuple(out)


def _address(obj: dict[str, object] | None) -> str | None:
    device = obj.get("device") if obj is not None else None
    address = device.get("address") if isinstance(device, dict) else None
    return address if isinstance(address, str) else None


def _is_corruption(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _CORRUPTION_CODES  # extended codes: low byte


def _translate(e: sqlite3.Error) -> StorageError:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
        return OutboxFullError(f"outbox storage is full: {e}")
    return StorageError(f"outbox storage failed: {e}")


def _why(e: StorageError) -> str:
    return str(e.__cause__) if isinstance(e.__cause__, sqlite3.Error) else str(e)


def _holds_frames(wal: Path) -> bool:
    # A WAL header (32 bytes) and at least one frame (24-byte header + the smallest page).
    try:
        return wal.stat().st_size >= 32 + 24 + 512
    except FileNotFoundError:
        return False


def _commit_delay_s() -> float:
    raw = os.environ.get(FAULT_COMMIT_DELAY_ENV)
    if not raw:
        return 0.0
    try:
        delay = float(raw) / 1000
    except ValueError:
        delay = -1.0
    if delay < 0:
        log.warning("ignoring %s=%r: not a number of milliseconds >= 0", FAULT_COMMIT_DELAY_ENV, raw)
        return 0.0
    log.warning("fault injection: every outbox commit is delayed by %.0f ms", delay * 1000)
    return delay


def _wal_pages(floor_bytes: int, page_size: int) -> tuple[int, int]:
    """(wal_autocheckpoint pages, journal_size_limit bytes) that keep the WAL under the floor."""
    limit = min(_WAL_CEILING, floor_bytes // 2)
    return max(16, limit // (page_size + 24)), limit


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
        self._put_queue: list[tuple[OutboxItem, bool, asyncio.Future[PutResult]]] = []
        self._put_busy = False  # a batch of puts is on the worker thread
        self._puts_idle = asyncio.Event()
        self._puts_idle.set()
        self._commit_delay_s = _commit_delay_s()
        # Rows by state, kept by the worker thread (derived at open): see outbox_counts.
        self._counts = Counts()
        self._counts_stale = False  # see _recount
        self._failing: str | None = None  # the last write's storage error, until one succeeds
        self._last_probe = -_PROBE_INTERVAL_S
        self.recovery: RecoveryReport | None = None

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
        """Open (or create) the database: integrity, schema version, salvage of a corrupt file."""
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
        # Readings handed over before close() are committed before the connection goes.
        while self._put_busy or self._put_queue:
            await asyncio.shield(self._puts_idle.wait())
        executor, self._executor = self._executor, None
        if executor is None:
            return
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=True)

    async def put(self, item: OutboxItem, *, confirmed: bool = False) -> PutResult:
        """Store a reading durably; returns only after the COMMIT has reached the disk.

        Puts that arrive while a commit is in progress are committed together in the next
        transaction (group commit): one fsync for all of them, so a burst of indications does
        not queue behind one fsync each. `confirmed`: the device has already let go of the
        reading (an indication the stack confirmed), so it is stored even past `max_pending`;
        refusing it would lose it. The bound then stops the next session (accepting()).
        If the caller is cancelled, the reading may or may not be stored: a retried put
        returns STORED or DUPLICATE, both safe.
        """
        if not item.reading_id or not item.topic or _TOPIC_FORBIDDEN & set(item.topic):
            raise ValueError("reading_id and a topic suffix without MQTT wildcards are required")
        if self._conn is None:
            raise OutboxClosedError("outbox is not open")
        done: asyncio.Future[PutResult] = asyncio.get_running_loop().create_future()
        self._put_queue.append((item, confirmed, done))
        if not self._put_busy:
            self._start_puts()
        # A cancelled caller cancels only its own future: the batch is committed regardless.
        return await done

    def _start_puts(self) -> None:
        # Callbacks, not a task: a put on an idle outbox goes to the worker thread at once and
        # comes back in one loop iteration (a task per batch cost two more, ~15% of a commit).
        batch, self._put_queue = self._put_queue, []
        conn, executor = self._conn, self._executor
        if conn is None or executor is None:
            for _, _, done in batch:
                if not done.done():
                    done.set_exception(OutboxClosedError("outbox is not open"))
            return
        self._put_busy = True
        self._puts_idle.clear()
        loop = asyncio.get_running_loop()
        job = executor.submit(self._guarded, conn, self._put_many_sync,
                              [(i, c) for i, c, _ in batch])  # fmt: skip
        job.add_done_callback(
            lambda f: loop.call_soon_threadsafe(self._puts_done, batch, f)
        )

    def _puts_done(
        self,
        batch: list[tuple[OutboxItem, bool, asyncio.Future[PutResult]]],
        job: Future[list[PutResult]],
    ) -> None:
        self._put_busy = False
        try:
            results = job.result()
        except BaseException as e:
            if isinstance(e, StorageError):
                self._failing = _why(e)  # the storage gate shuts (accepting())
            for _, _, done in batch:
                if done.done():
                    continue
                if isinstance(e, CancelledError):
                    done.cancel()
                else:
                    done.set_exception(e)
        else:
            self._failing = None
            for (item, _, done), result in zip(batch, results, strict=True):
                if result is PutResult.STORED and item.patient_id is not None:
                    self._stored.set()
                if not done.done():
                    done.set_result(result)
        if self._put_queue:
            self._start_puts()
        if not self._put_busy:
            self._puts_idle.set()

    async def pending(self, limit: int, after_seq: int = 0) -> list[Pending]:
        """Up to ``limit`` publishable readings with seq > ``after_seq``, in seq order.

        Unattributed rows and quarantined rows not yet due are skipped; a row whose payload no
        longer matches its checksum is quarantined for good and never returned.
        """
        return await self._run(self._pending_sync, limit, after_seq)

    async def mark_delivered(self, seqs: Sequence[int]) -> None:
        """Record the broker's PUBACK for these rows; unknown or already delivered seqs are ignored."""
        if seqs:
            await self._write(self._mark_delivered_sync, list(seqs))

    async def quarantine(self, seq: int, reason: str, retry_after_s: float | None) -> bool:
        """Keep a row but hold it out of pending() until now + retry_after_s (None: for good).

        Idempotent; an unknown or delivered seq is ignored. A row quarantined for a checksum
        mismatch stays quarantined for good. True when the row was not quarantined before (a
        retry that is refused again returns False: count and report it once).
        """
        return await self._write(self._quarantine_sync, seq, reason, retry_after_s)

    async def accepting(self) -> str | None:
        """None if a new reading can be stored now, else why not (asked before every connection).

        Cheap: a statvfs of the outbox's directory and the cached pending count; while a write
        has failed, one write probe at most per second, so the gate reopens by itself.
        """
        if self._conn is None:
            return "storage failing: the outbox is not open"
        directory = self._path.parent
        floor = int(self._cfg.min_free_mb * _MIB)
        try:
            st = os.statvfs(directory)
        except OSError as e:
            return f"storage failing: {e.strerror or e} at {directory}"
        free = st.f_bavail * st.f_frsize
        if free < floor:
            return (
                f"disk nearly full: {free / _MIB:.1f} MiB free at {directory}, "
                f"{floor / _MIB:.1f} MiB needed"
            )
        if self._failing is not None:
            now = time.monotonic()
            if now - self._last_probe >= _PROBE_INTERVAL_S:
                self._last_probe = now
                with contextlib.suppress(StorageError):
                    await self._write(self._probe_sync)
            if self._failing is not None:
                return f"storage failing: {self._failing}"
        backlog = self._counts.backlog
        if self._cfg.when_full == "reject_new" and backlog >= self._cfg.max_pending:
            return (
                f"outbox full: {backlog} readings pending "
                "(max_pending, when_full = reject_new)"
            )
        return None

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

    async def unattributed(self, limit: int = 1000) -> list[UnattributedReading]:
        """Up to ``limit`` kept readings no patient can claim, oldest first (stored order).

        Each with its device, time, user slot, values and when prune() will drop it. A row
        whose payload changed on the disk (checksum) or is not a JSON object is listed as
        ``damaged``, from its columns only.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self._run(self._unattributed_sync, limit)

    async def assign(
        self, reading_id: str, patient_id: str, *, measured_day: str | None = None
    ) -> AssignResult:
        """Attribute a kept unattributed reading to a patient: from now on it is published.

        For a patient who confirms the reading was theirs. In one durable transaction: the
        stored payload gets ``patient_id`` (every other field unchanged), the row becomes the
        patient's (it counts in days_with_data) and is queued for the uplink behind everything
        pending, as a reading stored now would be (a new seq; its age for
        ``max_pending_age_days`` starts now). ``measured_day``: the patient-local day, when the
        patient's time zone is not the one the reading was stored under (default: unchanged).

        Never refused by the ``max_pending`` bound, and drops nothing: the reading is on the
        disk already, and a technician's assignment must not fail because the broker is
        behind. The backlog may then exceed ``max_pending`` by the assigned readings; the
        policy applies as usual from there on (reject_new: accepting() shuts the gate for new
        sessions; drop_oldest: the next put() or prune() drops the oldest, counted and logged).

        A reading re-sent by its device after this is a duplicate, whatever its binding says.
        Returns ASSIGNED, or NOT_FOUND / ALREADY_ATTRIBUTED / DAMAGED with nothing changed.
        """
        if not ID_RE.fullmatch(patient_id):
            raise ValueError(f"not a patient id: {patient_id!r} (letters, digits, _ . -; 1-64)")
        if measured_day is not None and not _is_day(measured_day):
            raise ValueError(f"measured_day must be a date YYYY-MM-DD, not {measured_day!r}")
        result = await self._write(self._assign_sync, reading_id, patient_id, measured_day)
        if result.ok:
            self._stored.set()  # wake the uplink: there is a reading to publish
        return result

    async def prune(self) -> None:
        """Delete old delivered rows and apply the pending size/age policy (logged at WARNING).

        Unattributed readings older than ``keep_delivered_days`` are deleted too, counted in
        :attr:`OutboxStats.unattributed_dropped` (persisted) and logged at INFO (counts only).
        """
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

    async def _write(self, fn: Callable[..., T], *args: object) -> T:
        # A write's outcome opens or shuts the storage gate (accepting()).
        try:
            result = await self._run(fn, *args)
        except StorageError as e:
            self._failing = _why(e)
            raise
        self._failing = None
        return result

    def _guarded(self, conn: sqlite3.Connection, fn: Callable[..., T], *args: object) -> T:
        try:
            if self._counts_stale:  # a failed write left counts that could not be re-derived
                self._counts = count_rows(conn)
                self._counts_stale = False
            return fn(conn, *args)
        except BaseException as e:
            if conn.in_transaction:
                # SQLITE_FULL/IOERR may already have rolled back; a second rollback is harmless.
                with contextlib.suppress(sqlite3.Error):
                    conn.rollback()
            self._recount(conn)
            if isinstance(e, sqlite3.Error):
                raise _translate(e) from e
            raise

    def _recount(self, conn: sqlite3.Connection) -> None:
        """After a failed operation: the counts from the disk, not from what it meant to do.

        A write applies its count changes only once its COMMIT returned; but a COMMIT can raise
        after its commit frame reached the WAL (EIO on the fsync), and the rows it changed are
        then what the file holds. Counts left behind would inflate or shrink the backlog that
        drop_oldest drops by and reject_new refuses by. If the recount fails too, the next
        operation recounts first (and fails the same way, deciding nothing, until it works).
        """
        try:
            self._counts = count_rows(conn)
            self._counts_stale = False
        except sqlite3.Error:
            self._counts_stale = True
            log.debug("outbox: recount after a failed write failed too", exc_info=True)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves, so every write
        # transaction takes the write lock up front and its boundaries are explicit.
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        return conn

    def _open_sync(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = None
        self.recovery = None
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._finish_interrupted_recovery()
            empty = self._empty_file()
            conn = self._checked_connection()
            version = self._schema_version(conn)  # before WAL: a newer file is left untouched
            if version == 0:  # a new file: its page size is set before its first page exists
                conn.execute(f"PRAGMA page_size = {NEW_FILE_PAGE_SIZE}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(f"cannot use WAL journal mode on {self._path} (got {mode})")
            # FULL: in WAL mode, NORMAL may lose the last commits on power loss.
            conn.execute("PRAGMA synchronous = FULL")
            page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            pages, limit = _wal_pages(int(self._cfg.min_free_mb * _MIB), page_size)
            conn.execute(f"PRAGMA wal_autocheckpoint = {pages}")
            conn.execute(f"PRAGMA journal_size_limit = {limit}")
            # FAST: a deleted row's bytes are zeroed where that costs no extra write, so a
            # salvage of a damaged file brings fewer deleted rows back.
            conn.execute("PRAGMA secure_delete = FAST")
            self._migrate(conn, version)
            if empty and self.recovery is None:
                self.recovery = RecoveryReport("empty_file", None, 0, 0, "the file was empty")
                log.error(
                    "outbox file %s was empty: readings it held before are gone; "
                    "check the SD card",
                    self._path,
                )
            self._counts = count_rows(conn)  # the full count; writes keep it from here
            self._counts_stale = False
            # The file may be new (first start, or after moving a corrupt one aside).
            self._fsync_dir(self._path.parent)
            return conn
        except BaseException as e:
            if conn is not None:
                conn.close()
            if isinstance(e, sqlite3.Error):
                raise _translate(e) from e
            raise

    def _empty_file(self) -> bool:
        # A zero-length file without a WAL is not a first start: whatever it held is gone. (With
        # a WAL that holds frames it is salvaged from the WAL: see _checked_connection.)
        try:
            if self._path.stat().st_size != 0:
                return False
        except FileNotFoundError:
            return False
        return not _holds_frames(self._path.with_name(self._path.name + "-wal"))

    def _checked_connection(self) -> sqlite3.Connection:
        """A connection to a healthy file: a corrupt one is first replaced by its salvage."""
        wal = self._path.with_name(self._path.name + "-wal")
        # Checked before SQLite sees it: SQLite silently ignores a damaged WAL's later commits,
        # and the first write would overwrite them. And it deletes the WAL of a zero-length
        # file (taken for a crash before anything was written), which this outbox never leaves:
        # switching a new file to WAL writes its first page.
        problem = None
        if self._path.exists() and _holds_frames(wal):
            problem = wal_damage(wal)
            if self._path.stat().st_size == 0:
                problem = "the file was empty but its WAL holds commits"
        if problem is None:
            conn = self._connect()
            try:
                result = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
                problem = None if result == ["ok"] else " ".join(
                    " ".join(str(r).split()) for r in result[:5]
                )
            except sqlite3.Error as e:
                if not _is_corruption(e):
                    conn.close()
                    # Locked, I/O error, disk full...: the file may be fine; never move it.
                    raise _translate(e) from e
                problem = str(e)  # e.g. "file is not a database"
            if problem is None:
                return conn
            conn.close()
        self._recover(problem)
        return self._connect()

    def _salvage_path(self) -> Path:
        return self._path.with_name(self._path.name + ".salvage")

    def _recover(self, problem: str) -> None:
        # Power-cut safe order: the salvaged outbox is complete on the disk (its own file, a
        # rollback journal, committed and closed) before the damaged file is moved aside, and
        # takes its place by a rename. A start in between finds the damaged file still in
        # place (and salvages again) or only the salvaged one (and renames it in).
        wal_damaged = problem.startswith(("WAL", "the WAL"))
        new = self._salvage_path()
        self._remove_db_files(new)
        try:
            found = self._build_salvaged(new, wal_damaged=wal_damaged)
            salvaged, lost = found.salvaged, found.lost
            detail = f"{problem}; salvaged {salvaged} reading(s) ({found.pending} pending), {lost} lost"
        except Exception as e:  # salvage must never stop the agent from starting
            self._remove_db_files(new)
            salvaged, lost = 0, 0
            detail = f"{problem}; salvage failed ({type(e).__name__}: {e})"
            log.debug("outbox salvage failed", exc_info=True)
        aside = self._move_aside()
        if new.exists():
            os.replace(new, self._path)
        self._fsync_dir(self._path.parent)
        self.recovery = RecoveryReport("corrupt", aside, salvaged, lost, detail)
        # The agent must keep collecting readings; the old file is kept for manual recovery.
        log.error(
            "outbox %s was corrupt (%s); moved it to %s and started a new outbox with what "
            "could be read: %d reading(s) salvaged, %d lost",
            self._path, problem, aside, salvaged, lost,
        )  # fmt: skip

    def _build_salvaged(self, new: Path, *, wal_damaged: bool) -> Salvage:
        conn = sqlite3.connect(new, isolation_level=None)
        try:
            conn.execute(f"PRAGMA page_size = {NEW_FILE_PAGE_SIZE}")
            conn.execute("PRAGMA journal_mode = DELETE")  # one self-contained file once closed
            conn.execute("PRAGMA synchronous = FULL")
            self._migrate(conn, 0)
            found = salvage_into(conn, self._path, wal_damaged=wal_damaged)
            conn.execute("BEGIN IMMEDIATE")
            self._bump(conn, "salvaged", found.salvaged)
            self._bump(conn, "salvage_lost", found.lost)
            conn.execute("COMMIT")
        finally:
            conn.close()
        return found

    def _finish_interrupted_recovery(self) -> None:
        new = self._salvage_path()
        if not new.exists():
            return
        journal = new.with_name(new.name + "-journal")
        if self._path.exists() or journal.exists():
            # Not finished: the damaged file is still in place (it is salvaged again) or the
            # salvaged one was never committed.
            self._remove_db_files(new)
            return
        os.replace(new, self._path)
        self._fsync_dir(self._path.parent)
        self.recovery = RecoveryReport(
            "corrupt", None, 0, 0, "finished a recovery interrupted by a restart"
        )
        log.error("outbox %s: finished a recovery interrupted by a restart (the damaged file "
                  "was moved aside; salvaged rows are in the outbox)", self._path)  # fmt: skip

    @staticmethod
    def _remove_db_files(db: Path) -> None:
        for suffix in ("", "-journal", "-wal", "-shm"):
            db.with_name(db.name + suffix).unlink(missing_ok=True)

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
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                version += 1
                conn.execute(f"PRAGMA user_version = {version}")
                conn.execute("COMMIT")
            except BaseException:
                # SQLITE_FULL/IOERR may have rolled the transaction back already: a bare
                # ROLLBACK would then raise "no transaction is active" in place of the error
                # that says what is wrong (a full disk is OutboxFullError, the exit-73 path).
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            log.info("outbox %s: schema migrated to version %d", self._path, version)

    def _put_many_sync(
        self, conn: sqlite3.Connection, items: list[tuple[OutboxItem, bool]]
    ) -> list[PutResult]:
        """One transaction, one fsync, for a batch of readings (in order).

        Few SQLite calls per batch, not a few per reading: every call gives up the GIL, and
        while the event loop is busy with the radio each hand-back can cost milliseconds.
        """
        now = _iso(self._clock())
        conn.execute("BEGIN IMMEDIATE")
        high = self._high(conn)
        seen = self._existing_ids(conn, [item.reading_id for item, _ in items])
        # The worker keeps the count exact; a COUNT(*) here would grow with the backlog, and
        # the backlog is largest during an outage, when the commit window matters most.
        pending = self._counts.backlog
        change = Counts()
        results: list[PutResult] = []
        rows: dict[str, tuple[object, ...]] = {}  # by reading_id, in insertion order
        rejected = 0
        claimed: list[tuple[object, ...]] = []
        for item, confirmed in items:
            attributed = item.patient_id is not None
            if item.reading_id in seen:
                if not (attributed and seen[item.reading_id]):
                    # Pending, delivered, or already attributed (by a binding or by assign()):
                    # the first attribution stands, so a reading counts once for one patient.
                    log.debug("outbox: duplicate reading %s", item.reading_id)
                    results.append(PutResult.DUPLICATE)
                    continue
                # Kept unattributed before (a slot binding since corrected): the device re-sent
                # it and now a binding claims it, so it becomes publishable. Like assign(): the
                # kept row is replaced by this one, a new seq behind every pending row, never
                # refused by the bound (the reading was stored already).
                if rows.pop(item.reading_id, None) is None:  # else kept earlier in this batch
                    claimed.append((item.reading_id,))
                else:
                    change.unattributed -= 1  # stored unattributed earlier in this batch
            elif (attributed and not confirmed and self._cfg.when_full == "reject_new"
                    and self._full_reason(pending) is not None):
                # An unattributed reading is never published, so the bound on what waits for
                # the broker does not apply to it (its retention is keep_delivered_days).
                rejected += 1
                log.debug("outbox: rejected reading %s of patient %s", item.reading_id,
                          item.patient_id)
                results.append(PutResult.REJECTED_FULL)
                continue
            seen[item.reading_id] = not attributed
            pending += attributed
            change.unattributed += not attributed
            rows[item.reading_id] = (item.reading_id, item.topic, item.payload, item.patient_id,
                                     item.kind, item.measured_at, item.measured_day,
                                     int(item.valid), now, _checksum(item.payload))
            results.append(PutResult.STORED)
            log.debug("outbox: stored reading %s%s", item.reading_id, "" if attributed else
                      " (unattributed)")  # fmt: skip
        if claimed:
            change.unattributed -= conn.executemany(
                "DELETE FROM readings WHERE reading_id = ? AND patient_id IS NULL", claimed
            ).rowcount
        conn.executemany(
            "INSERT INTO readings (seq, reading_id, topic, payload, patient_id, kind, measured_at,"
            " measured_day, valid, created_at, checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(seq, *row) for seq, row in enumerate(rows.values(), start=high + 1)],
        )
        if self._cfg.when_full == "drop_oldest" and pending > self._cfg.max_pending:
            dropped = self._drop_oldest(conn, pending - self._cfg.max_pending, "over max_pending")
            pending += dropped.backlog  # negative: rows deleted
            change.quarantined += dropped.quarantined
        if rejected:
            total = self._bump(conn, "rejected_full", rejected)
            log.warning("outbox full (%s, when_full=reject_new): rejected %d new reading(s); "
                        "%d rejected so far", self._full_reason(pending), rejected, total)
        if self._commit_delay_s:
            time.sleep(self._commit_delay_s)  # fault injection: a slow disk
        conn.execute("COMMIT")
        change.backlog = pending - self._counts.backlog
        self._counts.add(change)
        return results

    @staticmethod
    def _high(conn: sqlite3.Connection) -> int:
        """The highest seq ever handed out: the next row gets this + 1 (a seq is never reused).

        Not AUTOINCREMENT, which writes sqlite_sequence's page in every insert: the table's own
        top row shows the high-water mark, and counters keeps it when deletes hide it.
        """
        return int(conn.execute(
            "SELECT MAX(COALESCE((SELECT MAX(seq) FROM readings), 0),"
            " COALESCE((SELECT value FROM counters WHERE name = ?), 0))", (SEQ_HIGH,),
        ).fetchone()[0])  # fmt: skip

    @staticmethod
    def _hold_high(conn: sqlite3.Connection, high: int) -> None:
        """After deleting rows: record ``high`` if the table's top row no longer shows it.

        A seq is what the uplink acknowledges by (mark_delivered after a PUBACK) and where its
        cursor stands: handing a deleted row's seq to a new reading could mark that reading
        delivered by the old one's PUBACK, or hide it behind the cursor.
        """
        top = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM readings").fetchone()[0]
        if int(top) < high:
            conn.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = MAX(value, excluded.value)",
                (SEQ_HIGH, high),
            )

    @staticmethod
    def _existing_ids(conn: sqlite3.Connection, ids: list[str]) -> dict[str, bool]:
        """The ids already stored, each with whether its row is unattributed."""
        found: dict[str, bool] = {}
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update((str(r[0]), bool(r[1])) for r in conn.execute(
                f"SELECT reading_id, patient_id IS NULL FROM readings"  # noqa: S608
                f" WHERE reading_id IN ({marks})", chunk))
        return found

    def _full_reason(self, pending: int) -> str | None:
        if pending >= self._cfg.max_pending:
            return f"{pending} pending >= max_pending {self._cfg.max_pending}"
        return None

    def _drop_oldest(self, conn: sqlite3.Connection, count: int, why: str) -> Counts:
        """Delete the ``count`` oldest undelivered rows; the (negative) changes to the counts.

        Never the table's top row, so no seq is freed and no high-water mark needs holding
        (_hold_high) for this delete: callers ask for ``count`` = backlog - max_pending, fewer
        than the undelivered attributed rows on the disk (max_pending >= 1, the counts exact),
        so the newest of those survives; and a top row outside that set (delivered,
        unattributed) is never a candidate. prune() holds the mark for its other deletes.
        """
        gone = self._deleted(conn.execute(
            "DELETE FROM readings WHERE seq IN (SELECT seq FROM readings"
            " WHERE delivered_at IS NULL AND patient_id IS NOT NULL ORDER BY seq LIMIT ?)"
            " RETURNING quarantined_at IS NOT NULL",
            (count,),
        ))  # fmt: skip
        self._log_dropped(conn, -gone.backlog, why)
        return gone

    @staticmethod
    def _deleted(cursor: sqlite3.Cursor) -> Counts:
        """The count changes of deleting undelivered attributed rows (RETURNING quarantined)."""
        flags = [bool(r[0]) for r in cursor.fetchall()]
        return Counts(backlog=-len(flags), quarantined=-sum(flags))

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

    def _probe_sync(self, conn: sqlite3.Connection) -> None:
        # A real (tiny) write: it fails while the disk is full or the store is failing.
        conn.execute("BEGIN IMMEDIATE")
        self._bump(conn, "storage_probes", 1)
        conn.execute("COMMIT")

    def _pending_sync(self, conn: sqlite3.Connection, limit: int, after_seq: int) -> list[Pending]:
        now = _iso(self._clock())
        out: list[Pending] = []
        bad: list[int] = []
        cursor = after_seq
        while len(out) < limit:
            want = limit - len(out)
            rows = conn.execute(
                "SELECT seq, reading_id, topic, payload, checksum FROM readings"
                " WHERE delivered_at IS NULL AND patient_id IS NOT NULL AND seq > ?"
                " AND (quarantined_at IS NULL OR retry_at <= ?)"  # NULL retry_at: never due
                " ORDER BY seq LIMIT ?",
                (cursor, now, want),
            ).fetchall()
            for seq, rid, topic, payload, checksum in rows:
                if not isinstance(payload, bytes) or (
                    checksum is not None and _checksum(payload) != checksum
                ):
                    bad.append(int(seq))
                else:
                    out.append(Pending(int(seq), str(rid), str(topic), payload))
            if len(rows) < want:
                break
            cursor = int(rows[-1][0])
        if bad:
            self._quarantine_corrupt(conn, bad, now)
        return out

    def _quarantine_corrupt(self, conn: sqlite3.Connection, seqs: list[int], now: str) -> None:
        conn.execute("BEGIN IMMEDIATE")
        # A quarantined row offered again because its retry was due is counted already.
        newly = sum(int(conn.execute(
            "SELECT quarantined_at IS NULL AND delivered_at IS NULL AND patient_id IS NOT NULL"
            " FROM readings WHERE seq = ?", (s,)).fetchone()[0]) for s in seqs)  # fmt: skip
        conn.executemany(
            "UPDATE readings SET quarantined_at = ?, quarantine_reason = ?, retry_at = NULL"
            " WHERE seq = ?",
            [(now, _CHECKSUM_REASON, s) for s in seqs],
        )
        total = self._bump(conn, "checksum_failures", len(seqs))
        conn.execute("COMMIT")
        self._counts.quarantined += newly
        for seq in seqs:
            log.error(
                "outbox: reading seq %d no longer matches its checksum (changed on the disk); "
                "quarantined, not published (%d checksum failure(s) so far)",
                seq,
                total,
            )

    def _mark_delivered_sync(self, conn: sqlite3.Connection, seqs: list[int]) -> None:
        # One transaction and one statement per 500 seqs, however many the uplink hands over.
        now = _iso(self._clock())
        unique = sorted(set(seqs))
        conn.execute("BEGIN IMMEDIATE")
        flags: list[bool] = []
        for start in range(0, len(unique), _IN_CHUNK):
            chunk = unique[start : start + _IN_CHUNK]
            flags += [bool(r[0]) for r in conn.execute(
                "UPDATE readings SET delivered_at = ?"  # noqa: S608 (placeholders only)
                f" WHERE seq IN ({','.join('?' * len(chunk))})"
                " AND delivered_at IS NULL AND patient_id IS NOT NULL"
                " RETURNING quarantined_at IS NOT NULL",
                (now, *chunk),
            ).fetchall()]  # fmt: skip
        if not flags:
            conn.execute("ROLLBACK")  # nothing changed: no commit, no fsync
            return
        conn.execute("COMMIT")
        self._counts.add(Counts(backlog=-len(flags), quarantined=-sum(flags),
                                delivered=len(flags)))  # fmt: skip

    def _quarantine_sync(
        self, conn: sqlite3.Connection, seq: int, reason: str, retry_after_s: float | None
    ) -> bool:
        now = self._clock()
        retry = None if retry_after_s is None else _iso(now + timedelta(seconds=retry_after_s))
        reason = reason[:200] or "quarantined"
        conn.execute("BEGIN IMMEDIATE")
        before = conn.execute(
            "SELECT quarantined_at FROM readings"
            " WHERE seq = ? AND delivered_at IS NULL AND patient_id IS NOT NULL"
            " AND quarantine_reason IS NOT ?",
            (seq, _CHECKSUM_REASON),
        ).fetchone()
        if before is None:
            conn.execute("ROLLBACK")
            return False
        conn.execute(
            "UPDATE readings SET quarantined_at = COALESCE(quarantined_at, ?),"
            " quarantine_reason = ?, retry_at = ? WHERE seq = ?",
            (_iso(now), reason, retry, seq),
        )
        conn.execute("COMMIT")
        self._counts.quarantined += before[0] is None
        # Debug: the uplink logs quarantines itself, rate-limited (an ACL refusal quarantines
        # every reading; a line per row would flood the journal).
        log.debug("outbox: reading seq %d quarantined (%s); %s", seq, reason,
                "no automatic retry" if retry is None else f"retry after {retry}")  # fmt: skip
        return before[0] is None

    def _stats_sync(self, conn: sqlite3.Connection) -> OutboxStats:
        counts = self._counts  # kept by every write: no COUNT(*) once a minute over the table
        oldest = conn.execute(
            "SELECT created_at FROM readings WHERE delivered_at IS NULL"
            " AND patient_id IS NOT NULL AND quarantined_at IS NULL"
            " ORDER BY seq LIMIT 1"
        ).fetchone()
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        size = 0
        for p in (self._path, self._path.with_name(self._path.name + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                size += p.stat().st_size
        return OutboxStats(
            pending=counts.backlog - counts.quarantined,
            oldest_pending=None if oldest is None else str(oldest[0]),
            delivered=counts.delivered,
            db_bytes=size,
            rejected_full=int(counters.get("rejected_full", 0)),
            dropped=int(counters.get("dropped", 0)),
            quarantined=counts.quarantined,
            unattributed=counts.unattributed,
            checksum_failures=int(counters.get("checksum_failures", 0)),
            salvaged=int(counters.get("salvaged", 0)),
            salvage_lost=int(counters.get("salvage_lost", 0)),
            unattributed_dropped=int(counters.get("unattributed_dropped", 0)),
        )

    @staticmethod
    def _days_sync(conn: sqlite3.Connection, patient_id: str, since: str, until: str) -> list[str]:
        # Unattributed rows (patient_id NULL) are no patient's data and never count.
        rows = conn.execute(
            "SELECT DISTINCT measured_day FROM readings"
            " WHERE patient_id = ? AND patient_id IS NOT NULL AND valid = 1"
            " AND measured_day BETWEEN ? AND ? ORDER BY measured_day",
            (patient_id, since, until),
        ).fetchall()
        return [str(r[0]) for r in rows]

    def _unattributed_sync(
        self, conn: sqlite3.Connection, limit: int
    ) -> list[UnattributedReading]:
        now = self._clock()
        keep = timedelta(days=self._cfg.keep_delivered_days)
        rows = conn.execute(
            "SELECT reading_id, payload, checksum, kind, measured_at, measured_day, valid,"
            " created_at FROM readings WHERE patient_id IS NULL"
            " ORDER BY created_at, seq LIMIT ?",
            (limit,),
        ).fetchall()
        out: list[UnattributedReading] = []
        for rid, payload, checksum, kind, measured_at, day, valid, created_at in rows:
            obj = _payload_object(payload, checksum)
            slot = obj.get("user_index") if obj is not None else None
            try:
                drops = datetime.fromisoformat(str(created_at)) + keep
                left = max(0, math.floor((drops - now).total_seconds() / 86400))
                drops_at = _iso(drops)
            except (TypeError, ValueError):  # not this outbox's format: the next prune
                drops_at, left = str(created_at), 0
            out.append(UnattributedReading(
                reading_id=str(rid),
                device_address=_address(obj),
                kind=str(kind),
                measured_at=_utc_z(str(measured_at)),
                measured_day=str(day),
                user_index=slot if isinstance(slot, int) and not isinstance(slot, bool) else None,
                observations=_observed(obj) if obj is not None else (),
                valid=bool(valid),
                stored_at=_utc_z(str(created_at)),
                drops_at=_utc_z(drops_at),
                days_left=left,
                damaged=obj is None,
            ))  # fmt: skip
        return out

    def _assign_sync(
        self, conn: sqlite3.Connection, reading_id: str, patient_id: str, day: str | None
    ) -> AssignResult:
        now = _iso(self._clock())
        # IMMEDIATE: the row read here is the row changed below (no writer in between).
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute(
            "SELECT seq, topic, payload, checksum, patient_id, kind, measured_at,"
            " measured_day, valid FROM readings WHERE reading_id = ?",
            (reading_id,),
        ).fetchone()
        if row is None:
            conn.execute("ROLLBACK")
            return AssignResult(AssignOutcome.NOT_FOUND, reading_id)
        seq, topic, payload, checksum, owner, kind, measured_at, stored_day, valid = row
        obj = _payload_object(payload, checksum)
        found = AssignResult(
            AssignOutcome.ALREADY_ATTRIBUTED, reading_id, patient_id=owner,
            device_address=_address(obj), kind=str(kind),
            measured_at=_utc_z(str(measured_at)), measured_day=str(stored_day),
        )  # fmt: skip
        if owner is not None:
            conn.execute("ROLLBACK")
            return found
        if obj is None:
            conn.execute("ROLLBACK")
            # Rewriting it would give changed bytes a fresh checksum: never publish them.
            log.error("outbox: unattributed reading %s not assigned: its stored payload is "
                      "damaged (changed on the disk, or not a JSON object)", reading_id)  # fmt: skip
            return replace(found, outcome=AssignOutcome.DAMAGED, patient_id=None)
        new = _with_patient(obj, patient_id)
        day = day or str(stored_day)
        # Deleted and stored again, not updated in place: a new seq after every pending row,
        # where the uplink's cursor finds it now (the drain goes back to the lowest seq only
        # once per quarantine_retry_s); _high: a seq is never reused.
        new_seq = self._high(conn) + 1
        conn.execute("DELETE FROM readings WHERE seq = ?", (seq,))
        conn.execute(
            "INSERT INTO readings (seq, reading_id, topic, payload, patient_id, kind, measured_at,"
            " measured_day, valid, created_at, checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (new_seq, reading_id, topic, new, patient_id, kind, measured_at, day, valid, now,
             _checksum(new)),
        )  # fmt: skip
        conn.execute("COMMIT")  # synchronous=FULL: on the disk when this returns
        # See assign(): past max_pending is allowed, the policy takes it from here.
        self._counts.add(Counts(backlog=1, unattributed=-1))
        log.info("outbox: unattributed reading %s assigned (%s from %s); queued for publishing",
                 reading_id, kind, found.device_address)  # fmt: skip
        log.debug("outbox: reading %s assigned to patient %s", reading_id, patient_id)
        return replace(
            found, outcome=AssignOutcome.ASSIGNED, patient_id=patient_id, measured_day=day,
            seq=int(new_seq), assigned_at=_utc_z(now),
        )  # fmt: skip

    @staticmethod
    def _prune_delivered(conn: sqlite3.Connection, keep_since: str) -> int:
        """Delete delivered rows with delivered_at < keep_since; how many.

        No index on delivered_at (a delivered mark would write its page: schema v3). The table
        is walked in seq order from the oldest row, a chunk at a time, and the walk stops after
        the chunk holding the first row created at or after keep_since: a row is delivered
        after it is created, so no later row can be due. Only rows that are due are deleted;
        if the hub clock went backwards, some may wait for a later prune (kept longer, never
        deleted early). An hourly prune reads about an hour of rows plus what must be kept.
        """
        removed, cursor = 0, 0
        while True:
            rows = conn.execute(
                "SELECT seq, delivered_at, created_at FROM readings WHERE seq > ?"
                " ORDER BY seq LIMIT ?",
                (cursor, _IN_CHUNK),
            ).fetchall()
            due = [(int(seq),) for seq, delivered, _ in rows
                   if delivered is not None and str(delivered) < keep_since]  # fmt: skip
            if due:
                removed += conn.executemany("DELETE FROM readings WHERE seq = ?", due).rowcount
            if len(rows) < _IN_CHUNK or any(str(c) >= keep_since for _, _, c in rows):
                return removed
            cursor = int(rows[-1][0])

    def _prune_sync(self, conn: sqlite3.Connection) -> None:
        now = self._clock()
        cfg = self._cfg
        keep_since = _iso(now - timedelta(days=cfg.keep_delivered_days))
        conn.execute("BEGIN IMMEDIATE")
        high = self._high(conn)
        change = Counts()
        removed = self._prune_delivered(conn, keep_since)
        change.delivered -= removed
        # Unattributed readings are kept as long as delivered ones, for de-duplication and for
        # a technician to assign (assign()); past that they are dropped, and counted: a reading
        # nobody claimed is still a measurement the clinic never saw.
        removed_guests = conn.execute(
            "DELETE FROM readings WHERE patient_id IS NULL AND created_at < ?", (keep_since,)
        ).rowcount
        change.unattributed -= removed_guests
        guests_total = self._bump(conn, "unattributed_dropped", removed_guests) if removed_guests else 0
        # Age is a time-to-live whatever the policy: a reading undelivered for this long is
        # no use to the clinic, and keeping it would let one dead broker fill the disk.
        expired = self._deleted(conn.execute(
            "DELETE FROM readings"
            " WHERE delivered_at IS NULL AND patient_id IS NOT NULL AND created_at < ?"
            " RETURNING quarantined_at IS NOT NULL",
            (_iso(now - timedelta(days=cfg.max_pending_age_days)),),
        ))  # fmt: skip
        change.add(expired)
        self._log_dropped(conn, -expired.backlog,
                          f"undelivered for over {cfg.max_pending_age_days} days")  # fmt: skip
        backlog = self._counts.backlog + change.backlog
        excess = backlog - cfg.max_pending
        if cfg.when_full == "drop_oldest" and excess > 0:
            change.add(self._drop_oldest(conn, excess, "over max_pending"))
        elif excess >= 0:
            log.warning("outbox full (%s, when_full=reject_new): new readings are being rejected",
                        self._full_reason(backlog))  # fmt: skip
        self._hold_high(conn, high)
        conn.execute("COMMIT")
        self._counts.add(change)
        if removed:
            log.info("outbox: pruned %d delivered reading(s) older than %d days",
                     removed, cfg.keep_delivered_days)
        if removed_guests:
            # Counts only: which readings (and whose slot) is patient data, never logged here.
            log.info("outbox: dropped %d unattributed reading(s) nobody assigned within %d days; "
                     "%d dropped unassigned so far", removed_guests, cfg.keep_delivered_days,
                     guests_total)
