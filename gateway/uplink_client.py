"""One connection to the broker: aiomqtt's Client with what the uplink needs and aiomqtt does
not give (PUBACK reason codes, the broker's Maximum Packet Size, PUBACKs that paho would reject
as malformed), and a connect whose errors say what went wrong.

aiomqtt 2.5.1's ``Client.publish(qos=1)`` does wait for paho's ``on_publish``, which paho calls on
the PUBACK (not on the socket write), but it discards the PUBACK reason code: under MQTT 5 a
broker that refuses a message (0x87 not authorized, 0x97 quota exceeded, ...) still "succeeds".
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Callable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.enums import MQTTErrorCode
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


class AckingClient(aiomqtt.Client):
    """aiomqtt's Client with a QoS 1 publish that returns the broker's PUBACK reason code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._acks: dict[int, asyncio.Future[ReasonCode]] = {}
        # Called on the PUBACK even when the publishing task was cancelled meanwhile (shutdown),
        # so a reading the broker has taken is not left pending and sent again needlessly.
        self._ack_callbacks: dict[int, Callable[[ReasonCode], None]] = {}
        self.max_packet_size: int | None = None
        super().__init__(*args, **kwargs)
        self._strict_puback = self._client._handle_pubackcomp
        # Instance attribute shadowing paho's method: paho's packet dispatcher calls it by name.
        self._client._handle_pubackcomp = self._handle_pubackcomp  # type: ignore[method-assign]

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        # mosquitto answers a payload over `message_size_limit` with PUBACK 0x95, a code MQTT 5
        # allows only in DISCONNECT; paho then declares the packet malformed and drops the
        # connection, and the reading would be resent (and the connection dropped) for ever.
        # Such a PUBACK is read here as the refusal it means.
        try:
            result: MQTTErrorCode = self._strict_puback(cmd)
        except MalformedPacket:
            inner = self._client
            packet = bytes(inner._in_packet["packet"])
            if cmd != "PUBACK" or inner._protocol != paho.MQTTv5 or len(packet) < 3:
                raise
            mid, code = struct.unpack("!HB", packet[:3])
            reason = _lenient_reason(code)
            if reason is None or not reason.is_failure:
                raise
            with inner._out_message_mutex:
                if mid in inner._out_messages:
                    props = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
                    return inner._do_on_publish(mid, reason, props)
            return paho.MQTT_ERR_SUCCESS
        return result

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        # MQTT 5 CONNACK: a broker that limits packet sizes says so here, and disconnects a
        # client that sends a larger one (aiomqtt does not keep the CONNACK's properties).
        size = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        self.max_packet_size = int(size) if size is not None else None
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def fits(self, topic: str, payload: bytes) -> bool:
        """Whether a QoS 1 PUBLISH of this is within the broker's Maximum Packet Size (if it set one)."""
        limit = self.max_packet_size
        return limit is None or publish_packet_size(topic, payload) <= limit

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

    def send(self, topic: str, payload: bytes, *, on_ack: Callable[[ReasonCode], None]) -> None:
        """Publish at QoS 1 without waiting; ``on_ack`` runs on the PUBACK (callers bound the wait)."""
        info = self._client.publish(topic, payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise ConnectionLostError(f"cannot publish: {paho.error_string(info.rc)}")
        # Registered after paho.publish returns: the PUBACK can only be read by a later loop
        # callback, so it cannot have arrived yet.
        self._ack_callbacks[info.mid] = on_ack

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


MqttLink = AckingClient


async def open_client(
    cfg: MqttConfig,
    client_id: str,
    will: aiomqtt.Will,
    password: str | None,
    tls: ssl.SSLContext | None,
    *,
    v311: bool,
) -> AckingClient:
    """Connect once (MQTT 5, or 3.1.1 if ``v311``); raises a ConnectError subclass saying why not."""
    client = AckingClient(
        cfg.host,
        cfg.port,
        username=cfg.username,
        password=password,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V311 if v311 else aiomqtt.ProtocolVersion.V5,
        will=will,
        keepalive=cfg.keepalive_s,
        # Also bounds the wait for CONNACK and for the clean DISCONNECT.
        timeout=cfg.publish_timeout_s,
        tls_context=tls,
        max_inflight_messages=cfg.inflight,
    )
    # aiomqtt warns above this many pending calls; our window is the in-flight limit plus a
    # status and an event publish.
    client.pending_calls_threshold = cfg.inflight + 2
    try:
        await client.__aenter__()
    except MqttConnectError as e:
        code = code_of(e.rc)
        if code in UNSUPPORTED_PROTOCOL:
            raise ProtocolRefusedError(f"broker refused MQTT {'3.1.1' if v311 else '5'}: {e}") from e
        if code in AUTH_REFUSED:
            raise AuthRefusedError(f"broker refused the credentials: {e}") from e
        raise ConnectError(f"broker refused the connection: {e}") from e
    except aiomqtt.MqttError as e:
        # aiomqtt raises "from None"; the context tells a network error (OSError) from a
        # connection that was accepted but never got a CONNACK (TimeoutError). That is a failed
        # attempt like any other, never a reason to try MQTT 3.1.1: a frozen network or an
        # overloaded broker would leave us on a protocol that cannot see refusals.
        if isinstance(e.__context__, TimeoutError):
            hint = ""
            if not v311 and cfg.protocol == "auto":
                hint = ' (a broker that ignores MQTT 5 needs mqtt.protocol = "3.1.1")'
            raise ConnectError(f"no CONNACK within {cfg.publish_timeout_s}s{hint}") from e
        raise ConnectError(f"cannot connect: {e}") from e
    return client
