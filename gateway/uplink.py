"""MQTT uplink: drains the outbox in order over QoS 1 and keeps the hub's retained status.

Delivery is at-least-once with the outbox as the source of truth: a row is marked delivered only
after the broker's PUBACK with a success reason code; after a lost connection, a publish timeout
or a transient refusal the connection is dropped, and the next one resends everything still
pending from the lowest seq. So a reading may arrive twice (same reading_id, same bytes) but is
never lost, and first arrivals keep seq order.

A reading the broker refuses for good (see gateway/uplink_codes.py), or one larger than the
broker's Maximum Packet Size, is quarantined in the outbox (kept, retried every
``quarantine_retry_s``) and the drain goes on with the rest on the same connection.

MQTT 5 is used unless the config says 3.1.1, or (``protocol = "auto"``) the broker's CONNACK says
it does not speak version 5. Never on a mere timeout: on 3.1.1 a broker acknowledges a PUBLISH it
refuses (ACL), so refused readings would be marked delivered and lost.

This module is the connection's life: connect (with that fallback), reconnect with full-jitter
backoff, the broker's state. The pieces: gateway/uplink_client.py (one connection: paho-mqtt on
this event loop, TLS, CONNACK errors), uplink_drain.py (the readings: fetch ahead, window,
PUBACK, batched marks), uplink_status.py (retained status, events, the clean stop's offline),
uplink_credentials.py, uplink_health.py, uplink_quarantine.py, uplink_codes.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from gateway.config import MqttConfig
from gateway.messages import BrokerReport, offline_message
from gateway.outbox import Outbox, OutboxError, Pending
from gateway.uplink_client import MqttLink, Will, open_client
from gateway.uplink_credentials import load_credentials
from gateway.uplink_drain import AckBook, Drain, DrainCounts
from gateway.uplink_errors import (
    AuthRefusedError,
    ConnectError,
    ConnectionLostError,
    CredentialsUnreadableError,
    ProtocolRefusedError,
    PublishRejectedError,
    PublishTimeoutError,
    UplinkError,
)
from gateway.uplink_health import SLOW_STATES, BrokerHealth, BrokerState, backoff
from gateway.uplink_quarantine import QuarantineBook
from gateway.uplink_status import Announcer

__all__ = [
    "AuthRefusedError",
    "ConnectError",
    "ConnectionLostError",
    "CredentialsUnreadableError",
    "ProtocolRefusedError",
    "PublishRejectedError",
    "PublishTimeoutError",
    "Uplink",
    "UplinkCounters",
    "UplinkError",
]

log = logging.getLogger(__name__)

# A connection that lasted this long counts as healthy and resets the reconnect backoff.
STABLE_CONNECTION_S = 30.0
EVENT_QUEUE_SIZE = 200
# A stored reading may cut a reconnect wait short, but at most this often: a device replaying
# its memory must not turn the backoff into a tight loop against a dead broker.
EARLY_RETRY_MIN_INTERVAL_S = 5.0
# Said once, when 3.1.1 is in use: it is why MQTT 5 is the default.
_V311_BLIND = (
    "uplink to %s: using MQTT 3.1.1 (%s); on 3.1.1 the broker acknowledges a reading it refuses "
    "(ACL, size), so such readings are marked delivered and lost; use MQTT 5 if the broker has it"
)


@dataclass(frozen=True, slots=True)
class UplinkCounters:
    """Counts since the uplink was created."""

    published: int  # reading PUBLISH packets sent, re-sends included
    acked: int  # readings the broker acknowledged (PUBACK with a success code)
    rejected: int  # reading PUBLISHes the broker refused (PUBACK with a failure code)
    reconnects: int  # connection attempts after a failure or a lost connection
    events_dropped: int  # events dropped because the in-memory event queue was full
    quarantined: int = 0  # readings quarantined (refused for good, or over the packet size limit)
    marks: int = 0  # transactions that marked acknowledged readings delivered


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


class Uplink:
    """Delivers the outbox to the clinic's MQTT broker and publishes the hub's status and events."""

    def __init__(
        self,
        cfg: MqttConfig,
        hub_id: str,
        outbox: Outbox,
        status: Callable[[], dict[str, object]],
        *,
        client_id: str | None = None,
        event_queue_size: int = EVENT_QUEUE_SIZE,
    ) -> None:
        self._cfg = cfg
        self._hub_id = hub_id
        self._outbox = outbox
        self._status = status
        self._client_id = client_id or cfg.client_id or f"rpm-gateway-{hub_id}"
        self._where = f"{cfg.host}:{cfg.port}"
        # The broker said (CONNACK) that it does not speak MQTT 5, or the config says so.
        self._v5_refused = cfg.protocol == "3.1.1"
        self._health = BrokerHealth(self._where, log)
        self._connected = False
        self._last_error: str | None = None
        self._said_once = False
        self._announcer = Announcer(
            hub_id, self.topic, status, self.broker_status,
            publish_timeout_s=cfg.publish_timeout_s, event_queue_size=event_queue_size,
        )
        self._acks = AckBook(outbox)
        self._counts = DrainCounts()
        self._wake = asyncio.Event()
        self._wakeable = False  # waiting to reconnect, in a state a new attempt may fix soon
        self._early_at = -EARLY_RETRY_MIN_INTERVAL_S  # monotonic time of the last early attempt
        self._quarantine = QuarantineBook(cfg.quarantine_retry_s, log)
        self._reconnects = 0
        self._connects = 0
        self._connected_at = 0.0

    @property
    def connected(self) -> bool:
        """Whether a connection to the broker is established right now."""
        return self._connected

    @property
    def _events(self) -> deque[bytes]:
        # The queued event payloads (read by the contract tests).
        return self._announcer.events

    @property
    def counters(self) -> UplinkCounters:
        """A snapshot of the delivery counters."""
        return UplinkCounters(
            published=self._counts.published,
            acked=self._counts.acked,
            rejected=self._counts.rejected,
            reconnects=self._reconnects,
            events_dropped=self._announcer.events_dropped,
            quarantined=self._quarantine.count,
            marks=self._acks.transactions,
        )

    @property
    def protocol(self) -> str:
        """The MQTT version in use, or to be tried next: "5" or "3.1.1"."""
        return "3.1.1" if self._v5_refused else "5"

    @property
    def last_error(self) -> str | None:
        """Why the last connection attempt failed or the last connection ended, if it did."""
        return self._last_error

    @property
    def state(self) -> BrokerState:
        """The broker connection's state (see broker_status)."""
        return self._health.state

    def broker_status(self) -> dict[str, object]:
        """The ``broker`` object of the status payload: state, since, protocol, last_error, quarantined."""
        report = BrokerReport.model_validate({
            "state": self._health.state,
            "since": self._health.since,
            "protocol": self.protocol,
            "last_error": self._health.last_error,
            "quarantined": self._quarantine.count,
        })
        return report.model_dump(mode="json")

    def topic(self, suffix: str) -> str:
        """The full topic for a suffix: ``<prefix>/<hub_id>/<suffix>``."""
        return f"{self._cfg.topic_prefix}/{self._hub_id}/{suffix}"

    def status_changed(self) -> None:
        """Publish the status now (the agent asks after every session and once a minute)."""
        self._announcer.status_changed()

    def reading_stored(self) -> None:
        """A reading was committed: while waiting to reconnect, try now (rate-limited)."""
        # Without this the hub would wait up to reconnect_max_s after the broker came back
        # although it has something to deliver. Refused or unreadable credentials are not
        # retried early: a new reading does not fix them.
        now = time.monotonic()
        if self._wakeable and now - self._early_at >= EARLY_RETRY_MIN_INTERVAL_S:
            self._early_at = now
            self._wake.set()

    async def publish_event(self, name: str, detail: Mapping[str, object], *,
                            at: datetime | str | None = None) -> None:
        """Queue an event for best-effort QoS 1 delivery; never blocks (drops the oldest if full).

        `at`: when it happened, if not now (an event journalled by the CLI, published later).
        The message is built through its model (gateway.messages.EVENTS): an event that is not
        declared there, or whose detail does not fit it, is logged as an error and not sent.
        """
        self._announcer.queue_event(name, detail, at)

    async def run(self) -> None:
        """Connect, publish status, drain the outbox; reconnect with jittered backoff; until cancelled."""
        self._say_once()
        attempt = 0
        while True:
            connects = self._connects
            try:
                await self._session()
            except (UplinkError, OutboxError) as e:
                error: UplinkError | OutboxError = e
            was_connected = self._connects > connects
            stable = was_connected and time.monotonic() - self._connected_at >= STABLE_CONNECTION_S
            if stable:
                # Only a connection that stayed up starts the backoff over: one that is dropped
                # right after CONNACK must not reconnect at full rate for ever.
                attempt = 0
            state = self._state_after(error, was_connected)
            if state in SLOW_STATES:
                delay = self._cfg.auth_retry_s
            else:
                delay = self._backoff(attempt)
                attempt += 1
            self._reconnects += 1
            self._last_error = str(error)
            if was_connected:
                self._health.lost(self._last_error, delay, stable=stable)
            else:
                self._health.failed(state, self._last_error, delay)
            await self._pause(delay, wakeable=state not in SLOW_STATES)

    def _say_once(self) -> None:
        if self._said_once:
            return
        self._said_once = True
        if self._cfg.protocol == "3.1.1":
            log.warning(_V311_BLIND, self._where, 'mqtt.protocol = "3.1.1"')
        tls = self._cfg.tls
        if tls is not None and tls.insecure_skip_verify:
            log.warning("uplink: TLS certificate verification is OFF (mqtt.tls.insecure_skip_verify)")

    @staticmethod
    def _state_after(error: Exception, was_connected: bool) -> BrokerState:
        if was_connected:
            return BrokerState.CONNECTING
        if isinstance(error, AuthRefusedError):
            return BrokerState.AUTH_REFUSED
        if isinstance(error, CredentialsUnreadableError):
            return BrokerState.CREDENTIALS_UNREADABLE
        return BrokerState.UNREACHABLE

    async def _pause(self, delay: float, *, wakeable: bool) -> None:
        self._wake.clear()
        self._wakeable = wakeable
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
        finally:
            self._wakeable = False

    def _backoff(self, attempt: int) -> float:
        return backoff(attempt, self._cfg.reconnect_min_s, self._cfg.reconnect_max_s)

    async def _session(self) -> None:
        """One connection's life: raises when it ends."""
        client = await self._connect()
        self._connects += 1
        self._connected_at = time.monotonic()
        self._connected = True
        self._last_error = None
        self._health.connected(self.protocol, self._cfg.tls is not None)
        try:
            await self._serve(client)
        except asyncio.CancelledError:
            await self._goodbye(client)
            raise
        finally:
            self._connected = False
            await self._acks.flush()
            # Bounded by the client's timeout; the connection is being abandoned anyway.
            await client.close()

    async def _connect(self) -> MqttLink:
        password, tls = await asyncio.to_thread(load_credentials, self._cfg)
        # Fixed now, published by the broker whenever this connection dies without a
        # DISCONNECT: the same shape as the clean stop's, its `at` the time of connecting.
        will = Will(
            self.topic("status"),
            offline_message(self._hub_id, "connection_lost"),
            qos=1,
            retain=True,
        )
        try:
            return await open_client(
                self._cfg, self._client_id, will, password, tls, v311=self._v5_refused
            )
        except ProtocolRefusedError:
            if self._v5_refused or self._cfg.protocol != "auto":
                raise
        # The one reason to leave MQTT 5: the broker's CONNACK said it does not speak it.
        self._v5_refused = True
        log.warning(_V311_BLIND, self._where, "the broker refuses MQTT 5")
        return await open_client(self._cfg, self._client_id, will, password, tls, v311=True)

    async def _serve(self, client: MqttLink) -> None:
        await self._announcer.publish_status(client)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watch(client))
                tg.create_task(self._acks.writer())
                tg.create_task(self._announcer.status_loop(client))
                tg.create_task(self._announcer.events_loop(client))
                drain = Drain(
                    client, self._outbox, topic=self.topic, inflight=self._cfg.inflight,
                    publish_timeout_s=self._cfg.publish_timeout_s, counts=self._counts,
                    acks=self._acks, quarantine=self._quarantine, set_aside=self._set_aside,
                )
                # The drain runs in the body, which therefore never stops awaiting: Python 3.11's
                # TaskGroup only balances its own cancel of this task (uncancel) when a child
                # fails while the body is still awaiting, and the check below relies on it.
                await drain.run(tg)
        except BaseExceptionGroup as group:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A cancellation that raced with a failing child is reported by the TaskGroup
                # as the child's error, and the cancel request is spent: let the cancellation
                # win, or run() would treat it as a lost connection and go on for ever.
                raise asyncio.CancelledError from group
            leaves = _leaves(group)
            expected = [e for e in leaves if isinstance(e, UplinkError | OutboxError)]
            if len(expected) != len(leaves):
                raise  # a bug, not a network problem: let it be seen
            raise expected[0] from group

    async def _watch(self, client: MqttLink) -> None:
        # Notices a dead connection even while the outbox is idle (paho's keepalive: no
        # PINGRESP within keepalive_s closes the connection).
        why = await client.wait_closed()
        raise ConnectionLostError(f"connection lost: {why}")

    async def _set_aside(self, item: Pending, reason: str) -> None:
        # Kept in the outbox with its reason and offered again every quarantine_retry_s; the
        # drain goes on behind it. No payload in the log or the event: it is patient data.
        # A retry refused again is not news: counted and reported once per reading.
        new = await self._outbox.quarantine(item.seq, reason, self._cfg.quarantine_retry_s)
        self._quarantine.record(item.seq, reason, new=new)
        if new:
            await self.publish_event("reading_quarantined", {"seq": item.seq, "reason": reason})
            self.status_changed()

    async def _goodbye(self, client: MqttLink) -> None:
        await self._announcer.goodbye(client)
        log.info("uplink to %s: shut down", self._where)
