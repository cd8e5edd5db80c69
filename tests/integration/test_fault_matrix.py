"""The short fault matrix (`python -m faults --short`) on real processes: every row must pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from faults.report import COLUMNS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_short_fault_matrix_passes_and_prints_its_table(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    proc = subprocess.run(
        [sys.executable, "-m", "faults", "--short", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    header = proc.stdout.splitlines()[0].split() if proc.stdout else []
    assert header == list(COLUMNS), proc.stdout + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    failed = [(r["fault"], r["notes"]) for r in doc["rows"] if r["verdict"] == "FAIL"]
    assert proc.returncode == 0, f"failed rows: {failed}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert not failed
    assert doc["rows"], "the short matrix ran no rows"
    # One row per class at least, so a regression anywhere shows up in `make test`.
    assert {r["class"] for r in doc["rows"]} >= {"kill", "broker", "network", "refused", "oversize",
                                                 "disk", "corrupt", "radio", "bond", "clock",
                                                 "config", "fuzz"}
