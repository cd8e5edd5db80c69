"""Draining a backlog: readings queued in the outbox → PUBACK'd by a local mosquitto → marked.

Ours: 20,000 realistic readings (blood-pressure payloads built by the real payload model, about
1 KB each) stored in the outbox on this machine's disk; the Uplink delivers them at QoS 1 with the
default in-flight window and marks each delivered only after its PUBACK. The clock stops when the
outbox has nothing pending (every mark committed). Baseline: raw paho-mqtt publishing the same
payloads to the same broker, MQTT 5, the same in-flight window, pipelined (paho's own queue sends
the next message on each PUBACK), no storage at all: the floor the uplink cannot beat.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench._common import HUB, cuff_readings, fill
from gateway.broker import LocalBroker
from gateway.config import MqttConfig, OutboxConfig
from gateway.outbox import Outbox, OutboxItem
from gateway.uplink import Uplink


async def _ours(broker: LocalBroker, items: list[OutboxItem], directory: Path) -> dict[str, float]:
    cfg = MqttConfig(host=broker.host, port=broker.port)
    async with Outbox(directory / "outbox.db", OutboxConfig()) as outbox:
        await fill(outbox, items)
        assert (await outbox.stats()).pending == len(items)
        uplink = Uplink(cfg, HUB, outbox, lambda: {"version": "bench"})
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        task = asyncio.create_task(uplink.run())
        try:
            while uplink.counters.acked < len(items):
                await asyncio.sleep(0.005)
            while (await outbox.stats()).pending:
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        c = uplink.counters
        assert c.acked == len(items) and c.reconnects == 0, c
    return {"s": elapsed, "cpu_s": cpu, "published": c.published, "marks": c.marks}


def _baseline(broker: LocalBroker, topic: str, payloads: list[bytes], inflight: int) -> float:
    """Seconds for raw paho (its own network thread) to have every payload PUBACK'd."""
    done = threading.Event()
    acked = 0
    connected = threading.Event()

    def on_connect(*_: Any) -> None:
        connected.set()

    def on_publish(_c: Any, _u: Any, _mid: int, rc: Any, _p: Any) -> None:
        nonlocal acked
        assert not rc.is_failure
        acked += 1
        if acked == len(payloads):
            done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-paho",
                         protocol=paho.MQTTv5)
    client.max_inflight_messages_set(inflight)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise RuntimeError("paho did not connect")
        t0 = time.perf_counter()
        for p in payloads:
            client.publish(topic, p, qos=1)
        if not done.wait(600):
            raise RuntimeError(f"paho: only {acked} of {len(payloads)} acked")
        return time.perf_counter() - t0
    finally:
        client.disconnect()
        client.loop_stop()


async def run(*, quick: bool = False) -> dict[str, Any]:
    """Measure both; print baseline, ours and the ratio; return the results' keys."""
    n = 2000 if quick else 20_000
    items = cuff_readings(n)
    inflight = MqttConfig().inflight
    topic = f"{MqttConfig().topic_prefix}/{HUB}/readings"
    sizes = sorted(len(i.payload) for i in items)
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent, prefix=".bench-") as tmp:
        async with LocalBroker("mosquitto") as broker:
            payloads = [i.payload for i in items]
            # Baseline before and after ours, and their mean: the machine's load drifts.
            before = await asyncio.to_thread(_baseline, broker, topic, payloads, inflight)
            ours = await _ours(broker, items, Path(tmp))
            after = await asyncio.to_thread(_baseline, broker, topic, payloads, inflight)
    base_s = (before + after) / 2
    base_rate, ours_rate = n / base_s, n / ours["s"]
    ratio = ours_rate / base_rate
    print(f"drain of {n} readings (median payload {sizes[n // 2]} B), QoS 1, MQTT 5, "
          f"in-flight {inflight}, mosquitto on loopback")
    print(f"  baseline raw paho, pipelined:  {base_rate:8.0f} msg/s  ({before:.2f} s before, "
          f"{after:.2f} s after)")
    print(f"  ours outbox -> uplink -> mark: {ours_rate:8.0f} msg/s  ({ours['s']:.2f} s, "
          f"CPU {ours['cpu_s']:.2f} s)")
    print(f"  marked in {ours['marks']} transactions ({n / ours['marks']:.0f} readings each)")
    print(f"  ratio ours/baseline:           {ratio:.2f}")
    return {
        "drain_ratio": round(ratio, 3),
        "drain": {
            "readings": n, "inflight": inflight, "payload_median_bytes": sizes[n // 2],
            "baseline_msg_per_s": round(base_rate, 1), "ours_msg_per_s": round(ours_rate, 1),
            "baseline_s": round(base_s, 3), "ours_s": round(ours["s"], 3),
            "ours_cpu_s": round(ours["cpu_s"], 3), "ours_published": ours["published"],
            "ours_mark_transactions": ours["marks"],
        },
    }
