"""A row of the fault table, the table as printed, and its JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from faults.tally import Tally

COLUMNS = ("fault", "class", "trials", "produced", "delivered", "lost", "redelivered_same_id",
           "new_id_or_wrong_patient", "in_window", "violations", "recovery_s", "verdict")


@dataclass
class Row:
    """One fault's outcome over all its trials."""

    fault: str
    cls: str
    trials: int = 0
    produced: int = 0
    delivered: int = 0
    lost: int = 0
    redelivered_same_id: int = 0
    new_id_or_wrong_patient: int = 0
    in_window: int = 0
    violations: int = 0
    recovery_s: float | None = None
    verdict: str = "PASS"
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def of(cls, fault: str, klass: str, trials: int, t: Tally, recovery_s: float | None = None,
           *, info_only: bool = False) -> Row:
        """A row from a tally; the verdict follows the columns (INFO rows never fail)."""
        row = cls(fault, klass, trials, t.produced, t.delivered, t.lost, t.redelivered_same_id,
                  t.new_id_or_wrong_patient, t.in_window, t.violations, recovery_s,
                  notes=list(t.notes))
        failed = t.lost or t.new_id_or_wrong_patient or t.violations
        row.verdict = "INFO" if info_only else ("FAIL" if failed else "PASS")
        return row

    def fail(self, note: str) -> None:
        """Fail the row for a reason the columns do not show."""
        self.violations += 1
        self.notes.append(note)
        if not self.verdict.startswith("SKIP") and self.verdict != "INFO":
            self.verdict = "FAIL"

    @property
    def failed(self) -> bool:
        """Whether this row fails the matrix."""
        return self.verdict == "FAIL"

    def cells(self) -> list[str]:
        """The printed cells, in COLUMNS order."""
        rec = "-" if self.recovery_s is None else f"{self.recovery_s:.1f}"
        return [self.fault, self.cls, str(self.trials), str(self.produced), str(self.delivered),
                str(self.lost), str(self.redelivered_same_id), str(self.new_id_or_wrong_patient),
                str(self.in_window), str(self.violations), rec, self.verdict]


def table(rows: Sequence[Row]) -> str:
    """The aligned table, then one line of notes per row that has any."""
    head = list(COLUMNS)
    body = [r.cells() for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    numeric = set(range(2, len(head) - 1))

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [line(head), line(["-" * w for w in widths]), *(line(b) for b in body)]
    noted = [r for r in rows if r.notes]
    if noted:
        out.append("")
        out += [f"{r.fault}: " + "; ".join(r.notes) for r in noted]
    return "\n".join(out)


def write_json(rows: Sequence[Row], path: Path, mode: str, seconds: float) -> None:
    """The rows as JSON (one object per row, plus the run's mode and duration)."""
    doc = {"mode": mode, "seconds": round(seconds, 1), "failed": sum(r.failed for r in rows),
           "rows": [asdict(r) | {"class": r.cls} for r in rows]}
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
