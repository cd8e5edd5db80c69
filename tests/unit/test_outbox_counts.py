"""The outbox's in-memory counts against COUNT(*), and seqs never reused, over random histories.

The counts (backlog, quarantined, unattributed, delivered) are derived once at open and then
kept by each write from the rows it touched (gateway/outbox_counts.py); a hypothesis state
machine drives put / mark / quarantine / prune / assign / the size policy / reopen in any order
and compares them with a full recount after every step. It also holds every seq the outbox ever
showed to its reading: schema v3 has no AUTOINCREMENT, and a seq given again to another reading
could be marked delivered by the first one's PUBACK.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import tempfile
from collections.abc import Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import gateway.outbox
from gateway.outbox import Outbox, PutResult, StorageError
from gateway.outbox_counts import Counts, count_rows
from tests.conftest import Clock, make_item, small

T = TypeVar("T")


class OutboxHistory(RuleBasedStateMachine):
    """Random operations on one outbox file; the counts and seqs are checked after each."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.TemporaryDirectory()
        self.clock = Clock()
        self.ob: Outbox | None = None
        self.seqs: dict[int, str] = {}  # every seq seen -> its reading_id
        self.guests: set[int] = set()  # item numbers put unattributed

    def _do(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    @property
    def outbox(self) -> Outbox:
        assert self.ob is not None
        return self.ob

    @initialize(policy=st.sampled_from(["reject_new", "drop_oldest"]),
                max_pending=st.integers(2, 8))  # fmt: skip
    def open(self, policy: str, max_pending: int) -> None:
        self.cfg = small(max_pending=max_pending, when_full=policy, keep_delivered_days=2,
                         max_pending_age_days=4)  # fmt: skip
        self.ob = Outbox(Path(self.dir.name) / "o.db", self.cfg, clock=self.clock)
        self._do(self.ob.open())

    def _see(self, seq: int, reading_id: str) -> None:
        assert self.seqs.setdefault(seq, reading_id) == reading_id, f"seq {seq} reused"

    @rule(n=st.integers(0, 30), attributed=st.booleans(), confirmed=st.booleans())
    def put(self, n: int, attributed: bool, confirmed: bool) -> None:
        item = make_item(n)
        if not attributed:
            item = dataclasses.replace(item, patient_id=None)
            self.guests.add(n)
        self._do(self.outbox.put(item, confirmed=confirmed))

    @rule(ns=st.lists(st.integers(0, 30), min_size=2, max_size=6))
    def burst(self, ns: list[int]) -> None:
        async def together() -> list[PutResult]:
            return await asyncio.gather(*(self.outbox.put(make_item(n)) for n in ns))

        self._do(together())

    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        pending = self._do(self.outbox.pending(100))
        for p in pending:
            self._see(p.seq, p.reading_id)
        seqs = [p.seq for p in pending]
        chosen = data.draw(st.lists(st.sampled_from(seqs), max_size=5)) if seqs else []
        self._do(self.outbox.mark_delivered([*chosen, 10_000]))  # an unknown seq is ignored

    @rule(data=st.data(), retry=st.sampled_from([None, 0.0, 3600.0]))
    def quarantine(self, data: st.DataObject, retry: float | None) -> None:
        pending = self._do(self.outbox.pending(100))
        if pending:
            p = data.draw(st.sampled_from(pending))
            self._do(self.outbox.quarantine(p.seq, "refused", retry_after_s=retry))

    @rule(n=st.integers(0, 30))
    def assign(self, n: int) -> None:
        result = self._do(self.outbox.assign(make_item(n).reading_id, "patient-7"))
        if result.ok:
            assert result.seq is not None
            self._see(result.seq, result.reading_id)

    @rule(days=st.sampled_from([0, 1, 3, 5]))
    def prune(self, days: int) -> None:
        self.clock.now += timedelta(days=days)
        self._do(self.outbox.prune())

    @rule()
    def reopen(self) -> None:
        self._do(self.outbox.close())
        self.ob = Outbox(Path(self.dir.name) / "o.db", self.cfg, clock=self.clock)
        self._do(self.ob.open())

    @invariant()
    @precondition(lambda self: self.ob is not None)
    def counts_match_a_recount(self) -> None:
        ob = self.outbox

        def check(conn: object) -> tuple[Counts, list[tuple[int, str]]]:
            assert conn is ob._conn and ob._conn is not None
            rows = ob._conn.execute("SELECT seq, reading_id FROM readings").fetchall()
            return count_rows(ob._conn), rows

        recount, rows = self._do(ob._run(check))
        assert ob._counts == recount
        for seq, rid in rows:
            self._see(seq, rid)
        stats = self._do(ob.stats())
        assert stats.pending == recount.backlog - recount.quarantined
        assert (stats.quarantined, stats.unattributed, stats.delivered) == (
            recount.quarantined, recount.unattributed, recount.delivered)  # fmt: skip

    def teardown(self) -> None:
        if self.ob is not None:
            self._do(self.ob.close())
        self.loop.close()
        self.dir.cleanup()


OutboxHistory.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
test_counts_and_seqs_over_random_histories = pytest.mark.filterwarnings("ignore")(
    OutboxHistory.TestCase
)


class _CommitThenFail:
    """The outbox's connection, whose next COMMIT commits and then raises SQLITE_IOERR_FSYNC.

    A stand-in for an fsync that fails after the commit frame reached the WAL: no filesystem
    these tests can mount fails an fsync on demand (tmpfs never does, a full disk fails the
    frame writes before the commit frame, so that transaction is not durable). Only the COMMIT
    statement is touched; every other call is the real connection's. ``fail_count`` also
    makes the next full recount (count_rows) fail once, as a read on a failing card would.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.armed = False
        self.fail_count = False

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.fail_count and "SELECT COUNT(*)" in sql:
            self.fail_count = False
            raise self._error("disk I/O error")
        cursor = self._conn.execute(sql, *args)
        if self.armed and sql.strip().upper() == "COMMIT":
            self.armed = False
            raise self._error("disk I/O error (fsync, after the commit frame was written)")
        return cursor

    @staticmethod
    def _error(text: str) -> sqlite3.OperationalError:
        e = sqlite3.OperationalError(text)
        e.sqlite_errorcode = sqlite3.SQLITE_IOERR_FSYNC  # type: ignore[attr-defined]
        e.sqlite_errorname = "SQLITE_IOERR_FSYNC"  # type: ignore[attr-defined]
        return e

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _faulty(ob: Outbox) -> _CommitThenFail:
    assert ob._conn is not None
    proxy = _CommitThenFail(ob._conn)
    ob._conn = proxy  # type: ignore[assignment]
    return proxy


async def _recount(ob: Outbox) -> Counts:
    return await ob._run(count_rows)


@pytest.mark.parametrize("recount_fails", [False, True])
async def test_a_commit_that_raises_after_it_is_durable_leaves_no_drift_drop_oldest(
    tmp_path: Path, recount_fails: bool
) -> None:
    # Two delivered marks commit but raise: counts left as they were would say 2 pending of 2,
    # and the next put (drop_oldest) would drop a real reading, the one just stored.
    async with Outbox(tmp_path / "o.db", small(max_pending=2, when_full="drop_oldest")) as ob:
        await ob.put(make_item(1))
        await ob.put(make_item(2))
        fault = _faulty(ob)
        fault.armed, fault.fail_count = True, recount_fails
        with pytest.raises(StorageError, match="fsync"):
            await ob.mark_delivered([p.seq for p in await ob.pending(10)])
        assert ob._counts_stale is recount_fails
        assert await ob.pending(10) == []  # the marks are on the disk
        assert await ob.put(make_item(3)) is PutResult.STORED
        assert [p.reading_id for p in await ob.pending(10)] == ["r-000003"]  # nothing dropped
        stats = await ob.stats()
        assert (stats.pending, stats.delivered, stats.dropped) == (1, 2, 0)
        assert ob._counts == await _recount(ob)


async def test_a_commit_that_raises_after_it_is_durable_leaves_no_drift_reject_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.outbox, "_PROBE_INTERVAL_S", 0.0)
    # The same with reject_new: an inflated backlog would shut the gate with nothing pending.
    async with Outbox(tmp_path / "o.db", small(max_pending=2, when_full="reject_new")) as ob:
        await ob.put(make_item(1))
        await ob.put(make_item(2))
        assert (await ob.accepting() or "").startswith("outbox full")
        _faulty(ob).armed = True
        with pytest.raises(StorageError):
            await ob.mark_delivered([p.seq for p in await ob.pending(10)])
        assert await ob.accepting() is None  # the probe's write works; nothing is pending
        assert await ob.put(make_item(3)) is PutResult.STORED
        assert ob._counts == await _recount(ob)
        # A put that commits and raises: the reading is stored, and counted.
        _faulty(ob).armed = True
        with pytest.raises(StorageError):
            await ob.put(make_item(4))
        assert ob._counts == await _recount(ob)
        assert (await ob.stats()).pending == 2
        assert await ob.put(make_item(4)) is PutResult.DUPLICATE
