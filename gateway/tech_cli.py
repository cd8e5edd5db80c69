"""The technician's commands: scan, pair, unpair, devices, status, unattributed, assign.

Each asks the running agent over the control socket (gateway.control) and, when no agent
listens, does the work itself (gateway.local_hub). Output is for a person on SSH (rich
tables within 100 columns) or, with --json, for a script; exit codes are listed in the README.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from gateway import render, technician
from gateway.config import GatewayConfig, load_config, parse_config
from gateway.control import (
    AgentLost,
    AgentRefused,
    AgentUnreachable,
    Conversation,
    OpError,
    call,
    login_name,
)
from gateway.local_hub import LocalHub

EX_NOPERM = 77
EX_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

_VIRTUAL_TOML = """
[hub]
id = "virtual-hub"
timezone = "{zone}"
data_dir = "{data_dir}"
control_socket = "{data_dir}/control.sock"
trust_clock = true

[radio]
kind = "virtual"

# The demo's devices on the air: the patient's scale and cuff, and a neighbour's cuff.
[[radio.simulated]]
profile = "weight_scale"
address = "C0:00:00:00:5C:01"
clock_offset_s = 300
interval_s = 1.0

[[radio.simulated]]
profile = "blood_pressure"
address = "C0:00:00:00:BC:01"
bonding_required = true
interval_s = 1.3

[[radio.simulated]]
profile = "blood_pressure"
address = "C0:00:00:00:BC:99"
name = "Neighbour Cuff"
interval_s = 1.1
"""


def virtual_config() -> GatewayConfig:
    """The config of `--radio virtual` without a config file."""
    from gateway.demo import local_zone_name  # noqa: PLC0415

    state = os.environ.get("RPM_GATEWAY_DATA_DIR") or str(
        Path.home() / ".local" / "state" / "rpm-gateway" / "virtual")
    return parse_config(_VIRTUAL_TOML.format(zone=local_zone_name(), data_dir=state),
                        "<virtual radio>")


def resolve_config(args: argparse.Namespace) -> GatewayConfig:
    """The config a command works with (ConfigError → exit 78 in cli.main)."""
    if args.radio == "virtual" and not args.config.exists():
        return virtual_config()
    cfg = load_config(args.config)
    if args.radio is not None and args.radio != cfg.radio.kind:
        cfg = cfg.model_copy(update={"radio": cfg.radio.model_copy(update={"kind": args.radio})})
    return cfg


def _op_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "scan":
        return {"seconds": args.seconds, "all": args.all}
    if args.command == "pair":
        return {"address": args.address, "patient": args.patient, "user_slot": args.user_slot,
                "force": args.force, "timeout": args.timeout}
    if args.command == "unpair":
        return {"address": args.address}
    if args.command == "unattributed":
        return {"limit": args.limit}
    if args.command == "assign":
        return {"reading_id": args.reading_id, "patient": args.patient}
    return {}


def run(args: argparse.Namespace) -> int:
    """Run one technician command; returns its exit code."""
    cfg = resolve_config(args)
    # Log lines would tear the tables apart: only errors, on stderr, after the output.
    logging.basicConfig(level=logging.ERROR, format="rpm-gateway: %(message)s", stream=sys.stderr)
    ui = _Ui(args.command, json_mode=args.json)
    socket = args.socket or cfg.hub.control_socket
    try:
        doc = asyncio.run(_perform(cfg, socket, args.command, _op_args(args), ui))
    except AgentRefused as e:
        doc = {"ok": False, "error": str(e), "exit": EX_NOPERM}
    except AgentLost as e:
        # Never done again alone: the agent may have done it (a bond made, a binding written).
        doc = {"ok": False, "exit": technician.EXIT_UNAVAILABLE,
               "error": f"{e}; the agent may have stopped during the command: check "
                        "`rpm-gateway status` and `rpm-gateway devices` before trying again"}
    except KeyboardInterrupt:
        ui.stop()
        print(f"rpm-gateway {args.command}: interrupted", file=sys.stderr)
        return EX_INTERRUPTED
    ui.stop()
    if not doc.get("ok"):
        print(f"rpm-gateway {args.command}: {doc.get('error')}", file=sys.stderr)
        if args.json:  # a script reads why on stdout too
            print(json.dumps({"error": doc.get("error"), "exit": int(doc.get("exit") or 1)}))
        return int(doc.get("exit") or 1)
    result = doc.get("result")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _RENDER[args.command](ui.console, result, cfg)
    return _exit_code(args.command, result)


def _exit_code(command: str, result: Any) -> int:
    if command == "pair" and isinstance(result, Mapping) and not result.get("bound"):
        return int(result.get("exit") or technician.EXIT_NOT_DONE)
    if command == "unpair" and isinstance(result, Mapping) and isinstance(
            result.get("bond_removed"), str):
        return technician.EXIT_NOT_DONE  # unbound, but bluetoothd still holds the bond
    return 0


async def _perform(cfg: GatewayConfig, socket: Path, op: str, op_args: dict[str, Any],
                   ui: _Ui) -> dict[str, Any]:
    try:
        doc = await call(socket, op, op_args, progress=ui.progress, answer=ui.answer)
        ui.via = "agent"
        return doc
    except AgentUnreachable:
        pass
    ui.via = "alone"
    if not ui.json and op in ("scan", "pair", "unpair"):
        print(f"(no agent answers on {socket}: this command uses the radio itself)",
              file=sys.stderr, flush=True)
    async with LocalHub(cfg) as hub:
        conv = Conversation(_local_send(ui), _no_receive, login_name(), asker=ui.answer)
        try:
            result = await technician.OPERATIONS[op](hub, op_args, conv)
        except OpError as e:
            return {"ok": False, "error": str(e), "exit": e.exit_code}
    return {"ok": True, "result": result}


def _local_send(ui: _Ui) -> Callable[[dict[str, Any]], Awaitable[None]]:
    async def send(doc: dict[str, Any]) -> None:
        if "progress" in doc:
            ui.progress(doc["progress"])

    return send


async def _no_receive() -> dict[str, Any]:
    raise ConnectionError("no client to answer")


class _Ui:
    """Progress while a command runs: a live scan table, the pairing checklist line by line."""

    def __init__(self, command: str, *, json_mode: bool) -> None:
        self.command = command
        self.json = json_mode
        self.console = render.console(json_mode)
        self.err = Console(stderr=True, highlight=False, markup=False, emoji=False,
                           width=min(Console(stderr=True).width, render.MAX_WIDTH))
        self.via = "?"
        self._live: Live | None = None

    def progress(self, doc: Mapping[str, Any]) -> None:
        if self.json:
            return
        if self.command == "scan":
            self._scan_progress(doc)
        elif self.command == "pair" and "step" in doc:
            self._step(doc)

    def _scan_progress(self, doc: Mapping[str, Any]) -> None:
        if not self.console.is_terminal:
            return  # a pipe gets the final table only
        rows = doc.get("devices") or []
        spinner = Spinner("dots", text=Text(f" scanning, {doc.get('left_s', 0):.0f} s left; "
                                            f"{len(rows)} device(s)"))
        view = Group(_scan_table(rows), spinner)
        if self._live is None:
            self._live = Live(view, console=self.console, refresh_per_second=4, transient=True)
            self._live.start()
        else:
            self._live.update(view)

    def _step(self, doc: Mapping[str, Any]) -> None:
        ok = doc.get("ok")
        mark = "…" if doc.get("step") in ("listening", "passkey shown") else (
            "✓" if ok else "✗" if ok is False else "-")
        if ok is False and not doc.get("required", True):
            mark = "!"
        step = render.one_line(doc.get("step", ""), 20)
        self.console.print(Text(f"{mark} {step:<11} " + render.one_line(doc.get("detail", ""), 300)))
        if doc.get("advice") and ok is False:
            # A grid keeps the advice's continuation lines under its first word.
            advice = Table.grid(padding=(0, 1))
            advice.add_column(width=3, justify="right")
            advice.add_column()
            advice.add_row("→", Text(str(doc["advice"])))
            self.console.print(advice)

    async def answer(self, what: str, prompt: str) -> str | None:
        self.stop()
        if not sys.stdin.isatty():
            return None  # a script cannot type a PIN; the pairing is refused, not hung
        return await _read_line(f"{prompt}: ")

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


async def _read_line(prompt: str) -> str | None:
    """One line from the terminal, cancellable (the agent may give up waiting first)."""
    loop = asyncio.get_running_loop()
    line: asyncio.Future[str] = loop.create_future()
    fd = sys.stdin.fileno()

    def readable() -> None:
        if not line.done():
            line.set_result(sys.stdin.readline())

    sys.stdout.write(prompt)
    sys.stdout.flush()
    loop.add_reader(fd, readable)
    try:
        text = await line
    finally:
        loop.remove_reader(fd)
    return text.rstrip("\n") if text else None


# -- rendering ------------------------------------------------------------------------------------


def _scan_table(rows: list[Mapping[str, Any]]) -> render.HouseTable:
    t = render.table(["address", "name", "RSSI", "driver", "paired", "patient"])
    t.columns[0].min_width = 17  # an address is never cut
    t.columns[2].justify = "right"
    for r in rows:
        t.add_row(r["address"], r.get("name"), None if r.get("rssi") is None else str(r["rssi"]),
                  r.get("driver") or "unsupported", "yes" if r.get("paired") else "no",
                  r.get("patient"))
    return t


def _render_scan(console: Console, result: Any, cfg: GatewayConfig) -> None:
    del cfg
    rows = list(result or [])
    console.print(_scan_table(rows))
    supported = sum(1 for r in rows if r.get("driver"))
    console.print(Text(f"{len(rows)} device(s), {supported} supported; pair one with "
                       "`rpm-gateway pair ADDRESS --patient ID`"))


def _render_pair(console: Console, result: Any, cfg: GatewayConfig) -> None:
    del cfg
    if result.get("bound"):
        console.print(Text(f"paired: {result['address']} is {result['patient']}'s; the hub reads "
                           "it from now on"))
    else:
        failed = [s for s in result.get("steps", []) if s.get("ok") is False and s.get("required")]
        what = failed[-1]["step"] if failed else "a step"
        console.print(Text(f"NOT paired: {result['address']} ({what} failed); fix it and run "
                           "the same command again"))


def _render_unpair(console: Console, result: Any, cfg: GatewayConfig) -> None:
    del cfg
    parts = []
    if result.get("unbound"):
        parts.append(f"binding to {result.get('patient')} removed")
    bond = result.get("bond_removed")
    parts.append("bond removed" if bond is True else "no bond held" if bond is False else str(bond))
    mark = "!" if isinstance(bond, str) else "✓"
    console.print(Text(f"{mark} {result['address']}: " + "; ".join(parts)))


def _when(utc: object, cfg: GatewayConfig) -> str | None:
    if not isinstance(utc, str) or not utc:
        return None
    try:
        then = dt.datetime.fromisoformat(utc.replace("Z", "+00:00"))
    except ValueError:
        return utc
    ago = (dt.datetime.now(dt.UTC) - then).total_seconds()
    return f"{render.local_time(utc, cfg.hub.zone)} ({render.age(ago, ago=True)})"


def _drift_words(drift: float | None) -> str | None:
    if drift is None:
        return None
    seconds = round(drift)  # rounds -0.5 to 0, and "0 s" is never signed
    return "0 s" if seconds == 0 else f"{seconds:+d} s"


def _days_words(days: object) -> str | None:
    return str(days.get("summary")) if isinstance(days, Mapping) else None


_KIND_WORDS = {"blood_pressure": "BP cuff", "body_weight": "scale"}


def _render_devices(console: Console, result: Any, cfg: GatewayConfig) -> None:
    rows = list(result or [])
    if not rows:
        console.print(Text("no paired devices; find one with `rpm-gateway scan`"))
        return
    t = render.table(["address", "patient", "device", "last reading", "batt", "drift"])
    t.columns[0].min_width = 17  # an address is never cut
    t.columns[1].min_width = 7
    for r in rows:
        device = " ".join(str(v) for v in (_KIND_WORDS.get(r.get("kind") or "", r.get("kind")),
                                            r.get("model"), r.get("serial")) if v) or None
        drift = r.get("clock_drift_s")
        t.add_row(r["address"], r["patient"] + (f" #{r['user_slot']}" if r.get("user_slot") else ""),
                  device, _when(r.get("last_reading"), cfg) or "none yet",
                  None if r.get("battery") is None else f"{r['battery']}%",
                  _drift_words(drift))
    console.print(t)
    seen: set[str] = set()
    for r in rows:
        words = _days_words(r.get("days_with_data"))
        if words and r["patient"] not in seen:
            seen.add(r["patient"])
            console.print(Text(f"{r['patient']}: {words}"))


def _render_status(console: Console, result: Any, cfg: GatewayConfig) -> None:
    doc: Mapping[str, Any] = result or {}
    lines: list[tuple[str, str]] = []
    agent = doc.get("agent", "?")
    started = doc.get("started_at")
    if agent == "running" and isinstance(started, str):
        up = (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(started.replace("Z", "+00:00")))
        agent += f", up {render.age(up.total_seconds())}"
    elif doc.get("last_known_at"):
        agent += f"; last known state {_when(doc.get('last_known_at'), cfg)}"
    lines.append(("hub", f"{doc.get('hub_id')} (rpm-gateway {doc.get('version')})"))
    lines.append(("agent", agent))
    broker = doc.get("broker") or {}
    if broker:
        b = str(broker.get("state"))
        if broker.get("since"):
            b += f" since {_when(broker.get('since'), cfg)}"
        if broker.get("protocol"):
            b += f", MQTT {broker['protocol']}"
        if broker.get("last_error") and broker.get("state") != "connected":
            b += f"; last error: {broker['last_error']}"
        lines.append(("broker", b))
    if "paired_devices" in doc:
        lines.append(("paired", f"{doc['paired_devices']} device(s) (`rpm-gateway devices`)"))
    if doc.get("pairing_registry"):
        lines.append(("registry", str(doc["pairing_registry"])))
    out = doc.get("outbox") or {}
    if not out and agent.startswith("not running"):
        lines.append(("outbox", "no readings stored yet"))
    if out:
        oldest = out.get("oldest_pending")
        waiting = f"{out.get('pending', 0)} reading(s) waiting"
        if oldest:
            waiting += f", oldest stored {_when(oldest, cfg)}"
        lines.append(("outbox", waiting))
        lines.append(("held back", f"{out.get('quarantined', 0)} quarantined, "
                                   f"{out.get('unattributed', 0)} unattributed "
                                   "(`rpm-gateway unattributed`)"))
    synced = doc.get("hub_clock_synced")
    if synced is not None:
        clock = "synchronised" if synced else "NOT synchronised (check timedatectl)"
        if doc.get("hub_clock") not in (None, "ok"):
            clock += f"; {doc['hub_clock']}"
        lines.append(("hub clock", clock))
    if doc.get("radio"):
        lines.append(("radio", str(doc["radio"])))
    if doc.get("storage"):
        lines.append(("storage", str(doc["storage"])))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        console.print(Text(f"{key:<{width}}  " + render.one_line(str(value), 300)))
    days: Mapping[str, Any] = doc.get("days_with_data") or {}
    if days:
        t = render.table(["patient", "days with data", "period", "left", "billable"])
        for patient, d in days.items():
            t.add_row(patient, f"{d.get('days')} of {d.get('needed')}",
                      f"{d.get('period_start')} to {d.get('period_end')}",
                      f"{d.get('days_left')} days", f"CPT {d['code']}" if d.get("code") else "not yet")
        console.print(t)


def _render_unattributed(console: Console, result: Any, cfg: GatewayConfig) -> None:
    rows = list(result or [])
    if not rows:
        console.print(Text("no unattributed readings"))
        return
    t = render.table(["reading id", "device", "measured", "slot", "values"])
    for r in rows:
        values = render.reading_values({"observations": r.get("observations") or []})
        slot = r.get("user_index")
        t.add_row(r["reading_id"], r.get("device_address"),
                  render.local_time(r["measured_at"], cfg.hub.zone),
                  "unknown" if slot == 255 else None if slot is None else str(slot), values)
    console.print(t)
    console.print(Text("give one to the patient who confirms it: "
                       "`rpm-gateway assign READING_ID --patient ID`"))


def _render_assign(console: Console, result: Any, cfg: GatewayConfig) -> None:
    del cfg
    console.print(Text(f"✓ reading {result['reading_id']} assigned to {result['patient']}; it is "
                       "delivered with the next readings"))


_RENDER: dict[str, Callable[[Console, Any, GatewayConfig], None]] = {
    "scan": _render_scan, "pair": _render_pair, "unpair": _render_unpair,
    "devices": _render_devices, "status": _render_status,
    "unattributed": _render_unattributed, "assign": _render_assign,
}
