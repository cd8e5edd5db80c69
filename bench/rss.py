"""Memory: the agent process's resident set, idle and over 10,000 readings.

Ours: `rpm-gateway run` in its own process, radio `bluez` against the BlueZ stand-in, which runs
in a process of its own (`rpm-gateway simulate --bluez`), as bluetoothd does on the hub, with
two paired devices and a local mosquitto. `rss_idle_mb`: VmRSS once the agent is connected to
the broker and scanning with nothing to read (median of samples over a few seconds).
`rss_growth_mb`: VmRSS after 10,000 readings (the two devices' stored memories, read, stored,
delivered) minus VmRSS after the first 1,000: growth that does not level off is a leak that a
hub running for months turns into an OOM kill. Baseline: VmRSS of `python -c "import asyncio,
sqlite3"`, the floor of any asyncio agent keeping readings in SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench._common import CUFF, SCALE, bytecode_env, hub_toml, simulate
from gateway.broker import LocalBroker
from gateway.sim.bluez.bus import PrivateBus

GOAL_IDLE_MB = 40.0
GOAL_GROWTH_MB = 1.0
ZONES = ("UTC", "Asia/Tokyo", "America/New_York", "Australia/Sydney")


def rss_mb(pid: int) -> float:
    """The resident set of a process in MiB (VmRSS: anonymous and file-backed pages)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _env() -> dict[str, str]:
    return bytecode_env(Path(tempfile.gettempdir()) / "rpm-bench-pycache")  # as on the hub


def _simulate(stored: int, bus: str, zone: str = "UTC") -> contextlib.AbstractAsyncContextManager[str]:
    """`rpm-gateway simulate --bluez` on `bus`, scale and cuff holding `stored` readings each.

    `zone`: the zone the device clocks are in; another zone gives the same walk of values other
    time stamps, so other readings (the stored history cannot go back more than ~3,000 days).
    """
    return simulate("--bluez", "--bus-address", bus, "--devices", "scale,cuff", "--stored",
                    str(stored), "--readings", "0", "--timezone", zone, "--log-level", "error",
                    env=_env())


@contextlib.asynccontextmanager
async def _agent(directory: Path, broker: LocalBroker, bus: str
                 ) -> AsyncIterator[tuple[asyncio.subprocess.Process, socket.socket]]:
    """The agent process (as systemd starts it) and the notify socket it reports on."""
    directory.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (nothing runs yet)
    config = directory / "gateway.toml"
    # Between rounds the stand-in is replaced; the agent then took the ladder's default 300 s
    # of silence to hear the new one (see the report of issue 8): not what this measures.
    config.write_text(hub_toml(
        directory / "state", host=broker.host, port=broker.port,
        control_socket=directory / "control.sock", devices=[SCALE, CUFF],
        radio='kind = "bluez"\nquiet_s = 1.0\nsession_timeout_s = 3600\nscan_silence_s = 5'))
    notify = directory / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.setblocking(False)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "run", "--config", str(config),
            stdout=subprocess.DEVNULL,
            env={**_env(), "NOTIFY_SOCKET": str(notify), "DBUS_SYSTEM_BUS_ADDRESS": bus})
        try:
            yield proc, sock
        finally:
            if proc.returncode is None:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 30)


async def _until_status(sock: socket.socket, *words: str, timeout: float = 60) -> str:
    """Wait for a STATUS= line from the agent that holds every one of `words`."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        while True:
            for line in (await loop.sock_recv(sock, 4096)).decode().splitlines():
                if line.startswith("STATUS=") and all(w in line for w in words):
                    return line[len("STATUS="):]


def _counts(db: Path) -> tuple[int, int]:
    """(stored, delivered) readings in the agent's outbox, read beside it (WAL)."""
    if not db.exists():
        return 0, 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        try:
            row = conn.execute("SELECT COUNT(*), COUNT(delivered_at) FROM readings").fetchone()
        except sqlite3.OperationalError:
            return 0, 0
    return int(row[0]), int(row[1])


async def _idle(directory: Path, samples: int) -> tuple[float, list[float]]:
    async with LocalBroker("mosquitto") as broker, PrivateBus() as bus, \
            _simulate(0, bus.address), _agent(directory, broker, bus.address) as (proc, sock):
        await _until_status(sock, "broker connected", "radio ok")
        await asyncio.sleep(2)  # the first status publish and registry checks are behind it
        got = []
        for _ in range(samples):
            got.append(rss_mb(proc.pid))
            await asyncio.sleep(0.5)
    return statistics.median(got), got


async def _growth(directory: Path, readings: int) -> dict[str, Any]:
    db = directory / "state" / "outbox.db"
    trace: list[tuple[float, int, int, float]] = []  # (s, stored, delivered, MiB)
    async with LocalBroker("mosquitto") as broker, PrivateBus() as bus, \
            _agent(directory, broker, bus.address) as (proc, sock):
        t0 = time.monotonic()
        # Rounds of 2,500 readings per device (a stand-in whose devices hold more would be a
        # different simulator); between rounds bluetoothd "restarts" under the agent.
        per_round = min(readings // 2, 2500)
        for n, zone in enumerate(ZONES[:max(1, readings // (2 * per_round))]):
            async with _simulate(per_round, bus.address, zone):
                if n == 0:
                    await _until_status(sock, "broker connected")
                async with asyncio.timeout(600):
                    while True:
                        stored, delivered = await asyncio.to_thread(_counts, db)
                        trace.append((round(time.monotonic() - t0, 1), stored, delivered,
                                      round(rss_mb(proc.pid), 2)))
                        if delivered >= (n + 1) * 2 * per_round:
                            break
                        await asyncio.sleep(0.1)
        await asyncio.sleep(3)  # settled: sessions over, marks committed
        final = rss_mb(proc.pid)
    at_first = next(mb for _, stored, _, mb in trace if stored >= readings // 10)
    return {"first_mb": at_first, "final_mb": round(final, 2),
            "peak_mb": max(mb for *_, mb in trace), "seconds": trace[-1][0],
            "trace": trace[:: max(1, len(trace) // 40)]}


def _baseline_mb() -> float:
    code = ("import asyncio, sqlite3\nfor l in open('/proc/self/status'):\n"
            "    l.startswith('VmRSS:') and print(int(l.split()[1]) / 1024)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env=_env())
    return float(out.stdout)


async def run(*, quick: bool = False) -> dict[str, Any]:
    """Measure both; print baseline, ours and the ratio; return the results' keys."""
    readings = 2000 if quick else 10_000
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent, prefix=".bench-") as tmp:
        idle, idle_samples = await _idle(Path(tmp) / "idle", 6 if quick else 10)
        growth = await _growth(Path(tmp) / "growth", readings)
    base = statistics.median([await asyncio.to_thread(_baseline_mb) for _ in range(3)])
    grown = growth["final_mb"] - growth["first_mb"]
    print("agent RSS, radio bluez (stand-in in its own process), two paired devices")
    print(f"  baseline python -c 'import asyncio, sqlite3': {base:.1f} MiB")
    print(f"  ours idle:                                   {idle:.1f} MiB"
          f"  (goal <= {GOAL_IDLE_MB:g})")
    print(f"  ratio ours/baseline:                         {idle / base:.2f}")
    print(f"  over {readings} readings: {growth['first_mb']:.1f} MiB after the first "
          f"{readings // 10}, {growth['final_mb']:.1f} MiB at the end: {grown:+.2f} MiB "
          f"(goal < {GOAL_GROWTH_MB:g}; {growth['seconds']:.0f} s)")
    return {
        "rss_idle_mb": round(idle, 2),
        "rss_growth_mb": round(grown, 2),
        "rss": {"baseline_mb": round(base, 2), "ratio": round(idle / base, 3),
                "idle_samples_mb": [round(s, 2) for s in idle_samples], "readings": readings,
                **growth, "goal_idle_mb": GOAL_IDLE_MB, "goal_growth_mb": GOAL_GROWTH_MB},
    }
