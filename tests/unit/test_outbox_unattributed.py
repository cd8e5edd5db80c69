"""Unattributed readings in the outbox on a real SQLite file: listed, assigned, dropped and counted."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.config import OutboxConfig
from gateway.outbox import Outbox, OutboxItem, PutResult
from tests.conftest import make_item


class Clock:
    """A settable clock for the retention limit."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def small(**kw: object) -> OutboxConfig:
    # model_construct skips the production floors (ge=100, ge=31) so a handful of rows will do.
    return OutboxConfig.model_construct(**{**OutboxConfig().model_dump(), **kw})


def guest(n: int, *, day: str = "2026-03-01", slot: int | None = 255) -> OutboxItem:
    """An unattributed cuff reading shaped like intake's: compact JSON, patient_id "" (none)."""
    rid = f"{n:032x}"
    body = {
        "schema": "rpm-gateway/reading/1", "reading_id": rid, "hub_id": "hub-1", "patient_id": "",
        "device": {"address": "AA:BB:CC:00:00:01", "model": "BP-1", "driver": "blood_pressure"},
        "kind": "blood_pressure",
        "observations": [
            {"code": "8480-6", "name": "Systolic blood pressure", "value": 132.0, "unit": "mm[Hg]"},
            {"code": "8462-4", "name": "Diastolic blood pressure", "value": 87.0, "unit": "mm[Hg]"},
            {"code": "8867-4", "name": "Pulse rate", "value": None, "unit": "/min"},
        ],
        "valid": True, "measured_at": f"{day}T07:30:00Z", "user_index": slot, "note": "Grüße",
    }  # fmt: skip
    return OutboxItem(
        reading_id=rid,
        topic="readings",
        payload=json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(),
        patient_id=None,
        kind="blood_pressure",
        measured_at=f"{day}T07:30:00+00:00",
        measured_day=day,
        valid=True,
    )


async def test_unassigned_readings_dropped_at_retention_are_counted_and_survive_reopen(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    cfg = small(keep_delivered_days=31)
    async with Outbox(tmp_path / "o.db", cfg, clock=clock) as ob:
        assert await ob.put(guest(1)) is PutResult.STORED
        assert await ob.put(guest(2)) is PutResult.STORED
        clock.now += timedelta(days=20)
        assert await ob.put(guest(3)) is PutResult.STORED
        assert await ob.put(make_item(4)) is PutResult.STORED
        clock.now += timedelta(days=12)  # 32 days after the first two, 12 after the third
        with caplog.at_level(logging.DEBUG, logger="gateway.outbox"):
            await ob.prune()
        stats = await ob.stats()
        assert (stats.unattributed, stats.unattributed_dropped) == (1, 2)
        assert (stats.pending, stats.dropped) == (1, 0)  # not a drop of a patient's reading
        [line] = [r for r in caplog.records if "unattributed" in r.getMessage()]
        assert line.levelno == logging.INFO
        assert "2 unattributed" in line.getMessage()
        assert "r-00000" not in line.getMessage()  # counts only, no reading ids
    async with Outbox(tmp_path / "o.db", cfg, clock=clock) as ob:
        assert (await ob.stats()).unattributed_dropped == 2
        clock.now += timedelta(days=30)
        await ob.prune()
        assert (await ob.stats()).unattributed_dropped == 3  # added up, not reset
        await ob.prune()  # nothing left to drop: the counter does not move
        assert (await ob.stats()).unattributed_dropped == 3
