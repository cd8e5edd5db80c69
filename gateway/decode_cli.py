"""`rpm-gateway decode`: one raw characteristic value to the payload's shape, for humans and tests."""

from __future__ import annotations

import json
from collections.abc import Callable

from drivers import uuids
from drivers.base import Measurement
from drivers.blood_pressure import decode_bp
from drivers.codec.errors import DecodeError
from drivers.weight_scale import decode_weight

DECODERS: dict[str, Callable[[bytes], Measurement]] = {
    "2a9d": decode_weight,
    "2a35": decode_bp,
}


class UsageError(Exception):
    """The command line is wrong (unknown characteristic, not hex)."""


def decode_to_json(characteristic: str, hex_text: str) -> str:
    """JSON for one value; UsageError for bad arguments, DecodeError for bad bytes."""
    try:
        short = uuids.short(characteristic)
    except ValueError as e:
        raise UsageError(str(e)) from e
    decoder = DECODERS.get(short)
    if decoder is None:
        known = ", ".join(f"0x{k.upper()}" for k in DECODERS)
        raise UsageError(f"no decoder for characteristic 0x{short.upper()}; known: {known}")
    cleaned = "".join(hex_text.split()).replace(":", "").lower().removeprefix("0x")
    try:
        raw = bytes.fromhex(cleaned)
    except ValueError as e:
        raise DecodeError(f"not hexadecimal bytes: {hex_text!r}") from e
    m = decoder(raw)
    # The payload's shape: the sequence number is an identity hint, the hub's own business.
    doc = m.model_dump(mode="json", exclude={"raw", "sequence"})
    doc["raw"] = raw.hex()
    return json.dumps(doc, indent=2)
