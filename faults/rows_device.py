"""radio, bond: devices that answer with ATT errors, never answer, or forget their bond.

Each fault lasts the device's first N connections (simulate --att-error, --never-answer,
--forget-bond-after), so a row can check both sides: how the agent names the failure, and that
the readings arrive once the device behaves (or, for a lost bond, stay on the device).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from faults.report import Row
from faults.rig import CUFF, PATIENTS, SCALE, Ctx, Rig
from faults.tally import Ledger, Tally, outbox_keys, tally
from gateway.ble.errors import ADVICE_BOND, ADVICE_GATT, ADVICE_STOPPED, ADVICE_WEDGED
from gateway.sim.ledger import read_ledger

# The agent waits at least this long after a failed session (gateway/agent.py: 2 s doubled once).
MIN_FAILED_GAP_S = 3.5
# A bonded cuff behind a lost bond is watched this long (the agent's failed backoff grows to 60 s).
BOND_WATCH_S = (25.0, 50.0, 120.0)


@dataclass(frozen=True)
class Link:
    """One connection as the device saw it."""

    device: str
    up: float
    down: float | None


def links(rig: Rig) -> list[Link]:
    """Every connection in the ledger, with its end (None while still up), in order."""
    out: list[Link] = []
    open_: dict[str, int] = {}
    for e in read_ledger(rig.dir / "ledger.jsonl"):
        dev = str(e.get("device", "")).upper()
        if e.get("event") == "connected":
            open_[dev] = len(out)
            out.append(Link(dev, float(e["t"]), None))
        elif e.get("event") == "disconnected" and dev in open_:
            i = open_.pop(dev)
            out[i] = Link(dev, out[i].up, float(e["t"]))
    return out


def status_errors(rig: Rig, address: str) -> list[str]:
    """Every distinct last_error the published status showed for a device, in order."""
    seen: list[str] = []
    for m in rig.collector.statuses():
        dev = _get(m.body, "devices", address)
        err = dev.get("last_error") if isinstance(dev, dict) else None
        if isinstance(err, str) and err not in seen:
            seen.append(err)
    return seen


def last_device_status(rig: Rig, address: str) -> dict[str, Any]:
    """The device's entry in the latest status message ({} if none)."""
    for m in reversed(rig.collector.statuses()):
        dev = _get(m.body, "devices", address)
        if isinstance(dev, dict):
            return dev
    return {}


def _get(body: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(body, dict):
            return None
        body = body.get(k)
    return body


def _gaps(ls: Sequence[Link]) -> list[float]:
    """Seconds from each link's end to the next link's start (one device)."""
    return [b.up - a.down for a, b in itertools.pairwise(ls) if a.down is not None]


def agent_problems(rig: Rig) -> list[str]:
    """Whether the agent crashed: it exited, or logged a traceback."""
    assert rig.agent is not None
    out = []
    if not rig.agent.running:
        out.append(f"the agent exited ({rig.agent.proc.returncode if rig.agent.proc else '?'})")
    if "Traceback" in rig.agent.log_text():
        out.append("a traceback in the agent's log")
    return out


def _violate(t: Tally, problems: Sequence[str]) -> None:
    t.violations += len(problems)
    t.notes += [p for p in problems if p not in t.notes]


async def _att_trial(ctx: Ctx, name: str, on: str, failing: int) -> tuple[Tally, float | None,
                                                                        list[str]]:
    stored = ctx.pick(4, 8, 16)
    sim = ["--devices", "scale,cuff", "--stored", str(stored), "--att-error", str(failing),
           "--att-error-on", on]
    notes: list[str] = []
    async with Rig(ctx, name, sim_args=sim) as rig:
        assert rig.agent is not None
        started = time.time()
        await rig.agent.start()
        await rig.settle(2 * stored, timeout=120, quiet=30)
        t = rig.tally()
        recovery = rig.first_delivery_after(started)
        log = rig.agent.log_text()
        per_dev = {d: [x for x in links(rig) if x.device == d] for d in (SCALE, CUFF)}
        first_ok = {d: next((i + 1 for i, x in enumerate(ls)
                             if any(r.device == d and r.t_confirmed is not None
                                    and x.up <= r.t_confirmed <= (x.down or time.time())
                                    for r in rig.ledger().records)), None)
                    for d, ls in per_dev.items()}
        _violate(t, agent_problems(rig))
        named = {d: [e for e in status_errors(rig, d) if "Unlikely Error" in e] for d in per_dev}
        for d, ls in per_dev.items():
            gaps = _gaps(ls)
            notes.append(f"{on}: {d[-5:]} first gave readings on connection {first_ok[d]} "
                         f"of {len(ls)}; gaps " + ", ".join(f"{g:.1f}" for g in gaps[:4]))
            if on == "info":
                continue  # identity is nice to have: the session goes on without it
            if not named[d] or ADVICE_GATT not in named[d][0]:
                t.violations += 1
                t.notes.append(f"{d}: no named ATT error with advice in the status "
                               f"(saw {status_errors(rig, d)[:2]})")
            if ADVICE_GATT not in log:
                t.violations += 1
                t.notes.append("the agent's log does not name the rejected request")
            if any(g < MIN_FAILED_GAP_S for g in gaps[:failing]):
                t.violations += 1
                t.notes.append(f"{d}: reconnected {min(gaps):.1f} s after a failed session")
            if first_ok[d] != failing + 1:
                t.notes.append(f"{d}: expected readings from connection {failing + 1}")
        if on != "info" and named[CUFF]:
            notes.append(f"status: {named[CUFF][0]}")
    return t, recovery, notes


async def att_error(ctx: Ctx) -> Row:
    """ATT Unlikely Error (0x0E) on identity reads and the CCCD write for 2 connections, then fine.

    Trial 1 (info,cccd): each failing session must end as a named GATT error, with the agent up
    and backing off; readings arrive from connection 3. Trial 2 (info only): the driver treats
    identity as optional, so the session goes on and readings arrive at once (noted).
    """
    name = "radio-att-error"
    out = Tally()
    recs: list[float] = []
    notes: list[str] = []
    for on in ("info,cccd", "info"):
        t, rec, n = await _att_trial(ctx, f"{name}-{on.replace(',', '-')}", on, 2)
        out.add(t)
        notes += n
        if rec is not None:
            recs.append(rec)
    row = Row.of(name, "radio", 2, out, max(recs) if recs else None)
    row.notes += notes
    return row


async def never_answer(ctx: Ctx) -> Row:
    """A device that takes the link, answers its setup, then no ATT request, for 2 connections.

    The agent must end each such session by itself (operation timeouts, well inside the
    session deadline) with the "stopped answering" advice, back off between them, and fetch
    the readings once the device answers. A third trial: silent from the link's start (the
    MTU exchange): how the agent names that is noted, not judged.
    """
    name = "radio-never-answer"
    op_s, deadline_s = 1.5, 40.0
    stored = ctx.pick(4, 8, 16)
    out = Tally()
    recs: list[float] = []
    notes: list[str] = []
    # "connect": silent for as many connections as the agent's attempts per session (4 by
    # default), else its next attempt finds the device answering and nothing fails.
    for mode, failing in (("session", 2), ("connect", 4)):
        sim = ["--devices", "scale", "--stored", str(stored), "--never-answer", str(failing),
               "--never-answer-from", mode]
        async with Rig(ctx, f"{name}-{mode}", sim_args=sim,
                       radio={"operation_timeout_s": op_s, "session_timeout_s": deadline_s,
                              "connect_timeout_s": 5.0}) as rig:
            assert rig.agent is not None
            started = time.time()
            await rig.agent.start()
            await rig.settle(stored, timeout=150, quiet=60)
            t = rig.tally()
            rec = rig.first_delivery_after(started)
            ls = [x for x in links(rig) if x.device == SCALE]
            errs = status_errors(rig, SCALE)
            _violate(t, agent_problems(rig))
            silent = ls[:failing]
            lengths = [x.down - x.up for x in silent if x.down is not None]
            gaps = _gaps(ls)
            notes.append(f"{mode}: {len(ls)} connection(s); silent ones lasted "
                         + ", ".join(f"{s:.1f}" for s in lengths)
                         + f" s (operation_timeout_s {op_s:g}, deadline {deadline_s:g}); gaps "
                         + ", ".join(f"{g:.1f}" for g in gaps[:4]))
            if errs:
                notes.append(f"{mode}: status said: {errs[0]}")
            if mode == "session":
                if not errs or ADVICE_STOPPED not in errs[0]:
                    t.violations += 1
                    t.notes.append(f"no 'stopped answering' advice (saw {errs[:1]})")
                if any(ADVICE_WEDGED in e for e in errs):
                    t.violations += 1
                    t.notes.append("blamed the Bluetooth stack for a silent device")
                if len(lengths) < failing or any(s > deadline_s + 5 for s in lengths):
                    t.violations += 1
                    t.notes.append("a silent session was not ended by the agent in time")
                if any(g < MIN_FAILED_GAP_S for g in gaps[:failing]):
                    t.violations += 1
                    t.notes.append(f"reconnected {min(gaps):.1f} s after a failed session")
                if len(gaps) >= 2 and gaps[1] <= gaps[0]:
                    t.notes.append("the second failed session was not followed by a longer wait")
            out.add(t)
            if rec is not None:
                recs.append(rec)
    row = Row.of(name, "radio", 2, out, max(recs) if recs else None)
    row.notes += notes
    return row


async def forgot_bond(ctx: Ctx) -> Row:
    """A bonded cuff forgets its bond after its first connection (battery change).

    Phase 1: the agent keeps its keys, the cuff refuses them: one bond_lost event with re-pair
    advice, the status says so, sessions back off, nothing is published under anyone. Readings
    the cuff never gave away (no ATT confirmation in its ledger) stay in its memory: counted as
    held on the device, not lost; any confirmed reading that never arrived is lost. Phase 2:
    the agent restarts with an empty key store (the virtual radio keeps keys in memory; on a
    hub BlueZ keeps them, and a technician re-pairs), pairs afresh, and the rest arrives.
    """
    name = "bond-forgot-bond"
    stored, readings = ctx.pick(6, 10, 20), ctx.pick(2, 4, 8)
    first = 3  # readings the first connection delivers before the cuff drops the link
    watch = ctx.pick_s(*BOND_WATCH_S)
    sim = ["--devices", "cuff", "--bonding", "--stored", str(stored), "--readings", str(readings),
           "--interval", "0.5", "--drop-link-after", str(first), "--forget-bond-after", "1"]
    total = stored + readings
    async with Rig(ctx, name, sim_args=sim) as rig:
        assert rig.agent is not None
        await rig.agent.start()
        await rig.wait_for(lambda: len(links(rig)) >= 2, 60)
        lost_at = time.time()
        await rig.wait_for(lambda: False, watch)
        phase1 = rig.ledger()
        held = [r for r in phase1.records if r.t_confirmed is None]
        problems = agent_problems(rig)
        events = [m.body for m in rig.collector.events()
                  if isinstance(m.body, dict) and m.body.get("event") == "bond_lost"]
        errs = status_errors(rig, CUFF)
        failed = last_device_status(rig, CUFF).get("sessions_failed")
        n_links = len(links(rig))
        # Phase 1's accounting: held readings are neither delivered nor lost.
        keep = Ledger([r for r in phase1.records if r.t_confirmed is not None],
                      phase1.connections, phase1.confirmations)
        t1 = tally(keep, rig.collector.readings(), rig.expect, set(PATIENTS.values()),
                   in_outbox=outbox_keys(rig.outbox_db))
        # Phase 2: a fresh key store, as after re-pairing.
        await rig.agent.stop()
        restarted = time.time()
        await rig.agent.start()
        await rig.settle(total, timeout=90, quiet=20)
        t2 = rig.tally()
        rec = rig.first_delivery_after(restarted)
        problems += [p for p in agent_problems(rig) if p not in problems]
    row = Row.of(name, "bond", 1, t2, rec)
    row.notes.append(f"phase 1 (bond lost, {watch:.0f} s): {t1.delivered} delivered, "
                     f"{len(held)} held on the device (never confirmed over ATT), {t1.lost} lost, "
                     f"{t1.new_id_or_wrong_patient} wrong patient; {n_links} connection(s), "
                     f"{failed} failed session(s) in the status")
    row.notes.append(f"phase 2 (agent restarted, fresh Just Works pairing, which the simulated "
                     f"cuff accepts without pairing mode): {t2.delivered} of {total} delivered")
    if t1.lost or t1.new_id_or_wrong_patient:
        problems.append("phase 1 lost or mis-filed readings")
    if len(events) != 1:
        problems.append(f"{len(events)} bond_lost event(s), expected exactly 1")
    else:
        detail = events[0].get("detail", {})
        row.notes.append(f"event: {json.dumps(detail)}")
        if detail.get("device") != CUFF or ADVICE_BOND not in str(detail.get("advice")):
            problems.append("the bond_lost event lacks the device or the re-pair advice")
    if not any(ADVICE_BOND in e for e in errs):
        problems.append(f"the status' last_error never gave the re-pair advice (saw {errs[:2]})")
    else:
        row.notes.append("status last_error: " + next(e for e in errs if ADVICE_BOND in e))
    # Failed sessions back off 4, 8, 16, 32, 60 s: a handful in the watch, never one per second.
    if isinstance(failed, int) and failed > 3 + (time.time() - lost_at) / 8:
        problems.append(f"{failed} failed sessions: no back-off")
    if t2.delivered < total - len([r for r in phase1.records if not rig.expect(r)]):
        problems.append("after re-pairing, not everything arrived")
    for p in problems:
        row.fail(p)
    if SCALE in {r.device for r in phase1.records}:
        row.fail("the scale was not meant to run")
    return row


async def never_answer_deadline(ctx: Ctx) -> Row:
    """The same silent device with session_timeout_s shorter than the driver's chain of timeouts.

    A first session asks up to 9 things one after another (6 identity reads, the clock read and
    write, the CCCD write), each given operation_timeout_s. With operation_timeout_s 4 and
    session_timeout_s 20 the deadline used to come first and the status blamed the Bluetooth
    stack; since an ATT timeout ends the session at once, the advice must be "stopped answering".
    """
    name = "radio-never-answer-deadline"
    op_s, deadline_s = 4.0, 20.0
    sim = ["--devices", "scale", "--stored", "3", "--never-answer", "1"]
    async with Rig(ctx, name, sim_args=sim,
                   radio={"operation_timeout_s": op_s, "session_timeout_s": deadline_s}) as rig:
        assert rig.agent is not None
        started = time.time()
        await rig.agent.start()
        await rig.settle(3, timeout=120, quiet=60)
        t = rig.tally()
        _violate(t, agent_problems(rig))
        ls = [x for x in links(rig) if x.device == SCALE]
        errs = status_errors(rig, SCALE)
        if any(ADVICE_WEDGED in e for e in errs):
            _violate(t, ["a device that stopped answering was reported as the Bluetooth stack"])
        row = Row.of(name, "radio", 1, t, rig.first_delivery_after(started))
    silent = ls[0].down - ls[0].up if ls and ls[0].down is not None else None
    row.notes.append(f"operation_timeout_s {op_s:g}, session_timeout_s {deadline_s:g}: the silent "
                     f"session lasted {silent if silent is None else round(silent, 1)} s")
    if errs:
        row.notes.append(f"status said: {errs[0]}")
    if any(ADVICE_WEDGED in e for e in errs):
        row.notes.append("WRONG ADVICE: a device that stopped answering is reported as the "
                         "Bluetooth stack (bluetoothd) stopping, because the session deadline "
                         "expires before the driver's per-request timeouts add up")
    return row
