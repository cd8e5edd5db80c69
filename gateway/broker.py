"""A local MQTT broker on 127.0.0.1 for the demo and the tests: mosquitto if installed, else amqtt.

Never used in production: the hub talks to the clinic's broker. mosquitto is preferred because it
is what the tests must prove against (MQTT 5, TLS, persistence, last will); amqtt (pure Python,
MQTT 3.1.1 only) keeps the demo running on a machine without mosquitto.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

log = logging.getLogger(__name__)

BrokerKind = Literal["mosquitto", "amqtt"]

# Distributions put the broker in sbin, which is often not on an unprivileged PATH.
_MOSQUITTO_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")
_HOST = "127.0.0.1"


class BrokerError(Exception):
    """The local broker could not be started or stopped."""


class BrokerNotFoundError(BrokerError):
    """mosquitto was asked for but is not installed."""


def find_mosquitto() -> Path | None:
    """The mosquitto executable on PATH or in the usual sbin directories, if any."""
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    for d in _MOSQUITTO_DIRS:
        candidate = Path(d) / "mosquitto"
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_HOST, 0))
        return int(s.getsockname()[1])


class LocalBroker:
    """Start a throwaway MQTT broker on 127.0.0.1 on a free port; ``async with`` starts and stops it."""

    def __init__(
        self,
        kind: Literal["auto", "mosquitto", "amqtt"] = "auto",
        *,
        port: int | None = None,
        persistence: bool = False,
        listener_options: Sequence[str] = (),
        extra_config: Sequence[str] = (),
        start_timeout_s: float = 5.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self._exe: Path | None = None
        if kind in ("auto", "mosquitto"):
            self._exe = find_mosquitto()
            if self._exe is None and kind == "mosquitto":
                raise BrokerNotFoundError(
                    "mosquitto is not installed (looked on PATH and in "
                    + ", ".join(_MOSQUITTO_DIRS)
                    + "): install it with `apt-get install mosquitto`"
                )
        self._kind: BrokerKind = "mosquitto" if self._exe is not None else "amqtt"
        if self._kind == "amqtt" and (persistence or listener_options or extra_config):
            raise BrokerError("persistence and extra config lines need mosquitto")
        self._port = port if port is not None else _free_port()
        self._persistence = persistence
        self._listener_options = tuple(listener_options)
        self._extra_config = tuple(extra_config)
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._dir: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._amqtt: Any = None  # amqtt.broker.Broker, imported lazily

    @property
    def host(self) -> str:
        """The address the broker listens on."""
        return _HOST

    @property
    def port(self) -> int:
        """The TCP port the broker listens on; the same across restarts."""
        return self._port

    @property
    def pid(self) -> int | None:
        """mosquitto's process id while it runs (for signals: a frozen broker), None for amqtt."""
        return self._proc.pid if self._proc is not None else None

    @property
    def kind(self) -> BrokerKind:
        """Which broker implementation runs."""
        return self._kind

    @property
    def running(self) -> bool:
        """Whether the broker has been started and not stopped."""
        return self._proc is not None or self._amqtt is not None

    @property
    def log_path(self) -> Path | None:
        """mosquitto's log file (kept until the context exits), None for amqtt."""
        return None if self._dir is None or self._kind == "amqtt" else self._dir / "mosquitto.log"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop()
        finally:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    async def start(self) -> None:
        """Start the broker and wait (bounded) until it accepts connections."""
        if self.running:
            raise BrokerError("broker is already running")
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="rpm-broker-"))
        if self._kind == "mosquitto":
            await self._start_mosquitto(self._dir)
        else:
            await self._start_amqtt()
        log.info("local %s broker listening on %s:%d", self._kind, _HOST, self._port)

    async def stop(self) -> None:
        """Stop the broker: SIGTERM, then SIGKILL if it has not exited within the timeout."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(self._stop_timeout_s):
                    await proc.wait()
            except TimeoutError:
                log.warning("mosquitto did not stop within %.1fs; killing it", self._stop_timeout_s)
                proc.kill()
                await proc.wait()
        broker, self._amqtt = self._amqtt, None
        if broker is not None:
            await broker.shutdown()

    async def restart(self) -> None:
        """Stop and start again on the same port (an outage, as the clients see it)."""
        await self.stop()
        await self.start()

    def config_text(self, directory: Path) -> str:
        """The mosquitto configuration this broker runs with."""
        lines = [
            f"listener {self._port} {_HOST}",
            *self._listener_options,
            "allow_anonymous true",
            # Without it, Nagle's algorithm delays PUBACKs and QoS 1 throughput collapses.
            "set_tcp_nodelay true",
            f"log_dest file {directory / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if self._persistence:
            # Saved on SIGTERM and reloaded on start: sessions and queued messages survive restart().
            lines += ["persistence true", f"persistence_location {directory}/", "autosave_interval 0"]
        else:
            lines.append("persistence false")
        if os.geteuid() == 0:
            # As root, mosquitto switches to the "mosquitto" user, which cannot read the private
            # temp directories (log, certificates) of the test run; this broker is loopback-only.
            lines.append("user root")
        lines += self._extra_config
        return "\n".join(lines) + "\n"

    async def _start_mosquitto(self, directory: Path) -> None:
        assert self._exe is not None
        conf = directory / "mosquitto.conf"
        conf.write_text(self.config_text(directory), encoding="utf-8")
        stderr_path = directory / "mosquitto.stderr"
        with stderr_path.open("ab") as stderr:
            self._proc = await asyncio.create_subprocess_exec(
                str(self._exe),
                "-c",
                str(conf),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            await self._wait_until_listening()
        except BaseException:
            await self.stop()
            raise

    async def _start_amqtt(self) -> None:
        from amqtt.broker import Broker  # noqa: PLC0415 - optional dependency, demo/tests only

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{_HOST}:{self._port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        broker = Broker(config)
        await broker.start()
        self._amqtt = broker
        await self._wait_until_listening()

    async def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + self._start_timeout_s
        while True:
            if self._proc is not None and self._proc.returncode is not None:
                raise BrokerError(
                    f"mosquitto exited with status {self._proc.returncode}: {self._tail()}"
                )
            try:
                _, writer = await asyncio.open_connection(_HOST, self._port)
            except OSError:
                if time.monotonic() > deadline:
                    raise BrokerError(
                        f"{self._kind} did not listen on {_HOST}:{self._port} within "
                        f"{self._start_timeout_s}s: {self._tail()}"
                    ) from None
                await asyncio.sleep(0.01)  # bounded polling for the listen socket
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    def _tail(self) -> str:
        if self._dir is None:
            return ""
        text = ""
        for name in ("mosquitto.stderr", "mosquitto.log"):
            with contextlib.suppress(OSError):
                text += (self._dir / name).read_text(encoding="utf-8", errors="replace")
        return " | ".join(text.strip().splitlines()[-5:])
