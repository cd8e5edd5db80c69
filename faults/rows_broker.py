"""broker and network: an outage with a backlog, kill -9 of mosquitto mid-drain, a frozen network."""

from __future__ import annotations

import re
import time

from faults.report import Row
from faults.rig import Ctx, Rig
from faults.tally import outbox_pending

# mosquitto: "New client connected from 127.0.0.1:40000 as hub-faults (p5, c1, k10)."
_CONNECTED = re.compile(r"New client connected from \S+ as (\S+) \(p(\d+)")


def downgrades(rig: Rig) -> int:
    """How many of the agent's connections were not MQTT 5 (p5) in mosquitto's log."""
    return sum(1 for cid, p in _CONNECTED.findall(rig.broker.log_text())
               if cid != "faults-clinic" and p != "5")


async def fill_outbox_offline(rig: Rig, total: int, timeout: float) -> bool:
    """Start the agent with the broker unreachable; wait until `total` readings are pending."""
    assert rig.agent is not None
    await rig.agent.start()
    return await rig.wait_for(lambda: (outbox_pending(rig.outbox_db) or 0) >= total, timeout, 0.25)


async def broker_outage(ctx: Ctx) -> Row:
    """Thousands queued while the broker is down, then back: all delivered, in order, promptly."""
    name = "broker-outage-backlog"
    stored = ctx.pick(150, 1000, 2500)
    ceiling = ctx.pick_s(3.0, 10.0, 60.0)
    sim = ["--devices", "scale,cuff", "--stored", str(stored)]
    async with Rig(ctx, name, sim_args=sim, proxy_open=False,
                   mqtt={"reconnect_max_s": ceiling}) as rig:
        filled = await fill_outbox_offline(rig, 2 * stored, 60 + stored * 0.2)
        # Long enough for the uplink's backoff to reach its ceiling.
        await rig.wait_for(lambda: False, ceiling * 1.5)
        opened = await rig.reopen_broker()
        await rig.settle(2 * stored, timeout=120 + stored * 0.05)
        t = rig.tally(check_order=True)
        rec = rig.first_delivery_after(opened)
    row = Row.of(name, "broker", 1, t, rec)
    if not filled:
        row.notes.append(f"outbox never held all {2 * stored} readings during the outage")
    if rec is None or rec > ceiling + 2.0:
        row.fail(f"reconnect took {rec if rec is None else round(rec, 1)} s; ceiling {ceiling} s")
    return row


async def broker_kill(ctx: Ctx) -> Row:
    """kill -9 of mosquitto at random moments while the agent drains a backlog."""
    name = "broker-kill-9-mid-drain"
    trials = ctx.pick(2, 20, 40)
    interval = 0.1
    readings = int(trials * 4.0 / interval) + 20
    sim = ["--devices", "scale,cuff", "--readings", str(readings), "--interval", str(interval)]
    async with Rig(ctx, name, sim_args=sim) as rig:
        assert rig.agent is not None
        await rig.agent.start()
        recoveries: list[float] = []
        t0 = time.time()
        await rig.wait_for(rig.delivered_since(t0), 30)
        for _ in range(trials):
            await rig.kill_broker()
            # Readings pile up in the outbox while mosquitto is gone...
            await rig.wait_for(lambda: False, ctx.rng.uniform(0.5, 2.0))
            opened = await rig.restart_broker()
            await rig.wait_for(rig.delivered_since(opened), 30)
            if (r := rig.first_delivery_after(opened)) is not None:
                recoveries.append(r)
            # ...and the next kill lands while they drain.
            await rig.wait_for(lambda: False, ctx.rng.uniform(0.0, 0.4))
        await rig.settle(2 * readings, timeout=readings * interval + 120)
        t = rig.tally()
    return Row.of(name, "broker", trials, t, max(recoveries) if recoveries else None)


async def frozen_network(ctx: Ctx, *, during_drain: bool) -> Row:
    """The proxy stops forwarding without closing (during a drain, or while idle), then thaws."""
    name = "network-frozen-drain" if during_drain else "network-frozen-idle"
    stored = ctx.pick(100, 400, 1000) if during_drain else 0
    readings, interval = ctx.pick(8, 20, 40), 0.6
    sim = ["--devices", "scale,cuff", "--stored", str(stored), "--readings", str(readings),
           "--interval", str(interval)]
    keepalive, publish_timeout = 5, 3.0
    async with Rig(ctx, name, sim_args=sim, proxy_open=not during_drain,
                   mqtt={"keepalive_s": keepalive, "publish_timeout_s": publish_timeout}) as rig:
        assert rig.agent is not None
        if during_drain:
            await fill_outbox_offline(rig, 2 * stored, 60 + stored * 0.2)
            opened = await rig.reopen_broker()
            await rig.wait_for(rig.delivered_since(opened), 30, 0.01)
        else:
            await rig.agent.start()
            t0 = time.time()
            await rig.wait_for(rig.delivered_since(t0), 30)
            await rig.wait_for(lambda: outbox_pending(rig.outbox_db) == 0, 10)
        rig.proxy.freeze()
        # Longer than the keepalive and the publish timeout: the agent must notice on its own.
        await rig.wait_for(lambda: False, ctx.pick_s(6.0, keepalive * 1.5 + publish_timeout + 2, 30.0))
        rig.proxy.thaw()
        thawed = time.time()
        await rig.settle(2 * (stored + readings), timeout=readings * interval + 120)
        t = rig.tally()
        rec = rig.first_delivery_after(thawed)
        bad = downgrades(rig)
    row = Row.of(name, "network", 1, t, rec)
    if bad:
        row.fail(f"{bad} agent connection(s) fell back to MQTT 3.1.1 after the freeze")
    return row
