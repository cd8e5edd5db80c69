"""The uplink's errors: each one ends the connection; the uplink's state depends on which."""

from __future__ import annotations


class UplinkError(Exception):
    """Base class of the uplink's errors; all of them end the connection and cause a retry."""


class ConnectError(UplinkError):
    """Could not connect: network error, TLS failure, no CONNACK, a refusal other than credentials."""


class AuthRefusedError(ConnectError):
    """The broker refused the credentials (bad user name or password, not authorized)."""


class ProtocolRefusedError(ConnectError):
    """The broker's CONNACK says it does not speak the MQTT version we asked for."""


class CredentialsUnreadableError(ConnectError):
    """A password, CA, certificate or key file cannot be read or used; the message names it."""


class ConnectionLostError(UplinkError):
    """An established connection to the broker broke."""


class PublishTimeoutError(UplinkError):
    """No PUBACK within ``publish_timeout_s``; the connection is presumed dead."""


class PublishRejectedError(UplinkError):
    """The broker refused a reading for now (a transient MQTT 5 reason code); it stays queued."""
