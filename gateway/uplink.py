"""MQTT uplink: drains the outbox in order over QoS 1 and keeps the hub's retained status.

Delivery is at-least-once with the outbox as the source of truth: a row is marked delivered only
after the broker's PUBACK with a success reason code; after any failure the connection is
dropped, and the next one resends everything still pending from the lowest seq. So a reading may
arrive twice (same reading_id, same bytes) but is never lost, and first arrivals keep seq order.

aiomqtt 2.5.1's ``Client.publish(qos=1)`` does wait for paho's ``on_publish``, which paho calls on
the PUBACK (not on the socket write), but it discards the PUBACK reason code: under MQTT 5 a
broker that refuses a message (0x87 not authorized, 0x97 quota exceeded, ...) still "succeeds".
:class:`_AckingClient` keeps that reason code, so a refused reading stays in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.config import ConfigError, MqttConfig, TlsConfig, read_password
from gateway.outbox import Outbox, OutboxError, Pending

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 60.0
# A connection that lasted this long counts as healthy and resets the reconnect backoff.
STABLE_CONNECTION_S = 30.0
EVENT_QUEUE_SIZE = 200
# Time allowed to say "offline" and disconnect cleanly when the agent shuts down.
_GOODBYE_TIMEOUT_S = 2.0
# CONNACK codes meaning "I do not speak this protocol version": 1 (MQTT 3.1.1), 0x84 (MQTT 5).
_UNSUPPORTED_PROTOCOL = frozenset({1, 0x84})


class UplinkError(Exception):
    """Base class of the uplink's errors; all of them end the connection and cause a retry."""


class ConnectError(UplinkError):
    """Could not connect: refused, TLS failure, bad credentials, no answer."""


class ConnectionLostError(UplinkError):
    """An established connection to the broker broke."""


class PublishTimeoutError(UplinkError):
    """No PUBACK within ``publish_timeout_s``; the connection is presumed dead."""


class PublishRejectedError(UplinkError):
    """The broker answered a reading's PUBLISH with a failure reason code (MQTT 5)."""


@dataclass(frozen=True, slots=True)
class UplinkCounters:
    """Counts since the uplink was created."""

    published: int  # reading PUBLISH packets sent, re-sends included
    acked: int  # readings the broker acknowledged (PUBACK with a success code)
    rejected: int  # readings the broker refused (PUBACK with a failure code); they stay pending
    reconnects: int  # connection attempts after a failure or a lost connection
    events_dropped: int  # events dropped because the in-memory event queue was full


class _AckingClient(aiomqtt.Client):
    """aiomqtt's Client with a QoS 1 publish that returns the broker's PUBACK reason code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._acks: dict[int, asyncio.Future[ReasonCode]] = {}
        # Called on the PUBACK even when the publishing task was cancelled meanwhile (shutdown),
        # so a reading the broker has taken is not left pending and sent again needlessly.
        self._ack_callbacks: dict[int, Callable[[ReasonCode], None]] = {}
        super().__init__(*args, **kwargs)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        # paho calls this from the PUBACK handler, on the event loop (aiomqtt's socket reader).
        callback = self._ack_callbacks.pop(mid, None)
        if callback is not None:
            callback(reason_code)
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(reason_code)
        super()._on_publish(client, userdata, mid, reason_code, properties)

    async def publish_acked(
        self, topic: str, payload: bytes, *, retain: bool = False,
        on_ack: Callable[[ReasonCode], None] | None = None,
    ) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK's reason code (callers bound the wait).

        `on_ack` runs when the PUBACK arrives, even if this call was cancelled by then.
        """
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise ConnectionLostError(f"cannot publish: {paho.error_string(info.rc)}")
        if on_ack is not None:
            self._ack_callbacks[info.mid] = on_ack
        # Registered after paho.publish returns: the PUBACK can only be read by a later loop
        # callback, so it cannot have arrived yet.
        fut: asyncio.Future[ReasonCode] = asyncio.get_running_loop().create_future()
        self._acks[info.mid] = fut
        try:
            return await fut
        finally:
            self._acks.pop(info.mid, None)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def _ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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
        status_interval_s: float = STATUS_INTERVAL_S,
        event_queue_size: int = EVENT_QUEUE_SIZE,
    ) -> None:
        self._cfg = cfg
        self._hub_id = hub_id
        self._outbox = outbox
        self._status = status
        self._client_id = client_id or cfg.client_id or f"rpm-gateway-{hub_id}"
        self._status_interval_s = status_interval_s
        self._where = f"{cfg.host}:{cfg.port}"
        self._protocol = aiomqtt.ProtocolVersion.V5  # of the current or last attempt
        # The broker said (CONNACK) that it does not speak MQTT 5, or the config says so.
        self._v5_refused = cfg.protocol == "3.1.1"
        self._v311_next = False  # the last MQTT 5 attempt got no CONNACK at all
        self._connected = False
        self._last_error: str | None = None
        self._status_wanted = asyncio.Event()
        self._events: deque[bytes] = deque()
        self._event_queue_size = event_queue_size
        self._events_ready = asyncio.Event()
        self._acked: list[int] = []
        self._acked_ready = asyncio.Event()
        self._published = 0
        self._acked_count = 0
        self._rejected = 0
        self._reconnects = 0
        self._connects = 0
        self._connected_at = 0.0
        self._events_dropped = 0

    @property
    def connected(self) -> bool:
        """Whether a connection to the broker is established right now."""
        return self._connected

    @property
    def counters(self) -> UplinkCounters:
        """A snapshot of the delivery counters."""
        return UplinkCounters(
            published=self._published,
            acked=self._acked_count,
            rejected=self._rejected,
            reconnects=self._reconnects,
            events_dropped=self._events_dropped,
        )

    @property
    def protocol(self) -> str:
        """The MQTT version in use or to be tried next: "5" or "3.1.1"."""
        return "5" if self._protocol is aiomqtt.ProtocolVersion.V5 else "3.1.1"

    @property
    def last_error(self) -> str | None:
        """Why the last connection attempt failed or the last connection ended, if it did."""
        return self._last_error

    def topic(self, suffix: str) -> str:
        """The full topic for a suffix: ``<prefix>/<hub_id>/<suffix>``."""
        return f"{self._cfg.topic_prefix}/{self._hub_id}/{suffix}"

    def status_changed(self) -> None:
        """Ask for a status refresh now instead of at the next periodic one."""
        self._status_wanted.set()

    async def publish_event(self, name: str, detail: dict[str, object]) -> None:
        """Queue an event for best-effort QoS 1 delivery; never blocks (drops the oldest if full)."""
        payload = json.dumps(
            {"event": name, "at": _now_iso(), "hub_id": self._hub_id, "detail": detail},
            default=str,
        ).encode()
        if len(self._events) >= self._event_queue_size:
            self._events.popleft()
            self._events_dropped += 1
            log.warning(
                "uplink: event queue full (%d); dropped the oldest event, %d dropped so far",
                self._event_queue_size,
                self._events_dropped,
            )
        self._events.append(payload)
        self._events_ready.set()

    async def run(self) -> None:
        """Connect, publish status, drain the outbox; reconnect with jittered backoff; until cancelled."""
        attempt = 0
        while True:
            connects = self._connects
            try:
                await self._session()
            except (UplinkError, OutboxError) as e:
                self._last_error = str(e)
            stable = time.monotonic() - self._connected_at >= STABLE_CONNECTION_S
            if self._connects > connects and stable:
                # Only a connection that stayed up starts the backoff over: one that is refused a
                # reading (or dropped) right after CONNACK must not reconnect at full rate for ever.
                attempt = 0
            delay = self._backoff(attempt)
            attempt += 1
            self._reconnects += 1
            log.warning("uplink to %s: %s; retrying in %.1fs", self._where, self._last_error, delay)
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        # Full jitter between min and an exponentially growing cap: hubs that lost the broker
        # together do not all come back in the same second.
        lo, hi = self._cfg.reconnect_min_s, self._cfg.reconnect_max_s
        cap = min(hi, lo * 2.0 ** min(attempt, 32))
        return random.uniform(lo, max(lo, cap))

    async def _session(self) -> None:
        """One connection's life: raises when it ends."""
        client = await self._connect()
        self._connects += 1
        self._connected_at = time.monotonic()
        self._connected = True
        self._last_error = None
        log.info(
            "uplink connected to %s (MQTT %s%s)",
            self._where,
            self.protocol,
            ", TLS" if self._cfg.tls else "",
        )
        try:
            await self._serve(client)
        except asyncio.CancelledError:
            await self._goodbye(client)
            raise
        finally:
            self._connected = False
            await self._flush_acked()
            # Bounded by the client's timeout; the connection is being abandoned anyway.
            with contextlib.suppress(aiomqtt.MqttError, OSError):
                await client.__aexit__(None, None, None)

    async def _connect(self) -> _AckingClient:
        try:
            password, tls = await asyncio.to_thread(self._credentials)
        except (ConfigError, OSError, ssl.SSLError) as e:
            raise ConnectError(f"cannot prepare the connection: {e}") from e
        while True:
            v311 = self._v5_refused or self._v311_next
            self._v311_next = False
            self._protocol = aiomqtt.ProtocolVersion.V311 if v311 else aiomqtt.ProtocolVersion.V5
            client = _AckingClient(
                self._cfg.host,
                self._cfg.port,
                username=self._cfg.username,
                password=password,
                identifier=self._client_id,
                protocol=self._protocol,
                will=aiomqtt.Will(
                    self.topic("status"),
                    json.dumps({"state": "offline", "hub_id": self._hub_id}).encode(),
                    qos=1,
                    retain=True,
                ),
                keepalive=self._cfg.keepalive_s,
                # Also bounds the wait for CONNACK and for the clean DISCONNECT.
                timeout=self._cfg.publish_timeout_s,
                tls_context=tls,
                max_inflight_messages=self._cfg.inflight,
            )
            # aiomqtt warns above this many pending calls; our window is the in-flight limit
            # plus a status and an event publish.
            client.pending_calls_threshold = self._cfg.inflight + 2
            try:
                await client.__aenter__()
            except MqttConnectError as e:
                code = e.rc.value if isinstance(e.rc, ReasonCode) else e.rc
                if not v311 and code in _UNSUPPORTED_PROTOCOL and self._cfg.protocol == "auto":
                    log.info("broker %s refuses MQTT 5; using MQTT 3.1.1", self._where)
                    self._v5_refused = True
                    continue
                raise ConnectError(f"broker refused the connection: {e}") from e
            except aiomqtt.MqttError as e:
                # aiomqtt raises "from None"; the context tells a network error (OSError) from
                # a connection that was accepted but never got a CONNACK (TimeoutError). Some
                # 3.1.1-only brokers (amqtt) do not answer an MQTT 5 CONNECT at all, so the next
                # attempt tries 3.1.1. Not for good: a merely overloaded MQTT 5 broker must not
                # leave us on 3.1.1, where a refused PUBLISH cannot be detected.
                if (not v311 and isinstance(e.__context__, TimeoutError)
                        and self._cfg.protocol == "auto"):
                    self._v311_next = True
                raise ConnectError(f"cannot connect: {e}") from e
            return client

    def _credentials(self) -> tuple[str | None, ssl.SSLContext | None]:
        # Read at every attempt (in a thread: file I/O), so a rotated password or certificate
        # is picked up without restarting the agent.
        password = read_password(self._cfg)
        tls = None if self._cfg.tls is None else _ssl_context(self._cfg.tls)
        if self._cfg.tls is not None and self._cfg.tls.insecure_skip_verify:
            log.warning("uplink: TLS certificate verification is OFF (mqtt.tls.insecure_skip_verify)")
        return password, tls

    async def _serve(self, client: _AckingClient) -> None:
        await self._publish_status(client)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watch(client))
                tg.create_task(self._write_acks())
                tg.create_task(self._status_loop(client))
                tg.create_task(self._events_loop(client))
                # The drain runs in the body, which therefore never stops awaiting: Python 3.11's
                # TaskGroup only balances its own cancel of this task (uncancel) when a child
                # fails while the body is still awaiting, and the check below relies on it.
                await self._drain(client, tg)
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

    async def _watch(self, client: _AckingClient) -> None:
        # We subscribe to nothing, so the iterator only ever ends by raising on disconnection:
        # this notices a dead connection even while the outbox is idle.
        try:
            async for _ in client.messages:
                pass
        except aiomqtt.MqttError as e:
            raise ConnectionLostError(f"connection lost: {e.__cause__ or e}") from e

    async def _drain(self, client: _AckingClient, tg: asyncio.TaskGroup) -> None:
        window = asyncio.Semaphore(self._cfg.inflight)
        cursor = 0
        while True:
            batch = await self._outbox.pending(self._cfg.inflight, after_seq=cursor)
            if not batch:
                await self._outbox.wait_for_pending()
                continue
            for item in batch:
                await window.acquire()
                tg.create_task(self._deliver(client, item, window))
                cursor = item.seq

    async def _deliver(self, client: _AckingClient, item: Pending, window: asyncio.Semaphore) -> None:
        try:
            self._published += 1
            log.debug("uplink: publishing seq %d reading %s", item.seq, item.reading_id)
            rc = await self._publish(client, self.topic(item.topic), item.payload,
                                     on_ack=functools.partial(self._record_ack, item.seq))
            if rc.is_failure:
                self._rejected += 1
                # Kept pending and retried after a reconnect: dropping it would lose a reading.
                raise PublishRejectedError(
                    f"broker refused reading seq {item.seq} ({rc.value:#04x} {rc}); it stays queued"
                )
        finally:
            window.release()

    def _record_ack(self, seq: int, rc: ReasonCode) -> None:
        # Runs from the PUBACK itself, so a shutdown that cancels the delivery task still
        # marks what the broker took (the goodbye's own PUBACK comes after these).
        if rc.is_failure:
            return
        self._acked_count += 1
        self._acked.append(seq)
        self._acked_ready.set()

    async def _publish(
        self, client: _AckingClient, topic: str, payload: bytes, *, retain: bool = False,
        on_ack: Callable[[ReasonCode], None] | None = None,
    ) -> ReasonCode:
        try:
            async with asyncio.timeout(self._cfg.publish_timeout_s):
                return await client.publish_acked(topic, payload, retain=retain, on_ack=on_ack)
        except TimeoutError as e:
            raise PublishTimeoutError(
                f"no PUBACK within {self._cfg.publish_timeout_s}s on {topic}"
            ) from e

    async def _write_acks(self) -> None:
        # Batched: one fsync'd transaction per burst of PUBACKs instead of one per reading.
        while True:
            await self._acked_ready.wait()
            self._acked_ready.clear()
            await self._flush_acked()

    async def _flush_acked(self) -> None:
        # The seqs leave the list only after the UPDATE committed: if this task is cancelled
        # meanwhile (shutdown), the final flush of the session marks them again (idempotent).
        seqs = list(self._acked)
        if not seqs:
            return
        try:
            await self._outbox.mark_delivered(seqs)
        except OutboxError as e:
            # They stay pending and are sent again: a duplicate (same reading_id), not a loss.
            log.error("uplink: could not mark %d reading(s) delivered: %s", len(seqs), e)
        del self._acked[: len(seqs)]

    def _status_payload(self, state: str) -> bytes:
        try:
            status = dict(self._status())
        except Exception:
            # A broken status provider must not stop readings from being delivered.
            log.exception("uplink: the status provider failed; publishing a minimal status")
            status = {}
        return json.dumps(
            {"hub_id": self._hub_id, **status, "state": state}, default=str
        ).encode()

    async def _publish_status(self, client: _AckingClient, state: str = "online") -> None:
        rc = await self._publish(client, self.topic("status"), self._status_payload(state), retain=True)
        if rc.is_failure:
            log.warning("uplink: broker refused the status message (%#04x %s)", rc.value, rc)

    async def _status_loop(self, client: _AckingClient) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._status_interval_s):
                    await self._status_wanted.wait()
            self._status_wanted.clear()
            await self._publish_status(client)

    async def _events_loop(self, client: _AckingClient) -> None:
        while True:
            while not self._events:
                await self._events_ready.wait()
                self._events_ready.clear()
            payload = self._events.popleft()
            try:
                rc = await self._publish(client, self.topic("events"), payload)
            except BaseException:
                # Not answered: keep it for the next connection (the queue may have filled meanwhile).
                if len(self._events) < self._event_queue_size:
                    self._events.appendleft(payload)
                else:
                    self._events_dropped += 1
                raise
            if rc.is_failure:
                log.warning("uplink: broker refused an event (%#04x %s); dropped", rc.value, rc)

    async def _goodbye(self, client: _AckingClient) -> None:
        # A clean DISCONNECT suppresses the last will, so say "offline" ourselves first.
        with contextlib.suppress(UplinkError, TimeoutError):
            async with asyncio.timeout(_GOODBYE_TIMEOUT_S):
                await self._publish_status(client, "offline")
        log.info("uplink to %s: shut down", self._where)
