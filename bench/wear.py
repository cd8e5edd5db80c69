"""SD-card wear: bytes written and fsyncs per reading at 1 reading/s, and idle writes per hour.

What is measured: a process of its own (so /proc/PID/io is the outbox's alone) drives the real
Outbox through a reading's whole lifecycle as the agent does: ``put(confirmed=True)`` (a session
commits it), ``pending()`` (the uplink fetches it), a real MQTT 5 QoS 1 publish to a local
mosquitto awaited until its PUBACK, then ``mark_delivered([seq])``. One reading per second.
The agent process itself is not used: its other writers (pairing registry, enrolment file,
logs) are not the outbox's, and its uplink is being reworked. The uplink's batched marks can
only lower the figure measured here (one mark transaction per reading is the worst case).
Idle: the same process then sits idle, asking what the agent asks while idle (accepting()
before each connection, stats() and days_with_data() once a minute, prune()).

Bytes: ``write_bytes`` of /proc/PID/io (what the process sent to the block layer's page cache,
counted per 4 KiB page dirtied) over each phase. The bench directory must be on a disk
filesystem (tmpfs counts nothing): it is created under /var/tmp and checked with findmnt.
fsyncs: ``strace -f -e trace=fsync,fdatasync -ttt`` of the child, lines counted
between the phase markers the child prints. Baseline: a bare SQLite table (seq INTEGER PRIMARY
KEY, reading_id TEXT UNIQUE, payload BLOB; WAL, synchronous=FULL) where each reading is one
INSERT + COMMIT and one UPDATE (its delivered mark) + COMMIT, through the same child: the floor
for two durable commits per reading.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KIB = 1024
_MARK = re.compile(r"^PHASE (\w+) (start|end) ([0-9.]+)$")
_SYSCALL = re.compile(r"^\s*(?:\[pid\s+)?\d*\]?\s*([0-9]+\.[0-9]+) (fsync|fdatasync)\(")
_TMPFS = ("tmpfs", "ramfs")
_SCRATCH = "/var/tmp" if Path("/var/tmp").is_dir() else str(Path(__file__).parent)


def _io_write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


def _phase(name: str, edge: str, io: dict[str, int]) -> None:
    io[f"{name}_{edge}"] = _io_write_bytes()
    print(f"PHASE {name} {edge} {time.time():.6f}", flush=True)


async def _child_ours(directory: Path, count: int, idle_s: float, host: str, port: int) -> None:
    import aiomqtt

    from bench._common import cuff_readings
    from gateway.config import OutboxConfig
    from gateway.outbox import Outbox

    items = cuff_readings(count + 5, start=5_000_000)
    io: dict[str, int] = {}
    async with (
        Outbox(directory / "outbox.db", OutboxConfig()) as ob,
        aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5) as client,
    ):
        async def one(item: Any) -> None:
            await ob.put(item, confirmed=True)
            for p in await ob.pending(100):
                await client.publish(f"rpm/bench-hub/{p.topic}", p.payload, qos=1)
                await ob.mark_delivered([p.seq])

        for item in items[:5]:  # warm-up: the schema, the first pages, the WAL file exist
            await one(item)
        _phase("readings", "start", io)
        start = time.monotonic()
        for n, item in enumerate(items[5:]):
            await asyncio.sleep(max(0.0, start + n - time.monotonic()))  # 1 reading/s
            await one(item)
        await asyncio.sleep(max(0.0, start + count - time.monotonic()))
        _phase("readings", "end", io)
        _phase("idle", "start", io)
        idle_end = time.monotonic() + idle_s
        tick = min(60.0, idle_s / 5)
        await ob.prune()
        while time.monotonic() < idle_end:
            await ob.accepting()
            await ob.stats()
            await ob.days_with_data("patient-0001", "2026-12-01", "2026-12-31")
            await asyncio.sleep(min(tick, max(0.0, idle_end - time.monotonic())))
        _phase("idle", "end", io)
    print("IO " + json.dumps(io), flush=True)


def _child_baseline(directory: Path, count: int) -> None:
    from bench._common import cuff_readings

    items = cuff_readings(count, start=6_000_000)
    conn = sqlite3.connect(directory / "bare.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE r (seq INTEGER PRIMARY KEY, reading_id TEXT UNIQUE, payload BLOB,"
                 " delivered_at TEXT)")  # fmt: skip
    io: dict[str, int] = {}
    _phase("readings", "start", io)
    start = time.monotonic()
    for n, item in enumerate(items):
        time.sleep(max(0.0, start + n - time.monotonic()))
        conn.execute("BEGIN IMMEDIATE")
        seq = conn.execute("INSERT INTO r (reading_id, payload) VALUES (?, ?) RETURNING seq",
                           (item.reading_id, item.payload)).fetchone()[0]  # fmt: skip
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE r SET delivered_at = ? WHERE seq = ?",
                     ("2026-12-02T10:00:00.000000+00:00", seq))  # fmt: skip
        conn.execute("COMMIT")
    time.sleep(max(0.0, start + count - time.monotonic()))
    _phase("readings", "end", io)
    conn.close()
    print("IO " + json.dumps(io), flush=True)


def _filesystem(directory: Path) -> str:
    found = shutil.which("findmnt")
    if found:
        out = subprocess.run([found, "-n", "-o", "FSTYPE", "--target", str(directory)],
                             capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
        if out:
            return out
    return "unknown"


def _measure(args: list[str], directory: Path, timeout: float) -> dict[str, Any]:
    """Run a child under strace; its phases' write_bytes and fsync counts."""
    strace = shutil.which("strace")
    if strace is None:
        raise RuntimeError("bench/wear needs strace: sudo apt-get install strace (make bench does)")
    trace = directory / "strace.txt"
    cmd = [strace, "-f", "-ttt", "-e", "trace=fsync,fdatasync", "-o", str(trace),
           sys.executable, "-m", "bench.wear", *args]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root,
                          check=False)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"wear child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    marks: dict[str, float] = {}
    io: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        if m := _MARK.match(line):
            marks[f"{m[1]}_{m[2]}"] = float(m[3])
        elif line.startswith("IO "):
            io = json.loads(line[3:])
    times = [float(m[1]) for line in trace.read_text().splitlines() if (m := _SYSCALL.match(line))]
    out: dict[str, Any] = {}
    for phase in ("readings", "idle"):
        if f"{phase}_start" in marks:
            a, b = marks[f"{phase}_start"], marks[f"{phase}_end"]
            out[phase] = {"seconds": b - a, "write_bytes": io[f"{phase}_end"] - io[f"{phase}_start"],
                          "fsyncs": sum(a <= t <= b for t in times)}  # fmt: skip
    return out


async def _with_broker(directory: Path, count: int, idle_s: float) -> dict[str, Any]:
    from gateway.broker import LocalBroker

    async with LocalBroker("mosquitto") as broker:
        return await asyncio.to_thread(
            _measure, ["ours", str(directory / "ours"), str(count), str(idle_s), broker.host,
                       str(broker.port)], directory, count + idle_s + 120)  # fmt: skip


async def run(*, quick: bool = False) -> dict[str, Any]:
    """Measure ours and the baseline; print them and the ratios; return the results' keys."""
    # 180 readings span three WAL checkpoints; idle is extrapolated from 5 minutes (the issue's
    # floor). The baseline runs beside ours: each figure is one process's own /proc/PID/io.
    count, idle_s = (20, 30.0) if quick else (180, 300.0)
    # /var/tmp: a disk filesystem on Debian (never tmpfs, unlike /tmp may be), and outside the
    # working tree, where other benchmarks' scratch directories come and go.
    with tempfile.TemporaryDirectory(dir=_SCRATCH, prefix="rpm-gateway-wear-") as tmp:
        directory = Path(tmp)
        fs = _filesystem(directory)
        if fs in _TMPFS:
            raise RuntimeError(f"{directory} is on {fs}: write_bytes would count nothing")
        for sub in ("ours", "bare"):
            (directory / sub).mkdir()
        ours, base = await asyncio.gather(
            _with_broker(directory, count, idle_s),
            asyncio.to_thread(_measure, ["bare", str(directory / "bare"), str(count)],
                              directory / "bare", count + 120),
        )  # fmt: skip
    r, b, idle = ours["readings"], base["readings"], ours["idle"]
    bpr, fpr = r["write_bytes"] / count, r["fsyncs"] / count
    bbpr, bfpr = b["write_bytes"] / count, b["fsyncs"] / count
    idle_h = idle["write_bytes"] / idle["seconds"] * 3600
    print(f"wear at 1 reading/s over {count} readings (stored -> published -> marked), on {fs}")
    print(f"  baseline bare SQLite (2 commits): {bbpr / KIB:6.1f} KiB  {bfpr:.2f} fsync per reading")
    print(f"  ours:                             {bpr / KIB:6.1f} KiB  {fpr:.2f} fsync per reading")
    print(f"  ratio ours/baseline:              {bpr / bbpr:6.2f}      {fpr / bfpr:.2f}"
          "   (goals: <= 16 KiB, <= 2 fsync)")
    print(f"  idle: {idle['write_bytes']} bytes in {idle['seconds']:.0f} s ="
          f" {idle_h / KIB:.1f} KiB/h (goal < 64 KiB/h)")
    return {
        "bytes_per_reading": round(bpr),
        "fsync_per_reading": round(fpr, 3),
        "idle_bytes_per_hour": round(idle_h),
        "wear": {"readings": count, "idle_s": round(idle["seconds"], 1), "filesystem": fs,
                 "baseline_bytes_per_reading": round(bbpr),
                 "baseline_fsync_per_reading": round(bfpr, 3),
                 "ratio_bytes": round(bpr / bbpr, 3), "ratio_fsync": round(fpr / bfpr, 3),
                 "idle_fsyncs": idle["fsyncs"]},
    }


def _main(argv: list[str]) -> None:
    if argv[0] == "ours":
        directory, count, idle_s, host, port = argv[1:6]
        asyncio.run(_child_ours(Path(directory), int(count), float(idle_s), host, int(port)))
    else:
        _child_baseline(Path(argv[1]), int(argv[2]))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    _main(sys.argv[1:])
