"""The real processes a fault row runs: mosquitto, the agent (`gateway.cli run`), the simulated devices."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from faults.proxy import hold_port
from gateway.broker import find_mosquitto

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


class Unavailable(Exception):
    """A precondition of a row is missing (the row prints SKIP with this reason)."""


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: this checkout first on the path, no stray fault knobs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPM_GATEWAY_FAULT_")}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


async def _terminate(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> int:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode


class Mosquitto:
    """A mosquitto of the row's own on a fixed loopback port: start, kill -9, restart, read its log."""

    def __init__(self, workdir: Path, *, extra: Sequence[str] = (),
                 users: Mapping[str, str] | None = None, acl: str | None = None,
                 anonymous: bool = False) -> None:
        exe = find_mosquitto()
        if exe is None:
            raise Unavailable("mosquitto is not installed")
        self._exe = exe
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        # Held for the broker's whole life, so a restart after kill -9 finds its port free.
        self._hold = hold_port()
        self.port = int(self._hold.getsockname()[1])
        self.extra = list(extra)
        self.users = dict(users or {})
        self.acl = acl
        self.anonymous = anonymous
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def log_path(self) -> Path:
        """mosquitto's log (appended across restarts)."""
        return self.dir / "mosquitto.log"

    def log_text(self) -> str:
        """Everything mosquitto logged so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def _write_config(self) -> Path:
        lines = [f"listener {self.port} {HOST}", "set_tcp_nodelay true",
                 f"log_dest file {self.log_path}", "log_type all", "connection_messages true",
                 "persistence false"]
        if self.users:
            pw = self.dir / "passwd"
            pw.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()), encoding="utf-8")
            subprocess.run(["mosquitto_passwd", "-U", str(pw)], check=True, capture_output=True)
            lines += [f"allow_anonymous {'true' if self.anonymous else 'false'}",
                      f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            acl = self.dir / "acl"
            acl.write_text(self.acl, encoding="utf-8")
            lines.append(f"acl_file {acl}")
        if os.geteuid() == 0:
            lines.append("user root")  # the mosquitto user cannot read our temp directories
        conf = self.dir / "mosquitto.conf"
        conf.write_text("\n".join(lines + self.extra) + "\n", encoding="utf-8")
        return conf

    async def start(self, timeout: float = 10.0) -> None:
        """Start and wait (bounded) until it accepts connections."""
        conf = self._write_config()
        with (self.dir / "stderr").open("ab") as err:
            self._proc = await asyncio.create_subprocess_exec(
                str(self._exe), "-c", str(conf), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.returncode is not None:
                raise RuntimeError(f"mosquitto exited {self._proc.returncode}: {self.log_text()[-500:]}")
            try:
                _, w = await asyncio.open_connection(HOST, self.port)
                w.close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("mosquitto did not listen") from None
                await asyncio.sleep(0.02)  # bounded poll for the listening socket

    async def kill9(self) -> None:
        """SIGKILL: no clean shutdown, in-flight state gone."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        self._proc = None

    async def stop(self) -> None:
        """SIGTERM and wait."""
        if self._proc is not None:
            await _terminate(self._proc)
        self._proc = None

    def release(self) -> None:
        """Give the port back (the broker is not started again)."""
        self._hold.close()


class AgentProc:
    """`python -m gateway.cli run --config ...` as systemd runs it; stderr appended to one log."""

    def __init__(self, config: Path, log: Path, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.env = child_env(env)
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.kills: list[float] = []  # wall-clock time of each kill -9 (compared with the ledger)

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.returncode is None

    async def start(self, command: str = "run") -> None:
        """Start the agent (or another subcommand on the same config)."""
        args = ["config", "check", str(self.config)] if command == "check" else \
            [command, "--config", str(self.config)]
        with self.log.open("ab") as err:
            err.write(f"--- start {self.starts} {time.time():.3f}\n".encode())
            err.flush()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.cli", *args, cwd=REPO, env=self.env,
                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        self.starts += 1

    async def kill9(self) -> float:
        """SIGKILL now; returns the time of the kill."""
        assert self.proc is not None
        t = time.time()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()
        self.kills.append(t)
        return t

    async def stop(self) -> int | None:
        """SIGTERM, wait (bounded); the exit status (None if it was not running)."""
        if self.proc is None:
            return None
        return await _terminate(self.proc, 20.0)

    async def wait(self, timeout: float) -> int | None:
        """The exit status once it exits within timeout, else None (still running)."""
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            return None

    def log_text(self) -> str:
        """Everything the agent logged, across restarts."""
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


class Simulator:
    """`python -m gateway.cli simulate ...`: devices in their own process, keeping their memory."""

    def __init__(self, args: Sequence[str], ledger: Path, log: Path) -> None:
        self.args = list(args)
        self.ledger = ledger
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.link = ""

    async def start(self, timeout: float = 60.0) -> str:
        """Start and wait for `READY tcp:HOST:PORT`; returns the link string for radio.link."""
        # "--": `simulate --devices ...` without it is refused by the CLI's REMAINDER parsing.
        with self.log.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.cli", "simulate", "--", *self.args,
                "--ledger", str(self.ledger), cwd=REPO, env=child_env(),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = (await self.proc.stdout.readline()).decode(errors="replace").strip()
                    if line.startswith("READY "):
                        self.link = line.split(None, 1)[1]
                        return self.link
                    if not line and self.proc.stdout.at_eof():
                        await self.proc.wait()
                        tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                        if "not implemented" in tail[0] or "invalid choice" in tail[0] \
                                or "unrecognized arguments" in tail[0]:
                            raise Unavailable(f"simulate: {tail[0][:120]}")
                        raise RuntimeError(f"simulate exited {self.proc.returncode}: {tail[0][:300]}")
        except TimeoutError:
            raise RuntimeError(f"simulate printed no READY within {timeout}s") from None

    async def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc is not None:
            await _terminate(self.proc)
