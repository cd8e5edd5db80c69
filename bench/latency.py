"""End-to-end latency: a simulated cuff takes a reading → the clinic's subscriber has the message.

Ours: the cuff runs in its own process (`rpm-gateway simulate`, which owns the virtual radio and
serves the hub's controller over TCP), the real agent reads it, commits every reading to its
outbox on this machine's disk and the uplink publishes it to a local mosquitto; a subscriber in
this process takes the time of arrival. The start is the device's own ledger line for the reading
(written when the frame enters its memory and is indicated; both processes read the same
clock). Two rates: one reading a second, and a burst of about 30 a second (`latency_p99_ms` is
the burst's). Readings the device took before the hub had subscribed are left out: they wait
for a connection, which is another benchmark. At one a second the cuff hangs up between
readings (0.3 s after its last indication, as cuffs do), so each reading there includes the
hub's reconnection (scan, connect, discover, subscribe): that is the radio's share. Baseline:
the transport alone, paho publishing ~1 KB payloads at QoS 1 at the burst's rate to the same
broker and subscriber: the floor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench._common import CUFF, HUB, hub_toml, pct, running_agent, simulate
from gateway.broker import LocalBroker
from gateway.config import parse_config
from gateway.sim.ledger import read_ledger

TOPIC = f"rpm/{HUB}/readings"


@contextlib.asynccontextmanager
async def _subscriber(broker: LocalBroker, key: str) -> AsyncIterator[dict[str, float]]:
    """Arrival time (time.time()) of every message on the readings topic, by a payload field."""
    arrivals: dict[str, float] = {}
    ready = asyncio.Event()

    async def listen() -> None:
        async with aiomqtt.Client(broker.host, broker.port, identifier="bench-clinic") as client:
            await client.subscribe(TOPIC, qos=1)
            ready.set()
            async for message in client.messages:
                now = time.time()
                arrivals.setdefault(json.loads(bytes(message.payload))[key], now)

    task = asyncio.create_task(listen())
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        yield arrivals
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _ours(readings: int, interval: float, directory: Path) -> list[float]:
    """Milliseconds from the device's reading to its arrival at the subscriber."""
    directory.mkdir(parents=True)  # noqa: ASYNC240 (before anything runs)
    ledger = directory / "ledger.jsonl"
    async with LocalBroker("mosquitto") as broker, _subscriber(broker, "raw") as arrivals, \
            simulate("--devices", "cuff", "--readings", str(readings), "--interval",
                     str(interval), "--listen", "127.0.0.1:0", "--ledger", str(ledger)) as link:
        cfg = parse_config(hub_toml(
            directory, host=broker.host, port=broker.port, devices=[CUFF],
            control_socket=directory / "control.sock",
            radio=f'kind = "virtual"\nlink = "{link}"\nquiet_s = 5.0\nsession_timeout_s = 900'))
        async with running_agent(cfg), asyncio.timeout(readings * interval + 120):
            while not _all_arrived(ledger, readings, arrivals):
                await asyncio.sleep(0.2)
    events = read_ledger(ledger)
    subscribed = min(e["t"] for e in events if e["event"] == "confirmed")
    first: dict[str, float] = {}  # a frame taken twice (same values, same second) is one reading
    for e in events:
        if e["event"] == "produced":
            first.setdefault(e["payload"], e["t"])
    return [(arrivals[p] - t) * 1000 for p, t in first.items() if t > subscribed]


def _all_arrived(ledger: Path, readings: int, arrivals: dict[str, float]) -> bool:
    """Whether the device took all its readings and every distinct one reached the subscriber."""
    if not ledger.exists():
        return False
    produced = [e["payload"] for e in read_ledger(ledger) if e["event"] == "produced"]
    return len(produced) >= readings and set(produced) <= arrivals.keys()


async def _baseline(payloads: list[bytes], interval: float) -> list[float]:
    """Milliseconds from paho's publish call to arrival, same broker, same rate, QoS 1."""
    async with LocalBroker("mosquitto") as broker, _subscriber(broker, "n") as arrivals:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub",
                             protocol=paho.MQTTv5)
        connected = threading.Event()
        client.on_connect = lambda *_: connected.set()
        client.connect(broker.host, broker.port)
        client.loop_start()
        sent: dict[str, float] = {}
        try:
            if not connected.wait(10):
                raise RuntimeError("paho did not connect")
            for n, payload in enumerate(payloads):
                body = json.loads(payload)
                body["n"] = str(n)
                data = json.dumps(body).encode()
                sent[str(n)] = time.time()
                client.publish(TOPIC, data, qos=1)
                await asyncio.sleep(interval)
            async with asyncio.timeout(30):
                while len(arrivals) < len(payloads):
                    await asyncio.sleep(0.05)
        finally:
            client.disconnect()
            client.loop_stop()
    return [(arrivals[k] - t) * 1000 for k, t in sent.items()]


async def run(*, quick: bool = False) -> dict[str, Any]:
    """Measure ours at both rates and the baseline; print them and the ratio; return the keys."""
    slow_n, burst_n = (10, 100) if quick else (60, 330)
    burst_interval = 1 / 30
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent, prefix=".bench-") as tmp:
        slow = await _ours(slow_n, 1.0, Path(tmp) / "slow")
        burst = await _ours(burst_n, burst_interval, Path(tmp) / "burst")
        payload = json.dumps({"schema": "rpm-gateway/reading/1", "pad": "x" * 1000}).encode()
        base = await _baseline([payload] * burst_n, burst_interval)
    s50, s99 = statistics.median(slow), pct(slow, 0.99)
    b50, b99 = statistics.median(burst), pct(burst, 0.99)
    t50, t99 = statistics.median(base), pct(base, 0.99)
    print("latency: reading on the simulated cuff -> message at the subscriber")
    print(f"  baseline paho pub -> mosquitto -> sub, ~30/s ({len(base)}): "
          f"p50 {t50:.1f} ms  p99 {t99:.1f} ms")
    print(f"  ours, 1 reading/s ({len(slow)}):                      "
          f"p50 {s50:.1f} ms  p99 {s99:.1f} ms")
    print(f"  ours, burst ~30/s ({len(burst)}):                     "
          f"p50 {b50:.1f} ms  p99 {b99:.1f} ms")
    print(f"  ratio burst/baseline:                        p50 {b50 / t50:.1f}    "
          f"p99 {b99 / t99:.1f}")
    return {
        "latency_p50_ms": round(b50, 2),
        "latency_p99_ms": round(b99, 2),
        "latency": {
            "burst": {"samples": len(burst), "p50_ms": round(b50, 2), "p99_ms": round(b99, 2),
                      "max_ms": round(max(burst), 2), "rate_per_s": 30},
            "slow": {"samples": len(slow), "p50_ms": round(s50, 2), "p99_ms": round(s99, 2),
                     "max_ms": round(max(slow), 2), "rate_per_s": 1},
            "baseline_p50_ms": round(t50, 2), "baseline_p99_ms": round(t99, 2),
            "ratio_p50": round(b50 / t50, 2), "ratio_p99": round(b99 / t99, 2),
        },
    }
