"""`rpm-gateway demo`: the whole pipeline on one machine, with simulated devices and no hardware."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import aiomqtt

from gateway.agent import Agent
from gateway.broker import LocalBroker
from gateway.config import GatewayConfig, parse_config

HUB_ID = "demo-hub"
SCALE = "C0:00:00:00:5C:01"
CUFF = "C0:00:00:00:BC:01"
NEIGHBOUR = "C0:00:00:00:BC:99"

_DEMO_TOML = """
log_level = "warning"

[hub]
id = "{hub}"
timezone = "{zone}"
data_dir = "{data_dir}"
trust_clock = true

[mqtt]
host = "{host}"
port = {port}
protocol = "{protocol}"

[radio]
kind = "virtual"
quiet_s = 1.0

# The patient's scale: its clock is five minutes fast, which the agent measures and corrects.
[[radio.simulated]]
profile = "weight_scale"
address = "{scale}"
readings = {n}
interval_s = 1.0
clock_offset_s = 300

# The patient's cuff: it wants a bond before it sends anything.
[[radio.simulated]]
profile = "blood_pressure"
address = "{cuff}"
readings = {n}
interval_s = 1.3
bonding_required = true

# A neighbour's cuff through the wall: not paired here, so never read or published.
[[radio.simulated]]
profile = "blood_pressure"
address = "{neighbour}"
readings = {n}
interval_s = 1.1

[[devices]]
address = "{scale}"
patient_id = "patient-0001"

[[devices]]
address = "{cuff}"
patient_id = "patient-0001"
"""


def demo_config(host: str, port: int, data_dir: Path, readings: int,
                protocol: str = "auto") -> GatewayConfig:
    """The demo's config: two paired simulated devices and one neighbour's."""
    text = _DEMO_TOML.format(hub=HUB_ID, zone=local_zone_name(), data_dir=data_dir, host=host,
                             port=port, protocol=protocol, n=readings, scale=SCALE, cuff=CUFF,
                             neighbour=NEIGHBOUR)
    return parse_config(text, "<demo>")


def local_zone_name() -> str:
    """This machine's IANA zone: the simulated devices' clocks show its local time."""
    tz = os.environ.get("TZ", "").lstrip(":")
    if tz and "/" in tz:
        return tz
    with contextlib.suppress(OSError):
        return Path("/etc/timezone").read_text().strip() or "UTC"
    with contextlib.suppress(OSError):
        target = str(Path("/etc/localtime").resolve())
        if "zoneinfo/" in target:
            return target.split("zoneinfo/", 1)[1]
    return "UTC"


def format_row(r: dict[str, Any]) -> str:
    """One table line for a reading payload."""
    when = dt.datetime.fromisoformat(r["measured_at"]).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    dev = r["device"]
    device = f"{dev.get('model') or dev['driver']} {dev['address'][-5:]}"
    values = ", ".join(
        f"{o['name'].replace(' blood pressure', '')} "
        f"{'—' if o['value'] is None else _fmt(o['value'])} {o['unit']}"
        for o in r["observations"]
    )
    flags = ",".join(r["status"]) or ("ok" if r["valid"] else "INVALID")
    return f"{when}  {r['patient_id']:<13} {device:<22} {values:<70} {flags} [{r['time_source']}]"


def _fmt(v: float) -> str:
    return f"{v:g}"


async def _subscribe(host: str, port: int, want: int, devices: set[str], json_out: bool,
                     ready: asyncio.Event, done: asyncio.Event) -> Counter[str]:
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    async with aiomqtt.Client(host, port, identifier="demo-clinic") as client:
        await client.subscribe(f"rpm/{HUB_ID}/readings", qos=1)
        ready.set()
        if not json_out:
            print(f"{'measured (local)':<20} {'patient':<13} {'device':<22} {'values':<70} status")
        async for msg in client.messages:
            payload = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
            r = json.loads(payload)
            if r["reading_id"] in seen:  # at-least-once delivery: the id says it is the same
                continue
            seen.add(r["reading_id"])
            counts[r["device"]["address"]] += 1
            print(json.dumps(r) if json_out else format_row(r), flush=True)
            if all(counts[d] >= want for d in devices):
                done.set()
                return counts
    return counts


async def run_demo(*, json_out: bool, readings: int, timeout: float,
                   broker: Literal["auto", "mosquitto", "amqtt"] = "auto") -> int:
    """Run the demo; 0 once every paired device delivered `readings` readings."""
    with tempfile.TemporaryDirectory(prefix="rpm-gateway-demo-") as tmp:
        async with LocalBroker(broker) as local:
            if not json_out:
                print(f"broker: {local.kind} on {local.host}:{local.port}; "
                      f"simulated: scale {SCALE}, cuff {CUFF}, neighbour's cuff {NEIGHBOUR}",
                      file=sys.stderr)
            # amqtt speaks MQTT 3.1.1 only (and never answers an MQTT 5 CONNECT).
            protocol = "3.1.1" if local.kind == "amqtt" else "auto"
            cfg = demo_config(local.host, local.port, Path(tmp), readings, protocol)
            agent = Agent(cfg)
            ready, done = asyncio.Event(), asyncio.Event()
            sub = asyncio.create_task(
                _subscribe(local.host, local.port, readings, {SCALE, CUFF}, json_out, ready, done))
            await asyncio.wait_for(ready.wait(), 10)
            run = asyncio.create_task(agent.run())
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.wait({sub, run}, return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError:
                print(f"demo: timed out after {timeout:.0f} s", file=sys.stderr)
            finally:
                interrupted = agent.stop_requested
                agent.stop()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(run, 15)
                sub.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sub
            if run.done() and not run.cancelled() and run.exception() is not None:
                print(f"demo: the agent failed: {run.exception()}", file=sys.stderr)
                return 70
            if not done.is_set():
                return 0 if interrupted else 1
            if not json_out:
                st = agent.status
                print(f"done: {st.stored} readings stored and delivered; "
                      f"{len(st.unknown_seen)} unpaired device(s) seen and ignored",
                      file=sys.stderr)
            return 0
