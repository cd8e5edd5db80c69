"""The `rpm-gateway` command: run the agent, the demo, and the tools a technician uses."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn, TextIO

from gateway import __version__, tech_args
from gateway.config import ConfigError, GatewayConfig, load_config

# sysexits.h: the codes systemd and shell scripts understand.
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_CONFIG = 78

DEFAULT_CONFIG = tech_args.DEFAULT_CONFIG


class _Parser(argparse.ArgumentParser):
    """argparse with sysexits' EX_USAGE (64) for a wrong command line, not 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="rpm-gateway",
        description="Reads Bluetooth LE medical devices and delivers every reading over MQTT.",
    )
    p.add_argument("--version", action="version", version=f"rpm-gateway {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent (what the systemd unit starts)")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                     help=f"the config file (default {DEFAULT_CONFIG})")

    demo = sub.add_parser("demo", help="simulated scale and cuff, local broker, agent, subscriber")
    demo.add_argument("--json", action="store_true", help="print the payloads instead of a table")
    demo.add_argument("--readings", type=int, default=3, help="readings per device (default 3)")
    demo.add_argument("--timeout", type=float, default=120.0, help="give up after this many s")
    demo.add_argument("--broker", choices=("auto", "mosquitto", "amqtt"), default="auto",
                      help="local broker: mosquitto when installed (auto), or the Python one")

    dec = sub.add_parser("decode", help="decode one raw characteristic value to JSON")
    dec.add_argument("characteristic", help="UUID: 2a35, 0x2A35 or the 128-bit form")
    dec.add_argument("hex", nargs="+", help="the value's bytes in hex, e.g. '1E 80 00 52 00 ...'")

    # Simulated devices in a process of their own (sim extra only; never imported on the hub).
    sim = sub.add_parser("simulate", help="simulated devices in their own process, for an agent "
                         "on radio.kind = \"virtual\" with radio.link set (development only)",
                         add_help=False)
    sim.add_argument("simulate_args", nargs=argparse.REMAINDER)

    tech_args.add_commands(sub)

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = cfg_sub.add_parser(
        "check", help="report every problem of a config file and the files it names "
                      "(exit 78 on any error)")
    check.add_argument("path", type=Path, nargs="?", default=DEFAULT_CONFIG,
                       help=f"the config file (default {DEFAULT_CONFIG})")
    check.add_argument("--json", action="store_true",
                       help='print {"ok": ..., "problems": [...]} instead of lines')
    return p


# sd-daemon(3)'s SD_CRIT .. SD_DEBUG: the journal reads a "<N>" at the start of a line as its
# syslog priority (`journalctl -p warning` filters by it, and colours the line).
_JOURNAL_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                     (logging.INFO, 6))
_JOURNAL_DEBUG = 7


class JournalFormatter(logging.Formatter):
    """Each line of a record prefixed with its syslog priority, for stderr that is the journal."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as usual, every line (a traceback's too) carrying the record's priority."""
        priority = next((p for level, p in _JOURNAL_PRIORITY if record.levelno >= level),
                        _JOURNAL_DEBUG)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def stderr_is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Whether `stream` is systemd's journal: $JOURNAL_STREAM names its device and inode.

    Compared rather than trusted: a child process inherits the variable with a stderr that
    may have been redirected elsewhere (systemd.exec(5)).
    """
    value = environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError):  # unset, malformed, or a stream without a descriptor
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _setup_logging(level: str, stream: TextIO | None = None,
                   environ: Mapping[str, str] | None = None) -> None:
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    if stderr_is_journal(stream, os.environ if environ is None else environ):
        # The journal stamps each line itself; a second timestamp only costs width.
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def _cmd_decode(args: argparse.Namespace) -> int:
    from drivers.codec.errors import DecodeError  # noqa: PLC0415
    from gateway.decode_cli import UsageError, decode_to_json  # noqa: PLC0415

    try:
        print(decode_to_json(args.characteristic, " ".join(args.hex)))
    except UsageError as e:
        print(f"rpm-gateway decode: {e}", file=sys.stderr)
        return EX_USAGE
    except DecodeError as e:
        print(f"rpm-gateway decode: bad bytes: {e}", file=sys.stderr)
        return EX_DATAERR
    return EX_OK


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [leaf for sub in e.exceptions for leaf in _leaves(sub)]
    return [e]


def _under(filename: object, dirs: tuple[Path, ...]) -> bool:
    if not isinstance(filename, str | bytes | os.PathLike):
        return False
    path = Path(os.fsdecode(filename)).absolute()
    return any(path == d or d in path.parents for d in dirs)


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    from gateway.config_check import check_environment, is_storage, one_line  # noqa: PLC0415

    _setup_logging(cfg.log_level)
    log = logging.getLogger("gateway")
    # Files and directories first: a missing CA file or an unwritable data_dir will not fix
    # itself, and the unit's RestartPreventExitStatus= keeps systemd from looping on 78.
    problems = check_environment(cfg)
    for p in problems:
        if p.severity == "warning":
            log.warning("config: %s", p)
    errors = [p for p in problems if p.severity == "error"]
    config_errors = [p for p in errors if not is_storage(p)]
    if config_errors:
        print(f"rpm-gateway: configuration error: {one_line(str(args.config), config_errors)}",
              file=sys.stderr)
        return EX_CONFIG
    if errors:
        print(f"rpm-gateway: cannot store readings: {one_line(str(args.config), errors)}",
              file=sys.stderr)
        return EX_CANTCREAT
    return _run_agent(cfg)


def _run_agent(cfg: GatewayConfig) -> int:
    from gateway.agent import Agent  # noqa: PLC0415
    from gateway.outbox import OutboxError  # noqa: PLC0415

    try:
        asyncio.run(Agent(cfg).run())
    except Exception as e:  # every failure ends in one line and a sysexits code
        leaves = _leaves(e)
        storage_dirs = (cfg.hub.data_dir.absolute(), cfg.outbox_path.absolute().parent)
        for leaf in leaves:
            if isinstance(leaf, OutboxError):
                # Locked, newer schema, unwritable: without its store the agent must not read
                # devices (they forget what they sent), and a restart in 5 s changes nothing.
                what = str(leaf) if str(cfg.outbox_path) in str(leaf) else (
                    f"{cfg.outbox_path}: {leaf}")
                print(f"rpm-gateway: cannot use the outbox: {what}", file=sys.stderr)
                return EX_CANTCREAT
            if isinstance(leaf, OSError) and _under(leaf.filename, storage_dirs):
                print(f"rpm-gateway: cannot store readings: {leaf.filename}: "
                      f"{(leaf.strerror or type(leaf).__name__).lower()}", file=sys.stderr)
                return EX_CANTCREAT
            if isinstance(leaf, ConfigError):
                print(f"rpm-gateway: configuration error: {leaf}", file=sys.stderr)
                return EX_CONFIG
            if isinstance(leaf, ConnectionError) and cfg.radio.link is not None:
                # Development only: the simulated devices of radio.link are not running.
                print(f"rpm-gateway: {leaf}", file=sys.stderr)
                return EX_UNAVAILABLE
        # A bug: its type only (the message may quote patient values), the traceback at debug.
        names = ", ".join(sorted({type(leaf).__name__ for leaf in leaves}))
        if cfg.log_level == "debug":
            logging.getLogger("gateway").error("agent failed", exc_info=e)
            hint = "the traceback is above"
        else:
            hint = 'set log_level = "debug" for the details'
        print(f"rpm-gateway: the agent failed unexpectedly ({names}); {hint}", file=sys.stderr)
        return EX_SOFTWARE
    return EX_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo  # noqa: PLC0415

    # Warnings and errors on stderr in the agent's format. With the table, run_demo holds them
    # while rows print and replays them through this handler right after the table; with
    # --json they go straight to stderr (stdout carries only the payloads).
    _setup_logging("warning")
    return asyncio.run(run_demo(json_out=args.json, readings=args.readings, timeout=args.timeout,
                                broker=args.broker))


def _cmd_simulate(args: argparse.Namespace) -> int:
    from gateway.sim.simulate_cli import main as simulate_main  # noqa: PLC0415

    return simulate_main(args.simulate_args)


def _cmd_technician(args: argparse.Namespace) -> int:
    from gateway import tech_cli  # noqa: PLC0415

    return tech_cli.run(args)


def _cmd_config(args: argparse.Namespace) -> int:
    from gateway.config_check import check_file, summary  # noqa: PLC0415

    problems = check_file(args.path)
    errors, warnings = summary(problems)
    if args.json:
        print(json.dumps({"ok": errors == 0, "problems": [p.as_dict() for p in problems]},
                         indent=2))
        return EX_CONFIG if errors else EX_OK
    for p in problems:
        print(f"{p.severity.upper()} {p}")
    if errors:
        positions = any("[" in p.key for p in problems)
        print(f"{args.path}: {errors} error{'s' * (errors != 1)}, {warnings} "
              f"warning{'s' * (warnings != 1)}"
              + (" (positions such as devices[2] count from 1)" if positions else ""))
        return EX_CONFIG
    cfg = load_config(args.path)
    print(f"{args.path}: OK{f' with {warnings} warning(s)' if warnings else ''}: hub {cfg.hub.id},"
          f" radio {cfg.radio.kind}, {len(cfg.devices)} paired device(s), "
          f"broker {cfg.mqtt.host}:{cfg.mqtt.port}")
    return EX_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (sysexits codes)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["simulate"]:
        # argparse's REMAINDER cannot start with an option ("simulate --devices ..."): the
        # simulator parses its own arguments.
        from gateway.sim.simulate_cli import main as simulate_main  # noqa: PLC0415

        return simulate_main(argv[1:])
    args = _parser().parse_args(argv)
    handlers = {"decode": _cmd_decode, "run": _cmd_run, "demo": _cmd_demo, "config": _cmd_config,
                "simulate": _cmd_simulate, **dict.fromkeys(tech_args.COMMANDS, _cmd_technician)}
    try:
        return handlers[args.command](args)
    except ConfigError as e:
        print(f"rpm-gateway: configuration error: {e}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return EX_OK
    except BrokenPipeError:
        # `rpm-gateway demo --json | head`: the reader left; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_OK


if __name__ == "__main__":
    sys.exit(main())
