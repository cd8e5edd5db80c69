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
import tempfile
from collections.abc import Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gateway.outbox import Outbox, PutResult
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
