"""fuzz: every driver's decoder under hypothesis; only DecodeError may come out."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faults.report import Row
from faults.rig import Ctx
from faults.tally import Tally


def _frames() -> st.SearchStrategy[bytes]:
    # Plain garbage, and frames that start with every flags byte (so the optional fields are
    # walked) followed by a tail of any length.
    return st.one_of(st.binary(max_size=64),
                     st.builds(lambda f, tail: bytes([f]) + tail, st.integers(0, 255),
                               st.binary(max_size=40)))


def run_fuzz(examples: int) -> list[str]:
    """Feed `examples` frames to every driver's decode; the failures (exception type and input)."""
    from drivers.codec.errors import DecodeError
    from drivers.registry import ALL_DRIVERS

    decoders = [(d.name, getattr(d, "decode")) for d in ALL_DRIVERS]  # noqa: B009
    failures: list[str] = []

    @settings(max_examples=examples, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(_frames())
    def check(data: bytes) -> None:
        for name, decode in decoders:
            try:
                decode(data)
            except DecodeError:
                pass
            except Exception as e:
                failures.append(f"{name}: {type(e).__name__} on {data.hex()}")
                raise

    try:
        check()
    except Exception as e:
        if not failures:
            failures.append(f"{type(e).__name__}: {e}")
    return failures


async def fuzz(ctx: Ctx) -> Row:
    """The fuzz row: N examples through every decoder."""
    examples = ctx.pick(2_000, 20_000, 100_000)
    t0 = time.monotonic()
    failures = run_fuzz(examples)
    row = Row.of("fuzz-decoders", "fuzz", examples, Tally(), None)
    row.notes.append(f"{examples} examples in {time.monotonic() - t0:.0f} s")
    for f in failures[:3]:
        row.fail(f)
    return row
