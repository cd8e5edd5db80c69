"""`python -m faults [--short | --long] [--only CLASS,...] [--json PATH]`: run the fault matrix."""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from faults.matrix import CLASSES, FAULTS, Fault
from faults.procs import Unavailable
from faults.report import Row, table, write_json
from faults.rig import Ctx, Mode


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m faults", description=__doc__)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--short", action="store_true", help="the subset `make test` runs (≤ 90 s)")
    size.add_argument("--long", action="store_true", help="more trials, 100,000 fuzz examples")
    p.add_argument("--only", default="", metavar="CLASS,...",
                   help=f"classes or fault names to run ({', '.join(CLASSES)})")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write JSON here")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, ledgers)")
    return p


def select(mode: Mode, only: str) -> list[Fault]:
    """The faults a run covers."""
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    unknown = wanted - set(CLASSES) - {f.name for f in FAULTS}
    if unknown:
        raise SystemExit(f"python -m faults: unknown class or fault: {', '.join(sorted(unknown))}")
    chosen = [f for f in FAULTS if not wanted or f.cls in wanted or f.name in wanted]
    if mode == "short" and not wanted:
        chosen = [f for f in chosen if f.short]
    return chosen


async def run_one(fault: Fault, ctx: Ctx) -> Row:
    """One row; a missing precondition is a SKIP, a crash of the harness a FAIL with its reason."""
    t0 = time.monotonic()
    try:
        row = await fault.run(ctx)
    except Unavailable as e:
        row = Row(fault.name, fault.cls, verdict=f"SKIP ({e})")
    except Exception as e:
        row = Row(fault.name, fault.cls)
        row.fail(f"harness error: {type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc(file=sys.stderr)
    row.fault, row.cls = fault.name, fault.cls
    row.seconds = round(time.monotonic() - t0, 1)
    return row


async def main_async(args: argparse.Namespace) -> int:
    """Run the selected rows one after another; print the table; non-zero if any failed."""
    mode: Mode = "short" if args.short else "long" if args.long else "default"
    faults = select(mode, args.only)
    seed = args.seed if args.seed is not None else int(time.time())
    work = Path(tempfile.mkdtemp(prefix="rpm-faults-"))
    rows: list[Row] = []
    t0 = time.monotonic()
    print(f"fault matrix: {len(faults)} row(s), mode {mode}, seed {seed}, work dir {work}",
          file=sys.stderr, flush=True)
    try:
        for i, fault in enumerate(faults):
            ctx = Ctx(mode, work, random.Random(f"{seed}-{fault.name}"))
            row = await run_one(fault, ctx)
            rows.append(row)
            print(f"[{i + 1}/{len(faults)}] {row.fault}: {row.verdict} ({row.seconds:.0f} s)",
                  file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.monotonic() - t0
    print(table(rows))
    failed = [r for r in rows if r.failed]
    print(f"\n{len(rows)} row(s) in {seconds:.0f} s: {len(failed)} failed, "
          f"{sum(r.verdict.startswith('SKIP') for r in rows)} skipped")
    if args.json is not None:
        write_json(rows, args.json, mode, seconds)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: the exit status (1 when any row failed)."""
    return asyncio.run(main_async(_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
