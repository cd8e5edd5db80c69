"""The published schemas (reading, status, event) are the ones the models generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.messages import EVENT_SCHEMA_ID, EVENTS, STATUS_SCHEMA_ID, schemas
from gateway.models import SCHEMA_ID

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schema"
SCHEMA_FILE = SCHEMA_DIR / "reading-1.json"


@pytest.mark.parametrize("name", sorted(schemas()))
def test_checked_in_schema_matches_model(name: str) -> None:
    assert (SCHEMA_DIR / name).read_text() == schemas()[name], (
        f"schema/{name} is out of date: run `make schema` and review the change "
        "(a breaking change needs a new schema version)"
    )


def test_every_schema_file_is_generated() -> None:
    assert {p.name for p in SCHEMA_DIR.glob("*.json")} == set(schemas())


def test_schema_names_the_contract() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["properties"]["schema"]["const"] == SCHEMA_ID
    required = set(schema["required"])
    assert {"reading_id", "patient_id", "observations", "measured_at", "time_source"} <= required
    # Added within version 1: a reading stored by an older hub has no timezone and is valid.
    assert "timezone" not in required
    assert "format" not in json.dumps(schema["properties"]["device_time"])


def test_status_schema_is_online_or_offline() -> None:
    schema = json.loads((SCHEMA_DIR / "status-1.json").read_text())
    assert schema["discriminator"]["propertyName"] == "state"
    assert set(schema["discriminator"]["mapping"]) == {"online", "offline"}
    for variant in ("OnlineStatus", "OfflineStatus"):
        props = schema["$defs"][variant]["properties"]
        assert props["schema"]["const"] == STATUS_SCHEMA_ID
        assert {"schema", "hub_id", "state", "at"} <= set(schema["$defs"][variant]["required"])


def test_event_schema_lists_every_declared_event() -> None:
    schema = json.loads((SCHEMA_DIR / "event-1.json").read_text())
    assert schema["discriminator"]["propertyName"] == "event"
    assert set(schema["discriminator"]["mapping"]) == set(EVENTS)
    for ref in schema["discriminator"]["mapping"].values():
        envelope = schema["$defs"][ref.rsplit("/", 1)[1]]
        assert envelope["properties"]["schema"]["const"] == EVENT_SCHEMA_ID
        assert envelope["required"] == ["schema", "event", "hub_id", "at", "detail"]
