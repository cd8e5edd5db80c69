"""`rpm-gateway demo` as a new user runs it: both brokers, the table and the JSON."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from gateway.demo import HeldLogs, demo_config, format_row, header_lines
from gateway.models import Reading

pytestmark = pytest.mark.integration

# gateway/cli.py _setup_logging's format: "2026-12-02 07:51:40,700 WARNING gateway.uplink: ..."
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S+: ")


def demo(*args: str, columns: int = 80, merged: bool = False) -> subprocess.CompletedProcess[str]:
    """The demo as a pipe sees it; `merged`: stderr into stdout, in the order a terminal shows."""
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-m", "gateway.cli", "demo", "--readings", "1",
                           "--timeout", "60", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if merged else subprocess.PIPE, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_demo_table(broker: str) -> None:
    p = demo("--broker", broker)
    assert p.returncode == 0, p.stderr
    assert f"broker: {broker}" in p.stderr
    rows = [line for line in p.stdout.splitlines() if "patient-0001" in line]
    assert len(rows) == 2
    assert any(re.search(r" SIM-WS1 5C:01 +\d+\.\d kg +ok +adjusted$", r) for r in rows), rows
    assert any(re.search(r" SIM-BP1 BC:01 +\d+/\d+ mmHg, pulse \d+ +ok +adjusted$", r)
               for r in rows), rows
    assert all(len(line) <= 80 for line in p.stdout.splitlines()), p.stdout
    assert "1 unpaired device(s) seen and ignored" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize(("broker", "columns"), [("amqtt", 80), ("mosquitto", 100)])
def test_demo_table_fits_and_no_log_line_lands_inside_it(broker: str, columns: int) -> None:
    # stdout and stderr in one pipe, as on a terminal: the agent's warnings (amqtt: MQTT 3.1.1;
    # both: the scale's clock is 5 min off) come after the table, in the log format, all of them.
    p = demo("--broker", broker, columns=columns, merged=True)
    assert p.returncode == 0, p.stdout
    lines = p.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["time", "patient"])
    last = max(i for i, line in enumerate(lines) if "patient-0001" in line)
    table = lines[head:last + 1]
    assert len([t for t in table if "patient-0001" in t]) == 2
    assert set(table[1]) == {"─"}
    assert all(len(line) <= columns for line in table), table
    assert not [t for t in table if LOG_LINE.match(t) or "WARNING" in t or "ERROR" in t], table
    after = lines[last + 1:]
    assert any(LOG_LINE.match(a) and "device clock was" in a for a in after), after
    if broker == "amqtt":
        assert any(LOG_LINE.match(a) and "using MQTT 3.1.1" in a for a in after), after
    assert after[-1].startswith("done: 2 readings stored and delivered")
    assert "Traceback" not in p.stdout


READING: dict[str, Any] = {
    "measured_at": "2026-12-02T07:14:05Z", "patient_id": "patient-0001", "kind": "blood_pressure",
    "device": {"address": "C0:00:00:00:BC:01", "model": "SIM-BP1", "driver": "blood_pressure"},
    "observations": [
        {"code": "8480-6", "name": "Systolic blood pressure", "value": 132.0, "unit": "mm[Hg]"},
        {"code": "8462-4", "name": "Diastolic blood pressure", "value": 87.0, "unit": "mm[Hg]"},
        {"code": "8478-0", "name": "Mean blood pressure", "value": 102.0, "unit": "mm[Hg]"},
        {"code": "8867-4", "name": "Pulse rate", "value": 176.0, "unit": "/min"}],
    "status": ["irregular_pulse", "body_movement"], "valid": True, "time_source": "hub_receipt",
}


def _printed(width: int, *rows: dict[str, Any]) -> list[str]:
    console = Console(width=width, file=io.StringIO())
    for line in header_lines(console.width):
        console.print(line, crop=True)
    for r in rows:
        console.print(format_row(r, console.width), crop=True)
    return console.file.getvalue().splitlines()  # type: ignore[attr-defined]


@pytest.mark.parametrize("width", [80, 100])
def test_rows_fit_the_width(width: int) -> None:
    lines = _printed(width, READING)
    assert len(lines) == 3
    assert all(len(line) <= width for line in lines), lines
    assert lines[0].split() == ["time", "patient", "device", "reading", "flags", "clock"]
    assert "132/87 mmHg, pulse 176" in lines[2]
    assert lines[2].endswith(" hub")
    assert ("irregular, moved" in lines[2]) == (width == 100)  # 80 columns: "irregular…"


def test_the_time_is_the_patients_local_time() -> None:
    berlin = _printed(80, {**READING, "timezone": "Europe/Berlin"})[2]
    assert berlin.startswith("08:14:05 patient-0001 ")
    assert _printed(80, {**READING, "timezone": "America/Chicago"})[2].startswith("01:14:05 ")
    unknown = _printed(80, {**READING, "timezone": "Mars/Olympus_Mons"})[2]
    assert unknown.startswith(dt.datetime(2026, 12, 2, 7, 14, 5, tzinfo=dt.UTC).astimezone()
                              .strftime("%H:%M:%S "))  # this machine's zone


@given(st.fixed_dictionaries({
    "measured_at": st.text(max_size=30), "timezone": st.text(max_size=30), "patient_id": st.text(max_size=40),
    "kind": st.text(max_size=20), "status": st.lists(st.text(max_size=20), max_size=4),
    "valid": st.booleans(), "time_source": st.text(max_size=30),
    "device": st.fixed_dictionaries({"address": st.text(max_size=20),
                                     "model": st.none() | st.text(max_size=40)}),
    "observations": st.lists(st.fixed_dictionaries({
        "code": st.sampled_from(["8480-6", "8462-4", "8867-4", "29463-7", "x"]),
        "name": st.text(max_size=40), "value": st.none() | st.floats(),
        "unit": st.text(max_size=10)}), max_size=6),
}), st.sampled_from([80, 100]))
def test_any_reading_is_one_line_within_the_width(r: dict[str, Any], width: int) -> None:
    lines = _printed(width, r)
    assert len(lines) == 3
    assert all(len(line) <= width for line in lines), lines


def test_held_log_records_come_after_in_order_and_none_is_lost(
        capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = root.handlers[:]
    root.handlers = [handler]
    try:
        with HeldLogs() as held:
            logging.getLogger("gateway.uplink").warning("first")
            print("a table row")
            logging.getLogger("amqtt.broker").error("second")
            assert held.errors == 1
            held.replay()
            held.replay()  # once only
        assert root.handlers == [handler]
    finally:
        root.handlers = saved
    err = capsys.readouterr()
    assert err.out == "a table row\n"
    assert err.err.splitlines() == ["logged during the demo (2):",
                                    "WARNING gateway.uplink: first", "ERROR amqtt.broker: second"]


def test_held_logs_keep_every_error_beyond_the_limit() -> None:
    held = HeldLogs()
    held.LIMIT = 2
    for level in (logging.WARNING, logging.WARNING, logging.WARNING, logging.ERROR):
        held.emit(logging.LogRecord("x", level, __file__, 1, "m", None, None))
    assert [r.levelno for r in held.records] == [logging.WARNING, logging.WARNING, logging.ERROR]
    assert held.dropped == 1


def test_the_demo_agent_keeps_off_the_hubs_control_socket(tmp_path: Path) -> None:
    # On a hub the service's agent owns /run/rpm-gateway/control.sock; `rpm-gateway status`
    # must never reach the demo's agent instead.
    cfg = demo_config("127.0.0.1", 1883, tmp_path, 1)
    assert cfg.hub.control_socket == tmp_path / "control.sock"


def test_demo_json_payloads_follow_the_schema() -> None:
    p = demo("--json")
    assert p.returncode == 0, p.stderr
    readings = [Reading.model_validate(json.loads(line)) for line in p.stdout.splitlines()]
    assert sorted(r.kind for r in readings) == ["blood_pressure", "body_weight"]
    assert {r.device.address for r in readings} == {"C0:00:00:00:5C:01", "C0:00:00:00:BC:01"}


def test_demo_ctrl_c_exits_cleanly() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "demo", "--readings", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        while "patient-0001" not in proc.stdout.readline():
            assert proc.poll() is None, "the demo ended before its first reading"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
