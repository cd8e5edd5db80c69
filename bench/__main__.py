"""`make bench`: every benchmark, each against a baseline measured in the same run.

Prints baseline, ours and their ratio per benchmark and writes bench/results.json (numeric
top-level keys; details under per-benchmark keys). Ratios are what count: the machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import pkgutil
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import bench

RESULTS = Path(__file__).with_name("results.json")


def _benches() -> dict[str, Callable[..., Coroutine[Any, Any, dict[str, Any]]]]:
    """Every module of bench/ with an `async def run(quick: bool) -> dict`, by name: a new
    benchmark is a new module, nothing to register."""
    found = {}
    for info in sorted(pkgutil.iter_modules(bench.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"bench.{info.name}")
        if callable(getattr(module, "run", None)):
            found[info.name] = module.run
    return found


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and write the results file."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    p.add_argument("--quick", action="store_true", help="fewer samples, for a smoke test")
    args = p.parse_args(argv)
    benches = _benches()
    wanted = [n for n in args.only.split(",") if n] or list(benches)
    unknown = sorted(set(wanted) - set(benches))
    if unknown:
        p.error(f"no benchmark named {', '.join(unknown)} (there are: {', '.join(benches)})")
    results: dict[str, Any] = {}
    if args.out.exists():
        results = json.loads(args.out.read_text())
    for name in wanted:
        print(f"== {name}", flush=True)
        results.update(asyncio.run(benches[name](quick=args.quick)))
    args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
