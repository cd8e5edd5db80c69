"""systemd's notify protocol (sd_notify(3)): READY, STATUS, WATCHDOG and STOPPING datagrams.

Written by hand rather than taken from a package: the protocol is one datagram of
``KEY=value`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET``, and the one package that
does only this (sdnotify 0.3.2, 2017) sends with a blocking socket and knows nothing of the
watchdog's variables. Without ``$NOTIFY_SOCKET`` (not started by systemd, or ``Type=simple``)
every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

# systemd(1) reads at most this much of one notification message (NOTIFY_BUFFER_MAX = 4096);
# a STATUS line never needs more than a fraction of it.
STATUS_MAX_CHARS = 200
# How often the status line is looked at for changes: it is a few fields already in memory.
STATUS_CHECK_S = 1.0


def _address(value: str | None) -> str | None:
    """The socket address of ``$NOTIFY_SOCKET``: a path, or '@name' for the abstract namespace."""
    if not value:
        return None
    if value.startswith("@"):
        # Linux abstract namespace: the name starts with a NUL byte instead of the '@'.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # vsock: and other forms systemd also knows are for VMs and containers, not this hub.
    log.debug("NOTIFY_SOCKET %r is not a path or an abstract name; not notifying", value)
    return None


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3)
    advises), or None when systemd asks this process for none."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = environ.get("WATCHDOG_PID")
    # The variables are inherited by children: the watchdog is for the process systemd names.
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.debug("WATCHDOG_USEC %r is not a number; no watchdog pings", usec)
        return None
    return value / 2e6 if value > 0 else None


def encode(fields: Mapping[str, str]) -> bytes:
    """One notification message: ``KEY=value`` lines; a value is cut at its first line break
    (a newline inside would start a new, unintended assignment)."""
    lines = []
    for key, value in fields.items():
        one_line = value.splitlines()[0] if value else ""
        lines.append(f"{key}={one_line}")
    return "\n".join(lines).encode()


class Notifier:
    """Sends notifications to systemd; every failure is logged at debug level and ignored."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(env.get("NOTIFY_SOCKET"))
        self.watchdog_s = watchdog_interval(env) if self._address is not None else None
        self._sock: socket.socket | None = None
        self._failing = False  # the last send failed: the next failure is not logged again
        self._status: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether systemd listens (``$NOTIFY_SOCKET`` names a socket)."""
        return self._address is not None

    def send(self, **fields: str) -> bool:
        """Send one message (``send(READY="1", STATUS="...")``); whether it went out."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the event loop: a full receive queue drops this message instead.
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(encode(fields), self._address)
        except OSError as e:
            # systemd gone or restarting, a full queue: nothing the agent's work depends on.
            if not self._failing:
                log.debug("systemd notification %s not sent: %s", ",".join(fields), e)
            self._failing = True
            return False
        if self._failing:
            log.debug("systemd notifications are sent again")
        self._failing = False
        return True

    def ready(self, status: str | None = None) -> None:
        """Start-up is done (``Type=notify`` units count as started from here)."""
        if status is None:
            self.send(READY="1")
            return
        self._status = status
        self.send(READY="1", STATUS=status[:STATUS_MAX_CHARS])

    def status(self, text: str) -> None:
        """The one-line status `systemctl status` shows; sent only when it changed."""
        text = text[:STATUS_MAX_CHARS]
        if text != self._status and self.send(STATUS=text):
            self._status = text

    def stopping(self) -> None:
        """A clean stop has begun (systemd then waits for the exit instead of the watchdog)."""
        self.send(STOPPING="1")

    async def keep_alive(self, status: Callable[[], str]) -> None:
        """Ping the watchdog and keep the status line current, from the event loop itself.

        Runs until cancelled. The pings come from a task on the loop, not a thread, on
        purpose: a loop that is blocked or spinning stops them, and systemd restarts the
        service (WatchdogSec=).
        """
        if self._address is None:
            return
        loop = asyncio.get_running_loop()
        ping_s = self.watchdog_s
        tick = STATUS_CHECK_S if ping_s is None else min(ping_s, STATUS_CHECK_S)
        next_ping = loop.time()
        while True:
            now = loop.time()
            if ping_s is not None and now >= next_ping:
                self.send(WATCHDOG="1")
                next_ping = now + ping_s
            try:
                self.status(status())
            except Exception:  # a status line must never stop the pings
                log.debug("status line for systemd failed", exc_info=True)
            wait = tick if ping_s is None else min(tick, next_ping - loop.time())
            await asyncio.sleep(max(0.0, wait))

    def close(self) -> None:
        """Close the socket (the next send opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
