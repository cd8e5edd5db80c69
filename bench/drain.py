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
import datetime as dt
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from drivers.base import ClockCheck, DeviceInfo
from drivers.blood_pressure import decode_bp
from gateway.broker import LocalBroker
from gateway.config import DeviceBinding, MqttConfig, OutboxConfig
from gateway.intake import build_reading, outbox_item
from gateway.outbox import Outbox, OutboxItem
from gateway.uplink import Uplink

HUB = "bench-hub"
CUFF = "C0:00:00:00:BC:01"
ZONE = ZoneInfo("America/New_York")
_BATCH = 500  # puts handed over together share one commit: filling the outbox stays quick


def readings(n: int) -> list[OutboxItem]:
    """n distinct blood-pressure readings as the agent stores them (about 1 KB of JSON each)."""
    binding = DeviceBinding(address=CUFF, patient_id="patient-0001")
    info = DeviceInfo(manufacturer="Simulated Health", model="SIM-BP1", serial="BP00BC01",
                      firmware="1.4.2")
    received = dt.datetime.now(dt.UTC)
    out = []
    for i in range(n):
        # Flags 0x1E: time stamp, pulse, user, status; SFLOAT mmHg; a distinct time per reading.
        day, minute = divmod(i, 1440)
        raw = bytes([0x1E, 100 + i % 60, 0, 60 + i % 30, 0, 80 + i % 20, 0, 0xE9, 0x07,
                     1 + (day // 28) % 12, 1 + day % 28, minute // 60, minute % 60, i % 60,
                     55 + i % 40, 0, 1, 0, 0])
        r = build_reading(decode_bp(raw), hub_id=HUB, binding=binding, address=CUFF, info=info,
                          driver_name="sig_blood_pressure", driver_version="1.0",
                          clock=ClockCheck(device_time=None, offset_s=2.5, set_ok=True),
                          received_at=received, zone=ZONE, hub_clock_synced=True)
        out.append(outbox_item(r, ZONE))
    return out


async def _fill(outbox: Outbox, items: list[OutboxItem]) -> None:
    for start in range(0, len(items), _BATCH):
        await asyncio.gather(*(outbox.put(i) for i in items[start:start + _BATCH]))


async def _ours(broker: LocalBroker, items: list[OutboxItem], directory: Path) -> dict[str, float]:
    cfg = MqttConfig(host=broker.host, port=broker.port)
    async with Outbox(directory / "outbox.db", OutboxConfig()) as outbox:
        await _fill(outbox, items)
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
    items = readings(n)
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
