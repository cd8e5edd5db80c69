"""`rpm-gateway demo`: the whole pipeline on one machine, with simulated devices and no hardware."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Self

import aiomqtt
from rich.console import Console
from rich.status import Status
from rich.text import Text

from gateway import render
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
# Its own control socket: on a hub the service's agent keeps /run/rpm-gateway/control.sock.
control_socket = "{data_dir}/control.sock"

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


# The table: one line per reading, fixed columns, so that rows printed as they arrive line up in
# a terminal, in a pipe and in a CI log alike (a live-redrawn table shows nothing in a log until
# it ends). Widths are display cells; 0 = shares what is left: the reading up to READING_MAX,
# the flags the rest (several flags at once fit at 100 columns).
COLUMNS: tuple[tuple[str, int], ...] = (
    ("time", 8), ("patient", 12), ("device", 13), ("reading", 0), ("flags", 0), ("clock", 8))
READING_MIN, READING_MAX, FLAGS_MIN = 12, 32, 10


def column_widths(width: int) -> tuple[list[int], int]:
    """The columns' widths and the gap between them for a console `width` columns wide (at most
    render.MAX_WIDTH): two spaces when the reading still gets 28 columns, else one. At 80
    columns a reading gets 24 and the flags 10; at 100, 32 and 17."""
    width = min(width, render.MAX_WIDTH)
    fixed = sum(w for _, w in COLUMNS)
    gaps = len(COLUMNS) - 1
    gap = 2 if width - fixed - FLAGS_MIN - 2 * gaps >= 28 else 1
    left = width - fixed - gap * gaps
    flags = max(FLAGS_MIN, left - READING_MAX)
    reading = max(READING_MIN, left - flags)
    named = {"reading": reading, "flags": flags}
    return [w or named[name] for name, w in COLUMNS], gap


def _line(cells: list[Text], width: int) -> Text:
    widths, gap = column_widths(width)
    line = Text(no_wrap=True, overflow="ellipsis")
    for i, (cell, w) in enumerate(zip(cells, widths, strict=True)):
        cell.truncate(w, overflow="ellipsis", pad=i < len(cells) - 1)
        if i:
            line.append(" " * gap)
        line.append_text(cell)
    line.rstrip()
    line.truncate(width, overflow="ellipsis")  # narrower than the columns: cut, never wrap
    return line


def header_lines(width: int) -> list[Text]:
    """The table's header and the rule under it (the house style of gateway.render.table)."""
    head = _line([Text(name, style="bold") for name, _ in COLUMNS], width)
    widths, gap = column_widths(width)
    rule = min(width, sum(widths) + gap * (len(widths) - 1))
    return [head, Text("─" * rule, no_wrap=True)]


def format_row(r: Mapping[str, Any], width: int = 80) -> Text:
    """One table line for a reading payload, at most `width` cells: the time in the patient's
    zone (the payload's `timezone`; this machine's without one), patient, device, the values as
    a person reads them, flags, where the time came from."""
    device = r.get("device")
    dev: Mapping[str, Any] = device if isinstance(device, Mapping) else {}
    flags = render.short_flags(r.get("status", ()), bool(r.get("valid", True)))
    flag_style = "" if flags == "ok" else "bold red" if flags.startswith("INVALID") else "yellow"
    cells = [
        Text(_local_time(r.get("measured_at"), r.get("timezone"))),
        Text(render.one_line(r.get("patient_id", ""), 40) or render.MISSING),
        Text(render.device_label(dev, r.get("kind"), width=13)),
        Text(render.reading_values(r)),
        Text(flags, style=flag_style),
        Text(render.time_source(r.get("time_source"))),
    ]
    return _line(cells, width)


def _local_time(measured: object, zone: object) -> str:
    if not isinstance(measured, str):
        return render.MISSING
    if isinstance(zone, str) and zone:
        with contextlib.suppress(KeyError, ValueError, OSError):  # a zone this machine lacks
            return render.local_time(measured, zone, fmt="%H:%M:%S")
    return render.local_time(measured, None, fmt="%H:%M:%S")


class HeldLogs(logging.Handler):
    """Holds the root logger's records while the demo runs, then replays them, in order and in
    the handlers' own format, through the handlers it stood in for: no log line lands inside
    the table, and none is lost (on a terminal, the progress line under the table counts them
    meanwhile, errors in red)."""

    LIMIT = 1000

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.dropped = 0
        self.on_record: Callable[[], None] | None = None
        self._saved: list[logging.Handler] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the record (beyond LIMIT, only count it: warnings, never an error)."""
        if len(self.records) < self.LIMIT or record.levelno >= logging.ERROR:
            self.records.append(record)
        else:
            self.dropped += 1
        if self.on_record is not None:
            self.on_record()

    @property
    def errors(self) -> int:
        """Held records at ERROR or above."""
        return sum(r.levelno >= logging.ERROR for r in self.records)

    def __enter__(self) -> Self:
        root = logging.getLogger()
        self._saved = root.handlers[:]
        root.handlers = [self]
        return self

    def __exit__(self, *exc: object) -> None:
        self.replay()

    def replay(self) -> None:
        """Put the handlers back and replay what was held (once; later calls do nothing)."""
        if self._saved is None:
            return
        root = logging.getLogger()
        root.handlers, self._saved = self._saved, None
        self.on_record = None
        held, self.records = self.records, []
        if held or self.dropped:
            print(f"logged during the demo ({len(held) + self.dropped}):",
                  file=sys.stderr, flush=True)
        for record in held:
            root.handle(record)  # root's handlers, or logging.lastResort when it has none
        if self.dropped:
            print(f"... and {self.dropped} more warning(s) not shown", file=sys.stderr)


class _TableView:
    """Prints the header and the rows; on a terminal, a progress line under the last row."""

    def __init__(self, console: Console, want: int, held: HeldLogs | None) -> None:
        self.console = console
        self.want = want
        self.held = held
        self.rows = 0
        self._status: Status | None = None

    def start(self) -> None:
        for line in header_lines(self.console.width):
            self.console.print(line, crop=True)
        self.console.file.flush()  # a pipe is block-buffered: each line as it is printed
        if self.console.is_terminal:
            self._status = self.console.status(self._progress())
            self._status.start()
            if self.held is not None:
                self.held.on_record = self._refresh

    def row(self, r: Mapping[str, Any]) -> None:
        self.rows += 1
        self.console.print(format_row(r, self.console.width), crop=True)
        self.console.file.flush()
        self._refresh()

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def _refresh(self) -> None:
        if self._status is not None:
            self._status.update(self._progress())

    def _progress(self) -> Text:
        text = Text(f"{self.rows} of {self.want} readings")
        if self.held is not None and (n := len(self.held.records) + self.held.dropped):
            text.append(f"; {n} log message(s)")
            if errors := self.held.errors:
                text.append(f", {errors} error(s)", style="bold red")
            text.append(" shown after the table")
        return text


async def _subscribe(host: str, port: int, want: int, devices: set[str],
                     view: _TableView | None, ready: asyncio.Event,
                     done: asyncio.Event) -> Counter[str]:
    """Print each reading the clinic receives once: a table row, or its JSON when `view` is None."""
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    async with aiomqtt.Client(host, port, identifier="demo-clinic") as client:
        await client.subscribe(f"rpm/{HUB_ID}/readings", qos=1)
        ready.set()
        if view is not None:
            view.start()
        async for msg in client.messages:
            payload = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
            r = json.loads(payload)
            if r["reading_id"] in seen:  # at-least-once delivery: the id says it is the same
                continue
            seen.add(r["reading_id"])
            counts[r["device"]["address"]] += 1
            if view is None:
                print(json.dumps(r), flush=True)
            else:
                view.row(r)
            if all(counts[d] >= want for d in devices):
                done.set()
                return counts
    return counts


async def run_demo(*, json_out: bool, readings: int, timeout: float,
                   broker: Literal["auto", "mosquitto", "amqtt"] = "auto",
                   console: Console | None = None) -> int:
    """Run the demo; 0 once every paired device delivered `readings` readings.

    The table goes to `console` (default: gateway.render.console(), stdout); the log records of
    the run (agent, broker) are held meanwhile and printed after the table, on stderr.
    `json_out`: one JSON payload per line on stdout and nothing else; logs go straight through.
    """
    held = None if json_out else HeldLogs()
    with held if held is not None else contextlib.nullcontext():
        return await _run(json_out, readings, timeout, broker, console, held)


async def _run(json_out: bool, readings: int, timeout: float,
               broker: Literal["auto", "mosquitto", "amqtt"], console: Console | None,
               held: HeldLogs | None) -> int:
    with tempfile.TemporaryDirectory(prefix="rpm-gateway-demo-") as tmp:
        async with LocalBroker(broker) as local:
            if not json_out:
                print(f"broker: {local.kind} on {local.host}:{local.port}\n"
                      f"paired: scale {SCALE}, cuff {CUFF}\n"
                      f"not paired: a neighbour's cuff {NEIGHBOUR}", file=sys.stderr, flush=True)
            # amqtt speaks MQTT 3.1.1 only (and never answers an MQTT 5 CONNECT).
            protocol = "3.1.1" if local.kind == "amqtt" else "auto"
            cfg = demo_config(local.host, local.port, Path(tmp), readings, protocol)
            agent = Agent(cfg)
            view = None if json_out else _TableView(console or render.console(), 2 * readings, held)
            ready, done = asyncio.Event(), asyncio.Event()
            sub = asyncio.create_task(
                _subscribe(local.host, local.port, readings, {SCALE, CUFF}, view, ready, done))
            await asyncio.wait_for(ready.wait(), 10)
            run = asyncio.create_task(agent.run())
            timed_out = False
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.wait({sub, run}, return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError:
                timed_out = True
            finally:
                if view is not None:
                    view.stop()  # first: the terminal gets its cursor back whatever follows
                interrupted = agent.stop_requested
                agent.stop()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(run, 15)
                sub.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await sub  # MqttError: reported below
                if held is not None:
                    held.replay()  # the table is over: what was logged meanwhile, in order
            if timed_out:
                print(f"demo: timed out after {timeout:.0f} s", file=sys.stderr)
            if run.done() and not run.cancelled() and run.exception() is not None:
                print(f"demo: the agent failed: {run.exception()}", file=sys.stderr)
                return 70
            if sub.done() and not sub.cancelled() and sub.exception() is not None:
                print(f"demo: the clinic's subscriber lost the broker: {sub.exception()}",
                      file=sys.stderr)
                return 1
            if not done.is_set():
                return 0 if interrupted else 1
            if not json_out:
                st = agent.status
                print(f"done: {st.stored} readings stored and delivered; "
                      f"{len(st.unknown_seen)} unpaired device(s) seen and ignored",
                      file=sys.stderr)
            return 0
