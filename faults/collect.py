"""The clinic's side: a subscriber on the hub's topics that keeps every message with its arrival time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

import aiomqtt


@dataclass(frozen=True)
class Message:
    """One message as the clinic received it."""

    t: float
    topic: str
    body: Any  # the JSON payload, or the raw text when it is not JSON


class Collector:
    """Subscribes to `<prefix>/<hub>/#` directly on the broker (not through the fault proxy)."""

    def __init__(self, host: str, port: int, hub: str, prefix: str = "rpm") -> None:
        self.host, self.port = host, port
        self.base = f"{prefix}/{hub}"
        self.messages: list[Message] = []
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 10.0) -> None:
        """Connect and subscribe; returns once subscribed."""
        self._task = asyncio.create_task(self._run())
        await self.wait_subscribed(timeout)

    async def wait_subscribed(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until the subscription is (again) in place."""
        async with asyncio.timeout(timeout):
            await self.subscribed.wait()

    async def close(self) -> None:
        """Disconnect."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def readings(self) -> list[Message]:
        """Messages on the readings topic, in arrival order."""
        return [m for m in self.messages if m.topic == f"{self.base}/readings"]

    def events(self) -> list[Message]:
        """Messages on the events topic."""
        return [m for m in self.messages if m.topic == f"{self.base}/events"]

    def statuses(self) -> list[Message]:
        """Messages on the status topic."""
        return [m for m in self.messages if m.topic == f"{self.base}/status"]

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(self.host, self.port, identifier="faults-clinic",
                                          timeout=5, keepalive=5) as client:
                    await client.subscribe(f"{self.base}/#", qos=1)
                    self.subscribed.set()
                    async for m in client.messages:
                        raw = bytes(m.payload) if isinstance(m.payload, bytes | bytearray) else \
                            str(m.payload).encode()
                        try:
                            body: Any = json.loads(raw)
                        except ValueError:
                            body = raw.decode(errors="replace")
                        self.messages.append(Message(time.time(), str(m.topic), body))
            except aiomqtt.MqttError:
                self.subscribed.clear()
                await asyncio.sleep(0.05)  # the broker is down or restarting; try again soon
