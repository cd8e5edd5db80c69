"""Which MQTT version the uplink speaks: MQTT 5 unless the broker refuses it (issue 5 item 5).

On MQTT 3.1.1 a broker acknowledges a PUBLISH it refuses (ACL), so a silent downgrade after a
timeout marked 200 of 200 refused readings delivered: they were lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from faults.proxy import TcpProxy
from gateway.broker import LocalBroker
from gateway.outbox import Outbox
from gateway.uplink import Uplink
from tests.conftest import make_item
from tests.integration.test_uplink import (
    HUB,
    READINGS,
    Subscribe,
    eventually,
    mqtt_cfg,
    mqtt_front,
    reading_ids,
    running,
    status_provider,
)

pytestmark = pytest.mark.integration

# A CONNACK refusing the protocol version, as a 3.1.1-only broker (code 1) or an MQTT 5 one
# configured without version 5 (0x84, with an empty property list) sends it.
REFUSED_311 = b"\x20\x02\x00\x01"
REFUSED_V5 = b"\x20\x03\x00\x84\x00"


async def test_frozen_network_at_connect_is_a_failed_attempt_not_a_downgrade(
    mosquitto: LocalBroker,
    outbox: Outbox,
    mqtt_subscriber: Subscribe,
    tcp_proxy: Callable[[str, int], Awaitable[TcpProxy]],
) -> None:
    async with mqtt_front(mosquitto) as front:
        proxy = await tcp_proxy(front.host, front.port)
        proxy.freeze()  # connections are accepted, nothing goes through: no CONNACK
        sub = await mqtt_subscriber(mosquitto, READINGS)
        await outbox.put(make_item(1))
        cfg = mqtt_cfg(proxy.host, proxy.port, publish_timeout_s=0.3)
        uplink = Uplink(cfg, HUB, outbox, status_provider)
        async with running(uplink):
            await eventually(lambda: uplink.counters.reconnects >= 3, "several timed-out attempts")
            assert not uplink.connected and uplink.protocol == "5"
            status = uplink.broker_status()
            assert status["state"] == "unreachable" and status["protocol"] == "5"
            assert "no CONNACK within 0.3s" in str(status["last_error"])
            proxy.thaw()
            await sub.wait_for(1)
            assert uplink.protocol == "5"
    # Every CONNECT that reached the broker side, the held ones included, asked for MQTT 5.
    assert front.levels and set(front.levels) == {5}


@pytest.fixture
async def acl_broker(
    broker_factory: Callable[..., Awaitable[LocalBroker]], tmp_path: Path
) -> LocalBroker:
    """mosquitto that lets the hub publish status and events but not readings."""
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite rpm/+/status\ntopic readwrite rpm/+/events\ntopic read rpm/#\n")
    return await broker_factory(extra_config=[f"acl_file {acl}"])


async def test_refused_readings_are_not_lost_after_a_connect_timeout(
    acl_broker: LocalBroker, outbox: Outbox, mqtt_subscriber: Subscribe
) -> None:
    # The fault test's case: the first CONNECT goes unanswered (a frozen network), then the
    # broker answers; it refuses readings (ACL). On 3.1.1 it would have acknowledged them.
    sub = await mqtt_subscriber(acl_broker, READINGS)
    n = 200
    for i in range(n):
        await outbox.put(make_item(i))
    async with mqtt_front(acl_broker) as front:
        front.swallow_connects = 1
        cfg = mqtt_cfg(front.host, front.port, publish_timeout_s=0.3)
        uplink = Uplink(cfg, HUB, outbox, status_provider)
        async with running(uplink):
            await eventually(lambda: uplink.counters.quarantined == n, "every refused reading held")
            assert uplink.connected and uplink.protocol == "5"
    assert front.levels == [5, 5]
    stats = await outbox.stats()
    assert stats.delivered == 0 and uplink.counters.acked == 0
    assert stats.quarantined == n
    assert sub.messages == []


@pytest.mark.parametrize("connack", [REFUSED_311, REFUSED_V5], ids=["rc1", "0x84"])
async def test_falls_back_to_311_only_when_the_broker_refuses_mqtt_5(
    mosquitto: LocalBroker,
    outbox: Outbox,
    mqtt_subscriber: Subscribe,
    caplog: pytest.LogCaptureFixture,
    connack: bytes,
) -> None:
    sub = await mqtt_subscriber(mosquitto, READINGS)
    for i in range(5):
        await outbox.put(make_item(i))
    async with mqtt_front(mosquitto) as front:
        front.refuse_v5 = connack  # an MQTT 3.1.1-only broker
        uplink = Uplink(mqtt_cfg(front.host, front.port), HUB, outbox, status_provider)
        with caplog.at_level(logging.WARNING, logger="gateway.uplink"):
            async with running(uplink):
                await sub.wait_for(5)
                assert uplink.connected and uplink.protocol == "3.1.1"
                assert uplink.broker_status()["protocol"] == "3.1.1"
    assert front.levels == [5, 4]
    assert reading_ids(sub) == [f"r-{i:06d}" for i in range(5)]
    blind = [r for r in caplog.records if "acknowledges a reading it refuses" in r.getMessage()]
    assert len(blind) == 1 and blind[0].levelno == logging.WARNING


async def test_protocol_5_in_config_never_falls_back(mosquitto: LocalBroker, outbox: Outbox) -> None:
    async with mqtt_front(mosquitto) as front:
        front.refuse_v5 = REFUSED_311
        cfg = mqtt_cfg(front.host, front.port, protocol="5")
        uplink = Uplink(cfg, HUB, outbox, status_provider)
        async with running(uplink):
            await eventually(lambda: uplink.counters.reconnects >= 2, "refused attempts")
            assert not uplink.connected and uplink.protocol == "5"
            assert uplink.broker_status()["state"] == "unreachable"
    assert set(front.levels) == {5}


async def test_a_311_broker_that_ignores_mqtt_5_needs_the_config_and_says_so(
    outbox: Outbox, mqtt_subscriber: Subscribe, caplog: pytest.LogCaptureFixture
) -> None:
    async with LocalBroker("amqtt") as broker:  # MQTT 3.1.1 only; never answers this CONNECT
        sub = await mqtt_subscriber(broker, READINGS)
        for i in range(3):
            await outbox.put(make_item(i))
        auto = Uplink(mqtt_cfg(broker.host, broker.port, publish_timeout_s=0.3), HUB, outbox,
                      status_provider)
        async with running(auto):
            await eventually(lambda: auto.counters.reconnects >= 3, "timed-out attempts")
            assert not auto.connected and auto.protocol == "5"  # a timeout is not a refusal
        assert 'mqtt.protocol = "3.1.1"' in str(auto.broker_status()["last_error"])
        cfg = mqtt_cfg(broker.host, broker.port, protocol="3.1.1")
        explicit = Uplink(cfg, HUB, outbox, status_provider)
        with caplog.at_level(logging.WARNING, logger="gateway.uplink"):
            async with running(explicit):
                await sub.wait_for(3)
                await asyncio.sleep(0.1)
                assert explicit.protocol == "3.1.1"
        await sub.close()
    blind = [r for r in caplog.records if "acknowledges a reading it refuses" in r.getMessage()]
    assert len(blind) == 1 and 'mqtt.protocol = "3.1.1"' in blind[0].getMessage()
