"""The drain's shape (issue 8): rows fetched ahead, marks batched, never ahead of the PUBACKs,
and one status publisher.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.broker import LocalBroker
from gateway.outbox import Outbox, Pending
from gateway.uplink import Uplink
from gateway.uplink_drain import FETCH_ROWS
from tests.conftest import make_item
from tests.integration.test_uplink import (
    HUB,
    READINGS,
    STATUS,
    Subscribe,
    eventually,
    first_arrivals,
    mqtt_cfg,
    reading_ids,
    running,
    status_provider,
)

pytestmark = pytest.mark.integration


async def test_a_backlog_is_fetched_ahead_and_marked_in_batches_never_before_its_puback(
    mosquitto: LocalBroker, outbox: Outbox, mqtt_subscriber: Subscribe,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sub = await mqtt_subscriber(mosquitto, READINGS)
    n = 1000
    for start in range(0, n, 100):  # handed over together: a few commits, not a thousand
        await asyncio.gather(*(outbox.put(make_item(i)) for i in range(start, start + 100)))
    cfg = mqtt_cfg(mosquitto.host, mosquitto.port)
    uplink = Uplink(cfg, HUB, outbox, status_provider)
    fetches: list[int] = []
    marks: list[list[int]] = []
    pending, mark = outbox.pending, outbox.mark_delivered

    async def spy_pending(limit: int, after_seq: int = 0) -> list[Pending]:
        fetches.append(limit)
        return await pending(limit, after_seq)

    async def spy_mark(seqs: Sequence[int]) -> None:
        # Every seq marked so far had its PUBACK (a success code) before this call. (A mark
        # cancelled at shutdown is done again by the session's last flush: counted once here.)
        assert sum(len(m) for m in marks) + len(seqs) <= uplink.counters.acked
        await mark(seqs)
        marks.append(list(seqs))

    monkeypatch.setattr(outbox, "pending", spy_pending)
    monkeypatch.setattr(outbox, "mark_delivered", spy_mark)
    async with running(uplink):
        await sub.wait_for(n, timeout=20)
        await eventually(lambda: uplink.counters.acked == n, "all acked", timeout=10)
        await eventually(lambda: sum(len(m) for m in marks) == n, "all marked", timeout=10)
    assert first_arrivals(reading_ids(sub)) == [f"r-{i:06d}" for i in range(n)]
    assert (await outbox.stats()).delivered == n
    marked = [s for m in marks for s in m]
    assert len(marked) == len(set(marked)) == n  # each once
    # Whole batches of rows, not one window at a time; many PUBACKs per transaction.
    assert all(limit == FETCH_ROWS for limit in fetches) and cfg.inflight < FETCH_ROWS
    assert len(fetches) <= n // FETCH_ROWS + 3
    assert len(marks) < n // cfg.inflight


async def test_the_status_is_published_on_connect_and_when_asked_not_on_a_timer_of_its_own(
    mosquitto: LocalBroker, outbox: Outbox, mqtt_subscriber: Subscribe
) -> None:
    # The agent's housekeeping asks once a minute with fresh outbox figures: the uplink's own
    # 60 s timer published the same status a second time.
    sub = await mqtt_subscriber(mosquitto, STATUS)
    uplink = Uplink(mqtt_cfg(mosquitto.host, mosquitto.port), HUB, outbox, status_provider)
    async with running(uplink):
        await sub.wait_for(1)
        await asyncio.sleep(0.3)
        assert len(sub.messages) == 1
        uplink.status_changed()
        await sub.wait_for(2)
    timed = Uplink(mqtt_cfg(mosquitto.host, mosquitto.port), HUB, outbox, status_provider,
                   status_interval_s=0.1)
    async with running(timed):  # an uplink without such an owner can still have a timer
        await sub.wait_for(6)
