"""Accounting: what the devices produced (their ledger) against what the clinic received."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faults.collect import Message
from gateway.sim import ledger as sim_ledger

# The oldest plausible measurement date and how far ahead of the hub a stamp may be.
EARLIEST = dt.datetime(2010, 1, 1, tzinfo=dt.UTC)
FUTURE_SLACK_S = 120.0


@dataclass
class Record:
    """One reading as the simulated device saw it (from its ledger)."""

    device: str
    index: int
    payload: str
    t_produced: float
    t_confirmed: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        """What ties it to a delivered message: device address and raw bytes."""
        return self.device, self.payload.lower()


@dataclass
class Ledger:
    """The devices' ledger: readings produced and confirmed, connections made."""

    records: list[Record] = field(default_factory=list)
    connections: list[tuple[float, str]] = field(default_factory=list)
    confirmations: int = 0


def read_ledger(path: Path) -> Ledger:
    """Parse the JSON-lines ledger; a torn last line (writer killed) is ignored."""
    out = Ledger()
    by_index: dict[tuple[str, int], Record] = {}
    for e in sim_ledger.read_ledger(path):
        ev, dev = e.get("event"), str(e.get("device", "")).upper()
        if ev == "produced":
            r = Record(dev, int(e.get("index", -1)), str(e.get("payload", "")), float(e["t"]))
            by_index[(dev, r.index)] = r
            out.records.append(r)
        elif ev == "confirmed":
            out.confirmations += 1
            r2 = by_index.get((dev, int(e.get("index", -1))))
            # The first confirmation is when the device may forget the record.
            if r2 is not None and r2.t_confirmed is None:
                r2.t_confirmed = float(e["t"])
        elif ev == "connected":
            out.connections.append((float(e["t"]), dev))
    return out


def outbox_keys(db: Path) -> set[tuple[str, str]]:
    """(device, raw) of every row in the outbox, read beside (or after) the agent."""
    keys: set[tuple[str, str]] = set()
    if not db.exists():
        return keys
    with contextlib.suppress(sqlite3.Error), \
            contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
        for (payload,) in c.execute("SELECT payload FROM readings"):
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                body = json.loads(payload)
                keys.add((str(body["device"]["address"]).upper(), str(body["raw"]).lower()))
    return keys


def outbox_pending(db: Path) -> int | None:
    """How many rows are not marked delivered (None if unreadable)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
            return int(c.execute("SELECT count(*) FROM readings WHERE delivered_at IS NULL")
                       .fetchone()[0])
    except sqlite3.Error:
        return None


def outbox_offerable(db: Path) -> int | None:
    """Rows the agent still means to publish: pending, attributed, not quarantined (None: unreadable)."""
    queries = ("SELECT count(*) FROM readings WHERE delivered_at IS NULL AND patient_id IS NOT NULL"
               " AND quarantined_at IS NULL",
               "SELECT count(*) FROM readings WHERE delivered_at IS NULL")  # schema v1
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
            for q in queries:
                try:
                    return int(c.execute(q).fetchone()[0])
                except sqlite3.OperationalError:
                    continue
    except sqlite3.Error:
        pass
    return None


def message_key(body: Any) -> tuple[str, str] | None:
    """(device, raw) of a delivered reading, None if it does not carry them."""
    try:
        return str(body["device"]["address"]).upper(), str(body["raw"]).lower()
    except (KeyError, TypeError):
        return None


@dataclass
class Tally:
    """The columns of one row (summed over its trials)."""

    produced: int = 0
    delivered: int = 0
    lost: int = 0
    redelivered_same_id: int = 0
    new_id_or_wrong_patient: int = 0
    in_window: int = 0
    violations: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        """Sum another trial into this one."""
        for name in ("produced", "delivered", "lost", "redelivered_same_id",
                     "new_id_or_wrong_patient", "in_window", "violations"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.notes += [n for n in other.notes if n not in self.notes]


Expect = Callable[[Record], str | None]
"""The patient a record must be filed under; None: it must not be filed under any patient."""


def _parse_time(text: object) -> dt.datetime | None:
    try:
        t = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def in_window(r: Record, kills: Iterable[float], bound_s: float) -> bool:
    """Confirmed by the device at most bound_s before a kill -9 of the agent."""
    return r.t_confirmed is not None and any(0 <= k - r.t_confirmed <= bound_s for k in kills)


def tally(ledger: Ledger, readings: list[Message], expect: Expect, patients: set[str], *,
          kills: Iterable[float] = (), window_s: float = 0.0,
          in_outbox: set[tuple[str, str]] | None = None, check_order: bool = False,
          check_time: bool = False) -> Tally:
    """Compare the ledger with the delivered readings: every column of the table."""
    kills = list(kills)
    t = Tally(produced=len(ledger.records))
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in ledger.records:
        groups.setdefault(r.key, []).append(r)
    ids: dict[tuple[str, str], list[str]] = {}
    first_seen: list[tuple[str, str]] = []
    unknown = bad_time = 0
    now = dt.datetime.now(dt.UTC)
    for m in readings:
        key = message_key(m.body)
        if key is None or key not in groups:
            unknown += 1
            continue
        body = m.body
        if key not in ids:
            first_seen.append(key)
        ids.setdefault(key, []).append(str(body.get("reading_id")))
        want = expect(groups[key][0])
        got = body.get("patient_id")
        if (want is None and got in patients) or (want is not None and got != want):
            t.new_id_or_wrong_patient += 1
        if check_time:
            at = _parse_time(body.get("measured_at"))
            if at is None or at < EARLIEST or at > now + dt.timedelta(seconds=FUTURE_SLACK_S):
                bad_time += 1
    for key, got_ids in ids.items():
        distinct = len(set(got_ids))
        t.redelivered_same_id += len(got_ids) - distinct
        # Byte-identical frames cannot be told apart: up to one id per produced copy is fine.
        t.new_id_or_wrong_patient += max(0, distinct - len(groups[key]))
    stuck = not_for_patient = 0
    windows: list[float] = []  # kill time minus confirmation time of each in-window reading
    for key, group in groups.items():
        if expect(group[0]) is None:
            not_for_patient += len(group)
            continue
        if key in ids:
            t.delivered += len(group)
            continue
        for r in group:
            if in_outbox is not None and key in in_outbox:
                stuck += 1
                t.lost += 1
            elif in_window(r, kills, window_s):
                t.in_window += 1
                assert r.t_confirmed is not None
                windows.append(min(k - r.t_confirmed for k in kills if k >= r.t_confirmed))
            else:
                t.lost += 1
    if unknown:
        t.violations += unknown
        t.notes.append(f"{unknown} published reading(s) no device produced")
    if bad_time:
        t.violations += bad_time
        t.notes.append(f"{bad_time} reading(s) dated before 2010 or in the future")
    if windows:
        t.notes.append(f"in_window readings confirmed {min(windows) * 1000:.0f} to "
                       f"{max(windows) * 1000:.0f} ms before a kill")
    if not_for_patient:
        t.notes.append(f"{not_for_patient} produced frame(s) for no patient (garbage, other slot)")
    if stuck:
        t.notes.append(f"{stuck} still pending in the outbox at the end")
    if check_order:
        last: dict[str, int] = {}
        disorder = 0
        for key in first_seen:
            r = groups[key][0]
            if r.index < last.get(r.device, -1):
                disorder += 1
            last[r.device] = max(last.get(r.device, -1), r.index)
        if disorder:
            t.violations += disorder
            t.notes.append(f"{disorder} reading(s) delivered out of order")
    return t
