"""radio, bond, clock: faults the simulated devices produce themselves (simulate's options)."""

from __future__ import annotations

import datetime as dt
import itertools
import time
from collections.abc import Sequence
from pathlib import Path

from faults.procs import Unavailable
from faults.report import Row
from faults.rig import Ctx, Rig
from faults.tally import Tally, outbox_pending

TEN_YEARS_S = 10 * 365 * 86400


async def _run_devices(ctx: Ctx, name: str, klass: str, sim: Sequence[str], total: int, *,
                       run_s: float = 0.0, info_only: bool = False, check_time: bool = False,
                       kill_once: bool = False, cuff_slot: int | None = None,
                       hub: dict[str, object] | None = None) -> tuple[Row, Rig]:
    """Devices with `sim` options, the agent reading them; settle and tally."""
    async with Rig(ctx, name, sim_args=sim, cuff_slot=cuff_slot, hub=hub) as rig:
        assert rig.agent is not None
        started = time.time()
        await rig.agent.start()
        if kill_once:
            await rig.wait_for(rig.delivered_since(started), 30)
            await rig.agent.kill9()
            await rig.agent.start()
        if run_s:
            await rig.wait_for(lambda: False, run_s)
        await rig.settle(total, timeout=120 + run_s, quiet=12)
        t = rig.tally(check_time=check_time)
    return Row.of(name, klass, 1, t, rig.first_delivery_after(started), info_only=info_only), rig


async def link_dropped(ctx: Ctx) -> Row:
    """The device drops the link mid-transfer, again and again; everything arrives once by id."""
    stored = ctx.pick(12, 30, 60)
    sim = ["--devices", "scale,cuff", "--stored", str(stored), "--drop-link-after", "4"]
    row, _ = await _run_devices(ctx, "radio-link-dropped", "radio", sim, 2 * stored)
    return row


async def garbage(ctx: Ctx) -> Row:
    """Garbage bytes between real records: rejected, never published, the rest delivered."""
    stored, readings = ctx.pick(10, 20, 40), ctx.pick(4, 10, 20)
    sim = ["--devices", "scale,cuff", "--stored", str(stored), "--readings", str(readings),
           "--interval", "0.3", "--garbage-every", "3"]
    row, _ = await _run_devices(ctx, "radio-garbage-bytes", "radio", sim, 2 * (stored + readings))
    return row


async def resend_stored(ctx: Ctx, *, timestamps: bool) -> Row:
    """A device that re-sends all of its memory on every connection: no new ids for a replay."""
    stored = ctx.pick(8, 20, 40)
    readings = ctx.pick(4, 8, 16)
    sim = ["--devices", "scale,cuff", "--stored", str(stored), "--resend-stored",
           "--readings", str(readings), "--interval", "1.0"]
    name = "radio-resend-stored"
    if not timestamps:
        sim.append("--no-timestamp")
        name = "radio-resend-untimestamped"
    # Several connections, each replaying everything.
    row, rig = await _run_devices(ctx, name, "radio", sim, 2 * (stored + readings),
                                  run_s=readings * 1.0 + 4, info_only=not timestamps)
    sessions = len(rig.ledger().connections)
    row.notes.append(f"{sessions} connection(s), each a full replay")
    if not timestamps:
        row.notes.append("no time stamp: the README's identity rule decides; reported, not judged")
    if sessions < 4:
        row.fail(f"only {sessions} connection(s): the replay was not exercised")
    return row


async def constant_advertiser(ctx: Ctx) -> Row:
    """A device that never stops advertising and has nothing: sessions must back off."""
    name = "radio-constant-advertiser"
    watch = ctx.pick_s(20.0, 40.0, 90.0)
    sim = ["--devices", "scale", "--constant-advertiser", "--readings", "0"]
    async with Rig(ctx, name, sim_args=sim, radio={"idle_backoff_max_s": 300.0}) as rig:
        assert rig.agent is not None
        await rig.agent.start()
        await rig.wait_for(lambda: False, watch)
        conns = [t for t, _ in rig.ledger().connections]
    row = Row.of(name, "radio", 1, Tally())
    gaps = [b - a for a, b in itertools.pairwise(conns)]
    row.notes.append(f"{len(conns)} session(s) in {watch:.0f} s; gaps "
                     + ", ".join(f"{g:.1f}" for g in gaps[:8]))
    # Doubling from a 2 s cooldown reaches 16 s in four steps: a fixed interval would not.
    if len(conns) < 2:
        row.fail("fewer than 2 sessions: the device was never read")
    elif len(conns) > 2 + watch / 8 or (len(gaps) >= 3 and gaps[-1] < 2 * gaps[0]):
        row.fail("sessions did not back off")
    return row


async def user_slots(ctx: Ctx) -> Row:
    """Slots 1, 2 and 255 on a cuff bound to slot 1: only slot 1 is filed under the patient."""
    readings = ctx.pick(6, 12, 24)
    sim = ["--devices", "cuff", "--readings", str(readings), "--interval", "0.4",
           "--user-slots", "1,2,255"]
    row, _ = await _run_devices(ctx, "bond-user-slots", "bond", sim, readings, cuff_slot=1)
    return row


async def bonded(ctx: Ctx) -> Row:
    """A cuff that demands a bond; the agent killed once: the bond is reused, nothing lost."""
    stored, readings = ctx.pick(5, 10, 20), ctx.pick(6, 12, 24)
    sim = ["--devices", "cuff", "--bonding", "--stored", str(stored), "--readings", str(readings),
           "--interval", "0.5"]
    row, _ = await _run_devices(ctx, "bond-bonded-cuff-kill", "bond", sim, stored + readings,
                                kill_once=True)
    return row


async def device_clock(ctx: Ctx, name: str, opts: Sequence[str], *, trust: bool = True) -> Row:
    """A device clock that is wrong (years off, 1970, year 0): no reading before 2010 or ahead."""
    readings = ctx.pick(4, 8, 16)
    sim = ["--devices", "scale,cuff", "--stored", "3", "--readings", str(readings),
           "--interval", "0.4", *opts]
    row, _ = await _run_devices(ctx, name, "clock", sim, 2 * (3 + readings), check_time=True,
                                hub={"trust_clock": trust})
    return row


async def hub_timezone(ctx: Ctx) -> Row:
    """A hub in America/New_York, devices on its local clock: measured_at is the true UTC instant."""
    name = "clock-hub-timezone"
    readings = ctx.pick(4, 8, 16)
    zone = "America/New_York"
    sim = ["--devices", "scale,cuff", "--readings", str(readings), "--interval", "0.5",
           "--timezone", zone]
    async with Rig(ctx, name, sim_args=sim, hub={"timezone": zone}) as rig:
        assert rig.agent is not None
        started = time.time()
        await rig.agent.start()
        await rig.settle(2 * readings, timeout=90, quiet=12)
        t = rig.tally(check_time=True)
        produced = {r.key: r.t_produced for r in rig.ledger().records}
        off = []
        for m in rig.collector.readings():
            k = (str(m.body["device"]["address"]).upper(), str(m.body["raw"]).lower())
            at = dt.datetime.fromisoformat(str(m.body["measured_at"]).replace("Z", "+00:00"))
            if k in produced and abs(at.timestamp() - produced[k]) > 120:
                off.append(at.timestamp() - produced[k])
    row = Row.of(name, "clock", 1, t, rig.first_delivery_after(started))
    if off:
        row.fail(f"{len(off)} reading(s) dated {off[0]:+.0f} s from when they were measured")
    return row


CLOCK_CASES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("clock-device-years-off", ("--clock-offset", str(-TEN_YEARS_S)), True),
    ("clock-device-epoch", ("--clock", "epoch"), True),
    ("clock-device-year0", ("--clock", "year0"), True),
    ("clock-device-years-ahead", ("--clock-offset", str(TEN_YEARS_S)), True),
    ("clock-hub-unsynced-device-off", ("--clock-offset", str(TEN_YEARS_S)), False),
)


FAKETIME_LIBS = (Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"),
                 Path("/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1"),
                 Path("/usr/lib/faketime/libfaketimeMT.so.1"))
HUB_BOOT_TIME = "@2000-01-01 00:00:00"  # a Pi without RTC boots with a clock long past


async def _stepped_trial(ctx: Ctx, name: str, lib: Path, *, stamped: bool,
                        readings: int) -> tuple[Tally, float | None]:
    stamp = ctx.workdir / f"{name}.faketime"
    stamp.write_text(HUB_BOOT_TIME + "\n")
    env = {"LD_PRELOAD": str(lib), "FAKETIME_TIMESTAMP_FILE": str(stamp),
           "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    sim = ["--devices", "scale,cuff", "--stored", "3", "--readings", str(readings),
           "--interval", "0.4", *([] if stamped else ["--no-timestamp"])]
    total = 2 * (3 + readings)
    # trust_clock unset (None: not written): the agent asks the kernel, as on a hub.
    async with Rig(ctx, name, sim_args=sim, proxy_open=False, agent_env=env,
                   hub={"trust_clock": None}) as rig:
        assert rig.agent is not None
        await rig.agent.start()
        await rig.wait_for(lambda: len(rig.ledger().records) >= total, readings * 0.4 + 30)
        await rig.wait_for(lambda: (outbox_pending(rig.outbox_db) or 0) >= total, 20, 0.25)
        stamp.write_text("+0\n")  # NTP steps the clock to the true time
        await rig.wait_for(lambda: False, 1.0)
        opened = await rig.reopen_broker()
        await rig.settle(total, timeout=60, quiet=12)
        return rig.tally(check_time=True), rig.first_delivery_after(opened)


async def hub_clock_stepped(ctx: Ctx) -> Row:
    """The hub clock unsynchronised at boot (year 2000), then stepped to the true time, by faketime.

    Only the agent's wall clock is faked (LD_PRELOAD, monotonic left alone), never the machine's.
    Readings pile up with the broker away while the clock is wrong, then go after the step: none
    may be dated before 2010 or in the future, none dropped as "too old".
    """
    lib = next((p for p in FAKETIME_LIBS if p.exists()), None)
    if lib is None:
        raise Unavailable("libfaketime is not installed (apt-get install faketime)")
    name = "clock-hub-stepped"
    readings = ctx.pick(4, 8, 16)
    out = Tally()
    recs: list[float] = []
    for stamped in (True, False):
        t, rec = await _stepped_trial(ctx, f"{name}-{'stamped' if stamped else 'unstamped'}", lib,
                                      stamped=stamped, readings=readings)
        out.add(t)
        if rec is not None:
            recs.append(rec)
    row = Row.of(name, "clock", 2, out, max(recs) if recs else None)
    row.notes.append("agent clock at 2000-01-01 until stepped; trust_clock unset; "
                     "devices with time stamps, then without")
    return row
