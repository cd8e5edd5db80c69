"""Shared fixtures: a real mosquitto on loopback, an outbox in tmp_path, an MQTT subscriber, a TCP proxy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from faults.proxy import TcpProxy
from gateway.broker import BrokerNotFoundError, LocalBroker
from gateway.config import OutboxConfig
from gateway.outbox import Outbox, OutboxItem

INSTALL_MOSQUITTO = (
    "mosquitto is required for these tests and was not found on PATH or in /usr/sbin. "
    "Install it: `sudo apt-get install mosquitto` (Debian/Ubuntu/Raspberry Pi OS) or "
    "`brew install mosquitto` (macOS). CI installs it; the tests do not skip without it."
)


class Clock:
    """A settable clock for the outbox's age-based policies (retention, pending age)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def needs_tools(*commands: str, package: str) -> pytest.MarkDecorator:
    """Skip a test when one of `commands` is missing, naming the Debian package to install.

    Where RPM_GATEWAY_REQUIRE_TOOLS=1 (.ci/run sets it) nothing is skipped: a missing tool
    makes the test fail, so CI cannot go green on tests that never ran.
    """
    missing = [c for c in commands if shutil.which(c) is None]
    required = os.environ.get("RPM_GATEWAY_REQUIRE_TOOLS") == "1"
    return pytest.mark.skipif(
        bool(missing) and not required,
        reason=f"{', '.join(missing)} not installed (apt-get install {package})")


def small(**kw: object) -> OutboxConfig:
    """An outbox config without the production floors (ge=100, ge=31): a handful of rows do."""
    return OutboxConfig.model_construct(**{**OutboxConfig().model_dump(), **kw})


def make_item(
    n: int,
    *,
    patient_id: str = "patient-1",
    day: str = "2026-03-01",
    valid: bool = True,
    topic: str = "readings",
    kind: str = "body_weight",
    extra: bytes = b"",
) -> OutboxItem:
    """A reading with id ``r-<n>`` whose JSON payload names its own reading_id and number."""
    rid = f"r-{n:06d}"
    body = {"schema": "rpm-gateway/reading/1", "reading_id": rid, "n": n, "patient_id": patient_id}
    return OutboxItem(
        reading_id=rid,
        topic=topic,
        payload=json.dumps(body).encode() + extra,
        patient_id=patient_id,
        kind=kind,
        measured_at=f"{day}T08:00:00+00:00",
        measured_day=day,
        valid=valid,
    )


@pytest.fixture(name="make_item")
def make_item_fixture() -> Callable[..., OutboxItem]:
    """The make_item helper, as a fixture."""
    return make_item


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    """An open outbox with the default policy in tmp_path."""
    async with Outbox(tmp_path / "outbox.db", OutboxConfig()) as ob:
        yield ob


def new_mosquitto(**options: Any) -> LocalBroker:
    """A LocalBroker that must be mosquitto; fails the test (never skips) if it is missing."""
    try:
        return LocalBroker("mosquitto", **options)
    except BrokerNotFoundError as e:
        pytest.fail(f"{INSTALL_MOSQUITTO} ({e})", pytrace=False)


@pytest.fixture
async def mosquitto() -> AsyncIterator[LocalBroker]:
    """A running mosquitto on 127.0.0.1 with the default test configuration."""
    async with new_mosquitto() as broker:
        yield broker


@pytest.fixture
async def broker_factory() -> AsyncIterator[Callable[..., Awaitable[LocalBroker]]]:
    """Start mosquitto brokers with options (persistence, TLS listener, ACL); stopped at teardown."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(**options: Any) -> LocalBroker:
            return await stack.enter_async_context(new_mosquitto(**options))

        yield start


class MqttSubscriber:
    """Collects messages on a topic filter; reconnects (resuming its session if persistent)."""

    def __init__(
        self,
        host: str,
        port: int,
        topic: str,
        *,
        client_id: str | None = None,
        persistent: bool = False,
        tls_context: Any = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.host, self.port, self.topic = host, port, topic
        self.messages: list[aiomqtt.Message] = []
        self._client_id = client_id
        self._persistent = persistent
        self._tls_context = tls_context
        self._username, self._password = username, password
        self._changed = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 5.0) -> None:
        """Connect and subscribe; returns once the first SUBACK arrived."""
        self._task = asyncio.create_task(self._run())
        async with asyncio.timeout(timeout):
            await self._subscribed.wait()

    async def close(self) -> None:
        """Disconnect."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    self.host,
                    self.port,
                    identifier=self._client_id,
                    clean_session=not self._persistent,
                    tls_context=self._tls_context,
                    username=self._username,
                    password=self._password,
                    timeout=5,
                ) as client:
                    await client.subscribe(self.topic, qos=1)
                    self._subscribed.set()
                    async for message in client.messages:
                        self.messages.append(message)
                        self._changed.set()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)  # retry delay while the broker is down

    async def wait_until(
        self, done: Callable[[list[aiomqtt.Message]], bool], timeout: float = 5.0
    ) -> list[aiomqtt.Message]:
        """Wait (bounded) until ``done(messages)`` holds; returns the messages."""
        try:
            async with asyncio.timeout(timeout):
                while not done(self.messages):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pytest.fail(
                f"subscriber on {self.topic}: condition not met within {timeout}s; "
                f"got {len(self.messages)} message(s): {self.payloads()[-5:]}"
            )
        return list(self.messages)

    async def wait_for(self, n: int, timeout: float = 5.0) -> list[aiomqtt.Message]:
        """Wait (bounded) until at least ``n`` messages arrived."""
        return await self.wait_until(lambda m: len(m) >= n, timeout)

    def payloads(self) -> list[Any]:
        """The JSON-decoded payloads received so far."""
        return [json.loads(bytes(m.payload)) for m in self.messages]


@pytest.fixture
async def mqtt_subscriber() -> AsyncIterator[Callable[..., Awaitable[MqttSubscriber]]]:
    """Start subscribers: ``await mqtt_subscriber(broker, "rpm/hub/#", persistent=True)``."""
    started: list[MqttSubscriber] = []

    async def start(broker: LocalBroker, topic: str, **options: Any) -> MqttSubscriber:
        sub = MqttSubscriber(broker.host, broker.port, topic, **options)
        await sub.start()
        started.append(sub)
        return sub

    yield start
    for sub in started:
        await sub.close()


@pytest.fixture
async def tcp_proxy() -> AsyncIterator[Callable[[str, int], Awaitable[TcpProxy]]]:
    """Start TCP proxies to a target; closed at teardown."""
    proxies: list[TcpProxy] = []

    async def start(host: str, port: int) -> TcpProxy:
        proxy = TcpProxy(host, port)
        await proxy.start()
        proxies.append(proxy)
        return proxy

    yield start
    for p in proxies:
        await p.close()
