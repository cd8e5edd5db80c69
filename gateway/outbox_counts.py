"""The outbox's row counts, kept in memory: derived once at open, then kept exact by each write.

A ``COUNT(*)`` grows with the table, and the table is largest during a broker outage, when the
commit window and the status matter most; so every write transaction says by how much each
count changed (the rows it touched, from ``RETURNING`` or ``rowcount``) and the worker applies
that after its COMMIT. :func:`count_rows` is the reference the tests compare against.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, fields


@dataclass(slots=True)
class Counts:
    """Rows by state. ``backlog`` includes the quarantined ones (the size bound counts them)."""

    backlog: int = 0  # attributed, undelivered (pending + quarantined)
    quarantined: int = 0  # attributed, undelivered, quarantined
    unattributed: int = 0  # patient_id NULL
    delivered: int = 0  # delivered_at set

    def add(self, other: Counts) -> None:
        """Apply the changes a committed transaction made."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def count_rows(conn: sqlite3.Connection) -> Counts:
    """Count every state with SQL (at open, and in tests), over partial indexes and COUNT(*).

    Delivered rows are all rows but the backlog and the unattributed ones (a delivered row is
    always attributed): no index is needed for them, and none is kept (see outbox_schema v3).
    """
    backlog, quarantined, unattributed, total = conn.execute(
        "SELECT"
        " (SELECT COUNT(*) FROM readings WHERE delivered_at IS NULL AND patient_id IS NOT NULL),"
        " (SELECT COUNT(*) FROM readings WHERE quarantined_at IS NOT NULL"
        "  AND delivered_at IS NULL AND patient_id IS NOT NULL),"
        " (SELECT COUNT(*) FROM readings WHERE patient_id IS NULL),"
        " (SELECT COUNT(*) FROM readings)"
    ).fetchone()
    return Counts(int(backlog), int(quarantined), int(unattributed),
                  int(total) - int(backlog) - int(unattributed))
