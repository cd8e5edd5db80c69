"""The unit's system-call allow list and MemoryDenyWriteExecute= hold what the agent really
does on the hub's path.

The unit's ExecStart= line (config check, then `exec rpm-gateway run`) runs under strace on
the BlueZ tier, with the hub clock left to the kernel (adjtimex), until readings are
delivered; every system call it made must be one SystemCallFilter= allows. A call outside
the list fails with EPERM under systemd (SystemCallErrorNumber=), somewhere no test looks.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway.broker import LocalBroker
from gateway.sim.bluez.bus import use_as_system_bus
from tests.conftest import MqttSubscriber, needs_tools
from tests.integration.hub_toml import devices, hub_toml
from tests.integration.test_bluez_process import simulate_bluez
from tests.systemd_unit import AGENT, command, unit_syscall_allow_list

pytestmark = [
    pytest.mark.integration,
    needs_tools("strace", "systemd-analyze", package="strace systemd"),
]

# Only ever called as root: sqlite's robust_fchown and `sudo rpm-gateway pair`'s chown keep
# a file's owner when root writes it (both check geteuid() == 0). The unit runs as rpm-gateway.
ROOT_ONLY = {"chown", "fchown", "fchownat", "lchown"}


# `strace -f` lines: "PID name(args..." or "PID <... name resumed>...".
CALL = re.compile(r"^\d+\s+(?:<\.\.\. )?([a-z_0-9]+)(?:\(| resumed>)")


def traced_names(trace: Path) -> set[str]:
    """System call names in a `strace -f -o` trace."""
    return {m[1] for line in trace.read_text().splitlines() if (m := CALL.match(line))}


def write_and_execute(trace: Path) -> list[str]:
    """Calls MemoryDenyWriteExecute= refuses (systemd 252's seccomp form): a mapping both
    writable and executable, or making any mapping executable afterwards."""
    bad = []
    for line in trace.read_text().splitlines():
        m = CALL.match(line)
        if not m or "PROT_EXEC" not in line:
            continue
        if (m[1] == "mmap" and "PROT_WRITE" in line) or m[1] in ("mprotect", "pkey_mprotect"):
            bad.append(line)
    return bad


async def test_everything_the_agent_calls_on_the_bluez_path_is_allowed(
    tmp_path: Path, mosquitto: LocalBroker,
    mqtt_subscriber: Callable[..., Awaitable[MqttSubscriber]],
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(hub_toml(
        "hub-sys", tmp_path / "state", mosquitto, control_socket=tmp_path / "control.sock",
        radio='[radio]\nkind = "bluez"\nquiet_s = 0.5\n', log_level="info",
        extra=devices(("C0:00:00:00:5C:01", "patient-1"), ("C0:00:00:00:BC:01", "patient-1")),
    ).replace("trust_clock = true\n", ""))  # ask the kernel: adjtimex
    assert "trust_clock" not in config.read_text()
    agent = f"{shlex.quote(sys.executable)} -m gateway.cli"
    start = [a.replace(AGENT, agent).replace("/etc/rpm-gateway/gateway.toml", str(config))
             for a in command("Service.ExecStart")]
    trace = tmp_path / "strace.txt"
    readings = await mqtt_subscriber(mosquitto, "rpm/hub-sys/readings")
    async with simulate_bluez("--devices", "scale,cuff", "--readings", "2", "--interval", "1",
                              "--bonding") as (_, address):
        with use_as_system_bus(address):
            # strace -o FILE PROG blocks fatal signals for itself (-I3): SIGTERM to the group
            # reaches the agent, which stops cleanly, and strace follows it out.
            proc = await asyncio.create_subprocess_exec(
                "strace", "-f", "-qq", "-o", str(trace), *start,
                stderr=asyncio.subprocess.PIPE, start_new_session=True)
            try:
                await readings.wait_for(4, timeout=90)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                _, err = await asyncio.wait_for(proc.communicate(), 60)
    log = err.decode()
    assert proc.returncode == 0, log
    assert "Traceback" not in log
    used = traced_names(trace)
    assert {"connect", "execve", "clock_adjtime"} <= used  # it did trace the agent's work
    missing = (used - ROOT_ONLY) - unit_syscall_allow_list()
    assert not missing, f"called but not in the unit's SystemCallFilter=: {sorted(missing)}"
    # MemoryDenyWriteExecute=yes: nothing in the venv on this path generates code.
    assert write_and_execute(trace) == []
