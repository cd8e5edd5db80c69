"""`rpm-gateway demo` as a new user runs it: both brokers, the table and the JSON."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from gateway.models import Reading

pytestmark = pytest.mark.integration


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "demo", "--readings", "1",
                           "--timeout", "60", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_demo_table(broker: str) -> None:
    p = demo("--broker", broker)
    assert p.returncode == 0, p.stderr
    assert f"broker: {broker}" in p.stderr
    rows = [line for line in p.stdout.splitlines() if "patient-0001" in line]
    assert len(rows) == 2
    assert any("Body weight" in r and " kg" in r for r in rows)
    assert any("Systolic" in r and "mm[Hg]" in r and "/min" in r for r in rows)
    assert "1 unpaired device(s) seen and ignored" in p.stderr
    assert "Traceback" not in p.stderr


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
