"""The technician's command lines (scan, pair, ...): argparse only, so that `rpm-gateway run`
does not load the terminal's libraries (gateway.tech_cli runs and prints them)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("/etc/rpm-gateway/gateway.toml")
COMMANDS = ("scan", "pair", "unpair", "devices", "status", "unattributed", "assign")
# How long `pair` listens for the device before saying it is not heard (its default).
FIND_TIMEOUT_S = 30.0


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Register the technician's commands on the top-level parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help=f"the hub's config file (default {DEFAULT_CONFIG})")
    common.add_argument("--socket", type=Path, default=None,
                        help="the agent's control socket (default: hub.control_socket of the "
                             "config, /run/rpm-gateway/control.sock)")
    common.add_argument("--radio", choices=("bluez", "virtual"), default=None,
                        help="override radio.kind; 'virtual' with no config file puts the "
                             "demo's simulated scale, cuff and a neighbour's cuff on the air "
                             "(state in $RPM_GATEWAY_DATA_DIR, default "
                             "~/.local/state/rpm-gateway/virtual)")
    common.add_argument("--json", action="store_true",
                        help="print JSON for a script instead of tables (default: tables)")

    scan = sub.add_parser("scan", parents=[common], help="list nearby devices (live table)")
    scan.add_argument("--seconds", type=float, default=10.0,
                      help="how long to listen (default 10)")
    scan.add_argument("--all", action="store_true",
                      help="also show devices with no health service or known vendor data")

    pair = sub.add_parser("pair", parents=[common],
                          help="bond a device, set its clock and bind it to a patient")
    pair.add_argument("address", help="the device's Bluetooth address, from `rpm-gateway scan`")
    pair.add_argument("--patient", required=True, help="the patient id to bind it to (required)")
    pair.add_argument("--user-slot", type=int, default=None,
                      help="the device's user slot (1-254) that is this patient's, on a device "
                           "with several users (default: every reading of the device)")
    pair.add_argument("--force", action="store_true",
                      help="move a device bound to another patient to this one (default: refuse)")
    pair.add_argument("--timeout", type=float, default=FIND_TIMEOUT_S,
                      help="seconds to wait for the device to advertise "
                           f"(default {FIND_TIMEOUT_S:g})")

    unpair = sub.add_parser("unpair", parents=[common],
                            help="remove a device's binding and bond")
    unpair.add_argument("address", help="the device's Bluetooth address")

    sub.add_parser("devices", parents=[common], help="the paired devices and what the hub knows")
    sub.add_parser("status", parents=[common], help="the hub: broker, outbox, clock, radio, days")

    un = sub.add_parser("unattributed", parents=[common],
                        help="readings kept because no binding claims their user slot")
    un.add_argument("--limit", type=int, default=200, help="at most this many (default 200)")
    assign = sub.add_parser("assign", parents=[common],
                            help="give an unattributed reading to the patient who confirms it")
    assign.add_argument("reading_id", help="the reading's id, from `rpm-gateway unattributed`")
    assign.add_argument("--patient", required=True, help="the patient id (required)")
