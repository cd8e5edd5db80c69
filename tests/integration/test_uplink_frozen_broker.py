"""A frozen broker process (SIGSTOP), not a frozen network: the kernel still completes new TCP
handshakes into mosquitto's listen backlog and the established socket's send buffer fills, so
every reconnect gets a connection that never says CONNACK (the abandoned-connect path, c55ff08).
The uplink must keep its event loop responsive, report the outage, and lose nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable

import pytest

from gateway.broker import LocalBroker
from gateway.outbox import Outbox
from gateway.uplink import Uplink
from gateway.uplink_health import BrokerState
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

N = 2000
TICK_S = 0.05


async def test_a_sigstopped_broker_is_survived_with_a_live_loop_and_nothing_lost(
    broker_factory: Callable[..., Awaitable[LocalBroker]], outbox: Outbox,
    mqtt_subscriber: Subscribe, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncio")
    # The test configuration, but no limit on what the broker queues for the subscriber: the
    # thawed backlog comes faster than it reads, and at mosquitto's default (1000 queued) it
    # drops QoS 1 messages for it ("Outgoing messages are being dropped"), the test's loss.
    mosquitto = await broker_factory(extra_config=["max_queued_messages 0"])
    pid = mosquitto.pid
    assert pid is not None
    # Persistent: should the subscriber's own connection drop meanwhile, its session keeps
    # what the broker queued for it.
    sub = await mqtt_subscriber(mosquitto, READINGS, client_id="frozen-sub", persistent=True)
    # No CONNACK and no PUBACK within 0.5 s ends an attempt or a connection.
    cfg = mqtt_cfg(mosquitto.host, mosquitto.port, publish_timeout_s=0.5)
    uplink = Uplink(cfg, HUB, outbox, status_provider)
    lags: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            lags.append(now - last - TICK_S)
            last = now

    tick = asyncio.create_task(ticker())
    stopped = False
    try:
        async with running(uplink):
            await outbox.put(make_item(0))
            await sub.wait_for(1)
            await eventually(lambda: (uplink.counters.acked == 1
                                      and uplink.state == BrokerState.CONNECTED), "delivered")
            before = uplink.counters.reconnects
            os.kill(pid, signal.SIGSTOP)
            stopped = True
            for start in range(1, N + 1, 100):
                await asyncio.gather(*(outbox.put(make_item(i))
                                       for i in range(start, start + 100)))
                uplink.reading_stored()
            await eventually(
                lambda: (uplink.state in (BrokerState.UNREACHABLE, BrokerState.CONNECTING)
                         and uplink.counters.reconnects >= before + 2),
                "the frozen broker noticed and retried twice", timeout=20)
            frozen = uplink.broker_status()
            os.kill(pid, signal.SIGCONT)
            stopped = False
            await sub.wait_until(lambda _: len(set(reading_ids(sub))) >= N + 1, timeout=60)
            await eventually(lambda: uplink.state == BrokerState.CONNECTED, "connected again")
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        tick.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tick
    assert frozen["state"] in ("unreachable", "connecting") and frozen["last_error"]
    assert first_arrivals(reading_ids(sub)) == [f"r-{i:06d}" for i in range(N + 1)]
    assert (await outbox.stats()).pending == 0
    assert mosquitto.log_path is not None
    assert "dropped" not in mosquitto.log_path.read_text(encoding="utf-8")
    assert lags and max(lags) < 0.5, f"the event loop lagged {max(lags):.2f}s"
    callbacks = [r.getMessage() for r in caplog.records
                 if r.name == "asyncio" and "Exception in callback" in r.getMessage()]
    assert not callbacks, callbacks
