"""Why a device session failed, in a few named errors, each with advice a technician can act on.

After bleak-retry-connector's taxonomy (field-lessons.md §2.2): a connection that never came up
is range or power, an abort is interference, "in progress" is the adapter, a refused bond is
pairing mode; only a session that outlived its hard deadline points at the Bluetooth stack.
"""

from __future__ import annotations

from typing import ClassVar

ADVICE_UNREACHABLE = (
    "the device did not answer: check it is switched on, has a battery, and is within a few "
    "metres of the hub"
)
ADVICE_ABORTED = (
    "the connection was cut while being set up, usually radio interference or range; on a "
    "Raspberry Pi the onboard Wi-Fi is a common cause (a USB Bluetooth adapter on an extension "
    "cable helps)"
)
ADVICE_BUSY = "the Bluetooth adapter was busy with another operation; it is retried on the next advertisement"
ADVICE_BOND = (
    "the device refused the hub's bond (it may have been reset or re-paired elsewhere): put it "
    "in pairing mode and pair it again"
)
ADVICE_STOPPED = "the device stopped answering mid-session (moved away, or switched itself off)"
ADVICE_WEDGED = (
    "the session outlived its deadline: the Bluetooth stack stopped answering; if this repeats, "
    "check bluetoothd (systemctl status bluetooth)"
)
ADVICE_GATT = "the device rejected a request; if this repeats, check that the right driver is bound"


class SessionError(Exception):
    """A session that ended without finishing; `str()` says what happened and what to do."""

    kind: ClassVar[str] = "failed"
    advice: ClassVar[str] = ADVICE_GATT

    def __init__(self, address: str, detail: str) -> None:
        self.address = address
        self.detail = detail
        self.connected = False  # whether the link had come up (set by classify)
        super().__init__(f"{address}: {detail}; {self.advice}")


class DeviceUnreachableError(SessionError):
    """No connection came up within the connect timeout, on every attempt."""

    kind = "unreachable"
    advice = ADVICE_UNREACHABLE


class LinkAbortedError(SessionError):
    """The link came up and was torn down during connection setup."""

    kind = "aborted"
    advice = ADVICE_ABORTED


class AdapterBusyError(SessionError):
    """The adapter refused because another operation is in progress."""

    kind = "adapter_busy"
    advice = ADVICE_BUSY


class BondLostError(SessionError):
    """Encryption with the stored bond, or pairing, was refused by the device."""

    kind = "bond_lost"
    advice = ADVICE_BOND


class DeviceStoppedAnsweringError(SessionError):
    """A GATT operation timed out after the connection was up."""

    kind = "stopped_answering"
    advice = ADVICE_STOPPED


class SessionDeadlineError(SessionError):
    """The whole session passed its hard deadline."""

    kind = "deadline"
    advice = ADVICE_WEDGED


class GattError(SessionError):
    """The device answered a request with an error."""

    kind = "gatt_error"
    advice = ADVICE_GATT


ADVICE_STACK = (
    "bluetoothd is not answering (stopped or restarting): it is retried with back-off; if this "
    "lasts, check systemctl status bluetooth"
)


class StackUnavailableError(SessionError):
    """bluetoothd is not on the bus (restarting, crashed) or the adapter is gone."""

    kind = "stack_unavailable"
    advice = ADVICE_STACK


# BlueZ's D-Bus error names (src/error.c) and the texts it puts in them, by what they mean for
# the technician. Kept in one place so a `dbus-monitor` trace from a real hub can check them.
BLUEZ_BUSY = frozenset({"org.bluez.Error.InProgress", "org.bluez.Error.NotReady"})
BLUEZ_AUTH = frozenset({
    "org.bluez.Error.AuthenticationFailed", "org.bluez.Error.AuthenticationRejected",
    "org.bluez.Error.AuthenticationTimeout",
})
# AuthenticationCanceled is also what Pair answers when the link drops mid-pairing: a link
# fault, retried; ConnectionAttemptFailed ("Page Timeout") is range.
BLUEZ_LINK_LOST = frozenset({"org.bluez.Error.AuthenticationCanceled"})
BLUEZ_UNREACHABLE = frozenset({"org.bluez.Error.ConnectionAttemptFailed"})
BLUEZ_GONE = frozenset({
    "org.bluez.Error.DoesNotExist", "org.freedesktop.DBus.Error.UnknownObject",
})
DBUS_STACK_GONE = frozenset({
    "org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply", "org.freedesktop.DBus.Error.Disconnected",
})
BLUEZ_NOT_PAIRED = "not paired"  # NotPermitted's text for ATT 0x05/0x0C/0x0F (gatt-client.c)
BLUEZ_ABORT_TEXTS = ("le-connection-abort-by-local", "le-connection-abort-by-remote")

_BOND_WORDS = ("authentication", "pin or key missing", "key missing", BLUEZ_NOT_PAIRED,
               "encryption")
_BUSY_WORDS = ("inprogress", "in progress", "notready", "not ready", "busy")
_GONE_WORDS = ("not found", "does not exist", "unknownobject", "unknown object")
_ABORT_WORDS = (
    "abort", "disconnected during", "not connected", "connection canceled", "connection cancelled",
    "failed to discover services", "br-connection", "le-connection",
)


def dbus_error_name(err: BaseException) -> str | None:
    """The D-Bus error name of a BleakDBusError (or anything carrying one), else None."""
    name = getattr(err, "dbus_error", None)
    return name if isinstance(name, str) else None


def classify(address: str, err: BaseException, *, connected: bool) -> SessionError:
    """The named error for a BLE failure; `connected`: the link had come up before it.

    The result's `connected` attribute keeps that flag (an adapter busy before the link came
    up is a different fault from one busy on a GATT request).
    """
    e = _classify(address, err, connected=connected)
    e.connected = connected
    return e


def _classify(address: str, err: BaseException, *, connected: bool) -> SessionError:
    text = str(err).lower().replace("_", " ")
    detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    name = dbus_error_name(err)
    if isinstance(err, TimeoutError):
        if connected:
            return DeviceStoppedAnsweringError(address, "a request timed out")
        return DeviceUnreachableError(
            address, "no connection came up (or finished its set-up) within the connect timeout")
    if name in DBUS_STACK_GONE or "pairing agent not registered" in text:
        return StackUnavailableError(address, detail)
    if name in BLUEZ_UNREACHABLE:
        return DeviceUnreachableError(address, detail)
    if name in BLUEZ_LINK_LOST:
        return LinkAbortedError(address, detail)
    if name in BLUEZ_AUTH:
        return BondLostError(address, detail)
    if name in BLUEZ_BUSY:
        return AdapterBusyError(address, detail)
    if name in BLUEZ_GONE or (not connected and any(w in text for w in _GONE_WORDS)):
        # bluetoothd dropped the device from its cache (not heard for a while): range.
        return DeviceUnreachableError(address, "not heard recently (dropped from the "
                                      "Bluetooth cache)")
    if any(w in text for w in BLUEZ_ABORT_TEXTS):
        return LinkAbortedError(address, detail)
    if any(w in text for w in _BOND_WORDS):
        return BondLostError(address, detail)
    if any(w in text for w in _BUSY_WORDS):
        return AdapterBusyError(address, detail)
    if any(w in text for w in _ABORT_WORDS):
        return LinkAbortedError(address, detail)
    if not connected:
        return LinkAbortedError(address, detail)
    return GattError(address, detail)
