"""One row's world: mosquitto, a fault proxy before it, the clinic's subscriber, the devices, the agent."""

from __future__ import annotations

import asyncio
import functools
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from faults.collect import Collector
from faults.procs import HOST, AgentProc, Mosquitto, Simulator
from faults.proxy import TcpProxy
from faults.tally import Ledger, Record, Tally, outbox_keys, read_ledger, tally

Mode = Literal["short", "default", "long"]

HUB = "hub-faults"
SCALE = "C0:00:00:00:5C:01"
CUFF = "C0:00:00:00:BC:01"
NEIGHBOUR = "C0:00:00:00:BC:99"
PATIENTS = {SCALE: "patient-0001", CUFF: "patient-0002"}
COMMIT_DELAY_ENV = "RPM_GATEWAY_FAULT_COMMIT_DELAY_MS"
# Beyond the injected commit delay: decoding, SQLite's own fsync and the two processes' clocks
# reading the same wall clock at slightly different moments.
WINDOW_MARGIN_S = 0.15


@dataclass
class Ctx:
    """What every row gets: the mode, a work directory of its own, a seeded random source."""

    mode: Mode
    workdir: Path
    rng: random.Random = field(default_factory=random.Random)

    def pick(self, short: int, default: int, long: int) -> int:
        """A count (of trials, readings...) for the current mode."""
        return {"short": short, "default": default, "long": long}[self.mode]

    def pick_s(self, short: float, default: float, long: float) -> float:
        """A duration in seconds for the current mode."""
        return {"short": short, "default": default, "long": long}[self.mode]


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def toml_text(sections: Mapping[str, Mapping[str, object]], top: Mapping[str, object],
              devices: Sequence[Mapping[str, object]]) -> str:
    """A small TOML writer for the agent's config: scalars in tables, then [[devices]]."""
    # None: the key is left out (the agent's default applies).
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items() if v is not None]
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    for d in devices:
        lines.append("[[devices]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in d.items()]
    return "\n".join(lines) + "\n"


def default_bindings(cuff_slot: int | None = None) -> list[dict[str, object]]:
    """Scale and cuff bound to two patients; the neighbour's cuff is never bound."""
    cuff: dict[str, object] = {"address": CUFF, "patient_id": PATIENTS[CUFF]}
    if cuff_slot is not None:
        cuff["user_index"] = cuff_slot
    return [{"address": SCALE, "patient_id": PATIENTS[SCALE]}, cuff]


def bp_user_slot(payload_hex: str) -> int | None:
    """The User ID byte of a Blood Pressure Measurement (0x2A35), None if the flags omit it."""
    raw = bytes.fromhex(payload_hex)
    if not raw:
        return None
    flags = raw[0]
    if not flags & 0x08:
        return None
    at = 1 + 6 + (7 if flags & 0x02 else 0) + (2 if flags & 0x04 else 0)
    return raw[at] if at < len(raw) else None


@functools.cache
def decodes(payload_hex: str) -> bool:
    """Whether some driver decodes these bytes (a reading), or all refuse them (garbage)."""
    from drivers.codec.errors import DecodeError
    from drivers.registry import ALL_DRIVERS

    try:
        raw = bytes.fromhex(payload_hex)
    except ValueError:
        return False
    for d in ALL_DRIVERS:
        try:
            getattr(d, "decode")(raw)  # noqa: B009 - not on the Driver protocol
        except DecodeError:
            continue
        return True
    return False


class Rig:
    """Start everything a row needs (``async with``); the agent is started by the row itself."""

    def __init__(self, ctx: Ctx, name: str, *, sim_args: Sequence[str] = ("--devices", "scale,cuff"),
                 commit_delay_ms: int = 0, mqtt: Mapping[str, object] | None = None,
                 radio: Mapping[str, object] | None = None,
                 outbox: Mapping[str, object] | None = None,
                 hub: Mapping[str, object] | None = None,
                 bindings: Sequence[Mapping[str, object]] | None = None,
                 broker_extra: Sequence[str] = (), users: Mapping[str, str] | None = None,
                 acl: str | None = None, anonymous: bool = False, proxy_open: bool = True,
                 data_dir: Path | None = None,
                 cuff_slot: int | None = None, with_sim: bool = True,
                 agent_env: Mapping[str, str] | None = None) -> None:
        self.ctx = ctx
        self.dir = ctx.workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir or self.dir / "state"
        # simulate takes 3 readings per device unless told otherwise; a row says how many.
        self.sim_args = list(sim_args) if "--readings" in sim_args else [*sim_args, "--readings", "0"]
        self.commit_delay_ms = commit_delay_ms
        # A reading confirmed just after a commit began waits for that commit, then its own
        # (all queued readings in one transaction): two commit delays at most, plus the margin.
        self.window_s = 2 * commit_delay_ms / 1000 + WINDOW_MARGIN_S
        self.cuff_slot = cuff_slot
        self.bindings = list(bindings) if bindings is not None else default_bindings(cuff_slot)
        self._mqtt = {"reconnect_min_s": 0.2, "reconnect_max_s": 2.0, "keepalive_s": 10,
                      "publish_timeout_s": 5.0, "quarantine_retry_s": 3.0, **(mqtt or {})}
        self._radio = {"quiet_s": 0.5, "idle_backoff_max_s": 3.0, **(radio or {})}
        self._outbox = dict(outbox or {})
        self._hub = dict(hub or {})
        self.broker = Mosquitto(self.dir / "broker", extra=broker_extra, users=users, acl=acl,
                                anonymous=anonymous)
        self.proxy = TcpProxy(HOST, self.broker.port)
        self._proxy_open = proxy_open
        self.collector = Collector(HOST, self.broker.port, HUB)
        self.sim: Simulator | None = None
        self._with_sim = with_sim
        self.agent: AgentProc | None = None
        self.config_path = self.dir / "gateway.toml"
        self._agent_env = dict(agent_env or {})

    async def __aenter__(self) -> Self:
        try:
            await self.broker.start()
            if self._proxy_open:
                await self.proxy.start()
            await self.collector.start()
            link = "tcp:127.0.0.1:1"
            if self._with_sim:
                self.sim = Simulator(self.sim_args, self.dir / "ledger.jsonl", self.dir / "sim.log")
                link = await self.sim.start()
            self.write_config(link)
            env = {COMMIT_DELAY_ENV: str(self.commit_delay_ms)} if self.commit_delay_ms else {}
            env.update(self._agent_env)
            self.agent = AgentProc(self.config_path, self.dir / "agent.log", env)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop everything that was started, in reverse order."""
        if self.agent is not None:
            await self.agent.stop()
        if self.sim is not None:
            await self.sim.stop()
        await self.collector.close()
        await self.proxy.close()
        await self.broker.stop()
        self.broker.release()

    def config_sections(self, link: str) -> dict[str, dict[str, object]]:
        """The agent's config as tables (a row may change them and write_config again)."""
        return {
            "hub": {"id": HUB, "data_dir": str(self.data_dir), "trust_clock": True, **self._hub},
            "mqtt": {"host": HOST, "port": self.proxy.port, **self._mqtt},
            "outbox": self._outbox,
            "radio": {"kind": "virtual", "link": link, **self._radio},
        }

    def write_config(self, link: str | None = None, *, extra: Mapping[str, Mapping[str, object]]
                     | None = None) -> None:
        """(Re)write the agent's config file."""
        link = link if link is not None else (self.sim.link if self.sim else "tcp:127.0.0.1:1")
        sections = self.config_sections(link)
        for k, v in (extra or {}).items():
            sections[k] = {**sections.get(k, {}), **v}
        sections = {k: v for k, v in sections.items() if v}
        self.config_path.write_text(toml_text(sections, {"log_level": "info"}, self.bindings),
                                    encoding="utf-8")

    # -- what happened ----------------------------------------------------------------------

    def ledger(self) -> Ledger:
        """The devices' ledger so far."""
        return read_ledger(self.dir / "ledger.jsonl")

    def expect(self, r: Record) -> str | None:
        """The patient a produced record must be filed under (None: under nobody)."""
        if not decodes(r.payload):
            return None  # garbage bytes are no reading: never to be published
        patient = next((str(b["patient_id"]) for b in self.bindings if b["address"] == r.device), None)
        if patient is None:
            return None
        slot = next((b.get("user_index") for b in self.bindings if b["address"] == r.device), None)
        if slot is not None and bp_user_slot(r.payload) != slot:
            return None
        return patient

    @property
    def outbox_db(self) -> Path:
        """The agent's outbox file."""
        return Path(str(self._outbox.get("path", self.data_dir / "outbox.db")))

    def tally(self, **kw: Any) -> Tally:
        """The row's columns as of now."""
        kills = self.agent.kills if self.agent else []
        patients = {str(b["patient_id"]) for b in self.bindings}
        return tally(self.ledger(), self.collector.readings(), self.expect, patients,
                     kills=kills, window_s=self.window_s, in_outbox=outbox_keys(self.outbox_db), **kw)

    def settled(self, total: int, gone: frozenset[tuple[str, str]] = frozenset()) -> bool:
        """All `total` readings produced, and each expected one delivered or lost in the window.

        `gone`: readings the fault itself destroyed, not waited for.
        """
        led = self.ledger()
        if len(led.records) < total:
            return False
        led.records = [r for r in led.records if r.key not in gone]
        t = tally(led, self.collector.readings(), self.expect, set(),
                  kills=self.agent.kills if self.agent else [], window_s=self.window_s)
        return t.lost == 0

    async def settle(self, total: int, timeout: float, quiet: float = 20.0,
                     gone: frozenset[tuple[str, str]] = frozenset()) -> float:
        """Wait until settled(total), or no progress for `quiet` s, or timeout; seconds waited."""
        t0 = time.monotonic()
        last_count, last_change = -1, t0
        while time.monotonic() - t0 < timeout:
            if self.settled(total, gone):
                break
            n = len(self.collector.readings()) + len(self.ledger().records)
            if n != last_count:
                last_count, last_change = n, time.monotonic()
            elif time.monotonic() - last_change > quiet:
                break
            await asyncio.sleep(0.25)  # bounded poll of the ledger and the subscriber
        return time.monotonic() - t0

    async def wait_for(self, cond: Callable[[], bool], timeout: float, poll: float = 0.1) -> bool:
        """Poll cond until it holds or timeout; whether it held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            await asyncio.sleep(poll)  # bounded poll
        return cond()

    # -- faults on the broker side -------------------------------------------------------------

    async def cut_broker(self) -> None:
        """The agent cannot reach the broker: connections refused, live ones cut."""
        await self.proxy.stop_listening()
        self.proxy.sever()

    async def reopen_broker(self) -> float:
        """The broker is reachable again (only once the clinic is subscribed); the time it opened."""
        await self.collector.wait_subscribed(15)
        await self.proxy.start()
        return time.time()

    async def kill_broker(self) -> None:
        """kill -9 mosquitto; the agent is kept off until the clinic is subscribed again."""
        await self.proxy.stop_listening()
        await self.broker.kill9()
        self.proxy.sever()

    async def restart_broker(self) -> float:
        """Start mosquitto again on its port and let the agent in; the time it opened."""
        self.collector.subscribed.clear()
        await self.broker.start()
        return await self.reopen_broker()

    def first_delivery_after(self, t: float) -> float | None:
        """Seconds from t to the first reading delivered after it."""
        later = [m.t for m in self.collector.readings() if m.t >= t]
        return min(later) - t if later else None

    def delivered_since(self, t: float) -> Callable[[], bool]:
        """A condition: some reading was delivered at or after t."""
        return lambda: self.first_delivery_after(t) is not None

    def online_since(self, t: float) -> Callable[[], bool]:
        """A condition: the agent published an online status at or after t (its uplink is up)."""
        return lambda: any(m.t >= t and isinstance(m.body, dict) and m.body.get("state") != "offline"
                           for m in self.collector.statuses())
