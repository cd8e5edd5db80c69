"""The published payload schema is the one the model generates."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.models import SCHEMA_ID, reading_json_schema

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "schema" / "reading-1.json"


def test_checked_in_schema_matches_model() -> None:
    assert SCHEMA_FILE.read_text() == reading_json_schema(), (
        "schema/reading-1.json is out of date: run `make schema` and review the change "
        "(a breaking change needs a new schema version)"
    )


def test_schema_names_the_contract() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["properties"]["schema"]["const"] == SCHEMA_ID
    required = set(schema["required"])
    assert {"reading_id", "patient_id", "observations", "measured_at", "time_source"} <= required
