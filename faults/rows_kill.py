"""kill: kill -9 of the agent at random moments while readings stream and devices drain their memory."""

from __future__ import annotations

import time

from faults.report import Row
from faults.rig import Ctx, Rig


async def agent_kill(ctx: Ctx, name: str, *, commit_delay_ms: int) -> Row:
    """Kill the agent `trials` times at random moments, restart it each time; nothing may be lost."""
    trials = ctx.pick(2, 20, 60)
    stored = ctx.pick(15, 40, 80)
    interval = 0.3
    # The devices measure for the whole row, so every kill lands in a stream (and early ones in
    # the drain of the stored memory).
    readings = int(trials * 3.0 / interval) + 5
    sim = ["--devices", "scale,cuff", "--stored", str(stored), "--readings", str(readings),
           "--interval", str(interval)]
    async with Rig(ctx, name, sim_args=sim, commit_delay_ms=commit_delay_ms) as rig:
        assert rig.agent is not None
        starts: list[float] = []
        for _ in range(trials):
            starts.append(time.time())
            await rig.agent.start()
            # Start-up (imports, the link to the devices) takes about a second: kill both
            # before and during sessions.
            await rig.wait_for(lambda: False, ctx.rng.uniform(0.8, 4.0))
            await rig.agent.kill9()
        starts.append(time.time())
        await rig.agent.start()
        await rig.settle(2 * (stored + readings), timeout=readings * interval + 180)
        t = rig.tally()
        recoveries = [r for s in starts if (r := rig.first_delivery_after(s)) is not None]
    row = Row.of(name, "kill", trials, t, max(recoveries) if recoveries else None)
    row.notes.append(f"in_window bound {rig.window_s * 1000:.0f} ms")
    return row
