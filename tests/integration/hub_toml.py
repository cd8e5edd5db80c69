"""The config text of a test hub: one writer for every integration test, fast timings."""

from __future__ import annotations

from pathlib import Path

from gateway.broker import LocalBroker

# The virtual radio with timings that keep a test to seconds.
FAST_RADIO = """[radio]
kind = "virtual"
quiet_s = 0.5
connect_timeout_s = 5
"""


def devices(*bindings: tuple[str, str] | tuple[str, str, int]) -> str:
    """[[devices]] entries: (address, patient) or (address, patient, user slot)."""
    out = []
    for b in bindings:
        slot = f"user_index = {b[2]}\n" if len(b) == 3 else ""
        out.append(f'[[devices]]\naddress = "{b[0]}"\npatient_id = "{b[1]}"\n{slot}')
    return "".join(out)


def hub_toml(hub: str, data_dir: Path, broker: LocalBroker, *, zone: str = "UTC",
             control_socket: Path | None = None, radio: str = FAST_RADIO, extra: str = "",
             log_level: str | None = None) -> str:
    """A hub on `broker` with its state in `data_dir`; `radio` and `extra` (devices) appended."""
    head = f'log_level = "{log_level}"\n' if log_level else ""
    sock = f'control_socket = "{control_socket}"\n' if control_socket else ""
    return f"""{head}[hub]
id = "{hub}"
timezone = "{zone}"
data_dir = "{data_dir}"
{sock}trust_clock = true
[mqtt]
host = "{broker.host}"
port = {broker.port}
reconnect_min_s = 0.1
reconnect_max_s = 0.5
{radio}{extra}"""
