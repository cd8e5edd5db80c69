"""The hub's own messages on a connection: the retained status and the events queue.

The status is published on connecting and whenever the owner asks (the agent's housekeeping,
once a minute with the outbox figures it has just read, and after every session); it has no
timer of its own, which published the same status a second time. Events are queued in
memory, bounded (the oldest is dropped, counted), and published best-effort at QoS 1; one not
answered on a connection is kept for the next. On a clean stop "offline" is published with
the same shape as the last will, since a clean DISCONNECT suppresses the will.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime

from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError

from gateway.messages import UnknownEventError, event_message, offline_message, why_invalid
from gateway.uplink_client import MqttLink
from gateway.uplink_codes import describe
from gateway.uplink_errors import PublishTimeoutError, UplinkError

log = logging.getLogger("gateway.uplink")

# Time allowed to say "offline" and disconnect cleanly when the agent shuts down.
GOODBYE_TIMEOUT_S = 2.0


async def publish_once(link: MqttLink, topic: str, payload: bytes, timeout_s: float, *,
                       retain: bool = False) -> ReasonCode:
    """Publish at QoS 1 and wait (bounded) for the PUBACK's reason code."""
    try:
        async with asyncio.timeout(timeout_s):
            return await link.publish_acked(topic, payload, retain=retain)
    except TimeoutError as e:
        raise PublishTimeoutError(f"no PUBACK within {timeout_s}s on {topic}") from e


class Announcer:
    """The status and events of one hub, published on whichever connection is up."""

    def __init__(
        self,
        hub_id: str,
        topic: Callable[[str], str],
        status: Callable[[], dict[str, object]],
        broker: Callable[[], dict[str, object]],
        *,
        publish_timeout_s: float,
        event_queue_size: int,
    ) -> None:
        self._hub_id = hub_id
        self._topic = topic
        self._status = status
        self._broker = broker
        self._timeout_s = publish_timeout_s
        self._wanted = asyncio.Event()
        self.events: deque[bytes] = deque()
        self._queue_size = event_queue_size
        self._events_ready = asyncio.Event()
        self.events_dropped = 0

    def status_changed(self) -> None:
        """Publish the status at the next chance."""
        self._wanted.set()

    def queue_event(self, name: str, detail: Mapping[str, object],
                    at: datetime | str | None = None) -> None:
        """Queue an event; never blocks (drops the oldest if full); refuses undeclared ones."""
        try:
            payload = event_message(self._hub_id, name, detail, at)
        except UnknownEventError as e:
            log.error("uplink: %s; not published", e)
            return
        except ValidationError as e:
            log.error("uplink: event %s does not fit its schema (%s); not published", name,
                      why_invalid(e))
            return
        if len(self.events) >= self._queue_size:
            self.events.popleft()
            self.events_dropped += 1
            log.warning(
                "uplink: event queue full (%d); dropped the oldest event, %d dropped so far",
                self._queue_size, self.events_dropped,
            )
        self.events.append(payload)
        self._events_ready.set()

    def status_payload(self) -> bytes:
        """The online status: the provider's report (gateway.status), `broker` and `state`."""
        try:
            status = dict(self._status())
        except Exception:
            # A broken status provider must not stop readings from being delivered.
            log.exception("uplink: the status provider failed; publishing a minimal status")
            status = {}
        return json.dumps(
            {"hub_id": self._hub_id, **status, "broker": self._broker(), "state": "online"},
            default=str,
        ).encode()

    async def publish_status(self, link: MqttLink, *, offline: bool = False) -> None:
        """Publish the status (retained) now; ``offline``: the clean stop's message."""
        payload = offline_message(self._hub_id, "stopped") if offline else self.status_payload()
        topic = self._topic("status")
        if not link.fits(topic, payload):
            log.warning("uplink: status (%d bytes) exceeds the broker's maximum packet size %s; "
                        "not sent", len(payload), link.max_packet_size)
            return
        rc = await publish_once(link, topic, payload, self._timeout_s, retain=True)
        if rc.is_failure:
            log.warning("uplink: broker refused the status message (%s)", describe(rc))

    async def status_loop(self, link: MqttLink) -> None:
        """Publish the status whenever asked, until cancelled."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            await self.publish_status(link)

    async def events_loop(self, link: MqttLink) -> None:
        """Publish queued events in order until cancelled or the connection fails."""
        topic = self._topic("events")
        while True:
            while not self.events:
                await self._events_ready.wait()
                self._events_ready.clear()
            payload = self.events.popleft()
            if not link.fits(topic, payload):
                log.warning("uplink: an event (%d bytes) exceeds the broker's maximum packet "
                            "size %s; dropped", len(payload), link.max_packet_size)
                continue
            try:
                rc = await publish_once(link, topic, payload, self._timeout_s)
            except BaseException:
                # Not answered: keep it for the next connection (the queue may have filled meanwhile).
                if len(self.events) < self._queue_size:
                    self.events.appendleft(payload)
                else:
                    self.events_dropped += 1
                raise
            if rc.is_failure:
                log.warning("uplink: broker refused an event (%s); dropped", describe(rc))

    async def goodbye(self, link: MqttLink) -> None:
        """Say "offline" (a clean DISCONNECT suppresses the last will), bounded."""
        with contextlib.suppress(UplinkError, TimeoutError):
            async with asyncio.timeout(GOODBYE_TIMEOUT_S):
                await self.publish_status(link, offline=True)
