"""The checked-in JSON Schemas as a clinic validates with them: Draft 2020-12, formats checked
(rfc3339-validator makes `date-time` a real check)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schema"


def validator(name: str) -> Draft202012Validator:
    """A validator for schema/`name`, the schema itself checked first."""
    schema = json.loads((SCHEMA_DIR / name).read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


READING, STATUS, EVENT = (validator(n) for n in ("reading-1.json", "status-1.json", "event-1.json"))


def errors(v: Draft202012Validator, message: Any) -> list[str]:
    """Every way `message` breaks the schema, as path: message."""
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(message)]
