"""corrupt: the outbox file damaged (truncated, garbage header, zero length, one payload byte) or locked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from faults.report import Row
from faults.rig import Ctx, Rig
from faults.tally import message_key, outbox_offerable, outbox_pending

LOCK_HOLDER = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute('PRAGMA locking_mode=EXCLUSIVE')
c.execute('BEGIN EXCLUSIVE')
c.execute('SELECT count(*) FROM readings').fetchone()
print('LOCKED', flush=True)
time.sleep(float(sys.argv[2]))
c.execute('COMMIT')
"""


def _rows(db: Path) -> dict[int, bytes]:
    with contextlib.closing(sqlite3.connect(db)) as c:
        return {int(s): bytes(p) for s, p in c.execute("SELECT seq, payload FROM readings")}


def readable_keys(db: Path, payloads: dict[int, bytes]) -> set[tuple[str, str]]:
    """(device, raw) of each stored row whose payload bytes are still intact in the damaged file.

    The yardstick for salvage: a row still on the disk, byte for byte, can be read back (the
    header or the B-tree pages around it may be gone; the cell itself is not).
    """
    try:
        data = db.read_bytes()
    except OSError:
        return set()
    return {k for p in payloads.values() if p in data and (k := message_key(json.loads(p)))}


def _checkpoint(db: Path) -> None:
    # The agent stopped cleanly; fold any WAL left into the main file so the damage is the file's.
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(str(db) + suffix).unlink()


def truncate(db: Path) -> str:
    """Cut the file in half."""
    os.truncate(db, db.stat().st_size // 2)
    return "truncated to half"


def garbage_header(db: Path) -> str:
    """Overwrite the 100-byte database header with garbage."""
    with db.open("r+b") as f:
        f.write(b"\xa5GARBAGE" * 12 + b"\x00" * 4)
    return "header overwritten"


def zero_length(db: Path) -> str:
    """Leave an empty file where the outbox was."""
    os.truncate(db, 0)
    return "zero length"


def change_payload_byte(db: Path, payloads: dict[int, bytes]) -> tuple[str, str]:
    """Change one digit of one stored observation value in place; the reading id it hit."""
    data = bytearray(db.read_bytes())
    for payload in payloads.values():
        at = data.find(payload)
        rel = payload.find(b'"value"')
        if at < 0 or rel < 0:
            continue
        i = at + rel + 7
        while i < at + len(payload) and not chr(data[i]).isdigit():
            i += 1
        data[i] = ord("9") if data[i] != ord("9") else ord("1")
        db.write_bytes(bytes(data))
        return "one digit of a stored value changed", str(json.loads(payload)["reading_id"])
    raise RuntimeError("no stored payload with a value found in the file")


# What systemd/rpm-gateway.service does after an exit (tests/unit/test_systemd_unit.py keeps
# these equal to the unit): RestartSec=, plus ExecStopPost='s wait after 73; 78 is not restarted.
RESTART_S = 5.0
RESTART_AFTER_73_S = 35.0


async def supervise(rig: Rig, exits: list[tuple[float, int | None]]) -> None:
    """Keep the agent running as the unit would, recording each exit's time and status."""
    assert rig.agent is not None
    while True:
        await rig.agent.start()
        status = await rig.agent.wait(1e9)
        exits.append((time.time(), status))
        if status == 78:
            return
        await asyncio.sleep(RESTART_AFTER_73_S if status == 73 else RESTART_S)


async def _stocked_rig(ctx: Ctx, name: str, stored: int) -> Rig:
    rig = Rig(ctx, name, sim_args=["--devices", "scale,cuff", "--stored", str(stored)],
              proxy_open=False)
    await rig.__aenter__()
    return rig


async def corrupt(ctx: Ctx, name: str, damage: Callable[[Path], str] | None) -> Row:
    """Fill the outbox with the broker away, stop the agent, damage the file, start again."""
    stored = ctx.pick(30, 100, 300)
    total = 2 * stored
    rig = await _stocked_rig(ctx, name, stored)
    try:
        assert rig.agent is not None
        await rig.agent.start()
        await rig.wait_for(lambda: (outbox_pending(rig.outbox_db) or 0) >= total, 60 + stored * 0.2, 0.25)
        await rig.agent.stop()
        db = rig.outbox_db
        _checkpoint(db)
        payloads = _rows(db)
        changed_id: str | None = None
        holder: asyncio.subprocess.Process | None = None
        inode = db.stat().st_ino
        before = set(os.listdir(db.parent))
        if damage is not None:
            what = damage(db)
        elif name.endswith("byte-changed"):
            what, changed_id = change_payload_byte(db, payloads)
        else:
            hold = ctx.pick_s(4.0, 8.0, 8.0)
            holder = await asyncio.create_subprocess_exec(
                sys.executable, "-c", LOCK_HOLDER, str(db), str(hold), stdout=subprocess.PIPE)
            assert holder.stdout is not None
            await asyncio.wait_for(holder.stdout.readline(), 10)
            what = f"locked by another process for {hold:.0f} s"
        readable = readable_keys(db, payloads)
        led = rig.ledger()
        changed_key = next((k for p in payloads.values() if changed_id and changed_id.encode() in p
                            for k in [message_key(json.loads(p))] if k is not None), None)
        # Rows SQLite cannot read any more were destroyed by the fault itself, and the changed
        # one must be held back: neither is the agent's loss, neither is waited for.
        stored_keys = {k for p in payloads.values() if (k := message_key(json.loads(p)))}
        gone = frozenset((stored_keys - readable) | ({changed_key} if changed_key else set()))
        await rig.reopen_broker()
        started = time.time()
        exits: list[tuple[float, int | None]] = []
        keeper = asyncio.create_task(supervise(rig, exits))
        try:
            if holder is not None:
                await asyncio.wait_for(holder.wait(), 30)
            # Up, with what it salvaged delivered; then the rest (devices' new readings).
            await rig.wait_for(rig.online_since(started), 30)
            await rig.wait_for(lambda: outbox_offerable(db) == 0, 30, 0.2)
            await rig.settle(total, timeout=60, quiet=10, gone=gone)
            # A moment more: a changed row published late would show now.
            await rig.wait_for(lambda: False, 1.0)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        t = rig.tally()
        rec = rig.first_delivery_after(started)
        log = rig.agent.log_text()
        after = set(os.listdir(db.parent))
        inode_after = db.stat().st_ino if db.exists() else None
        original = json.loads(next(p for p in payloads.values() if changed_id.encode() in p)) \
            if changed_id else None
        changed_published = [m for m in rig.collector.readings()
                             if changed_id and m.body.get("reading_id") == changed_id
                             and m.body != original]
        led = rig.ledger()
        delivered_keys = {message_key(m.body) for m in rig.collector.readings()}
    finally:
        await rig.close()
    row = Row.of(name, "corrupt", 1, t, rec)
    row.notes.append(what)
    destroyed = [r for r in led.records if r.key in gone and r.key not in delivered_keys]
    if destroyed:
        row.lost -= len(destroyed)
        row.notes.append(f"{len(destroyed)} reading(s) no longer intact in the file "
                         "(not counted lost)")
        row.verdict = "FAIL" if (row.lost or row.new_id_or_wrong_patient or row.violations) \
            else "PASS"
    if exits:
        row.notes.append(f"{len(exits)} restart(s) as the unit would (exit status "
                         f"{', '.join(str(c) for _, c in exits)})")
    if holder is not None and any(c != 73 for _, c in exits):
        row.fail(f"a locked outbox should make the agent wait or exit 73, nothing else: {exits}")
    if changed_published:
        row.fail(f"published {len(changed_published)} time(s) with the changed value")
    if damage is zero_length and "empty" not in log.lower():
        row.fail("an empty outbox where data was expected was not reported")
    if holder is not None:
        aside = sorted(after - before - {db.name + "-wal", db.name + "-shm"})
        if aside or inode_after != inode:
            row.fail(f"healthy locked outbox moved aside or replaced: {aside}")
    return row
