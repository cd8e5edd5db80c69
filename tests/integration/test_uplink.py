"""The uplink against a real mosquitto on loopback: order, outages, restarts, status, TLS.

The helpers here (mqtt_cfg, running, eventually, MqttFront, ...) are shared by the other
test_uplink_*.py modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from faults.proxy import TcpProxy
from gateway.broker import LocalBroker
from gateway.config import MqttConfig, TlsConfig
from gateway.outbox import Outbox
from gateway.uplink import Uplink
from tests.conftest import MqttSubscriber, make_item

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


def _encode(header: int, body: bytes) -> bytes:
    out, n = bytearray([header]), len(body)
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out) + body


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = (await reader.readexactly(1))[0]
    length, mult = 0, 1
    while True:
        byte = (await reader.readexactly(1))[0]
        length += (byte & 0x7F) * mult
        mult *= 128
        if not byte & 0x80:
            break
    return header, await reader.readexactly(length)


class MqttFront:
    """A loopback front for a real broker that reads the MQTT packets going through it.

    It records the protocol level of every CONNECT (4 = 3.1.1, 5 = MQTT 5), and can stand in
    for brokers we do not have: one that only speaks 3.1.1 (answers an MQTT 5 CONNECT with a
    refusal), a network that swallows the next CONNECTs, a broker that refuses readings with a
    given PUBACK reason code.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self._target = (target_host, target_port)
        self.levels: list[int] = []
        self.refuse_v5: bytes | None = None  # the CONNACK sent back to an MQTT 5 CONNECT
        self.swallow_connects = 0  # this many next connections get no answer at all
        self.reading_puback: int | None = None  # PUBACK code for every PUBLISH on .../readings
        self.readings_seen = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        """Listen on a free port."""
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and cut every connection."""
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            header, body = await _read_packet(reader)
            self.levels.append(body[6] if header >> 4 == 1 and len(body) > 6 else -1)
            if self.swallow_connects > 0:
                self.swallow_connects -= 1
                while await reader.read(4096):  # hold the connection, answer nothing
                    pass
                return
            if self.levels[-1] == 5 and self.refuse_v5 is not None:
                writer.write(self.refuse_v5)
                await writer.drain()
                return
            up_reader, up_writer = await asyncio.open_connection(*self._target)
            self._writers.add(up_writer)
            up_writer.write(_encode(header, body))
            mids: dict[int, int] = {}  # mid of a refused PUBLISH -> its PUBACK code
            pipes = {
                asyncio.create_task(self._upstream(reader, up_writer, mids)),
                asyncio.create_task(self._downstream(up_reader, writer, mids)),
            }
            _, rest = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.transport.abort()
                    self._writers.discard(w)

    async def _upstream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mids: dict[int, int]
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, OSError):
            while True:
                header, body = await _read_packet(reader)
                if header >> 4 == 3 and (header >> 1) & 3 == 1:  # a QoS 1 PUBLISH
                    n = int.from_bytes(body[:2], "big")
                    if body[2 : 2 + n].decode().endswith("/readings"):
                        self.readings_seen += 1
                        if self.reading_puback is not None:
                            mids[int.from_bytes(body[2 + n : 4 + n], "big")] = self.reading_puback
                writer.write(_encode(header, body))
                await writer.drain()

    async def _downstream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mids: dict[int, int]
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, OSError):
            while True:
                header, body = await _read_packet(reader)
                code = mids.pop(int.from_bytes(body[:2], "big"), None) if header >> 4 == 4 else None
                if code is not None:  # the PUBACK of a reading to refuse
                    body = body[:2] + bytes([code])
                writer.write(_encode(header, body))
                await writer.drain()


@contextlib.asynccontextmanager
async def mqtt_front(broker: LocalBroker) -> AsyncIterator[MqttFront]:
    """An MqttFront for a broker, closed on exit."""
    front = MqttFront(broker.host, broker.port)
    await front.start()
    try:
        yield front
    finally:
        await front.close()


def broker_status(payload: dict[str, Any]) -> dict[str, Any]:
    """The status payload's ``broker`` object."""
    broker = payload["broker"]
    assert isinstance(broker, dict)
    return broker


def without_broker(payload: dict[str, Any]) -> dict[str, Any]:
    """The status payload without its ``broker`` object (whose ``since`` is a time)."""
    return {k: v for k, v in payload.items() if k != "broker"}


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
        online = sub.payloads()[-1]
        assert without_broker(online) == {"hub_id": HUB, "version": "test", "pending": 0, "state": "online"}
        broker = broker_status(online)
        assert broker["state"] == "connected" and broker["protocol"] == "5"
        assert broker["quarantined"] == 0 and broker["last_error"] is None
        # The link dies without a DISCONNECT and the hub cannot get back: the broker's will fires.
        await proxy.stop_listening()
        proxy.sever()
        await sub.wait_until(lambda _: _states(sub)[-1:] == ["offline"])
        will = sub.payloads()[-1]
        assert will["reason"] == "connection_lost"  # the will, not a goodbye
        assert will == {"schema": "rpm-gateway/status/1", "hub_id": HUB, "state": "offline",
                        "at": will["at"], "reason": "connection_lost"}
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
    # run() was cancelled: a goodbye (the will's shape) replaced the retained "online".
    await sub.wait_until(lambda _: _states(sub)[-1:] == ["offline"])
    goodbye = sub.payloads()[-1]
    assert goodbye == {"schema": "rpm-gateway/status/1", "hub_id": HUB, "state": "offline",
                       "at": goodbye["at"], "reason": "stopped"}


async def test_events_are_published_and_the_queue_drops_oldest(
    mosquitto: LocalBroker, outbox: Outbox, mqtt_subscriber: Subscribe
) -> None:
    sub = await mqtt_subscriber(mosquitto, f"rpm/{HUB}/events")
    uplink = Uplink(
        mqtt_cfg(mosquitto.host, mosquitto.port), HUB, outbox, status_provider, event_queue_size=3
    )
    for i in range(5):  # not connected yet: the bounded queue keeps the newest three
        await uplink.publish_event("clock_drift", {"device": "C0:00:00:00:BC:01", "offset_s": i,
                                                   "set": True})
    assert uplink.counters.events_dropped == 2
    async with running(uplink):
        await sub.wait_for(3)
    assert [(p["event"], p["detail"]["offset_s"]) for p in sub.payloads()] == [
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


async def test_acl_refusal_quarantines_readings_and_marks_none_delivered(
    acl_broker: LocalBroker, outbox: Outbox, mqtt_subscriber: Subscribe,
    caplog: pytest.LogCaptureFixture
) -> None:
    # aiomqtt's publish() returns normally on a PUBACK that says "not authorized" (MQTT 5);
    # the uplink must not count that as delivered. Refused for good, each reading is
    # quarantined once (kept, retried in an hour), not resent in a loop.
    sub = await mqtt_subscriber(acl_broker, READINGS)
    events = await mqtt_subscriber(acl_broker, f"rpm/{HUB}/events")
    n = 200
    for i in range(n):
        await outbox.put(make_item(i))
    uplink = Uplink(mqtt_cfg(acl_broker.host, acl_broker.port), HUB, outbox, status_provider)
    with caplog.at_level(logging.WARNING, logger="gateway.uplink"):
        async with running(uplink):
            await eventually(lambda: uplink.counters.quarantined == n, "all refused, quarantined")
            await events.wait_for(n)
            await asyncio.sleep(0.3)  # nothing more is sent
            assert uplink.protocol == "5" and uplink.connected
            assert uplink.counters.published == n and uplink.counters.reconnects == 0
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "gateway.uplink" and "quarantined" in r.getMessage()]
    assert len(warnings) == 1  # one line for the burst, not one per reading
    assert re.search(r"reading seq \d+ quarantined \(broker refused it: 0x87 Not authorized\)", warnings[0])
    stats = await outbox.stats()
    assert stats.delivered == 0 and uplink.counters.acked == 0
    assert stats.pending == 0 and stats.quarantined == n  # held back, not lost
    assert await outbox.pending(10) == []  # not offered again before quarantine_retry_s
    assert sub.messages == []
    detail = events.payloads()[0]
    assert detail["event"] == "reading_quarantined"
    assert detail["detail"] == {"seq": 1, "reason": "broker refused it: 0x87 Not authorized"}
    assert uplink.broker_status()["quarantined"] == n


async def test_cancel_while_a_publish_fails_still_stops(mosquitto: LocalBroker, outbox: Outbox) -> None:
    # Python 3.11's TaskGroup turns a cancellation that races with a failing child into the
    # child's error; the uplink must still stop (SIGTERM must stop the agent). A transient
    # refusal (quota exceeded) is such a failure: it ends the connection.
    await outbox.put(make_item(1))
    async with mqtt_front(mosquitto) as front:
        front.reading_puback = 0x97
        for _ in range(5):
            uplink = Uplink(mqtt_cfg(front.host, front.port), HUB, outbox, status_provider)
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


@pytest.mark.parametrize("ca_content", [None, b"not a certificate\n"], ids=["missing", "garbage"])
async def test_a_ca_file_unusable_at_run_time_is_credentials_unreadable(
    tls_broker: LocalBroker, pki: Path, outbox: Outbox, tmp_path: Path, ca_content: bytes | None
) -> None:
    # Deleted or overwritten after start-up validation: not a network error retried at the
    # normal rate, and the message says which file.
    ca = tmp_path / "ca-copy.crt"
    if ca_content is not None:
        ca.write_bytes(ca_content)
    tls = TlsConfig(ca_file=ca, cert_file=pki / "client.crt", key_file=pki / "client.key")
    cfg = mqtt_cfg(tls_broker.host, tls_broker.port, tls=tls, auth_retry_s=30.0)
    uplink = Uplink(cfg, HUB, outbox, status_provider)
    async with running(uplink):
        await eventually(lambda: uplink.counters.reconnects >= 1, "a failed attempt")
        await asyncio.sleep(0.3)
        assert uplink.counters.reconnects == 1  # the long backoff, not reconnect_min_s
        status = uplink.broker_status()
    assert status["state"] == "credentials_unreadable"
    assert "mqtt.tls.ca_file: cannot " in str(status["last_error"]) and str(ca) in str(status["last_error"])


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
