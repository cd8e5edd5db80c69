"""The uplink against a real mosquitto on loopback: order, outages, restarts, status, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway.broker import LocalBroker
from gateway.config import MqttConfig, TlsConfig
from gateway.outbox import Outbox
from gateway.uplink import Uplink
from tests.conftest import MqttSubscriber, TcpProxy, make_item

pytestmark = pytest.mark.integration

HUB = "hub-1"
READINGS = f"rpm/{HUB}/readings"
STATUS = f"rpm/{HUB}/status"

Subscribe = Callable[..., Awaitable[MqttSubscriber]]


def mqtt_cfg(host: str, port: int, **kw: Any) -> MqttConfig:
    """Fast reconnects and short timeouts, so outages are over in tens of milliseconds."""
    base: dict[str, Any] = {
        "host": host,
        "port": port,
        "inflight": 20,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.3,
        "publish_timeout_s": 3.0,
        "keepalive_s": 5,
    }
    return MqttConfig(**(base | kw))


def status_provider() -> dict[str, object]:
    """What the hub's status module would report."""
    return {"version": "test", "pending": 0}


@contextlib.asynccontextmanager
async def running(uplink: Uplink) -> AsyncIterator[asyncio.Task[None]]:
    """Run the uplink in a task; cancel it on exit."""
    task = asyncio.create_task(uplink.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 5.0, poll_s: float = 0.01
) -> None:
    """Bounded polling until ``check()`` is true (poll_s=0: every event-loop turn)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for: {what}")
        await asyncio.sleep(poll_s)


def reading_ids(sub: MqttSubscriber) -> list[str]:
    """reading_id of every message received, in arrival order (duplicates included)."""
    return [p["reading_id"] for p in sub.payloads()]


def first_arrivals(ids: list[str]) -> list[str]:
    """The ids in order of first arrival."""
    return list(dict.fromkeys(ids))


async def pending_count(ob: Outbox) -> int:
    """How many readings still wait for a PUBACK."""
    return (await ob.stats()).pending


async def test_readings_arrive_in_order_with_qos1(
    mosquitto: LocalBroker, outbox: Outbox, mqtt_subscriber: Subscribe
) -> None:
    sub = await mqtt_subscriber(mosquitto, READINGS)
    n = 200
    for i in range(n):
        await outbox.put(make_item(i))
    uplink = Uplink(mqtt_cfg(mosquitto.host, mosquitto.port), HUB, outbox, status_provider)
    async with running(uplink):
        await sub.wait_for(n)
        await eventually(lambda: _zero(outbox), "outbox drained")
        assert uplink.connected and uplink.protocol == "5"
        # Readings put while connected and idle are picked up at once too.
        await outbox.put(make_item(n))
        await sub.wait_for(n + 1)
    assert reading_ids(sub) == [f"r-{i:06d}" for i in range(n + 1)]
    assert {m.qos for m in sub.messages} == {1}
    assert uplink.counters.acked == n + 1
    assert (await outbox.stats()).delivered == n + 1


async def _zero(ob: Outbox) -> bool:
    return await pending_count(ob) == 0


async def test_readings_put_while_broker_down_are_delivered_after_it_starts(
    broker_factory: Callable[..., Awaitable[LocalBroker]], outbox: Outbox, mqtt_subscriber: Subscribe
) -> None:
    broker = await broker_factory(persistence=True)
    # The clinic's subscriber has a persistent session, so it gets what arrives while it is away.
    sub = await mqtt_subscriber(broker, READINGS, client_id="clinic", persistent=True)
    await broker.stop()
    uplink = Uplink(mqtt_cfg(broker.host, broker.port), HUB, outbox, status_provider)
    async with running(uplink):
        for i in range(30):
            await outbox.put(make_item(i))
        await eventually(lambda: uplink.counters.reconnects >= 3, "several failed attempts")
        assert not uplink.connected
        assert await pending_count(outbox) == 30
        await broker.start()
        await sub.wait_for(30)
        await eventually(lambda: _zero(outbox), "outbox drained")
    assert reading_ids(sub) == [f"r-{i:06d}" for i in range(30)]


async def test_broker_restart_mid_drain_loses_nothing_and_keeps_order(
    broker_factory: Callable[..., Awaitable[LocalBroker]], outbox: Outbox, mqtt_subscriber: Subscribe
) -> None:
    broker = await broker_factory(persistence=True)
    sub = await mqtt_subscriber(broker, READINGS, client_id="clinic", persistent=True)
    n = 400
    expected = [make_item(i, extra=b" " * 2000) for i in range(n)]
    for item in expected[: n // 2]:  # a backlog, so the window is full when the broker goes
        await outbox.put(item)

    async def produce() -> None:
        for item in expected[n // 2 :]:
            await outbox.put(item)
            await asyncio.sleep(0.001)  # and a steady stream across the restart

    uplink = Uplink(mqtt_cfg(broker.host, broker.port), HUB, outbox, status_provider)
    async with running(uplink):
        producer = asyncio.create_task(produce())

        def in_flight() -> bool:
            c = uplink.counters
            return c.acked >= 20 and c.published - c.acked >= 10

        await eventually(in_flight, "readings in flight", poll_s=0)
        await broker.restart()
        await producer
        await eventually(lambda: _zero(outbox), "outbox drained after the restart", timeout=10)
        await sub.wait_until(lambda _: len(set(reading_ids(sub))) >= n, timeout=10)
    ids = reading_ids(sub)
    assert first_arrivals(ids) == [item.reading_id for item in expected]  # nothing lost, in order
    by_id = {item.reading_id: item.payload for item in expected}
    for m in sub.messages:  # a duplicate is the same reading: same id, same bytes
        assert bytes(m.payload) == by_id[json.loads(bytes(m.payload))["reading_id"]]
    # The restart caught readings in flight: they were sent again on the new connection.
    assert uplink.counters.reconnects >= 1 and uplink.counters.published > n


async def test_publish_timeout_forces_reconnect_and_reading_stays_queued(
    mosquitto: LocalBroker,
    outbox: Outbox,
    mqtt_subscriber: Subscribe,
    tcp_proxy: Callable[[str, int], Awaitable[TcpProxy]],
) -> None:
    proxy = await tcp_proxy(mosquitto.host, mosquitto.port)
    sub = await mqtt_subscriber(mosquitto, READINGS)
    cfg = mqtt_cfg(proxy.host, proxy.port, publish_timeout_s=0.5)
    uplink = Uplink(cfg, HUB, outbox, status_provider)
    async with running(uplink):
        await eventually(lambda: uplink.connected, "connected")
        # The link goes silent: no error, no PUBACK. This is the test that fails if a reading
        # were counted as delivered when written to the socket rather than on its PUBACK.
        proxy.stall()
        await outbox.put(make_item(1))
        await eventually(lambda: proxy.connections >= 2, "a new connection after the timeout")
        await sub.wait_for(1)
        await eventually(lambda: _zero(outbox), "delivered on the new connection")
    assert reading_ids(sub) == ["r-000001"]
    assert uplink.counters.reconnects >= 1


async def test_retained_status_online_and_last_will_when_the_link_dies(
    mosquitto: LocalBroker,
    outbox: Outbox,
    mqtt_subscriber: Subscribe,
    tcp_proxy: Callable[[str, int], Awaitable[TcpProxy]],
) -> None:
    proxy = await tcp_proxy(mosquitto.host, mosquitto.port)
    sub = await mqtt_subscriber(mosquitto, STATUS)
    uplink = Uplink(mqtt_cfg(proxy.host, proxy.port), HUB, outbox, status_provider)
    async with running(uplink):
        await sub.wait_until(lambda _: _states(sub)[-1:] == ["online"])
        assert sub.payloads()[-1] == {"hub_id": HUB, "version": "test", "pending": 0, "state": "online"}
        # The link dies without a DISCONNECT and the hub cannot get back: the broker's will fires.
        await proxy.stop_listening()
        proxy.sever()
        await sub.wait_until(lambda _: _states(sub)[-1:] == ["offline"])
        assert sub.payloads()[-1] == {"state": "offline", "hub_id": HUB}  # the will, not a goodbye
        late = MqttSubscriber(mosquitto.host, mosquitto.port, STATUS)
        await late.start()
        try:
            [retained] = await late.wait_for(1)
            assert retained.retain and json.loads(bytes(retained.payload))["state"] == "offline"
        finally:
            await late.close()
        await proxy.start()  # the network is back
        await sub.wait_until(lambda _: _states(sub)[-1:] == ["online"])


def _states(sub: MqttSubscriber) -> list[str]:
    return [p["state"] for p in sub.payloads()]


async def test_clean_shutdown_says_offline_and_status_refreshes_on_demand(
    mosquitto: LocalBroker, outbox: Outbox, mqtt_subscriber: Subscribe
) -> None:
    sub = await mqtt_subscriber(mosquitto, STATUS)
    state: dict[str, object] = {"version": "test", "days": 3}
    uplink = Uplink(mqtt_cfg(mosquitto.host, mosquitto.port), HUB, outbox, lambda: dict(state))
    async with running(uplink):
        await sub.wait_until(lambda _: _states(sub)[-1:] == ["online"])
        state["days"] = 4
        uplink.status_changed()
        await sub.wait_until(lambda _: sub.payloads()[-1].get("days") == 4)
    # run() was cancelled: a goodbye (with the full status) replaced the retained "online".
    await sub.wait_until(lambda _: _states(sub)[-1:] == ["offline"])
    assert sub.payloads()[-1] == {"hub_id": HUB, "version": "test", "days": 4, "state": "offline"}


async def test_events_are_published_and_the_queue_drops_oldest(
    mosquitto: LocalBroker, outbox: Outbox, mqtt_subscriber: Subscribe
) -> None:
    sub = await mqtt_subscriber(mosquitto, f"rpm/{HUB}/events")
    uplink = Uplink(
        mqtt_cfg(mosquitto.host, mosquitto.port), HUB, outbox, status_provider, event_queue_size=3
    )
    for i in range(5):  # not connected yet: the bounded queue keeps the newest three
        await uplink.publish_event("clock_drift", {"i": i})
    assert uplink.counters.events_dropped == 2
    async with running(uplink):
        await sub.wait_for(3)
    assert [(p["event"], p["detail"]["i"]) for p in sub.payloads()] == [
        ("clock_drift", 2),
        ("clock_drift", 3),
        ("clock_drift", 4),
    ]


@pytest.fixture
async def acl_broker(
    broker_factory: Callable[..., Awaitable[LocalBroker]], tmp_path: Path
) -> LocalBroker:
    """mosquitto that lets the hub publish status and events but not readings."""
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite rpm/+/status\ntopic readwrite rpm/+/events\ntopic read rpm/#\n")
    return await broker_factory(extra_config=[f"acl_file {acl}"])


async def test_broker_refusal_keeps_the_reading_queued(
    acl_broker: LocalBroker, outbox: Outbox, mqtt_subscriber: Subscribe,
    caplog: pytest.LogCaptureFixture
) -> None:
    # aiomqtt's publish() returns normally on a PUBACK that says "not authorized" (MQTT 5);
    # the uplink must not count that as delivered.
    sub = await mqtt_subscriber(acl_broker, READINGS)
    await outbox.put(make_item(1))
    uplink = Uplink(mqtt_cfg(acl_broker.host, acl_broker.port), HUB, outbox, status_provider)
    with caplog.at_level(logging.WARNING, logger="gateway.uplink"):
        async with running(uplink):
            await eventually(lambda: uplink.counters.rejected >= 3, "refused, then retried")
            assert uplink.protocol == "5"
    # (last_error is cleared by every reconnect, so the log is where the reason stays.)
    assert "broker refused reading seq 1 (0x87 Not authorized)" in caplog.text
    assert await pending_count(outbox) == 1 and uplink.counters.acked == 0
    assert sub.messages == []
    # Refused right after every CONNACK: the backoff grew instead of hammering the broker.
    assert uplink.counters.reconnects < 10


async def test_cancel_while_a_publish_fails_still_stops(acl_broker: LocalBroker, outbox: Outbox) -> None:
    # Python 3.11's TaskGroup turns a cancellation that races with a failing child into the
    # child's error; the uplink must still stop (SIGTERM must stop the agent).
    await outbox.put(make_item(1))
    for _ in range(5):
        uplink = Uplink(mqtt_cfg(acl_broker.host, acl_broker.port), HUB, outbox, status_provider)
        task = asyncio.create_task(uplink.run())
        await eventually(lambda u=uplink: u.counters.rejected >= 1, "a refusal", poll_s=0)  # type: ignore[misc]
        task.cancel()  # in the same event-loop turn as the failing publish
        # asyncio.wait, not a timeout around "await task": that would cancel the task again.
        done, _ = await asyncio.wait({task}, timeout=5)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            pytest.fail("run() swallowed its cancellation and kept reconnecting")
        assert task.cancelled()


async def test_falls_back_to_mqtt_311_when_the_broker_refuses_mqtt_5(
    outbox: Outbox, mqtt_subscriber: Subscribe
) -> None:
    async with LocalBroker("amqtt") as broker:  # amqtt speaks MQTT 3.1.1 only
        sub = await mqtt_subscriber(broker, READINGS)
        for i in range(5):
            await outbox.put(make_item(i))
        # amqtt does not answer an MQTT 5 CONNECT that carries a will: the CONNACK wait
        # (publish_timeout_s) ends the first attempt.
        cfg = mqtt_cfg(broker.host, broker.port, publish_timeout_s=0.5)
        uplink = Uplink(cfg, HUB, outbox, status_provider)
        async with running(uplink):
            await sub.wait_for(5)
            await eventually(lambda: _zero(outbox), "outbox drained")
            assert uplink.protocol == "3.1.1"
        await sub.close()
    assert reading_ids(sub) == [f"r-{i:06d}" for i in range(5)]


# --- TLS ----------------------------------------------------------------------------------------


def _openssl(cwd: Path, *args: str) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        pytest.fail("the openssl command is needed to make throwaway test certificates")
    subprocess.run([exe, *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A throwaway CA, a server cert for 127.0.0.1, a client cert, and an unrelated CA."""
    d = tmp_path / "pki"
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-noenc"]
    for ca in ("ca", "other-ca"):
        _openssl(d, "req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 "-days", "1", "-subj", f"/CN=rpm-test-{ca}")  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl(d, "req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=rpm-test-{name}")  # fmt: skip
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "1",
                 "-extfile", f"{name}.ext")  # fmt: skip
    return d


@pytest.fixture
async def tls_broker(
    broker_factory: Callable[..., Awaitable[LocalBroker]], pki: Path
) -> LocalBroker:
    """mosquitto with a TLS listener that requires a client certificate from our CA."""
    return await broker_factory(
        listener_options=[
            f"cafile {pki / 'ca.crt'}",
            f"certfile {pki / 'server.crt'}",
            f"keyfile {pki / 'server.key'}",
            "require_certificate true",
        ]
    )


def _client_context(pki: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    return ctx


async def test_mutual_tls_delivers(
    tls_broker: LocalBroker, pki: Path, outbox: Outbox, mqtt_subscriber: Subscribe
) -> None:
    sub = await mqtt_subscriber(tls_broker, READINGS, tls_context=_client_context(pki))
    tls = TlsConfig(ca_file=pki / "ca.crt", cert_file=pki / "client.crt", key_file=pki / "client.key")
    uplink = Uplink(mqtt_cfg(tls_broker.host, tls_broker.port, tls=tls), HUB, outbox, status_provider)
    for i in range(3):
        await outbox.put(make_item(i))
    async with running(uplink):
        await sub.wait_for(3)
    assert reading_ids(sub) == ["r-000000", "r-000001", "r-000002"]


async def test_tls_with_the_wrong_ca_is_refused(
    tls_broker: LocalBroker, pki: Path, outbox: Outbox
) -> None:
    tls = TlsConfig(
        ca_file=pki / "other-ca.crt", cert_file=pki / "client.crt", key_file=pki / "client.key"
    )
    uplink = Uplink(mqtt_cfg(tls_broker.host, tls_broker.port, tls=tls), HUB, outbox, status_provider)
    await outbox.put(make_item(1))
    async with running(uplink):
        await eventually(lambda: uplink.counters.reconnects >= 2, "repeated refusals")
        assert not uplink.connected
    assert "certificate verify failed" in (uplink.last_error or "")
    assert await pending_count(outbox) == 1


async def test_tls_without_a_client_certificate_is_refused(
    tls_broker: LocalBroker, pki: Path, outbox: Outbox
) -> None:
    tls = TlsConfig(ca_file=pki / "ca.crt")
    # With TLS 1.3 the client learns of the server's refusal only after its own handshake,
    # so the wait for CONNACK (publish_timeout_s) is what ends the attempt.
    cfg = mqtt_cfg(tls_broker.host, tls_broker.port, tls=tls, publish_timeout_s=0.5)
    uplink = Uplink(cfg, HUB, outbox, status_provider)
    await outbox.put(make_item(1))
    async with running(uplink):
        await eventually(lambda: uplink.counters.reconnects >= 1, "a refused attempt")
        assert not uplink.connected
    assert await pending_count(outbox) == 1
    assert tls_broker.log_path is not None
    log_text = await asyncio.to_thread(tls_broker.log_path.read_text)
    assert "certificate" in log_text.lower()


@pytest.fixture
def broker_passwords(tmp_path: Path) -> Path:
    """A mosquitto password file with user hub-1."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.fail("mosquitto_passwd (package mosquitto) is needed to make a password file")
    passwords = tmp_path / "passwd"
    subprocess.run([tool, "-c", "-b", str(passwords), "hub-1", "s3cret-pw"], check=True)
    return passwords


async def test_password_from_file_authenticates_and_is_never_logged(
    broker_factory: Callable[..., Awaitable[LocalBroker]],
    outbox: Outbox,
    mqtt_subscriber: Subscribe,
    tmp_path: Path,
    broker_passwords: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = await broker_factory(
        extra_config=["allow_anonymous false", f"password_file {broker_passwords}"]
    )
    with pytest.raises(aiomqtt.MqttError):  # the broker really demands a password
        async with aiomqtt.Client(broker.host, broker.port):
            pass
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret-pw\n")  # a trailing newline, as editors leave it
    await outbox.put(make_item(1))
    sub = await mqtt_subscriber(broker, READINGS, username="hub-1", password="s3cret-pw")
    good = Uplink(
        mqtt_cfg(broker.host, broker.port, username="hub-1", password_file=secret),
        HUB, outbox, status_provider,
    )  # fmt: skip
    async with running(good):
        await sub.wait_for(1)
    wrong = tmp_path / "wrong-password"
    wrong.write_text("guess")
    bad = Uplink(
        mqtt_cfg(broker.host, broker.port, username="hub-1", password_file=wrong),
        HUB, outbox, status_provider,
    )  # fmt: skip
    with caplog.at_level(logging.DEBUG):
        async with running(bad):
            await eventually(lambda: bad.counters.reconnects >= 1, "refused")
            assert not bad.connected
    assert "refused" in (bad.last_error or "")
    assert all("s3cret" not in r.getMessage() and "guess" not in r.getMessage() for r in caplog.records)


def test_backoff_is_jittered_within_bounds_and_grows() -> None:
    cfg = mqtt_cfg("127.0.0.1", 1, reconnect_min_s=1.0, reconnect_max_s=300.0)
    uplink = Uplink(cfg, HUB, outbox=None, status=status_provider)  # type: ignore[arg-type]
    for attempt in range(40):
        cap = min(300.0, 2.0**attempt)
        delays = [uplink._backoff(attempt) for _ in range(50)]
        assert all(1.0 <= d <= cap for d in delays)
    assert len({round(uplink._backoff(10), 6) for _ in range(20)}) > 1  # jittered, not fixed
