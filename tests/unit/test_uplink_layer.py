"""The uplink's MQTT layer is paho-mqtt's public API driven from the event loop (issue 8)."""

from __future__ import annotations

import subprocess
import sys


def test_the_uplink_does_not_load_aiomqtt() -> None:
    # aiomqtt discards PUBACK reason codes; using it meant overriding its private callbacks.
    code = "import sys, gateway.uplink; print('aiomqtt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
