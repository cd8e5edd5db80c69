"""`rpm-gateway simulate`: simulated devices in a process of their own, for an agent elsewhere.

The process owns the virtual link, the devices and the hub's controller, and serves that
controller's HCI on TCP (gateway.sim.hci_server). An agent configured with ``[radio] kind =
"virtual"`` and ``link = "tcp:HOST:PORT"`` drives it; kill the agent and the devices keep their
memory, see the link drop, and re-send what the hub never confirmed to the next agent.

Prints ``READY tcp:HOST:PORT`` on stdout once serving, then runs until SIGTERM or SIGINT.

Two terminals::

    $ rpm-gateway simulate -- --devices scale,cuff --listen 127.0.0.1:7000 --bonding \
          --readings 20 --interval 1 --ledger /tmp/ledger.jsonl
    READY tcp:127.0.0.1:7000

    $ rpm-gateway run --config gateway.toml   # [radio] kind = "virtual"
                                              #         link = "tcp:127.0.0.1:7000"

Bonds live in the agent's (in-memory) key store, so a restarted agent has none: the cuff keeps
its old keys and accepts re-pairing (Just Works) from the same hub address, as the test shows.

With ``--bluez`` the process runs the production radio path's far side instead: a private
D-Bus system bus (Debian's dbus-daemon), the BlueZ stand-in owning ``org.bluez`` on it
(gateway.sim.bluez) and the devices behind it, and prints ``READY unix:path=...``. An agent
with ``[radio] kind = "bluez"`` and ``DBUS_SYSTEM_BUS_ADDRESS`` set to that address then runs
bleak's real BlueZ backend end to end::

    $ rpm-gateway simulate -- --bluez --devices scale,cuff --bonding
    READY unix:path=/tmp/rpm-gateway-dbus-.../bus,guid=...

    $ DBUS_SYSTEM_BUS_ADDRESS='unix:path=/tmp/...' rpm-gateway run --config gateway.toml

There SIGHUP restarts the stand-in as a bluetoothd restart would (links drop, bonds stay) and
SIGUSR1 power-cycles its adapter, for trying the agent's recovery by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from drivers.codec.blood_pressure import BloodPressureMeasurement
from drivers.codec.weight import WeightMeasurement
from drivers.simulated.blood_pressure import demo_bp_readings, demo_cuff
from drivers.simulated.device import SimulatedDevice
from drivers.simulated.weight_scale import demo_scale, demo_weight_readings
from gateway.sim.bluez.bus import PrivateBus
from gateway.sim.bluez.daemon import BluezStandIn
from gateway.sim.field import DeviceField
from gateway.sim.ledger import Ledger
from gateway.sim.radio import VirtualRadio

log = logging.getLogger(__name__)

# The demo's addresses (gateway/demo.py): the patient's scale and cuff, a neighbour's cuff.
ADDRESSES = {
    "scale": "C0:00:00:00:5C:01",
    "cuff": "C0:00:00:00:BC:01",
    "neighbour": "C0:00:00:00:BC:99",
}

GARBAGE_FLAGS = 0xFF
"""First byte of a garbage frame: every optional field flagged, so no decoder finds them all."""

Frame = WeightMeasurement | BloodPressureMeasurement | bytes

ATT_ERROR_TARGETS = ("info", "cccd")
"""What --att-error-on may name: Device Information/Battery reads, the measurement CCCD write."""

DEFAULT_ATT_ERROR = 0x0E
"""Unlikely Error (Core Vol 3 Part F §3.4.1.1): what a device's firmware answers when confused."""


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _device_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ADDRESSES]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected a comma list of {', '.join(ADDRESSES)} (each once), got {text!r}")
    return names


def _slots(text: str) -> list[int]:
    try:
        slots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected user ids like 1,2,255, got {text!r}") from e
    if not slots or not all(0 <= s <= 255 for s in slots):
        raise argparse.ArgumentTypeError(f"user ids are 0..255 (255 = unknown user), got {text!r}")
    return slots


def _att_code(text: str) -> int:
    try:
        code = int(text, 0)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected an ATT error code like 0x0E, got {text!r}") from e
    if not 0x01 <= code <= 0xFF:
        raise argparse.ArgumentTypeError(f"ATT error codes are 0x01..0xFF, got {text!r}")
    return code


def _att_targets(text: str) -> frozenset[str]:
    names = {n.strip() for n in text.split(",") if n.strip()}
    if not names or not names <= set(ATT_ERROR_TARGETS):
        raise argparse.ArgumentTypeError(
            f"expected a comma list of {', '.join(ATT_ERROR_TARGETS)}, got {text!r}")
    return frozenset(names)


def _zone(text: str) -> ZoneInfo:
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"unknown IANA time zone {text!r}") from e


def _non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line of `rpm-gateway simulate`."""
    p = argparse.ArgumentParser(
        prog="rpm-gateway simulate",
        description="Run simulated BLE health devices in this process and serve the hub's "
                    "virtual controller over TCP to an agent run with radio.link = "
                    '"tcp:HOST:PORT". Prints "READY tcp:HOST:PORT" when serving; stops on '
                    "SIGTERM or SIGINT.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--devices", type=_device_list, default=["scale", "cuff"],
                   help="comma list of: scale (C0:00:00:00:5C:01), cuff (C0:00:00:00:BC:01), "
                        "neighbour (an unpaired cuff, C0:00:00:00:BC:99)")
    p.add_argument("--listen", type=_host_port, default=("127.0.0.1", 0), metavar="HOST:PORT",
                   help="where to serve the hub's HCI (port 0: pick a free one)")
    p.add_argument("--readings", type=_non_negative(int), default=3, metavar="N",
                   help="readings each device takes after start, one every --interval")
    p.add_argument("--interval", type=_non_negative(float), default=2.0, metavar="S",
                   help="seconds between two readings of one device")
    p.add_argument("--stored", type=_non_negative(int), default=0, metavar="N",
                   help="readings already in each device's memory at start (daily, to yesterday)")
    p.add_argument("--resend-stored", action="store_true",
                   help="devices replay their whole memory on every connection")
    p.add_argument("--bonding", action="store_true",
                   help="the cuff requires an encrypted (bonded) link before it sends")
    p.add_argument("--timezone", type=_zone, default=ZoneInfo("UTC"), metavar="ZONE",
                   help="the zone device clocks are set in (the hub's hub.timezone)")
    p.add_argument("--clock-offset", type=float, default=0.0, metavar="S",
                   help="device clocks run this many seconds ahead (negative: behind)")
    p.add_argument("--clock", choices=("set", "year0", "epoch"), default="set",
                   help="device clocks start set (zone time + offset), at year 0 "
                        "(never set), or at 2000-01-01")
    p.add_argument("--drop-link-after", type=_non_negative(int), default=None, metavar="N",
                   help="once per device: drop the link after N confirmed indications")
    p.add_argument("--att-error", type=_non_negative(int), default=0, metavar="N",
                   help="each device's first N connections answer --att-error-on requests with "
                        "an ATT error, then the device behaves")
    p.add_argument("--att-error-code", type=_att_code, default=DEFAULT_ATT_ERROR, metavar="CODE",
                   help="the ATT error code for --att-error (0x0E: Unlikely Error)")
    p.add_argument("--att-error-on", type=_att_targets, default=frozenset(ATT_ERROR_TARGETS),
                   metavar="info,cccd",
                   help="what --att-error answers: info (Device Information and Battery "
                        "reads), cccd (the hub's write enabling measurement indications)")
    p.add_argument("--never-answer", type=_non_negative(int), default=0, metavar="N",
                   help="each device's first N connections: accept the link, then answer no "
                        "ATT request and hold the link until the hub drops it")
    p.add_argument("--never-answer-from", choices=("connect", "session"), default="session",
                   help="connect: silent from the link's start (MTU exchange, discovery); "
                        "session: answers the hub's connection setup, then nothing")
    p.add_argument("--forget-bond-after", type=_non_negative(int), default=None, metavar="N",
                   help="once per device: delete its bonds after N connections, as a battery "
                        "change does (needs --bonding: only the bonded cuff holds one)")
    p.add_argument("--garbage-every", type=_non_negative(int), default=0, metavar="N",
                   help="every Nth frame of a device is garbage bytes (0: never)")
    p.add_argument("--user-slots", type=_slots, default=[1], metavar="1,2,255",
                   help="cuff readings cycle through these user ids (255: unknown user)")
    p.add_argument("--constant-advertiser", action="store_true",
                   help="advertise always, even with nothing to send")
    p.add_argument("--no-timestamp", action="store_true",
                   help="frames carry no time stamp")
    p.add_argument("--ledger", type=Path, default=None, metavar="PATH",
                   help="append one JSON line per device event (produced, confirmed, "
                        "connected, disconnected)")
    p.add_argument("--bluez", action="store_true",
                   help="serve the devices through a BlueZ stand-in on a private D-Bus system "
                        "bus (prints its address) instead of HCI over TCP")
    p.add_argument("--bus-address", default=None, metavar="ADDRESS",
                   help="with --bluez: own org.bluez on this existing bus instead of starting "
                        "a private dbus-daemon")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   default="warning", help="logging on stderr")
    return p


class FrameMaker:
    """The frames one device takes, per the options: values, user slot, time stamp, garbage."""

    def __init__(self, kind: str, args: argparse.Namespace) -> None:
        self.kind = kind
        self._args = args
        self._count = 0  # frames made so far: every --garbage-every'th is garbage
        self._readings = 0  # real readings made so far: they cycle through the user slots

    def stored(self) -> list[Frame]:
        """The frames in memory at start: daily readings ending yesterday, in the device zone."""
        end = dt.datetime.now(self._args.timezone).replace(tzinfo=None, second=0, microsecond=0)
        return [self._dress(r, keep_stamp=True) for r in self._values(self._args.stored, end, 0)]

    def scheduled(self) -> list[Frame]:
        """The frames taken after start (no stamp yet: the device clock stamps them)."""
        end = dt.datetime.now(self._args.timezone).replace(tzinfo=None)
        return [self._dress(r, keep_stamp=False) for r in self._values(self._args.readings, end, 1)]

    def _values(self, count: int, end: dt.datetime, seed_shift: int) -> Sequence[Any]:
        if self.kind == "scale":
            return demo_weight_readings(count, seed=7 + seed_shift, end=end)
        return demo_bp_readings(count, seed=(11 if self.kind == "cuff" else 23) + seed_shift,
                                end=end)

    def _dress(self, reading: Any, *, keep_stamp: bool) -> Frame:
        self._count += 1
        every = self._args.garbage_every
        if every and self._count % every == 0:
            return bytes([GARBAGE_FLAGS, self._count % 256])  # too short for any profile
        if not keep_stamp or self._args.no_timestamp:
            reading = dataclasses.replace(reading, timestamp=None)
        if isinstance(reading, BloodPressureMeasurement):
            slots = self._args.user_slots
            reading = dataclasses.replace(reading, user_id=slots[self._readings % len(slots)])
        self._readings += 1
        frame: Frame = reading
        return frame


def make_device(kind: str, args: argparse.Namespace, maker: FrameMaker) -> SimulatedDevice[Any]:
    """One simulated device per the options, its memory filled with the stored frames."""
    script: dict[str, Any] = {
        "readings": maker.stored(),
        "resend_stored": args.resend_stored,
        "clock": args.clock,
        "clock_offset_s": args.clock_offset,
        "zone": args.timezone,
        "drop_link_after": args.drop_link_after,
        "pairing_mode": args.constant_advertiser,
        "att_error_connections": args.att_error,
        "att_error_code": args.att_error_code,
        "att_error_on": args.att_error_on,
        "never_answer_connections": args.never_answer,
        "never_answer_from": args.never_answer_from,
        "forget_bond_after": args.forget_bond_after,
    }
    address = ADDRESSES[kind]
    if kind == "scale":
        return demo_scale(address, **script)
    if kind == "cuff":
        return demo_cuff(address, bonding_required=args.bonding, **script)
    return demo_cuff(address, name="SIM Cuff N", bonding_required=False, **script)


async def _measure(device: SimulatedDevice[Any], frames: list[Frame], interval: float,
                   stamp: bool) -> None:
    for frame in frames:
        await asyncio.sleep(interval)
        await device.measure(frame, stamp=stamp)


async def run(args: argparse.Namespace, ready: Callable[[str], None]) -> None:
    """Serve the devices until SIGTERM/SIGINT; `ready` gets the link (tcp:… or unix:…)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.ExitStack() as stack:
        ledger = stack.enter_context(Ledger(args.ledger)) if args.ledger else None
        async with contextlib.AsyncExitStack() as field_stack:
            field: DeviceField | VirtualRadio
            if args.bluez:
                field = await field_stack.enter_async_context(VirtualRadio())
            else:
                field = await field_stack.enter_async_context(DeviceField())
            makers = {kind: FrameMaker(kind, args) for kind in args.devices}
            devices = {kind: make_device(kind, args, makers[kind]) for kind in args.devices}
            for device in devices.values():
                device.observe(ledger)
                await field.add_peripheral(device)
            if isinstance(field, VirtualRadio):
                link = await _serve_bluez(field, args.bus_address, field_stack)
            else:
                host, port = await field.serve(*args.listen)
                link = f"tcp:{host}:{port}"
            tasks = [asyncio.create_task(_measure(devices[k], makers[k].scheduled(),
                                                  args.interval, not args.no_timestamp))
                     for k in args.devices]
            ready(link)
            try:
                await stop.wait()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        loop.remove_signal_handler(sig)


async def _serve_bluez(
    radio: VirtualRadio, bus_address: str | None, stack: contextlib.AsyncExitStack
) -> str:
    """The stand-in on a private bus (or `bus_address`); SIGHUP restarts it, SIGUSR1 power-cycles."""
    if bus_address is None:
        bus = await stack.enter_async_context(PrivateBus())
        bus_address = bus.address
    bluez = await stack.enter_async_context(BluezStandIn(radio, bus_address=bus_address))
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    def spawn(what: str, make: Callable[[], Coroutine[Any, Any, None]]) -> None:
        async def step() -> None:
            log.warning("bluez stand-in: %s", what)
            await make()

        task = loop.create_task(step())
        pending.add(task)
        task.add_done_callback(pending.discard)

    async def power_cycle() -> None:
        await bluez.power(False)
        await bluez.power(True)

    loop.add_signal_handler(signal.SIGHUP, spawn, "restarting (as bluetoothd would)", bluez.restart)
    loop.add_signal_handler(signal.SIGUSR1, spawn, "power-cycling the adapter", power_cycle)
    return bus_address


def main(argv: list[str]) -> int:
    """Run the simulate command with `argv` (the arguments after `simulate`); exit status."""
    if argv[:1] == ["--"]:
        argv = argv[1:]  # `rpm-gateway simulate -- --devices ...`: the separator is not ours
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.forget_bond_after is not None and not args.bonding:
        parser.error("--forget-bond-after needs --bonding (without it no device holds a bond)")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def ready(link: str) -> None:
        print(f"READY {link}", flush=True)

    try:
        asyncio.run(run(args, ready))
    except (OSError, RuntimeError) as e:  # port taken, ledger unwritable, no dbus-daemon...
        print(f"rpm-gateway simulate: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were in place
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
