"""Scanning paused for connections on adapters that cannot do both (gateway.ble.scan_gate)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.ble.scan_gate import ScanGate


async def test_a_shared_adapter_never_pauses() -> None:
    rescan = asyncio.Event()
    gate = ScanGate(rescan)
    async with gate.connecting():
        assert not gate.paused
    assert not rescan.is_set()


async def test_an_exclusive_adapter_stops_the_scanner_and_reopens_after_the_last_session() -> None:
    rescan = asyncio.Event()
    gate = ScanGate(rescan, exclusive=True)
    gate.scanner_running(True)

    async def scan_loop_stops() -> None:
        await rescan.wait()
        gate.scanner_running(False)

    stopper = asyncio.create_task(scan_loop_stops())
    async with gate.connecting():
        assert rescan.is_set() and gate.paused and not gate.scanning
        async with gate.connecting():  # a second device's session at the same time
            assert gate.paused
        assert gate.paused  # still held by the first
    assert not gate.paused
    await asyncio.wait_for(gate.wait_open(), 1)
    await stopper


async def test_a_cancelled_session_releases_the_gate() -> None:
    gate = ScanGate(asyncio.Event(), exclusive=True)
    entered = asyncio.Event()

    async def session() -> None:
        async with gate.connecting():
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(session())
    await entered.wait()
    assert gate.paused
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not gate.paused
    await asyncio.wait_for(gate.wait_open(), 1)


def test_learnt_only_from_two_refusals_in_a_row_while_scanning() -> None:
    gate = ScanGate(asyncio.Event())
    gate.scanner_running(True)
    assert not gate.refused_while_scanning()  # one "in progress" may be a pending connect
    gate.connected_while_scanning()  # then a connection worked with the scanner on: forgiven
    assert not gate.refused_while_scanning()
    assert gate.refused_while_scanning()  # the second in a row: from now on, exclusive
    assert gate.exclusive
    assert not gate.refused_while_scanning()  # learnt once
