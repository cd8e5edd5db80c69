"""Reconnecting: promptly when there is something to send, rarely when retrying cannot help.

Issue 5 items 6 (the hub waited 200 s after the broker came back), 10 (wrong credentials and
unreadable files retried at the normal rate, a WARNING per attempt for ever) and the frozen
network while idle and during a drain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

import pytest

from faults.proxy import TcpProxy
from gateway.broker import LocalBroker
from gateway.outbox import Outbox
from gateway.uplink import EARLY_RETRY_MIN_INTERVAL_S, Uplink
from gateway.uplink_health import REMIND_S, BrokerHealth, BrokerState
from tests.conftest import make_item
from tests.integration.test_uplink import (
    HUB,
    READINGS,
    Subscribe,
    eventually,
    first_arrivals,
    mqtt_cfg,
    reading_ids,
    running,
    status_provider,
)

pytestmark = pytest.mark.integration


def uplink_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    """The uplink's own log records at exactly this level."""
    return [r for r in caplog.records if r.name == "gateway.uplink" and r.levelno == level]


async def test_a_stored_reading_wakes_a_long_reconnect_wait(
    broker_factory: Callable[..., Awaitable[LocalBroker]], outbox: Outbox, mqtt_subscriber: Subscribe
) -> None:
    broker = await broker_factory()
    await broker.stop()
    # Every wait is the 60 s ceiling: without a wake-up the broker's return goes unseen for a minute.
    cfg = mqtt_cfg(broker.host, broker.port, reconnect_min_s=60.0, reconnect_max_s=60.0)
    uplink = Uplink(cfg, HUB, outbox, status_provider)
    async with running(uplink):
        await eventually(lambda: uplink.counters.reconnects == 1, "the first attempt failed")
        assert uplink.broker_status()["state"] == "unreachable"
        await broker.start()
        sub = await mqtt_subscriber(broker, READINGS)
        started = time.monotonic()
        await outbox.put(make_item(1))
        uplink.reading_stored()  # what the agent does after every stored reading
        await sub.wait_for(1, timeout=3)
        assert time.monotonic() - started < 2.0
        assert uplink.broker_status()["state"] == "connected"


async def test_stored_readings_wake_at_most_one_early_attempt_per_interval(
    broker_factory: Callable[..., Awaitable[LocalBroker]], outbox: Outbox
) -> None:
    assert 1.0 < EARLY_RETRY_MIN_INTERVAL_S <= 10.0
    broker = await broker_factory()
    await broker.stop()
    cfg = mqtt_cfg(broker.host, broker.port, reconnect_min_s=60.0, reconnect_max_s=60.0)
    uplink = Uplink(cfg, HUB, outbox, status_provider)
    async with running(uplink):
        await eventually(lambda: uplink.counters.reconnects == 1, "the first attempt failed")
        for _ in range(20):  # a device replaying its memory: a reading every 50 ms
            uplink.reading_stored()
            await asyncio.sleep(0.05)
        assert uplink.counters.reconnects == 2  # one early attempt, not twenty


async def test_unreachable_broker_logs_once_then_quietly(
    broker_factory: Callable[..., Awaitable[LocalBroker]],
    outbox: Outbox,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = await broker_factory()
    await broker.stop()
    cfg = mqtt_cfg(broker.host, broker.port, reconnect_min_s=0.01, reconnect_max_s=0.02)
    uplink = Uplink(cfg, HUB, outbox, status_provider)
    with caplog.at_level(logging.DEBUG, logger="gateway.uplink"):
        async with running(uplink):
            await eventually(lambda: uplink.counters.reconnects >= 20, "many failed attempts")
            since = uplink.broker_status()["since"]
            await broker.start()
            await eventually(lambda: uplink.connected, "connected when the broker is back")
    [warning] = uplink_records(caplog, logging.WARNING)  # the change of state, not every attempt
    assert "unreachable" in warning.getMessage()
    assert len(uplink_records(caplog, logging.DEBUG)) >= 19
    assert any("uplink connected" in r.getMessage() for r in uplink_records(caplog, logging.INFO))
    status = uplink.broker_status()
    assert status["state"] == "connected" and since is not None
    assert datetime.fromisoformat(str(status["since"])).utcoffset() is not None  # ISO, with zone
    assert status["last_error"]  # why it was last cut off, kept after the recovery


@pytest.fixture
async def auth_broker(
    broker_factory: Callable[..., Awaitable[LocalBroker]], broker_passwords: Path
) -> LocalBroker:
    """mosquitto that wants user hub-1 with its password."""
    return await broker_factory(
        extra_config=["allow_anonymous false", f"password_file {broker_passwords}"]
    )


@pytest.mark.parametrize("protocol", ["auto", "3.1.1"])
async def test_wrong_credentials_are_their_own_state_retried_rarely(
    auth_broker: LocalBroker,
    outbox: Outbox,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
) -> None:
    # CONNACK 0x86 on MQTT 5, return code 4 on 3.1.1.
    secret = tmp_path / "mqtt-password"
    secret.write_text("guess")
    cfg = mqtt_cfg(auth_broker.host, auth_broker.port, username="hub-1", password_file=secret,
                   reconnect_min_s=0.01, reconnect_max_s=0.02, auth_retry_s=0.5,
                   protocol=protocol)  # fmt: skip
    uplink = Uplink(cfg, HUB, outbox, status_provider)
    with caplog.at_level(logging.DEBUG, logger="gateway.uplink"):
        async with running(uplink):
            await eventually(lambda: uplink.counters.reconnects >= 1, "refused")
            status = uplink.broker_status()
            assert status["state"] == "auth_refused"
            assert "credentials" in str(status["last_error"])
            uplink.reading_stored()  # a new reading does not make the password right
            await asyncio.sleep(1.2)
            # At auth_retry_s, not at the normal rate (which would be ~60 attempts here).
            assert 2 <= uplink.counters.reconnects <= 4
            secret.write_text("s3cret-pw\n")  # the technician fixes it: picked up, no restart
            await eventually(lambda: uplink.connected, "connected with the right password")
    [error] = uplink_records(caplog, logging.ERROR)  # one per change of state, not per retry
    assert "auth_refused" in error.getMessage()
    warnings = [r.getMessage() for r in uplink_records(caplog, logging.WARNING)]
    assert warnings == ([] if protocol == "auto" else [warnings[0]])  # 3.1.1: the one caveat
    assert uplink.protocol == ("5" if protocol == "auto" else "3.1.1")
    assert all("s3cret" not in r.getMessage() and "guess" not in r.getMessage() for r in caplog.records)


async def test_a_password_file_gone_at_run_time_is_its_own_state_naming_the_file(
    auth_broker: LocalBroker,
    outbox: Outbox,
    tmp_path: Path,
    tcp_proxy: Callable[[str, int], Awaitable[TcpProxy]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await tcp_proxy(auth_broker.host, auth_broker.port)
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret-pw\n")
    cfg = mqtt_cfg(proxy.host, proxy.port, username="hub-1", password_file=secret,
                   reconnect_min_s=0.01, reconnect_max_s=0.02, auth_retry_s=0.5)  # fmt: skip
    uplink = Uplink(cfg, HUB, outbox, status_provider)
    with caplog.at_level(logging.DEBUG, logger="gateway.uplink"):
        async with running(uplink):
            await eventually(lambda: uplink.connected, "connected")
            secret.unlink()  # deleted after start-up validation
            proxy.sever()
            await eventually(
                lambda: uplink.broker_status()["state"] == "credentials_unreadable", "unreadable"
            )
            assert str(secret) in str(uplink.broker_status()["last_error"])
            await asyncio.sleep(1.2)
            assert uplink.counters.reconnects <= 4  # the long backoff
            secret.write_text("s3cret-pw\n")
            await eventually(lambda: uplink.connected, "connected once the file is back")
    [error] = uplink_records(caplog, logging.ERROR)
    assert str(secret) in error.getMessage() and "credentials_unreadable" in error.getMessage()


async def test_frozen_network_while_idle_is_detected_and_the_next_reading_delivered(
    mosquitto: LocalBroker,
    outbox: Outbox,
    mqtt_subscriber: Subscribe,
    tcp_proxy: Callable[[str, int], Awaitable[TcpProxy]],
) -> None:
    proxy = await tcp_proxy(mosquitto.host, mosquitto.port)
    sub = await mqtt_subscriber(mosquitto, READINGS)
    # A 1 s keepalive (below the config's 5 s floor, hence model_copy) keeps the test short;
    # detection is paho's: no PINGRESP within the keepalive closes the connection.
    cfg = mqtt_cfg(proxy.host, proxy.port).model_copy(update={"keepalive_s": 1})
    uplink = Uplink(cfg, HUB, outbox, status_provider)
    async with running(uplink):
        await eventually(lambda: uplink.connected, "connected")
        proxy.stall()  # black hole: nothing arrives, nothing is closed, and nothing is sent
        await eventually(lambda: uplink.counters.reconnects >= 1, "the dead link noticed", timeout=6)
        await eventually(lambda: uplink.connected, "connected again")
        assert proxy.connections >= 2
        await outbox.put(make_item(1))
        await sub.wait_for(1)
    assert reading_ids(sub) == ["r-000001"]


async def test_frozen_network_during_a_drain_loses_nothing(
    mosquitto: LocalBroker,
    outbox: Outbox,
    mqtt_subscriber: Subscribe,
    tcp_proxy: Callable[[str, int], Awaitable[TcpProxy]],
) -> None:
    proxy = await tcp_proxy(mosquitto.host, mosquitto.port)
    sub = await mqtt_subscriber(mosquitto, READINGS)
    n = 300
    items = [make_item(i, extra=b" " * 1000) for i in range(n)]
    for item in items:
        await outbox.put(item)
    cfg = mqtt_cfg(proxy.host, proxy.port, publish_timeout_s=0.5)
    uplink = Uplink(cfg, HUB, outbox, status_provider)
    async with running(uplink):
        await eventually(lambda: uplink.counters.acked >= 50, "part of the backlog acked", poll_s=0)
        proxy.stall()
        await eventually(lambda: uplink.counters.reconnects >= 1, "the publish timeout noticed it")
        await eventually(lambda: uplink.counters.acked >= n, "the rest delivered", timeout=10)
        await eventually(lambda: pending_zero(outbox), "outbox drained")
        await sub.wait_until(lambda _: len(set(reading_ids(sub))) >= n)
    assert first_arrivals(reading_ids(sub)) == [item.reading_id for item in items]


async def pending_zero(ob: Outbox) -> bool:
    """Whether nothing waits for a PUBACK."""
    return (await ob.stats()).pending == 0


def test_a_lasting_outage_is_reminded_every_few_minutes_and_flapping_is_reported_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("gateway.uplink")
    health = BrokerHealth("broker:1883", logger, remind_s=0.2)
    assert REMIND_S >= 120.0  # "a few minutes" in production
    with caplog.at_level(logging.DEBUG, logger="gateway.uplink"):
        for _ in range(5):  # within one reminder period: one line, then debug
            health.failed(BrokerState.UNREACHABLE, "connection refused", 1.0)
        time.sleep(0.25)
        health.failed(BrokerState.UNREACHABLE, "connection refused", 1.0)  # the reminder
        warnings = [r.getMessage() for r in uplink_records(caplog, logging.WARNING)]
        assert len(warnings) == 2 and "still unreachable, 5 failed attempts" in warnings[1]
        caplog.clear()
        for _ in range(5):  # dropped right after every CONNACK
            health.connected("5", tls=False)
            health.lost("broker refused reading seq 1 for now (0x97 Quota exceeded)", 1.0, stable=False)
        assert len(uplink_records(caplog, logging.WARNING)) == 1
        assert len(uplink_records(caplog, logging.INFO)) == 2  # the first connect, and the next
