"""One connection to the broker: paho-mqtt's client driven by this event loop, and a connect whose
errors say what went wrong.

Why paho-mqtt itself and not aiomqtt (issue 8): aiomqtt's ``publish(qos=1)`` waits for the PUBACK
but discards its reason code, so under MQTT 5 a broker that refuses a reading (0x87 not
authorized, 0x97 quota exceeded, ...) still "succeeds"; reading the code meant overriding
aiomqtt's private callbacks and reaching into its private client. paho 2.x gives it publicly
(``on_publish`` with CallbackAPIVersion.VERSION2), the CONNACK's properties with it (the
broker's Maximum Packet Size), and its documented external-loop API (``on_socket_*``,
``loop_read``/``loop_write``/``loop_misc``) lets the event loop drive the socket: no thread, no
per-message future or task. Measured with bench/drain.py on the same machine: see the commit.

One paho quirk is still handled below paho's public surface (``_LenientPaho``): mosquitto answers
a payload over its ``message_size_limit`` with PUBACK 0x95, a code MQTT 5 allows only in
DISCONNECT; paho declares such a PUBACK malformed and drops the connection, and the reading
would be resent, and the connection dropped, for ever. The override reads that PUBACK as the
refusal it means. tests/integration/test_uplink_quarantine.py fails if paho changes under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.config import MqttConfig
from gateway.uplink_codes import AUTH_REFUSED, UNSUPPORTED_PROTOCOL, code_of
from gateway.uplink_errors import (
    AuthRefusedError,
    ConnectError,
    ConnectionLostError,
    ProtocolRefusedError,
)

OnAck = Callable[[ReasonCode], None]


@dataclass(frozen=True, slots=True)
class Will:
    """The last will: published by the broker when the connection dies without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def publish_packet_size(topic: str, payload: bytes, *, v5: bool = True) -> int:
    """Bytes of a QoS 1 PUBLISH without properties, as the broker's Maximum Packet Size counts them."""
    remaining = 2 + len(topic.encode()) + 2 + (1 if v5 else 0) + len(payload)
    return 1 + _varint_len(remaining) + remaining


def _lenient_reason(code: int) -> ReasonCode | None:
    # A reason code paho knows for some packet type, to stand for one it refuses in a PUBACK.
    for packet_type in (PacketTypes.PUBACK, PacketTypes.DISCONNECT, PacketTypes.CONNACK):
        try:
            return ReasonCode(packet_type, identifier=code)
        except (KeyError, ValueError):  # not a code of that packet type
            continue
    return None


class _LenientPaho(paho.Client):
    """paho's client, reading mosquitto's PUBACK 0x95 as a refusal instead of a protocol error."""

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        try:
            return super()._handle_pubackcomp(cmd)
        except MalformedPacket:
            packet = bytes(self._in_packet["packet"])
            if cmd != "PUBACK" or self._protocol != paho.MQTTv5 or len(packet) < 3:
                raise
            mid, code = struct.unpack("!HB", packet[:3])
            reason = _lenient_reason(code)
            if reason is None or not reason.is_failure:
                raise
            with self._out_message_mutex:
                if mid in self._out_messages:
                    props = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
                    return self._do_on_publish(mid, reason, props)
            return paho.MQTT_ERR_SUCCESS


class MqttLink:
    """A connected MQTT client on this event loop: QoS 1 publishes with their PUBACK reason codes."""

    def __init__(self, cfg: MqttConfig, client_id: str, will: Will, password: str | None,
                 tls: ssl.SSLContext | None, *, v311: bool) -> None:
        self._cfg = cfg
        self._loop = asyncio.get_running_loop()
        self._connack: asyncio.Future[tuple[ReasonCode, Properties | None]] = (
            self._loop.create_future())
        self._closed: asyncio.Future[str] = self._loop.create_future()
        self._acks: dict[int, OnAck] = {}
        self._misc: asyncio.Task[None] | None = None
        self._fd = -1
        self._loop_thread = threading.get_ident()
        self.max_packet_size: int | None = None
        self.v5 = not v311
        p = _LenientPaho(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv311 if v311 else paho.MQTTv5,
                         reconnect_on_failure=False)
        if cfg.username is not None:
            p.username_pw_set(cfg.username, password)
        p.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        if tls is not None:
            p.tls_set_context(tls)
        # The drain keeps at most `inflight` readings out; a status or an event beyond that
        # waits in paho's queue for a free slot.
        p.max_inflight_messages_set(cfg.inflight)
        p.on_connect = self._on_connect
        p.on_disconnect = self._on_disconnect
        p.on_publish = self._on_publish
        p.on_socket_open = self._on_socket_open
        p.on_socket_close = self._on_socket_close
        p.on_socket_register_write = self._on_register_write
        p.on_socket_unregister_write = self._on_unregister_write
        self._paho = p

    # -- paho's callbacks (on the event loop, except socket open/register during connect) ----

    def _on_connect(self, _c: paho.Client, _u: Any, _f: paho.ConnectFlags, rc: ReasonCode,
                    props: Properties | None = None) -> None:
        if not self._connack.done():
            self._connack.set_result((rc, props))

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: paho.DisconnectFlags, rc: ReasonCode,
                       _p: Properties | None = None) -> None:
        if not self._closed.done():
            self._closed.set_result(str(rc))

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, rc: ReasonCode,
                    _p: Properties) -> None:
        # Called from the PUBACK handler: paho calls it on the PUBACK, not on the socket write.
        on_ack = self._acks.pop(mid, None)
        if on_ack is not None:
            on_ack(rc)

    def _on_socket_open(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        # Called in the thread that runs paho's blocking connect().
        self._loop.call_soon_threadsafe(self._watch_socket, sock.fileno())

    def _watch_socket(self, fd: int) -> None:
        if self._closed.done():  # abandoned (cancelled, timed out) while connect() ran
            self._abandon()
            return
        self._fd = fd
        self._loop.add_reader(fd, self._readable)
        self._misc = self._loop.create_task(self._misc_loop(), name="mqtt keepalive")

    def _on_socket_close(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        fd = sock.fileno()
        if fd > -1:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        if not self._closed.done():
            self._closed.set_result("socket closed")

    def _on_register_write(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        # On every publish that finds the socket idle: no wake-up through the loop's self-pipe
        # unless it comes from connect()'s thread.
        if threading.get_ident() == self._loop_thread:
            self._loop.add_writer(sock.fileno(), self._writable)
        else:
            self._loop.call_soon_threadsafe(self._add_writer_if_open, sock)

    def _add_writer_if_open(self, sock: Any) -> None:
        # Queued from connect()'s thread: the connect may have been abandoned (and its socket
        # closed) meanwhile, and the fd number reused by another part of the process.
        fd: int = sock.fileno()
        if self._closed.done() or sock is not self._paho.socket() or fd < 0:
            return
        self._loop.add_writer(fd, self._writable)

    def _on_unregister_write(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        self._loop.remove_writer(sock.fileno())

    def _readable(self) -> None:
        try:
            while True:
                self._paho.loop_read()
                # TLS may hold decrypted bytes the socket no longer signals.
                sock = self._paho.socket()
                if not (isinstance(sock, ssl.SSLSocket) and sock.pending() > 0):
                    break
        except Exception as e:  # a broken pipe, a TLS error: the connection is gone
            self._fail(f"{type(e).__name__}: {e}")

    def _writable(self) -> None:
        try:
            self._paho.loop_write()
        except Exception as e:
            self._fail(f"{type(e).__name__}: {e}")

    def _fail(self, why: str) -> None:
        if not self._closed.done():
            self._closed.set_result(why)

    async def _misc_loop(self) -> None:
        # Keepalive: paho sends PINGREQ and closes the connection when no PINGRESP came in time.
        while self._paho.loop_misc() == paho.MQTT_ERR_SUCCESS:  # noqa: ASYNC110
            await asyncio.sleep(1)

    # -- the uplink's side ---------------------------------------------------------------------

    async def connect(self) -> None:
        """TCP (+ TLS) in a thread, then wait for the CONNACK; raises ConnectError saying why."""
        cfg, v = self._cfg, "5" if self.v5 else "3.1.1"
        try:
            # paho's own connect timeout (5 s) bounds the TCP connect and the TLS handshake.
            await asyncio.to_thread(self._paho.connect, cfg.host, cfg.port, cfg.keepalive_s)
        except (OSError, ValueError) as e:  # refused, unreachable, TLS (socket timeouts too)
            self._abandon()
            raise ConnectError(f"cannot connect: {e}") from e
        except BaseException:  # cancelled: the agent is stopping
            self._abandon()
            raise
        try:
            async with asyncio.timeout(cfg.publish_timeout_s):
                waits: set[asyncio.Future[Any]] = {self._connack, self._closed}
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError as e:
            self._abandon()
            # A frozen network or an overloaded broker: a failed attempt like any other, never
            # a reason to try MQTT 3.1.1, where refusals are invisible.
            hint = ""
            if self.v5 and cfg.protocol == "auto":
                hint = ' (a broker that ignores MQTT 5 needs mqtt.protocol = "3.1.1")'
            raise ConnectError(f"no CONNACK within {cfg.publish_timeout_s}s{hint}") from e
        except BaseException:
            self._abandon()
            raise
        if self._connack not in done:
            self._abandon()
            raise ConnectError(f"cannot connect: connection closed before CONNACK "
                               f"({self._closed.result()})")
        rc, props = self._connack.result()
        if rc.is_failure:
            self._abandon()
            code = code_of(rc)
            if code in UNSUPPORTED_PROTOCOL:
                raise ProtocolRefusedError(f"broker refused MQTT {v}: {rc}")
            if code in AUTH_REFUSED:
                raise AuthRefusedError(f"broker refused the credentials: {rc}")
            raise ConnectError(f"broker refused the connection: {rc}")
        # MQTT 5 CONNACK: a broker that limits packet sizes says so here, and disconnects a
        # client that sends a larger one.
        size = getattr(props, "MaximumPacketSize", None) if props is not None else None
        self.max_packet_size = int(size) if size is not None else None

    def fits(self, topic: str, payload: bytes) -> bool:
        """Whether a QoS 1 PUBLISH of this is within the broker's Maximum Packet Size (if it set one)."""
        limit = self.max_packet_size
        return limit is None or publish_packet_size(topic, payload) <= limit

    def send(self, topic: str, payload: bytes, *, on_ack: OnAck, retain: bool = False) -> None:
        """Publish at QoS 1 without waiting; ``on_ack`` gets the PUBACK's reason code.

        Callers bound the wait themselves. ``on_ack`` runs even if whoever sent it is gone.
        """
        if self._closed.done():
            raise ConnectionLostError(f"cannot publish: connection lost ({self._closed.result()})")
        info = self._paho.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise ConnectionLostError(f"cannot publish: {paho.error_string(info.rc)}")
        # Registered after publish() returns: the PUBACK is read by a later loop callback.
        self._acks[info.mid] = on_ack

    async def publish_acked(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK's reason code (callers bound the wait)."""
        fut: asyncio.Future[ReasonCode] = self._loop.create_future()

        def on_ack(rc: ReasonCode) -> None:
            if not fut.done():
                fut.set_result(rc)

        self.send(topic, payload, on_ack=on_ack, retain=retain)
        return await fut

    async def wait_closed(self) -> str:
        """Return why, once the connection is gone (keepalive, socket error, broker DISCONNECT)."""
        return await asyncio.shield(self._closed)

    async def close(self) -> None:
        """A clean DISCONNECT (the broker then drops the will), bounded by publish_timeout_s."""
        if not self._closed.done() and self._paho.disconnect() == paho.MQTT_ERR_SUCCESS:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._cfg.publish_timeout_s):
                    await asyncio.shield(self._closed)
        self._abandon()

    def _abandon(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
        if self._fd > -1:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        sock = self._paho.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._fail("closed")


async def open_client(
    cfg: MqttConfig,
    client_id: str,
    will: Will,
    password: str | None,
    tls: ssl.SSLContext | None,
    *,
    v311: bool,
) -> MqttLink:
    """Connect once (MQTT 5, or 3.1.1 if ``v311``); raises a ConnectError subclass saying why not."""
    link = MqttLink(cfg, client_id, will, password, tls, v311=v311)
    await link.connect()
    return link
