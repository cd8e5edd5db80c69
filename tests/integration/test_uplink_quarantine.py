"""One bad reading must not block the queue (issue 5 item 7).

Before: any failure PUBACK ended the delivery session and the drain restarted at the lowest seq,
so nothing behind a refused reading was ever delivered (0 of 300, 82 re-sends).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gateway.broker import LocalBroker
from gateway.outbox import Outbox, OutboxItem
from gateway.uplink import Uplink
from gateway.uplink_client import publish_packet_size
from gateway.uplink_codes import is_transient
from tests.conftest import make_item
from tests.integration.test_uplink import (
    HUB,
    READINGS,
    Subscribe,
    eventually,
    first_arrivals,
    mqtt_cfg,
    mqtt_front,
    reading_ids,
    running,
    status_provider,
)

pytestmark = pytest.mark.integration

N = 300
BAD = 150  # the oversize reading sits in the middle of the queue
LIMIT = 10_000


def queue_with_one_oversize() -> list[OutboxItem]:
    """N normal readings with one far over LIMIT at position BAD."""
    return [make_item(i, extra=b" " * (3 * LIMIT if i == BAD else 0)) for i in range(N + 1)]


async def _deliver_all_but_the_bad_one(
    broker: LocalBroker, outbox: Outbox, mqtt_subscriber: Subscribe
) -> tuple[Uplink, list[dict[str, object]]]:
    sub = await mqtt_subscriber(broker, READINGS)
    events = await mqtt_subscriber(broker, f"rpm/{HUB}/events")
    items = queue_with_one_oversize()
    for item in items:
        await outbox.put(item)
    uplink = Uplink(mqtt_cfg(broker.host, broker.port), HUB, outbox, status_provider)
    async with running(uplink):
        await sub.wait_for(N, timeout=10)
        await events.wait_for(1)
        await eventually(lambda: uplink.counters.acked == N, "every normal reading acked")
        await asyncio.sleep(0.3)  # and the bad one is not sent again
        assert uplink.connected and uplink.counters.reconnects == 0  # on the same connection
        status = uplink.broker_status()
    good = [item.reading_id for i, item in enumerate(items) if i != BAD]
    assert first_arrivals(reading_ids(sub)) == good
    stats = await outbox.stats()
    assert stats.delivered == N and stats.quarantined == 1 and stats.pending == 0
    assert uplink.counters.quarantined == 1 and status["quarantined"] == 1
    quarantined = [p for p in events.payloads() if p["event"] == "reading_quarantined"]
    assert len(quarantined) == 1
    detail = quarantined[0]["detail"]
    assert isinstance(detail, dict) and detail["seq"] == BAD + 1
    assert set(detail) == {"seq", "reason"}  # no patient data in the event
    return uplink, quarantined


async def test_reading_over_the_brokers_maximum_packet_size_is_quarantined_unsent(
    broker_factory: Callable[..., Awaitable[LocalBroker]], outbox: Outbox, mqtt_subscriber: Subscribe
) -> None:
    # MQTT 5 CONNACK carries Maximum Packet Size; mosquitto disconnects a client that sends more.
    broker = await broker_factory(extra_config=[f"max_packet_size {LIMIT}"])
    uplink, events = await _deliver_all_but_the_bad_one(broker, outbox, mqtt_subscriber)
    assert uplink.counters.published == N  # the oversize one never went on the wire
    reason = str(events[0]["detail"]["reason"])  # type: ignore[index]
    assert reason.startswith("packet too large:") and f"at most {LIMIT}" in reason


async def test_reading_refused_as_too_large_by_puback_is_quarantined(
    broker_factory: Callable[..., Awaitable[LocalBroker]], outbox: Outbox, mqtt_subscriber: Subscribe
) -> None:
    # message_size_limit is not announced: mosquitto takes the PUBLISH and answers PUBACK 0x95,
    # a code paho rejects as malformed in a PUBACK (it used to drop the connection on it).
    broker = await broker_factory(extra_config=[f"message_size_limit {LIMIT}"])
    uplink, events = await _deliver_all_but_the_bad_one(broker, outbox, mqtt_subscriber)
    assert uplink.counters.published == N + 1 and uplink.counters.rejected == 1  # sent once
    assert events[0]["detail"]["reason"] == "broker refused it: 0x95 Packet too large"  # type: ignore[index]


async def test_transient_refusal_keeps_the_reading_pending_and_retries_it(
    mosquitto: LocalBroker, outbox: Outbox, mqtt_subscriber: Subscribe
) -> None:
    sub = await mqtt_subscriber(mosquitto, READINGS)
    await outbox.put(make_item(1))
    async with mqtt_front(mosquitto) as front:
        front.reading_puback = 0x97  # quota exceeded: the broker will take it later
        uplink = Uplink(mqtt_cfg(front.host, front.port), HUB, outbox, status_provider)
        async with running(uplink):
            await eventually(lambda: uplink.counters.rejected >= 2, "refused, then retried")
            assert uplink.counters.quarantined == 0
            assert (await outbox.stats()).pending == 1
            front.reading_puback = None  # quota available again
            await sub.wait_for(1)
            await eventually(lambda: uplink.counters.acked == 1, "acked")
    # (The front refused only the PUBACK: the broker had taken each copy, hence duplicates.)
    assert set(reading_ids(sub)) == {"r-000001"}
    assert (await outbox.stats()).quarantined == 0


async def test_a_quarantined_reading_is_offered_again_on_the_slow_schedule(
    mosquitto: LocalBroker, outbox: Outbox
) -> None:
    await outbox.put(make_item(1))
    async with mqtt_front(mosquitto) as front:
        front.reading_puback = 0x87  # not authorized: an ACL an operator may still fix
        # The retry must come well after the 0.5 s look below, even on a loaded machine.
        cfg = mqtt_cfg(front.host, front.port, quarantine_retry_s=2.0)
        uplink = Uplink(cfg, HUB, outbox, status_provider)
        async with running(uplink):
            await eventually(lambda: uplink.counters.quarantined == 1, "quarantined")
            await asyncio.sleep(0.5)
            assert uplink.counters.published == 1  # not resent in a loop
            front.reading_puback = None  # the ACL was fixed
            # Retried after quarantine_retry_s on the same connection, without a reconnect.
            await eventually(lambda: uplink.counters.acked == 1, "acked")
            assert uplink.counters.reconnects == 0 and uplink.counters.published == 2
    assert (await outbox.stats()).delivered == 1


async def test_readings_quarantined_before_a_restart_are_offered_again_on_a_live_connection(
    mosquitto: LocalBroker, outbox: Outbox, mqtt_subscriber: Subscribe
) -> None:
    # A previous run quarantined it; this uplink never saw the refusal, so only its periodic
    # sweep (every quarantine_retry_s) can find the row once it is due.
    sub = await mqtt_subscriber(mosquitto, READINGS)
    await outbox.put(make_item(1))
    [row] = await outbox.pending(1)
    await outbox.quarantine(row.seq, "broker refused it: 0x87 Not authorized", 0.5)
    cfg = mqtt_cfg(mosquitto.host, mosquitto.port, quarantine_retry_s=0.5)
    uplink = Uplink(cfg, HUB, outbox, status_provider)
    async with running(uplink):
        await eventually(lambda: uplink.connected, "connected")
        await sub.wait_for(1, timeout=5)
        assert uplink.counters.reconnects == 0
    assert reading_ids(sub) == ["r-000001"]


async def test_the_packet_size_limit_is_counted_as_the_broker_counts_it(
    broker_factory: Callable[..., Awaitable[LocalBroker]], outbox: Outbox, mqtt_subscriber: Subscribe
) -> None:
    # One reading exactly at the limit (sent, taken) and one a byte over (quarantined unsent):
    # a size computed too small would get the connection dropped, too large would hold back a
    # reading the broker would take.
    broker = await broker_factory(extra_config=[f"max_packet_size {LIMIT}"])
    sub = await mqtt_subscriber(broker, READINGS)
    topic = f"rpm/{HUB}/readings"
    for n, size in ((1, LIMIT), (2, LIMIT + 1)):
        pad = size - publish_packet_size(topic, make_item(n).payload)
        while publish_packet_size(topic, make_item(n, extra=b" " * pad).payload) > size:
            pad -= 1  # the remaining-length field itself grew by a byte
        item = make_item(n, extra=b" " * pad)
        assert publish_packet_size(topic, item.payload) == size
        await outbox.put(item)
    uplink = Uplink(mqtt_cfg(broker.host, broker.port), HUB, outbox, status_provider)
    async with running(uplink):
        await sub.wait_for(1)
        await eventually(lambda: uplink.counters.quarantined == 1, "the larger one held back")
        await eventually(lambda: uplink.counters.acked == 1, "the one at the limit acked")
        assert uplink.connected and uplink.counters.reconnects == 0
    assert reading_ids(sub) == ["r-000001"]


@pytest.mark.parametrize(
    ("code", "transient"),
    [(0x97, True), (0x91, True), (0x89, True), (0x87, False), (0x90, False), (0x95, False),
     (0x99, False), (0x80, False), (0x83, False), (0x9F, False)],
)  # fmt: skip
def test_puback_refusals_are_classified(code: int, transient: bool) -> None:
    # Quota and busy: retried soon. The rest, unknown codes included, are quarantined (kept,
    # retried rarely) so they cannot block the queue.
    assert is_transient(code) is transient


async def test_a_retry_refused_again_is_not_counted_or_reported_again(
    mosquitto: LocalBroker, outbox: Outbox
) -> None:
    # Found in review: every hourly retry of a refused reading counted it again and published
    # another event (an ACL refusing 5,000 readings: 5,000 events an hour, for ever).
    await outbox.put(make_item(1))
    async with mqtt_front(mosquitto) as front:
        front.reading_puback = 0x87
        cfg = mqtt_cfg(front.host, front.port, quarantine_retry_s=0.3)
        uplink = Uplink(cfg, HUB, outbox, status_provider)
        async with running(uplink):
            await eventually(lambda: uplink.counters.published >= 3, "offered again twice")
            assert uplink.counters.quarantined == 1
            assert uplink.broker_status()["quarantined"] == 1
    assert (await outbox.stats()).quarantined == 1
