"""The local control socket: how the CLI asks a running agent to scan, pair, or report.

The agent is the one owner of the radio (a second process scanning and connecting at the same
time is what makes BlueZ answer "Operation already in progress"), so `rpm-gateway scan`,
`pair`, `status`... send their request here when an agent listens, and do the work themselves
only when none does.

Protocol: JSON lines over a Unix stream socket. The client sends one request
``{"op": NAME, "args": {...}, "by": WHO}``; the server answers with any number of
``{"progress": {...}}`` lines, ``{"ask": {"what": ..., "prompt": ...}}`` lines the client
answers with one ``{"answer": TEXT}`` line each (a passkey typed by the technician), and ends
with ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": TEXT, "exit": CODE}``.

The socket is mode 0660: the service's group (the technician's) may use it, nobody else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# One request line, or one answer: far more than any request needs, and a bound on a stranger.
MAX_LINE = 64 * 1024
# What the client reads in one line (a result: 1,000 unattributed readings fit).
CLIENT_MAX_LINE = 16 * 1024 * 1024
# A client that sends nothing is dropped after this long.
REQUEST_TIMEOUT_S = 10.0
# A question to the technician (a passkey) waits this long for the answer: less than a
# pairing waits for its agent (technician.BOND_TIMEOUT_S), so the pairing ends in words.
ANSWER_TIMEOUT_S = 50.0
# A message to a client that does not read it (a suspended `scan`) is given up after this.
SEND_TIMEOUT_S = 10.0
# Clients served at once; more are told to try again (a runaway script must not pile up).
MAX_CLIENTS = 16
# The client gives up when the agent says nothing at all for this long (scans send progress
# twice a second; a pairing step takes at most the connect or bond timeout).
SILENCE_TIMEOUT_S = 180.0


class OpError(Exception):
    """An operation refused or failed in a way the technician can act on; `exit` is its code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Conversation:
    """What an operation may say while it works: progress, and questions for the technician."""

    def __init__(self, send: Callable[[dict[str, Any]], Awaitable[None]],
                 receive: Callable[[], Awaitable[dict[str, Any]]], by: str,
                 asker: Callable[[str, str], Awaitable[str | None]] | None = None) -> None:
        self._send = send
        self._receive = receive
        self._asker = asker  # in-process: ask the terminal directly, not over a socket
        self.by = by

    async def progress(self, **fields: Any) -> None:
        """Tell the client how far the operation got (it prints it)."""
        await self._send({"progress": fields})

    async def ask(self, what: str, prompt: str) -> str | None:
        """Ask the technician; None when no answer comes (client gone, timed out, no input)."""
        if self._asker is not None:
            return await self._asker(what, prompt)
        try:
            await self._send({"ask": {"what": what, "prompt": prompt}})
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                reply = await self._receive()
        except (TimeoutError, ConnectionError, EOFError, ValueError, asyncio.LimitOverrunError):
            # The technician left (Ctrl-C), typed nothing in time, or sent nonsense: no answer.
            return None
        answer = reply.get("answer")
        return answer if isinstance(answer, str) else None


Handler = Callable[[Mapping[str, Any], Conversation], Awaitable[object]]


class ControlServer:
    """Serves `handlers` (op name → coroutine) on a Unix socket while open (async with)."""

    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self._handlers = handlers
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ControlServer:
        await _clear_stale(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Created 0660 from the start (umask), not chmod-ed after: no window where others could.
        old = os.umask(0o117)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=self.path,
                                                           limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o660)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if len(self._tasks) > MAX_CLIENTS:
                writer.write(json.dumps({"ok": False, "exit": 75, "error": "the agent is busy "
                                         "with other commands; try again"}).encode() + b"\n")
                return
            await self._conversation(reader, writer)
        except (ConnectionError, EOFError, TimeoutError):
            log.debug("control client left")
        except asyncio.CancelledError:
            # The agent stops. Not re-raised: Python 3.11's server callback logs a cancelled
            # connection task as an error.
            log.debug("control client dropped: the agent stops")
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _conversation(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send(doc: dict[str, Any]) -> None:
            writer.write(json.dumps(doc).encode() + b"\n")
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await writer.drain()

        async def receive() -> dict[str, Any]:
            return _parse(await reader.readuntil(b"\n"))

        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                request = await receive()
        except (TimeoutError, ValueError, asyncio.LimitOverrunError) as e:
            await send({"ok": False, "error": f"bad request: {type(e).__name__}", "exit": 64})
            return
        op = request.get("op")
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            await send({"ok": False, "error": f"unknown operation {op!r}", "exit": 64})
            return
        args = request.get("args") or {}
        by = _who(writer, request.get("by"))
        log.debug("control: %s by %s", op, by)
        try:
            result = await handler(args if isinstance(args, dict) else {},
                                   Conversation(send, receive, by))
        except OpError as e:
            await send({"ok": False, "error": str(e), "exit": e.exit_code})
            return
        except (ConnectionError, EOFError) as e:
            log.debug("control: %s ended: the client left (%s)", op, type(e).__name__)
            return
        except Exception as e:  # a bug in one operation must not take the agent down
            log.error("control: %s failed on an internal error (%s)", op, type(e).__name__)
            log.debug("control operation failure", exc_info=True)
            await send({"ok": False, "error": f"internal error in the agent ({type(e).__name__})",
                        "exit": 70})
            return
        await send({"ok": True, "result": result})


def _parse(line: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(line)
    except RecursionError as e:  # "[[[[…": nested deeper than Python recurses
        raise ValueError("nested too deep") from e
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def _who(writer: asyncio.StreamWriter, claimed: object) -> str:
    """Who is asking: the client's login name as it says, checked against the socket's peer."""
    sock = writer.get_extra_info("socket")
    uid: int | None = None
    with contextlib.suppress(OSError, AttributeError, struct.error):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
    name = None
    if uid is not None:
        with contextlib.suppress(KeyError):
            name = pwd.getpwuid(uid).pw_name
    said = claimed if isinstance(claimed, str) and claimed.isprintable() and claimed else None
    if name is None:
        return said or "unknown"
    # root (sudo) may say who it is acting for; anyone else is who the kernel says.
    return f"{said} (as {name})" if said and said != name and uid == 0 else name


async def _clear_stale(path: Path) -> None:
    """Remove a socket file left by an agent that died; refuse if an agent still answers."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 2.0)
    except (ConnectionRefusedError, FileNotFoundError, TimeoutError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    writer.close()
    raise OSError(f"another agent already listens on {path}")


# -- client -------------------------------------------------------------------------------------


class AgentUnreachable(Exception):
    """No agent listens on the socket (the CLI then works alone)."""


class AgentRefused(Exception):
    """The socket exists but this user may not use it."""


class AgentLost(Exception):
    """The agent took the request and then went away or answered nonsense: its outcome is
    unknown, so the command must not be done again alone."""


Answerer = Callable[[str, str], Awaitable[str | None]]
ProgressSink = Callable[[dict[str, Any]], None]


async def call(path: Path, op: str, args: Mapping[str, Any] | None = None, *,
               progress: ProgressSink | None = None, answer: Answerer | None = None,
               by: str | None = None, silence_s: float = SILENCE_TIMEOUT_S) -> dict[str, Any]:
    """Run `op` in the agent; returns the final message (``ok``, ``result`` or ``error``).

    Raises AgentUnreachable when nobody listens (nothing was asked), AgentRefused when
    permission is denied, AgentLost when the agent took the request and then went silent
    for `silence_s`, closed the connection, or sent something that is not our protocol.
    """
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(path, limit=CLIENT_MAX_LINE), 5.0)
    except PermissionError as e:
        raise AgentRefused(f"{path}: permission denied (is this user in the service's group?)") from e
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError, TimeoutError) as e:
        raise AgentUnreachable(str(path)) from e
    pending: asyncio.Task[bytes] | None = None
    try:
        writer.write(json.dumps({"op": op, "args": dict(args or {}),
                                 "by": by or login_name()}).encode() + b"\n")
        await writer.drain()
        while True:
            pending = pending or asyncio.ensure_future(reader.readline())
            try:
                async with asyncio.timeout(silence_s):
                    line = await asyncio.shield(pending)
            except TimeoutError as e:
                raise AgentLost(f"the agent said nothing for {silence_s:g} s") from e
            pending = None
            if not line:
                raise AgentLost("the agent closed the connection before it answered")
            doc = _parse(line)
            if "progress" in doc:
                if progress is not None:
                    progress(doc["progress"])
            elif "ask" in doc:
                ask = doc["ask"]
                # Read on while the technician is asked: if the agent gives up waiting, its
                # final word must end the prompt, not wait behind it.
                pending = asyncio.ensure_future(reader.readline())
                asking = asyncio.ensure_future(answer(str(ask.get("what")), str(ask.get("prompt")))
                                               if answer is not None else _none())
                await asyncio.wait({pending, asking}, return_when=asyncio.FIRST_COMPLETED)
                if asking.done():
                    reply = asking.result()
                    writer.write(json.dumps({"answer": reply}).encode() + b"\n")
                    await writer.drain()
                else:
                    asking.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await asking
            else:
                return doc
    except (ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError) as e:
        raise AgentLost(f"the agent's answer could not be read ({type(e).__name__})") from e
    except ConnectionError as e:
        raise AgentLost(f"the connection to the agent broke ({type(e).__name__})") from e
    finally:
        if pending is not None:
            pending.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _none() -> None:
    return None


def login_name() -> str:
    """The technician's own name, also under sudo."""
    for var in ("SUDO_USER", "LOGNAME", "USER"):
        value = os.environ.get(var)
        if value:
            return value
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())
