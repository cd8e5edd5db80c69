"""Connection failures become a few named errors, each with advice that fits (issue 5, item 13)."""

from __future__ import annotations

import logging

import pytest
from bleak.exc import (
    BleakDBusError,
    BleakDeviceNotFoundError,
    BleakError,
    BleakGATTProtocolError,
    BleakGATTProtocolErrorCode,
)

from drivers.standard_profile import needs_pairing
from gateway.ble.errors import (
    AdapterBusyError,
    BondLostError,
    DeviceStoppedAnsweringError,
    DeviceUnreachableError,
    GattError,
    LinkAbortedError,
    StackUnavailableError,
    classify,
)
from gateway.lograte import StateLog

A = "C0:00:00:00:BC:01"


@pytest.mark.parametrize(("err", "connected", "kind"), [
    (TimeoutError(), False, DeviceUnreachableError),
    (TimeoutError(), True, DeviceStoppedAnsweringError),
    # BlueZ's words (field-lessons.md §2.1) and the virtual radio's.
    (BleakError("[org.bluez.Error.InProgress] Operation already in progress"), False, AdapterBusyError),
    (BleakError("le-connection-abort-by-local"), False, LinkAbortedError),
    (BleakError("[org.bluez.Error.Failed] Software caused connection abort"), False, LinkAbortedError),
    (BleakError("[org.bluez.Error.NotPermitted] Not paired"), True, BondLostError),
    (BleakError(f"authentication failed: {A} did not accept the stored bond"), False, BondLostError),
    (BleakError("ATT error 0x0e (Unlikely Error)"), True, GattError),
    # BleakDBusError exactly as bleak's BlueZ backend raises it from bluetoothd's reply.
    (BleakDBusError("org.bluez.Error.InProgress", ["Operation already in progress"]), False,
     AdapterBusyError),
    (BleakDBusError("org.bluez.Error.NotReady", ["Resource Not Ready"]), False, AdapterBusyError),
    (BleakDBusError("org.bluez.Error.Failed", ["le-connection-abort-by-local"]), False,
     LinkAbortedError),
    (BleakDBusError("org.bluez.Error.NotPermitted", ["Not paired"]), True, BondLostError),
    (BleakDBusError("org.bluez.Error.Failed", ["Authentication Failed"]), False, BondLostError),
    (BleakDBusError("org.bluez.Error.AuthenticationTimeout", ["Authentication Timeout"]), True,
     BondLostError),
    (BleakDBusError("org.bluez.Error.AuthenticationRejected", ["Authentication Rejected"]), True,
     BondLostError),
    (BleakDBusError("org.freedesktop.DBus.Error.UnknownObject", ["Method call on unknown object"]),
     False, DeviceUnreachableError),
    (BleakDeviceNotFoundError(A, "device 'dev_C0_00_00_00_BC_01' not found"), False,
     DeviceUnreachableError),
    (BleakDBusError("org.freedesktop.DBus.Error.ServiceUnknown",
                    ["The name org.bluez was not provided by any .service files"]), False,
     StackUnavailableError),
    (BleakDBusError("org.bluez.Error.Failed", ["Not connected"]), True, LinkAbortedError),
    # Review: range and a link lost mid-pairing are not a refused bond (no re-pair advice).
    (BleakDBusError("org.bluez.Error.ConnectionAttemptFailed", ["Page Timeout"]), False,
     DeviceUnreachableError),
    (BleakDBusError("org.bluez.Error.AuthenticationCanceled", ["Authentication Canceled"]), True,
     LinkAbortedError),
    (BleakError("pairing agent not registered: AgentManager1.RegisterAgent: ..."), True,
     StackUnavailableError),
])
def test_classify(err: BaseException, connected: bool, kind: type) -> None:
    e = classify(A, err, connected=connected)
    assert type(e) is kind
    assert e.connected is connected
    assert str(e).startswith(A)
    assert e.advice in str(e)


def test_unreachable_points_at_range_not_at_bluetoothd() -> None:
    e = classify(A, TimeoutError(), connected=False)
    assert "within a few metres" in str(e)
    assert "bluetoothd" not in str(e)


def test_state_log_once_per_change_then_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sl = StateLog(logging.getLogger("t"), remind_s=3600)
    assert sl.warning("k", "a", "state %s", "a")
    for _ in range(50):
        assert not sl.warning("k", "a", "state %s", "a")
    assert sl.warning("k", "b", "state %s", "b")
    sl.clear("k")
    assert sl.warning("k", "b", "state %s", "b")
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in loud] == ["state a", "state b", "state b"]


def test_state_log_reminds_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    sl = StateLog(logging.getLogger("t"), remind_s=0.0)
    sl.error("k", "x", "radio gone")
    sl.error("k", "x", "radio gone")
    assert caplog.records[-1].levelno == logging.ERROR
    assert "1 times since the last report" in caplog.records[-1].getMessage()


def test_a_refused_bond_is_not_retried_on_the_spot() -> None:
    # Found by the matrix (bond-forgot-bond): 4 connection attempts per session for an error
    # that retrying cannot fix, 17 connections in 50 s on the device's battery.
    from gateway.ble.session import _transient

    assert _transient(TimeoutError())
    assert _transient(BleakError("le-connection-abort-by-local"))
    assert not _transient(BleakError(f"authentication failed: {A} did not accept the stored bond"))


@pytest.mark.parametrize(("err", "expected"), [
    (BleakDBusError("org.bluez.Error.NotPermitted", ["Not paired"]), True),
    (BleakDBusError("org.bluez.Error.NotPermitted", ["Read not permitted"]), False),
    # A pairing that already failed: pairing again at once would not help.
    (BleakDBusError("org.bluez.Error.Failed", ["Authentication Failed"]), False),
    (BleakDBusError("org.bluez.Error.AuthenticationFailed", ["Authentication Failed"]), False),
    (BleakGATTProtocolError(BleakGATTProtocolErrorCode.INSUFFICIENT_ENCRYPTION), True),
    (BleakGATTProtocolError(BleakGATTProtocolErrorCode.INSUFFICIENT_AUTHENTICATION), True),
    (BleakGATTProtocolError(BleakGATTProtocolErrorCode.READ_NOT_PERMITTED), False),
])
def test_needs_pairing_reads_bluez_errors(err: BaseException, expected: bool) -> None:
    # Issue 6: checked against BlueZ, needs_pairing() said False for "Not paired".
    assert needs_pairing(err) is expected
