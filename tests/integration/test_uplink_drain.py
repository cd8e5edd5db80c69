"""The drain's shape (issue 8): rows fetched ahead, marks batched, never ahead of the PUBACKs,
and one status publisher.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest
from paho.mqtt.reasoncodes import ReasonCode

from gateway import uplink_drain
from gateway.broker import LocalBroker
from gateway.outbox import Outbox, Pending
from gateway.uplink import Uplink
from gateway.uplink_client import MqttLink, OnAck
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


async def test_readings_waiting_for_their_mark_are_bounded_however_slow_the_outbox(
    mosquitto: LocalBroker, outbox: Outbox, mqtt_subscriber: Subscribe,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A kill -9 sends again what was acknowledged but not yet marked: with marks that take
    # 0.3 s each (a slow SD card), the drain must stop and mark rather than run ahead.
    monkeypatch.setattr(uplink_drain, "MAX_UNMARKED", 40)
    sub = await mqtt_subscriber(mosquitto, READINGS)
    n = 400
    for start in range(0, n, 100):
        await asyncio.gather(*(outbox.put(make_item(i)) for i in range(start, start + 100)))
    cfg = mqtt_cfg(mosquitto.host, mosquitto.port)
    uplink = Uplink(cfg, HUB, outbox, status_provider)
    mark = outbox.mark_delivered
    marked = 0
    waiting: list[int] = []  # acknowledged, not yet marked, at every mark

    async def slow_mark(seqs: Sequence[int]) -> None:
        nonlocal marked
        waiting.append(uplink.counters.acked - marked)
        await asyncio.sleep(0.3)
        await mark(seqs)
        marked += len(seqs)

    monkeypatch.setattr(outbox, "mark_delivered", slow_mark)
    async with running(uplink):
        await sub.wait_for(n, timeout=30)
        await eventually(lambda: marked == n, "all marked", timeout=30)
    # Checked by mutation: without the bound the drain ran all 400 out during the first mark.
    assert max(waiting) <= 40 + 2 * cfg.inflight, waiting


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
    rid_of: dict[int, str] = {}  # seq -> reading_id, from the pending rows the drain fetched
    pubacked: set[str] = set()  # reading_ids whose PUBACK (a success code) paho has handed over
    pending, mark, send = outbox.pending, outbox.mark_delivered, MqttLink.send

    async def spy_pending(limit: int, after_seq: int = 0) -> list[Pending]:
        fetches.append(limit)
        rows = await pending(limit, after_seq)
        rid_of.update((p.seq, p.reading_id) for p in rows)
        return rows

    def spy_send(link: MqttLink, topic: str, payload: bytes, *, on_ack: OnAck,
                 retain: bool = False) -> None:
        # Below the drain: which reading this PUBLISH carried, and when its own PUBACK (matched
        # by paho on the message id) reached the drain with a success code. Every 25th is held
        # back 0.2 s, as a slow broker would: longer than the marks gather, so a mark that ran
        # ahead of a PUBACK is caught here rather than hidden by the PUBACK arriving meanwhile.
        body = json.loads(payload) if topic == READINGS else {}
        rid, late = body.get("reading_id"), body.get("n", 1) % 25 == 0

        def handed_over(rc: ReasonCode) -> None:
            if rid is not None and not rc.is_failure:
                pubacked.add(rid)
            on_ack(rc)

        def acked(rc: ReasonCode) -> None:
            if late:
                asyncio.get_running_loop().call_later(0.2, handed_over, rc)
            else:
                handed_over(rc)

        send(link, topic, payload, on_ack=acked, retain=retain)

    async def spy_mark(seqs: Sequence[int]) -> None:
        # Every seq marked is one whose own message the broker PUBACK'd before this call
        # (identities, not only totals). (A mark cancelled at shutdown is done again by the
        # session's last flush: counted once here.)
        unacked = [s for s in seqs if rid_of.get(s) not in pubacked]
        assert not unacked, f"marked before their PUBACK: seqs {unacked[:10]}"
        assert sum(len(m) for m in marks) + len(seqs) <= uplink.counters.acked
        await mark(seqs)
        marks.append(list(seqs))

    monkeypatch.setattr(MqttLink, "send", spy_send)
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
    # And each marked seq's reading reached a real subscriber (the broker forwards a QoS 1
    # PUBLISH as it takes it; which socket our loop reads first is not ordered, so at the end).
    assert {rid_of[s] for s in marked} == set(reading_ids(sub)) == pubacked
    # Whole batches of rows, not one window at a time; many PUBACKs per transaction.
    assert all(limit == FETCH_ROWS for limit in fetches) and cfg.inflight < FETCH_ROWS
    assert len(fetches) <= n // FETCH_ROWS + 3
    assert len(marks) < n // cfg.inflight


async def test_the_status_is_published_on_connect_and_when_asked_not_on_a_timer_of_its_own(
    mosquitto: LocalBroker, outbox: Outbox, mqtt_subscriber: Subscribe
) -> None:
    # The agent's housekeeping asks once a minute with fresh outbox figures (gateway/agent.py
    # builds Uplink(cfg, hub, outbox, status) and calls status_changed()): the uplink's own
    # 60 s timer published the same status a second time.
    sub = await mqtt_subscriber(mosquitto, STATUS)
    uplink = Uplink(mqtt_cfg(mosquitto.host, mosquitto.port), HUB, outbox, status_provider)
    async with running(uplink):
        await sub.wait_for(1)
        # In 1.5 s nothing unasked: a timer of any interval up to 1.5 s would have published
        # the status again (and the code has no timer to set to more).
        await asyncio.sleep(1.5)
        assert len(sub.messages) == 1
        for n in (2, 3):  # each request: one status, promptly
            uplink.status_changed()
            await sub.wait_for(n, timeout=1)
        await asyncio.sleep(0.5)
        assert len(sub.messages) == 3

