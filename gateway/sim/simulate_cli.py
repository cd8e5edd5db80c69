"""`rpm-gateway simulate`: simulated devices in a process of their own (work in progress)."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    """Run the simulate command with `argv` (the arguments after `simulate`); exit status."""
    raise SystemExit("rpm-gateway simulate: not implemented yet")
