"""refused and oversize: a broker that says no to readings, and a reading too big for it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sqlite3
import time
from pathlib import Path

from faults.report import Row
from faults.rig import HUB, PATIENTS, SCALE, Ctx, Rig
from faults.rows_broker import downgrades
from faults.tally import outbox_pending

# Anonymous clients (the clinic) may read everything; the hub may write status and events but
# not readings, so every reading is refused (PUBACK 0x87 on MQTT 5).
_ACL_REFUSE = f"topic read rpm/#\n\nuser hub\ntopic readwrite rpm/{HUB}/status\n" \
              f"topic readwrite rpm/{HUB}/events\n"
_ACL_ALLOW = f"topic read rpm/#\n\nuser hub\ntopic readwrite rpm/{HUB}/#\n"


def _password_file(rig: Rig, password: str) -> Path:
    path = rig.dir / "mqtt-password"
    path.write_text(password + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def delivered_marks(db: Path) -> int:
    """Rows marked delivered in the outbox."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
            return int(c.execute("SELECT count(*) FROM readings WHERE delivered_at IS NOT NULL")
                       .fetchone()[0])
    except sqlite3.Error:
        return -1


async def refused(ctx: Ctx) -> Row:
    """MQTT 5 broker refuses every reading (ACL); none may be marked delivered; all go once allowed."""
    name = "broker-refuses-readings-acl"
    readings, interval = ctx.pick(4, 15, 30), 0.4
    sim = ["--devices", "scale,cuff", "--stored", "5", "--readings", str(readings),
           "--interval", str(interval)]
    total = 2 * (5 + readings)
    async with Rig(ctx, name, sim_args=sim, users={"hub": "hub-secret"}, acl=_ACL_REFUSE,
                   anonymous=True) as rig:
        assert rig.agent is not None
        pw = _password_file(rig, "hub-secret")
        rig.write_config(extra={"mqtt": {"username": "hub", "password_file": str(pw)}})
        await rig.agent.start()
        # Refused for the whole stream: every reading produced meets the refusal at least once.
        await rig.wait_for(lambda: len(rig.ledger().records) >= total, readings * interval + 60)
        await rig.wait_for(lambda: False, ctx.pick_s(2.0, 4.0, 4.0))
        marked = delivered_marks(rig.outbox_db)
        refused_published = len(rig.collector.readings())
        # Now the broker allows readings: each refused one must still be there to be delivered.
        await rig.cut_broker()
        await rig.broker.stop()
        rig.broker.acl = _ACL_ALLOW
        opened = await rig.restart_broker()
        await rig.settle(total, timeout=90)
        t = rig.tally()
        rec = rig.first_delivery_after(opened)
        bad = downgrades(rig)
    row = Row.of(name, "refused", 1, t, rec)
    row.notes.append(f"while refused: {marked} row(s) marked delivered, "
                     f"{refused_published} reading(s) reached the clinic")
    if marked > 0:
        row.fail(f"{marked} refused reading(s) marked delivered")
    if bad:
        row.fail(f"{bad} connection(s) on MQTT 3.1.1 (refusals invisible)")
    return row


def oversize_item(size: int) -> object:
    """An outbox item whose payload is bigger than the broker accepts (at the head of the queue)."""
    from gateway.outbox import OutboxItem

    rid = "0" * 31 + "f"
    body = {"schema": "rpm-gateway/reading/1", "reading_id": rid, "hub_id": HUB,
            "patient_id": PATIENTS[SCALE], "device": {"address": SCALE}, "raw": "ff",
            "padding": "x" * size}
    values = {"reading_id": rid, "topic": "readings", "payload": json.dumps(body).encode(),
              "patient_id": PATIENTS[SCALE], "kind": "body_weight",
              "measured_at": "2026-01-01T00:00:00+00:00", "measured_day": "2026-01-01",
              "valid": True}
    # Only the fields the outbox has today (the other engineers may add some with defaults).
    names = {f.name for f in dataclasses.fields(OutboxItem)}
    return OutboxItem(**{k: v for k, v in values.items() if k in names})  # type: ignore[arg-type]


async def prefill(db: Path, item: object) -> None:
    """Store one item in the outbox before the agent starts."""
    from gateway.config import OutboxConfig
    from gateway.outbox import Outbox

    db.parent.mkdir(parents=True, exist_ok=True)
    async with Outbox(db, OutboxConfig()) as ob:
        await ob.put(item)  # type: ignore[arg-type]


def _row_state(db: Path, rid: str) -> str:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
            got = c.execute("SELECT delivered_at FROM readings WHERE reading_id = ?", (rid,)).fetchone()
    except sqlite3.Error as e:
        return f"unreadable ({type(e).__name__})"
    if got is None:
        return "gone"
    return "kept, not delivered" if got[0] is None else "marked delivered"


async def oversize(ctx: Ctx) -> Row:
    """A reading above the broker's limit at the head of the queue; everything behind it goes."""
    name = "oversize-reading"
    limits = [("message_size_limit", 65536)] + ([] if ctx.mode == "short" else
                                                 [("max_packet_size", 65536)])
    readings, interval = ctx.pick(6, 12, 30), 0.4
    total = 2 * readings
    rows: list[Row] = []
    for key, limit in limits:
        sim = ["--devices", "scale,cuff", "--readings", str(readings), "--interval", str(interval)]
        async with Rig(ctx, f"{name}-{key}", sim_args=sim, broker_extra=[f"{key} {limit}"]) as rig:
            assert rig.agent is not None
            item = oversize_item(limit + 1000)
            await prefill(rig.outbox_db, item)
            started = time.time()
            await rig.agent.start()
            await rig.settle(total, timeout=readings * interval + 60, quiet=15)
            t = rig.tally()
            state = _row_state(rig.outbox_db, item.reading_id)  # type: ignore[attr-defined]
            pending = outbox_pending(rig.outbox_db)
        r = Row.of(name, "oversize", 1, t, rig.first_delivery_after(started))
        r.notes.append(f"{key}: oversize reading {state}; {pending} pending at the end")
        if state != "kept, not delivered":
            r.fail(f"{key}: oversize reading {state}")
        rows.append(r)
        await asyncio.sleep(0)
    out = rows[0]
    for r in rows[1:]:
        out.trials += 1
        for f in ("produced", "delivered", "lost", "redelivered_same_id", "new_id_or_wrong_patient",
                  "in_window", "violations"):
            setattr(out, f, getattr(out, f) + getattr(r, f))
        out.notes += r.notes
        out.recovery_s = max(out.recovery_s or 0, r.recovery_s or 0)
        if r.failed:
            out.verdict = "FAIL"
    return out
