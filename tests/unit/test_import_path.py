"""bumble (the virtual radio) never loads on the hub: production imports stay lean."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_production_path_does_not_import_bumble_or_the_simulator() -> None:
    code = (
        "import sys, gateway.cli, gateway.agent, gateway.ble.radio, gateway.config_check,"
        " gateway.outbox, gateway.uplink, gateway.lograte, drivers.registry,"
        " gateway.ble.bluez_agent, gateway.ble.bluez_client, gateway.ble.bluez_watch,"
        " gateway.ble.bluez_radio,"
        " gateway.ble.scan_gate, gateway.ble.recovery, gateway.ble.adapter_control;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('bumble', 'amqtt')"
        " or m.startswith(('gateway.sim', 'drivers.simulated')));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"production imports pulled in: {p.stdout}"


def test_the_agent_and_the_virtual_radio_load_without_dbus_fast() -> None:
    # dbus-fast is a Linux-only dependency: a developer's laptop runs the agent on the virtual
    # radio without it. Only the BlueZ radio (gateway.ble.bluez_radio) may need it.
    code = (
        "import sys; sys.modules['dbus_fast'] = None;"
        " import gateway.cli, gateway.agent, gateway.ble.radio, gateway.sim.wiring;"
        "bad = sorted(m for m in sys.modules if m.startswith('gateway.ble.bluez'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"needs dbus-fast at import: {p.stdout}{p.stderr[-500:]}"


def test_the_agent_start_loads_no_terminal_library_or_cli_host() -> None:
    # `rpm-gateway run` (what systemd starts on a Pi Zero) builds the whole parser, technician
    # commands included: their tables and the CLI's own radio host load only when used.
    code = (
        "import sys, gateway.cli; gateway.cli._parser(); import gateway.agent;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'rich'"
        " or m in ('gateway.tech_cli', 'gateway.local_hub', 'gateway.render', 'gateway.demo'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"the agent's start pulled in: {p.stdout}{p.stderr[-500:]}"


def test_the_agent_run_on_bluez_never_imports_bumble(tmp_path: Path) -> None:
    # The whole `rpm-gateway run` on the hub's radio, for a second and a half (no D-Bus system
    # bus here: the scanner fails and retries, as on a hub whose bluetoothd is starting), then
    # SIGTERM; what it loaded on the way must not include the virtual radio's stack.
    config = tmp_path / "gateway.toml"
    config.write_text(f"""[hub]
id = "hub-imports"
data_dir = "{tmp_path / 'state'}"
control_socket = "{tmp_path / 'control.sock'}"
trust_clock = true
[mqtt]
host = "127.0.0.1"
port = 9
[radio]
kind = "bluez"
[[devices]]
address = "C0:00:00:00:5C:01"
patient_id = "patient-1"
""")
    code = (
        "import os, signal, sys, threading; from gateway.cli import main;"
        "threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM)).start();"
        f"rc = main(['run', '--config', {str(config)!r}]);"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('bumble', 'amqtt')"
        " or m.startswith(('gateway.sim', 'drivers.simulated')));"
        "ran = 'gateway.ble.bluez_radio' in sys.modules and 'bleak.backends.bluezdbus' in"
        " str(sorted(sys.modules));"
        "print(rc, ran, bad); sys.exit(0 if rc == 0 and ran and not bad else 1)"
    )
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path / 'no-bus'}"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=env)
    assert p.returncode == 0, f"exit, bluez path taken, bumble modules: {p.stdout}{p.stderr[-800:]}"
