"""`make bench`: every benchmark, each against a baseline measured in the same run.

Prints baseline, ours and their ratio per benchmark and writes bench/results.json (numeric
top-level keys; details under per-benchmark keys). Ratios are what count: the machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from bench import commit_window, radio_cycle

RESULTS = Path(__file__).with_name("results.json")
BENCHES = {"commit_window": commit_window.run, "radio_cycle": radio_cycle.run}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and write the results file."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    p.add_argument("--quick", action="store_true", help="fewer samples, for a smoke test")
    args = p.parse_args(argv)
    wanted = [n for n in args.only.split(",") if n] or list(BENCHES)
    results: dict[str, Any] = {}
    if args.out.exists():
        results = json.loads(args.out.read_text())
    for name in wanted:
        print(f"== {name}", flush=True)
        results.update(asyncio.run(BENCHES[name](quick=args.quick)))
    args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
