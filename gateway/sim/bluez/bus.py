"""A private D-Bus message bus (Debian's dbus-daemon) to stand in for the hub's system bus.

The BlueZ stand-in, bleak's BlueZ backend and the gateway's pairing agent all expect the
*system* bus; a test or demo must not touch the host's real one (or need root for its policy),
so ``PrivateBus`` runs a throw-away dbus-daemon whose policy lets the current user own, send
and receive everything, and ``use_as_system_bus`` points ``DBUS_SYSTEM_BUS_ADDRESS`` at it:
bleak and dbus-fast's ``BusType.SYSTEM`` read that variable each time they connect.

Usable from asyncio (``async with PrivateBus() as bus``) and from synchronous code such as a
CLI (``with PrivateBus() as bus``). Either way the daemon is stopped and its directory removed
on exit, even when the body raised or was cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self
from xml.sax.saxutils import escape, quoteattr

log = logging.getLogger(__name__)

DBUS_DAEMON = "/usr/bin/dbus-daemon"
"""Where Debian's ``dbus`` package installs the daemon (looked up on PATH if not there)."""

SYSTEM_BUS_VARIABLE = "DBUS_SYSTEM_BUS_ADDRESS"
"""The variable libdbus, dbus-fast and bleak consult for the system bus before the default socket."""

DEFAULT_START_TIMEOUT_S = 5.0
"""How long the daemon gets to print its address (it takes milliseconds when healthy)."""

STOP_GRACE_S = 2.0
"""How long the daemon gets to exit after SIGTERM before it is killed."""

_POLL_S = 0.01
_STDERR_TAIL = 2000  # characters of the daemon's stderr quoted in a start-up error


def _die_with_parent() -> list[str]:
    """A command prefix that makes the daemon get SIGTERM if its parent is killed (kill -9).

    util-linux's setpriv sets PR_SET_PDEATHSIG and execs; without it the daemon would outlive
    a killed parent (it has its own session). No preexec_fn: unsafe with threads.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv else []


def system_bus_env(address: str) -> dict[str, str]:
    """The environment entries that make a child process use `address` as its system bus."""
    return {SYSTEM_BUS_VARIABLE: address}


@contextlib.contextmanager
def use_as_system_bus(address: str) -> Iterator[str]:
    """Point this process's system bus at `address` for the duration; restores the old value."""
    previous = os.environ.get(SYSTEM_BUS_VARIABLE)
    os.environ[SYSTEM_BUS_VARIABLE] = address
    try:
        yield address
    finally:
        if previous is None:
            os.environ.pop(SYSTEM_BUS_VARIABLE, None)
        else:
            os.environ[SYSTEM_BUS_VARIABLE] = previous


def _find_daemon() -> str:
    if os.access(DBUS_DAEMON, os.X_OK):
        return DBUS_DAEMON
    found = shutil.which("dbus-daemon")
    if found is None:
        raise RuntimeError("dbus-daemon not found: apt-get install dbus")
    return found


def _current_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        # A container user without a passwd entry: the policy takes a numeric uid as well.
        return str(os.getuid())


def bus_config(listen: str, *, bus_type: str = "system", user: str | None = None) -> str:
    """A dbus-daemon configuration: one listen address, EXTERNAL auth, everything allowed for `user`."""
    who = quoteattr(user if user is not None else _current_user())
    return (
        '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"\n'
        ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
        "<busconfig>\n"
        f"  <type>{escape(bus_type)}</type>\n"
        f"  <listen>{escape(listen)}</listen>\n"
        "  <auth>EXTERNAL</auth>\n"
        '  <policy context="default">\n'
        f"    <allow user={who}/>\n"
        '    <allow own="*"/>\n'
        '    <allow send_destination="*" eavesdrop="true"/>\n'
        '    <allow receive_sender="*"/>\n'
        '    <allow eavesdrop="true"/>\n'
        "  </policy>\n"
        "</busconfig>\n"
    )


class PrivateBus:
    """A dbus-daemon of its own in a temporary directory, for tests and demos.

    ``listen`` is the daemon's listen address; by default a socket ``bus`` in the temporary
    directory (``"unix:dir=..."`` or any other dbus-daemon address may be given instead).
    ``bus_type`` is the config's ``<type>`` ("system" so that clients asking the daemon what
    it is see the system bus).
    """

    def __init__(
        self,
        *,
        bus_type: str = "system",
        listen: str | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT_S,
    ) -> None:
        self._bus_type = bus_type
        self._listen = listen
        self._start_timeout = start_timeout
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._read_fd: int | None = None
        self._address: str | None = None

    @property
    def address(self) -> str:
        """The daemon's address as it printed it: ``"unix:path=...,guid=..."``."""
        if self._address is None:
            raise RuntimeError("the private bus is not running")
        return self._address

    @property
    def pid(self) -> int | None:
        """The daemon's process id while it runs (tests check it is gone afterwards)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def directory(self) -> Path | None:
        """The temporary directory holding the config, the socket and the daemon's stderr."""
        return self._dir

    # -- synchronous use ----------------------------------------------------------------------

    def start(self) -> str:
        """Start the daemon and wait (blocking) for its address; returns the address."""
        self._spawn()
        try:
            deadline = time.monotonic() + self._start_timeout
            buf = b""
            while (line := self._address_line(buf)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._start_error(f"printed no address within {self._start_timeout:g} s")
                assert self._read_fd is not None
                ready, _, _ = select.select([self._read_fd], [], [], remaining)
                if ready:
                    buf = self._read_some(buf)
            self._address = line
        except BaseException:
            self.stop()
            raise
        log.debug("private %s bus at %s (pid %s)", self._bus_type, self._address, self.pid)
        return self._address

    def stop(self) -> None:
        """Stop the daemon (SIGTERM, SIGKILL after a grace period) and remove its directory."""
        proc = self._proc
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    log.warning("dbus-daemon (pid %s) ignored SIGTERM; killing it", proc.pid)
                    proc.kill()
                    proc.wait()
        finally:
            self._cleanup()

    def __enter__(self) -> Self:
        """Start the daemon (see `start`)."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the daemon (see `stop`)."""
        self.stop()

    # -- asyncio use --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Start the daemon without blocking the loop while it comes up."""
        # Spawning is quick; only the wait for the address is made asynchronous, so that a
        # cancellation at any point leaves a process this object already knows and can stop.
        self._spawn()
        try:
            async with asyncio.timeout(self._start_timeout):
                buf = b""
                while (line := self._address_line(buf)) is None:
                    try:
                        buf = self._read_some(buf)
                    except BlockingIOError:
                        await asyncio.sleep(_POLL_S)
        except TimeoutError:
            self.stop()
            raise self._start_error(f"printed no address within {self._start_timeout:g} s") from None
        except BaseException:
            self.stop()
            raise
        self._address = line
        log.debug("private %s bus at %s (pid %s)", self._bus_type, self._address, self.pid)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the daemon without blocking the loop for the grace period."""
        proc = self._proc
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(proc.wait, STOP_GRACE_S)
        finally:
            # Also reached when cancelled mid-wait: stop() kills whatever is still running.
            if proc is not None and proc.poll() is None:
                log.warning("dbus-daemon (pid %s) ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait()
            self.stop()

    # -- internals ----------------------------------------------------------------------------

    def _spawn(self) -> None:
        if self._proc is not None:
            raise RuntimeError("the private bus is already running")
        daemon = _find_daemon()
        self._dir = Path(tempfile.mkdtemp(prefix="rpm-gateway-dbus-"))
        try:
            listen = self._listen or f"unix:path={self._dir / 'bus'}"
            config = self._dir / "bus.conf"
            config.write_text(bus_config(listen, bus_type=self._bus_type), encoding="utf-8")
            read_fd, write_fd = os.pipe()
            self._read_fd = read_fd
            os.set_blocking(read_fd, False)
            try:
                with (self._dir / "stderr").open("wb") as stderr:
                    self._proc = subprocess.Popen(  # noqa: S603 - fixed binary, generated config
                        [*_die_with_parent(), daemon, f"--config-file={config}", "--nofork",
                         "--nopidfile",
                         f"--print-address={write_fd}"],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=stderr,
                        pass_fds=(write_fd,),
                        # Its own process group: a Ctrl-C meant for the caller reaches the
                        # caller, which then stops the daemon in order.
                        start_new_session=True,
                    )
            finally:
                # Only the daemon holds the write end now, so its exit reads as end-of-file.
                os.close(write_fd)
        except BaseException:
            self._cleanup()
            raise

    def _read_some(self, buf: bytes) -> bytes:
        assert self._read_fd is not None
        chunk = os.read(self._read_fd, 4096)
        if not chunk:
            raise self._start_error("exited before printing its address")
        return buf + chunk

    @staticmethod
    def _address_line(buf: bytes) -> str | None:
        if b"\n" not in buf:
            return None
        return buf.split(b"\n", 1)[0].decode("utf-8", "replace").strip()

    def _start_error(self, what: str) -> RuntimeError:
        stderr = ""
        if self._dir is not None:
            with contextlib.suppress(OSError):
                stderr = (self._dir / "stderr").read_text("utf-8", "replace").strip()[-_STDERR_TAIL:]
        detail = f": {stderr}" if stderr else ""
        return RuntimeError(f"dbus-daemon {what}{detail}")

    def _cleanup(self) -> None:
        self._proc = None
        self._address = None
        if self._read_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._read_fd)
            self._read_fd = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
