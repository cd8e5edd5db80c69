"""Which MQTT reason codes the uplink acts on, and how: retry soon, retry rarely, or give up on v5.

A PUBACK refusal is either *transient* (the broker is busy or over a quota: the same PUBLISH will
be taken later, so the reading stays pending and the connection is retried with backoff) or
*permanent* (this reading will be refused again however often it is sent: it is quarantined, so
it does not block the readings behind it, and offered again on a slow schedule).

Permanent, by the MQTT 5 spec (section 3.4.2.1) and what brokers send in practice:

- 0x87 Not authorized: an ACL refuses the topic. An operator may fix the ACL, hence the slow retry.
- 0x90 Topic Name invalid, 0x99 Payload format invalid: a property of the message itself.
- 0x95 Packet too large: not a valid PUBACK code, but mosquitto's ``message_size_limit`` sends it.
- 0x83 Implementation specific error: mosquitto's documented answer to an oversize payload, and
  what plugins send for a message they refuse; nothing says a resend will succeed.
- 0x80 Unspecified error: the broker will not say why. Treating it as transient would resend it
  in a loop and block the queue (the fault this classification exists to prevent); quarantine
  loses nothing, because a quarantined reading is kept and retried every ``quarantine_retry_s``.

Transient: 0x97 Quota exceeded, 0x91 Packet identifier in use (fixed by a new connection), and
the codes a broker may send under load although the spec reserves them for DISCONNECT: 0x89
Server busy, 0x93 Receive Maximum exceeded, 0x96 Message rate too high. Any other failure code is
treated as permanent, for the same reason as 0x80.
"""

from __future__ import annotations

from paho.mqtt.reasoncodes import ReasonCode

# CONNACK "I do not speak this protocol version": 1 in MQTT 3.1.1, 0x84 in MQTT 5 (paho reports a
# 3.1.1 broker's answer to an MQTT 5 CONNECT as 0x84).
UNSUPPORTED_PROTOCOL = frozenset({1, 0x84})
# CONNACK credential refusals: MQTT 5 0x86 bad user name or password, 0x87 not authorized; 3.1.1
# codes 4 and 5 (paho maps those to the MQTT 5 values; both are listed so neither is missed).
AUTH_REFUSED = frozenset({4, 5, 0x86, 0x87})

TRANSIENT_PUBACK = frozenset({0x89, 0x91, 0x93, 0x96, 0x97})


def code_of(rc: ReasonCode | int | None) -> int | None:
    """The numeric value of a reason code as paho hands it over (None if none)."""
    if rc is None:
        return None
    return rc.value if isinstance(rc, ReasonCode) else int(rc)


def is_transient(rc: ReasonCode | int) -> bool:
    """Whether a PUBACK failure code is worth resending soon (else the reading is quarantined)."""
    return code_of(rc) in TRANSIENT_PUBACK


def describe(rc: ReasonCode | int) -> str:
    """A reason code as ``0x87 Not authorized`` for logs, events and status."""
    if isinstance(rc, ReasonCode):
        return f"{rc.value:#04x} {rc}"
    return f"{int(rc):#04x}"
