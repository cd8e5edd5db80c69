"""Connection failures become a few named errors, each with advice that fits (issue 5, item 13)."""

from __future__ import annotations

import logging

import pytest
from bleak.exc import BleakError

from gateway.ble.errors import (
    AdapterBusyError,
    BondLostError,
    DeviceStoppedAnsweringError,
    DeviceUnreachableError,
    GattError,
    LinkAbortedError,
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
])
def test_classify(err: BaseException, connected: bool, kind: type) -> None:
    e = classify(A, err, connected=connected)
    assert type(e) is kind
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
