"""Batched marks across `kill -9` of the agent process (issue 8's price, measured).

Acknowledged seqs gather MARK_GATHER_S before one transaction marks them, so a SIGKILL loses
the marks of readings the broker already took: they are sent again after the restart, as
duplicates (same reading_id). What must never happen: a row marked delivered whose reading the
broker never had (a loss), or more duplicates than the drain lets wait for their mark
(MAX_UNMARKED, plus the window in flight and the window acknowledged while a mark commits).
Each kill's duplicates are printed (-s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway.broker import LocalBroker
from gateway.config import MqttConfig, OutboxConfig
from gateway.outbox import Outbox
from gateway.uplink_drain import MAX_UNMARKED
from tests.conftest import MqttSubscriber, make_item
from tests.integration.hub_toml import hub_toml
from tests.integration.test_agent_process import HUB, agent_process, stop
from tests.integration.test_uplink import Subscribe, eventually

pytestmark = pytest.mark.integration

N = 2000
KILL_AT = (500, 1000, 1500)  # distinct readings the subscriber has when the agent is killed
INFLIGHT = 2
NO_DEVICES = '[radio]\nkind = "virtual"\nquiet_s = 0.5\n'


def marked(db: Path) -> dict[int, str]:
    """seq -> reading_id of every row marked delivered, read-only, the agent dead."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        rows = conn.execute(
            "SELECT seq, reading_id FROM readings WHERE delivered_at IS NOT NULL").fetchall()
    return {int(seq): str(rid) for seq, rid in rows}


class Received:
    """reading_id of every message, in arrival order, decoded once (checked on every arrival)."""

    def __init__(self, sub: MqttSubscriber) -> None:
        self._sub = sub
        self.ids: list[str] = []
        self.distinct: set[str] = set()

    def update(self) -> list[str]:
        for m in self._sub.messages[len(self.ids):]:
            rid = json.loads(bytes(m.payload))["reading_id"]
            self.ids.append(rid)
            self.distinct.add(rid)
        return self.ids


async def test_kill_9_during_a_drain_never_marks_ahead_and_duplicates_stay_bounded(
    tmp_path: Path, broker_factory: Callable[..., Awaitable[LocalBroker]],
    mqtt_subscriber: Subscribe,
) -> None:
    # No limit on what mosquitto queues for the subscriber: the drain outruns it, and at the
    # default (1000) mosquitto drops QoS 1 messages for it, which would read as losses here.
    broker = await broker_factory(extra_config=["max_queued_messages 0"])
    sub = await mqtt_subscriber(broker, f"rpm/{HUB}/readings", client_id="clinic",
                                persistent=True)
    rx = Received(sub)

    def ids(_: object = None) -> list[str]:
        return rx.update()

    def distinct(_: object = None) -> int:
        rx.update()
        return len(rx.distinct)

    state = tmp_path / "state"
    state.mkdir()
    db = state / "outbox.db"
    async with Outbox(db, OutboxConfig()) as ob:
        for first in range(0, N, 200):  # handed over together: a few commits
            await asyncio.gather(*(ob.put(make_item(i)) for i in range(first, first + 200)))
    config = tmp_path / "gateway.toml"
    # A narrow window keeps the agent's drain near the pace at which this process's subscriber
    # reads (with the default 20 the agent had marked all 2,000 before the subscriber had 500).
    inflight = INFLIGHT
    config.write_text(hub_toml(HUB, state, broker, radio=NO_DEVICES, log_level="info").replace(
        "[mqtt]\n", f"[mqtt]\ninflight = {inflight}\n"))
    assert MqttConfig(inflight=inflight).inflight == inflight
    bound = MAX_UNMARKED + 2 * inflight
    restarts: list[int] = []  # len(sub.messages) when each next agent started
    figures: list[tuple[int, int, int]] = []  # (distinct at the kill, marked, broker had)
    for kill_at in KILL_AT:
        # Killed once the subscriber has kill_at readings, and this agent has sent new ones.
        floor = min(max(kill_at, distinct() + 100), N)
        async with agent_process(config) as proc:
            await sub.wait_until(lambda _: distinct() >= floor, timeout=60)  # noqa: B023
            proc.kill()  # SIGKILL: no last flush of the marks
            at_kill = distinct()
            await proc.wait()
        done = marked(db)
        assert len(done) < N, "the drain finished before the kill: nothing was tested"
        # A mark follows its PUBACK, and mosquitto forwards a QoS 1 reading to the subscriber
        # as it takes it: every marked reading reaches the subscriber (a bounded wait for
        # those still on their way through our own socket).
        taken = set(done.values())
        await sub.wait_until(lambda _: ids() is not None and taken <= rx.distinct,  # noqa: B023
                             timeout=5)
        await asyncio.sleep(0.3)  # what the broker took before the kill lands before the restart
        # Marks follow the PUBACKs, which come in seq order: what is marked is a prefix of what
        # the broker had, and every reading the broker had but not marked comes after it.
        assert max(done) == len(done)  # seqs 1..M (one put per seq)
        unmarked = {f"r-{i:06d}" for i in range(len(done), N)} & rx.distinct
        assert not unmarked or min(unmarked) > max(taken)
        figures.append((at_kill, len(done), distinct()))
        restarts.append(len(sub.messages))
    async with agent_process(config) as proc:
        await sub.wait_until(lambda _: distinct() >= N, timeout=60)
        await eventually(lambda: len(marked(db)) == N, "every reading marked", timeout=30)
        code, log = await stop(proc)
    assert code == 0, log
    got = ids()
    assert set(got) == {f"r-{i:06d}" for i in range(N)}  # none lost
    # After each restart, the readings sent again: the broker had them, the kill lost the mark.
    ends = [*restarts[1:], len(got)]
    resent = [sum(1 for rid in got[start:end] if rid in set(got[:start]))
              for start, end in zip(restarts, ends, strict=True)]
    print(f"\nkills (distinct at kill, marked, broker had): {figures}; duplicates {resent} "
          f"(bound {bound}); {len(got)} messages for {N} readings")
    assert resent == [had - m for _, m, had in figures]  # exactly the unmarked ones, once
    assert sum(n - 1 for n in Counter(got).values()) == sum(resent)  # no other duplicates
    assert max(resent) <= bound, resent
