"""The systemd unit as tests read it: its directives, its Exec lines, its system-call allow
list (systemd-analyze expands the groups), and a marker for tests that need systemd-analyze."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from tests.conftest import needs_tools

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"
UNIT = SYSTEMD / "rpm-gateway.service"
INSTALL = SYSTEMD / "install.sh"
AGENT = "/opt/rpm-gateway/.venv/bin/rpm-gateway"
needs_analyze = needs_tools("systemd-analyze", package="systemd")


def directives(path: Path = UNIT) -> dict[str, list[str]]:
    """'Section.Key' -> every value assigned, in order (systemd accumulates some keys)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def one(key: str) -> str:
    values = directives()[key]
    assert len(values) == 1, (key, values)
    return values[0]


def seconds(value: str) -> float:
    """A systemd time span in the forms this unit uses: '45s', '5min', '300'."""
    m = re.fullmatch(r"(\d+)\s*(s|sec|min|m)?", value)
    assert m, value
    return int(m[1]) * (60 if m[2] in ("min", "m") else 1)


def command(key: str) -> list[str]:
    """The argv of an Exec line, systemd's '$$' (a literal '$') undone."""
    return shlex.split(one(key).replace("$$", "$"))


def unit_syscall_allow_list(unit: Path = UNIT) -> set[str]:
    """The system calls the unit's SystemCallFilter= lines allow, groups expanded by systemd."""
    groups: dict[str, list[str]] = {}
    current = ""
    for line in subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                               text=True, timeout=60).stdout.splitlines():
        if line.startswith("@"):
            current = line.strip()
            groups[current] = []
        elif line.strip() and not line.strip().startswith("#") and current:
            groups[current].append(line.strip())

    def expand(name: str) -> set[str]:
        return set().union(*(expand(n) for n in groups[name])) if name.startswith("@") else {name}

    # An allow list: later lines add, '~' lines remove, in order; @default is always allowed.
    allowed: set[str] = set()
    for spec in directives(unit)["Service.SystemCallFilter"]:
        names = set().union(*(expand(n) for n in spec.lstrip("~").split()))
        allowed = allowed - names if spec.startswith("~") else allowed | names
    return allowed | expand("@default")
