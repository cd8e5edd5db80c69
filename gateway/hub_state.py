"""Files in the state directory that say what the agent is doing to others: its lock (an agent
runs and owns the radio) and its last status (for `rpm-gateway status` while it is stopped)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

SNAPSHOT_FILE = "status.json"
# Held (flock) by a running agent: a CLI that cannot reach its socket must not open the radio
# beside it (two owners of one adapter is what makes BlueZ answer "in progress").
AGENT_LOCK_FILE = "agent.lock"


def hold_agent_lock(data_dir: Path) -> int | None:
    """Take the agent's lock; the fd to keep open, or None (another agent has it, or no dir)."""
    try:
        fd = os.open(data_dir / AGENT_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o640)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def agent_running(data_dir: Path) -> bool:
    """Whether an agent holds its lock in `data_dir`."""
    fd = hold_agent_lock(data_dir)
    if fd is None:
        return (data_dir / AGENT_LOCK_FILE).exists()
    os.close(fd)
    return False


def read_snapshot(data_dir: Path) -> dict[str, Any]:
    """The agent's last saved status ({} if none or unreadable)."""
    with contextlib.suppress(OSError, ValueError):
        doc = json.loads((data_dir / SNAPSHOT_FILE).read_text(encoding="utf-8"))
        if isinstance(doc, dict):
            return doc
    return {}


def write_snapshot(data_dir: Path, doc: dict[str, Any]) -> None:
    """Save the status for `read_snapshot` (atomically: a crash leaves the old one)."""
    from gateway.pairings import write_atomically  # noqa: PLC0415 (one atomic writer)

    write_atomically(data_dir / SNAPSHOT_FILE, json.dumps(doc, indent=1, default=str) + "\n")
