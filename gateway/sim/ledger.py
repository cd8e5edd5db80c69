"""The simulate command's ledger: what each device produced and what the hub confirmed.

JSON lines, one per event, flushed per line so a reader (the fault matrix) sees every event as
it happens, whatever becomes of the agent:

    {"t": 1764633600.12, "event": "produced", "device": "C0:00:00:00:BC:01", "index": 0,
     "payload": "1e8000..."}
    {"t": ..., "event": "confirmed", "device": ..., "index": 0, "payload": "1e8000..."}
    {"event": "connected", "device": ..., "t": ...}
    {"event": "disconnected", "device": ..., "t": ...}

`index` is the record's position in that device's memory; `t` is time.time(). "confirmed" is
written when the hub's ATT Handle Value Confirmation of that record's indication reaches the
device (again for every replay of a device that re-sends its memory).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self


class Ledger:
    """Writes device events as JSON lines (a DeviceObserver); a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def __enter__(self) -> Self:
        """Open the file for appending (events of earlier runs stay)."""
        self._file = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def produced(self, address: str, index: int, payload: bytes) -> None:
        """A frame entered device memory."""
        self._write({"t": time.time(), "event": "produced", "device": address, "index": index,
                     "payload": payload.hex()})

    def confirmed(self, address: str, index: int, payload: bytes) -> None:
        """The hub confirmed a frame's indication."""
        self._write({"t": time.time(), "event": "confirmed", "device": address, "index": index,
                     "payload": payload.hex()})

    def connected(self, address: str) -> None:
        """A hub connected to the device."""
        self._write({"event": "connected", "device": address, "t": time.time()})

    def disconnected(self, address: str) -> None:
        """The device's link to the hub is gone."""
        self._write({"event": "disconnected", "device": address, "t": time.time()})

    def _write(self, event: dict[str, Any]) -> None:
        """One line, flushed (not fsynced: it must survive the agent, not the machine)."""
        if self._file is None:
            return
        self._file.write(json.dumps(event) + "\n")
        self._file.flush()


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """Every complete event in a ledger file, in order (a torn last line is skipped).

    No file yet (the simulator not started, or killed before its first line) is no events.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
