"""disk: the outbox on a real small filesystem (tmpfs) that is, or becomes, full; then space back."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from faults.procs import Unavailable
from faults.report import Row
from faults.rig import Ctx, Rig


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` (root only), unmounted afterwards."""
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if os.geteuid() != 0 or mount is None or umount is None:
        raise Unavailable("needs root and mount(8) for a real small filesystem")
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise Unavailable(f"mount tmpfs failed: {r.stderr.strip()[:100]}")
    try:
        yield where
    finally:
        subprocess.run([umount, "-l", str(where)], capture_output=True)


def resize(where: Path, size: str) -> None:
    """Give the filesystem more (or less) room: the space comes back."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True,
                   capture_output=True)


def fill(where: Path) -> Path:
    """Write a filler file until the filesystem is full (ENOSPC); returns it."""
    filler = where / "filler"
    # Unbuffered: a buffered file would raise ENOSPC again when it is closed.
    with filler.open("wb", buffering=0) as f:
        for size in (1 << 16, 512):  # then the last few KiB
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    return filler


def _sessions_between(rig: Rig, t0: float, t1: float) -> int:
    return sum(1 for t, _ in rig.ledger().connections if t0 <= t <= t1)


def _confirmed_between(rig: Rig, t0: float, t1: float) -> int:
    return sum(1 for r in rig.ledger().records if r.t_confirmed and t0 <= r.t_confirmed <= t1)


async def disk_small(ctx: Ctx) -> Row:
    """The outbox on a 2 MiB filesystem (less than the WAL needs): no device read, none lost; then room."""
    name = "disk-full-2mib"
    readings, interval, stored = ctx.pick(5, 10, 20), 0.5, 20
    total = 2 * (stored + readings)
    sim = ["--devices", "scale,cuff", "--stored", str(stored), "--readings", str(readings),
           "--interval", str(interval)]
    mnt = ctx.workdir / name / "small"
    with tmpfs(mnt, "2m"):
        async with Rig(ctx, name, sim_args=sim, data_dir=mnt) as rig:
            assert rig.agent is not None
            t0 = time.time()
            await rig.agent.start()
            await rig.wait_for(lambda: len(rig.ledger().records) >= total, readings * interval + 30)
            await rig.wait_for(lambda: False, 5.0)
            t1 = time.time()
            sessions, confirmed = _sessions_between(rig, t0, t1), _confirmed_between(rig, t0, t1)
            resize(mnt, "64m")
            await rig.settle(total, timeout=90)
            t = rig.tally()
            rec = rig.first_delivery_after(t1)
    row = Row.of(name, "disk", 1, t, rec)
    row.notes.append(f"while too small: {sessions} session(s), {confirmed} reading(s) confirmed")
    return row


async def disk_fills(ctx: Ctx) -> Row:
    """A filesystem that fills up while devices measure, then gets space back: nothing lost."""
    name = "disk-full-then-space"
    trials = ctx.pick(1, 2, 4)
    # Sessions end between readings (quiet_s 0.5), so the disk fills between sessions, as it does
    # when another process fills the card; a reading arriving then must stay in the device.
    interval = ctx.pick_s(1.5, 2.0, 2.0)
    readings = trials * ctx.pick(4, 5, 5) + ctx.pick(1, 6, 6)
    total = 2 * readings
    sim = ["--devices", "scale,cuff", "--readings", str(readings), "--interval", str(interval)]
    mnt = ctx.workdir / name / "fs"
    notes: list[str] = []
    with tmpfs(mnt, "24m"):
        async with Rig(ctx, name, sim_args=sim, data_dir=mnt) as rig:
            assert rig.agent is not None
            await rig.agent.start()
            t_start = time.time()
            await rig.wait_for(rig.delivered_since(t_start), 30)
            recs: list[float] = []
            for i in range(trials):
                await rig.wait_for(rig.delivered_since(time.time()), 10, 0.02)
                await rig.wait_for(lambda: False, 0.8)
                t0 = time.time()
                filler = fill(mnt)
                await rig.wait_for(lambda: False, ctx.pick_s(3.0, 6.0, 10.0))
                t1 = time.time()
                filler.unlink()
                notes.append(f"full #{i + 1}: {_sessions_between(rig, t0, t1)} session(s), "
                              f"{_confirmed_between(rig, t0, t1)} reading(s) confirmed")
                await rig.wait_for(rig.delivered_since(t1), 30)
                if (r := rig.first_delivery_after(t1)) is not None:
                    recs.append(r)
                await rig.wait_for(lambda: False, 1.5)
            await rig.settle(total, timeout=readings * interval + 90)
            t = rig.tally()
    row = Row.of(name, "disk", trials, t, max(recs) if recs else None)
    row.notes += notes
    return row
