"""The window a killed hub can lose: notification callback → commit returned, per reading.

The BLE stack confirms an indication before the gateway sees the value, so the device may forget
a record the moment the callback runs; until the outbox's COMMIT returns, a `kill -9` or a power
cut loses it. Ours: that window for every reading of a scale that sends its whole memory to the
real agent (outbox on this machine's disk, synchronous=FULL) while the uplink delivers to a local
mosquitto. The scale and the hub's controller run in a process of their own (`rpm-gateway
simulate`), as bluetoothd and the radio do on a hub, so the agent's event loop carries only what
it carries there. Baseline: the same payloads committed one by one in a bare SQLite database
with the same journal settings and nothing else running: the floor the window cannot go under.
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import SCALE, hub_toml, pct, running_agent, simulate
from gateway.broker import LocalBroker
from gateway.config import parse_config
from gateway.sim.ledger import read_ledger


def _baseline(payloads: list[bytes], directory: Path) -> list[float]:
    """Seconds per bare INSERT + COMMIT with WAL and synchronous=FULL."""
    conn = sqlite3.connect(directory / "bare.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE r (id INTEGER PRIMARY KEY, reading_id TEXT UNIQUE, payload BLOB)")
    out = []
    for n, payload in enumerate(payloads):
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO r (reading_id, payload) VALUES (?, ?)", (f"r{n}", payload))
        conn.execute("COMMIT")
        out.append(time.perf_counter() - t0)
    conn.close()
    return out


async def _ours(readings: int, directory: Path) -> tuple[list[float], list[bytes]]:
    directory.mkdir(parents=True)  # noqa: ASYNC240 (before anything runs)
    ledger = directory / "ledger.jsonl"
    device = ("--devices", "scale", "--stored", str(readings), "--readings", "0",
              "--listen", "127.0.0.1:0", "--ledger", str(ledger))
    async with LocalBroker("mosquitto") as broker, simulate(*device) as link:
        cfg = parse_config(hub_toml(
            directory, host=broker.host, port=broker.port, devices=[SCALE],
            radio=f'kind = "virtual"\nlink = "{link}"\nquiet_s = 1.0\nsession_timeout_s = 600'))
        async with running_agent(cfg) as agent, asyncio.timeout(600):
            while len(agent.commit_windows) < readings:
                await asyncio.sleep(0.05)
    payloads = [bytes.fromhex(e["payload"]) for e in read_ledger(ledger) if e["event"] == "produced"]
    return list(agent.commit_windows), payloads


async def run(*, quick: bool = False) -> dict[str, Any]:
    """Measure both; print baseline, ours and the ratio; return the results' keys."""
    readings = 60 if quick else 500
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent, prefix=".bench-") as tmp:
        ours, payloads = await _ours(readings, Path(tmp) / "agent")
        base = await asyncio.to_thread(_baseline, payloads, Path(tmp))
    ours_ms = [w * 1000 for w in ours]
    base_ms = [w * 1000 for w in base]
    p50, p99 = statistics.median(ours_ms), pct(ours_ms, 0.99)
    b50, b99 = statistics.median(base_ms), pct(base_ms, 0.99)
    print(f"commit window over {len(ours_ms)} readings (callback -> commit returned)")
    print(f"  baseline bare SQLite commit: p50 {b50:.3f} ms  p99 {b99:.3f} ms")
    print(f"  ours:                        p50 {p50:.3f} ms  p99 {p99:.3f} ms")
    print(f"  ratio ours/baseline:         p50 {p50 / b50:.2f}    p99 {p99 / b99:.2f}")
    return {
        "commit_window_p50_ms": round(p50, 3),
        "commit_window_p99_ms": round(p99, 3),
        "commit_window": {
            "readings": len(ours_ms), "max_ms": round(max(ours_ms), 3),
            "baseline_p50_ms": round(b50, 3), "baseline_p99_ms": round(b99, 3),
            "ratio_p50": round(p50 / b50, 3), "ratio_p99": round(p99 / b99, 3),
        },
    }
