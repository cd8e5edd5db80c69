"""The control socket (gateway.control) on a real Unix socket: the JSON-lines protocol, what a
stranger or a broken client gets, the socket file's life, and who the agent thinks is asking."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway import control
from gateway.control import (
    MAX_LINE,
    AgentLost,
    AgentRefused,
    AgentUnreachable,
    ControlServer,
    Conversation,
    OpError,
    call,
)

ME = pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture
def sock_path() -> Iterator[Path]:
    """A short socket path (sun_path is ~107 bytes; pytest's tmp_path can be longer)."""
    d = tempfile.mkdtemp(prefix="ctl-", dir="/tmp")
    try:
        yield Path(d) / "c.sock"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def exists(path: Path) -> bool:
    return path.exists()


def write(path: Path, text: str) -> None:
    path.write_text(text)


def read(path: Path) -> str:
    return path.read_text()


async def echo(args: Mapping[str, Any], conv: Conversation) -> object:
    return {"args": dict(args), "by": conv.by}


async def boom(args: Mapping[str, Any], conv: Conversation) -> object:
    del args, conv
    raise RuntimeError("a bug in one operation")


async def refuse(args: Mapping[str, Any], conv: Conversation) -> object:
    del args, conv
    raise OpError("device C0:00:00:00:BC:01 is already bound to patient patient-1", 65)


HANDLERS = {"echo": echo, "boom": boom, "refuse": refuse}


@contextlib.asynccontextmanager
async def serving(path: Path, handlers: Mapping[str, Any] | None = None) -> AsyncIterator[ControlServer]:
    async with asyncio.timeout(30):
        async with ControlServer(path, handlers or HANDLERS) as server:
            yield server


async def raw(path: Path, data: bytes, *, close_write: bool = False) -> list[dict[str, Any]]:
    """Send raw bytes; the JSON lines the server sent back until it closed (reset counts as closed)."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(data)
        await writer.drain()
        if close_write:
            writer.write_eof()
        chunks = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(10):
                while chunk := await reader.read(65536):
                    chunks += chunk
        return [json.loads(line) for line in chunks.splitlines() if line.strip()]
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def still_serving(path: Path) -> None:
    doc = await call(path, "echo", {"n": 1}, silence_s=10)
    assert doc == {"ok": True, "result": {"args": {"n": 1}, "by": ME}}


# -- the protocol -------------------------------------------------------------------------------


async def test_a_request_gets_progress_a_question_and_its_answer(sock_path: Path) -> None:
    async def pair(args: Mapping[str, Any], conv: Conversation) -> object:
        await conv.progress(step="connected", ok=True)
        pin = await conv.ask("passkey", "type the 6 digits the device shows")
        await conv.progress(step="bonded", ok=pin == "123456")
        return {"address": args["address"], "pin": pin, "by": conv.by}

    asked: list[tuple[str, str]] = []

    async def technician(what: str, prompt: str) -> str | None:
        asked.append((what, prompt))
        return "123456"

    progress: list[dict[str, Any]] = []
    async with serving(sock_path, {"pair": pair}):
        doc = await call(sock_path, "pair", {"address": "C0:00:00:00:BC:01"},
                         progress=progress.append, answer=technician, by=ME, silence_s=10)
    assert doc == {"ok": True, "result": {"address": "C0:00:00:00:BC:01", "pin": "123456", "by": ME}}
    assert progress == [{"step": "connected", "ok": True}, {"step": "bonded", "ok": True}]
    assert asked == [("passkey", "type the 6 digits the device shows")]


async def test_a_question_without_an_answerer_gets_none(sock_path: Path) -> None:
    got: list[object] = []

    async def ask(args: Mapping[str, Any], conv: Conversation) -> object:
        del args
        got.append(await conv.ask("passkey", "PIN?"))
        return "done"

    async with serving(sock_path, {"ask": ask}):
        doc = await call(sock_path, "ask", silence_s=10)  # a script: nobody at the terminal
    assert doc == {"ok": True, "result": "done"}
    assert got == [None]


async def test_an_operation_error_is_ok_false_with_its_exit_code(sock_path: Path) -> None:
    async with serving(sock_path):
        doc = await call(sock_path, "refuse", silence_s=10)
        assert doc == {"ok": False, "exit": 65,
                       "error": "device C0:00:00:00:BC:01 is already bound to patient patient-1"}
        await still_serving(sock_path)


async def test_a_bug_in_a_handler_is_exit_70_and_the_server_keeps_serving(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(sock_path):
        doc = await call(sock_path, "boom", silence_s=10)
        assert doc["ok"] is False and doc["exit"] == 70
        assert "RuntimeError" in doc["error"]
        assert "a bug in one operation" not in doc["error"]  # the type, not the internals
        await still_serving(sock_path)
        await still_serving(sock_path)
    assert any("boom" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


async def test_an_unknown_operation_is_exit_64(sock_path: Path) -> None:
    async with serving(sock_path):
        doc = await call(sock_path, "format-the-disk", silence_s=10)
        assert doc["ok"] is False and doc["exit"] == 64
        assert "format-the-disk" in doc["error"]
        # An op that is not a string, and no op at all.
        assert (await raw(sock_path, b'{"op": 7}\n'))[0]["exit"] == 64
        assert (await raw(sock_path, b'{"args": {}}\n'))[0]["exit"] == 64
        await still_serving(sock_path)


async def test_args_that_are_not_an_object_reach_the_handler_as_empty(sock_path: Path) -> None:
    async with serving(sock_path):
        (doc,) = await raw(sock_path, b'{"op": "echo", "args": [1, 2]}\n')
    assert doc == {"ok": True, "result": {"args": {}, "by": ME}}


# -- strangers and broken clients ---------------------------------------------------------------


@pytest.mark.parametrize("garbage", [
    b"this is not JSON\n",
    b'["op", "status"]\n',
    b'"status"\n',
    b"\xff\xfe\x00\n",
    b"{\n",
])
async def test_garbage_is_answered_exit_64_and_the_server_keeps_serving(
    sock_path: Path, garbage: bytes
) -> None:
    async with serving(sock_path):
        docs = await raw(sock_path, garbage)
        assert len(docs) == 1
        assert docs[0]["ok"] is False and docs[0]["exit"] == 64
        assert docs[0]["error"].startswith("bad request")
        await still_serving(sock_path)


async def test_a_line_over_max_line_is_refused_and_the_server_keeps_serving(sock_path: Path) -> None:
    huge = b'{"op": "echo", "args": {"x": "' + b"x" * (MAX_LINE + 100) + b'"}}\n'
    async with serving(sock_path):
        docs = await raw(sock_path, huge)
        # Answered (exit 64) or dropped: never served, never the end of the server.
        assert all(d["ok"] is False and d["exit"] == 64 for d in docs)
        assert not any("result" in d for d in docs)
        await still_serving(sock_path)


async def test_a_request_just_under_max_line_is_served(sock_path: Path) -> None:
    filler = "x" * (MAX_LINE - 200)
    async with serving(sock_path):
        doc = await call(sock_path, "echo", {"x": filler}, silence_s=10)
    assert doc["ok"] is True and doc["result"]["args"]["x"] == filler


async def test_a_client_that_sends_nothing_is_dropped_after_the_timeout(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "REQUEST_TIMEOUT_S", 0.3)
    async with serving(sock_path):
        reader, writer = await asyncio.open_unix_connection(sock_path)
        try:
            async with asyncio.timeout(5):
                line = await reader.readline()
                assert await reader.read() == b""  # then closed
        finally:
            writer.close()
        doc = json.loads(line)
        assert doc["ok"] is False and doc["exit"] == 64 and "Timeout" in doc["error"]
        await still_serving(sock_path)


async def test_a_silent_client_does_not_hold_up_the_others(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "REQUEST_TIMEOUT_S", 5.0)
    async with serving(sock_path):
        _, writer = await asyncio.open_unix_connection(sock_path)
        try:
            async with asyncio.timeout(2):  # well before the silent one is dropped
                await still_serving(sock_path)
        finally:
            writer.close()


async def test_a_client_that_half_closes_without_a_request_is_answered(sock_path: Path) -> None:
    async with serving(sock_path):
        docs = await raw(sock_path, b"", close_write=True)
        assert all(d["ok"] is False for d in docs)
        docs = await raw(sock_path, b'{"op": "echo"}', close_write=True)  # no newline
        assert not any(d.get("ok") for d in docs)
        await still_serving(sock_path)


async def test_a_client_that_leaves_while_asked_gets_none_and_nothing_escapes(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    answered: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    async def ask(args: Mapping[str, Any], conv: Conversation) -> object:
        del args
        try:
            answer = await conv.ask("passkey", "PIN?")
        except BaseException as e:
            answered.set_result(e)
            raise
        answered.set_result(answer)
        return answer

    async with serving(sock_path, {"ask": ask, "echo": echo}):
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b'{"op": "ask"}\n')
        await writer.drain()
        async with asyncio.timeout(5):
            assert "ask" in json.loads(await reader.readline())
        writer.close()  # the technician pressed Ctrl-C at the prompt
        await writer.wait_closed()
        async with asyncio.timeout(5):
            got = await answered
        await still_serving(sock_path)
    assert got is None, f"ask raised {got!r}"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def asker(outcome: asyncio.Future[object], before: float = 0.0) -> Any:
    """A handler that asks once and reports what ask gave it (or raised)."""

    async def ask(args: Mapping[str, Any], conv: Conversation) -> object:
        del args
        await asyncio.sleep(before)
        try:
            answer = await conv.ask("passkey", "PIN?")
        except BaseException as e:
            outcome.set_result(e)
            raise
        outcome.set_result(answer)
        return answer

    return ask


async def test_a_client_gone_before_the_question_gets_none_and_nothing_escapes(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outcome: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    async with serving(sock_path, {"ask": asker(outcome, before=0.3), "echo": echo}):
        _, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b'{"op": "ask"}\n')
        await writer.drain()
        writer.close()  # gone before the agent gets to its question
        await writer.wait_closed()
        async with asyncio.timeout(5):
            got = await outcome
        await still_serving(sock_path)
    assert got is None, f"ask raised {got!r}"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_an_answer_over_max_line_gets_none_and_nothing_escapes(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outcome: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    async with serving(sock_path, {"ask": asker(outcome), "echo": echo}):
        reader, writer = await asyncio.open_unix_connection(sock_path)
        try:
            writer.write(b'{"op": "ask"}\n')
            await writer.drain()
            async with asyncio.timeout(5):
                assert "ask" in json.loads(await reader.readline())
            writer.write(b'{"answer": "' + b"1" * (MAX_LINE + 100) + b'"}\n')
            await writer.drain()
            async with asyncio.timeout(5):
                got = await outcome
        finally:
            writer.close()
        await still_serving(sock_path)
    assert got is None, f"ask raised {got!r}"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_an_answer_that_is_not_json_or_not_text_gets_none(sock_path: Path) -> None:
    for line in (b"123456\n", b'{"answer": 123456}\n', b'["123456"]\n'):
        outcome: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        async with serving(sock_path, {"ask": asker(outcome)}):
            reader, writer = await asyncio.open_unix_connection(sock_path)
            try:
                writer.write(b'{"op": "ask"}\n')
                await writer.drain()
                async with asyncio.timeout(5):
                    assert "ask" in json.loads(await reader.readline())
                    writer.write(line)
                    await writer.drain()
                    assert await outcome is None
                    assert json.loads(await reader.readline()) == {"ok": True, "result": None}
            finally:
                writer.close()


async def test_closing_the_server_while_a_handler_waits_for_an_answer(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The agent stops while a technician is asked for a PIN: the socket goes, the client is
    # hung up on (not left hanging), and nothing is logged as an error (Python 3.11's server
    # callback logs a cancelled connection task unless the conversation ends it itself).
    asked = asyncio.Event()

    async def ask(args: Mapping[str, Any], conv: Conversation) -> object:
        del args
        asked.set()
        return await conv.ask("passkey", "PIN?")

    async with serving(sock_path, {"ask": ask}):
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b'{"op": "ask"}\n')
        await writer.drain()
        async with asyncio.timeout(5):
            await asked.wait()
            await reader.readline()
    try:
        assert not exists(sock_path)
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        await asyncio.sleep(0.2)  # the loop's callbacks for the cancelled conversation run
    finally:
        writer.close()
    assert not [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


# -- the socket file ----------------------------------------------------------------------------


async def test_the_socket_is_0660_from_the_start_and_removed_on_exit(sock_path: Path) -> None:
    old = os.umask(0o022)  # a permissive umask must not loosen it
    try:
        async with serving(sock_path):
            mode = os.lstat(sock_path).st_mode
            assert stat.S_ISSOCK(mode)
            assert stat.S_IMODE(mode) == 0o660
        assert not exists(sock_path)
        assert os.umask(0o022) == 0o022  # the server put the process umask back
    finally:
        os.umask(old)


async def test_the_parent_directory_is_created(sock_path: Path) -> None:
    path = sock_path.parent / "run" / "c.sock"
    async with serving(path):
        await still_serving(path)
    assert not exists(path)


async def test_a_stale_socket_file_is_replaced(sock_path: Path) -> None:
    # What a killed agent leaves: a socket file nobody listens on.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock_path))
    s.close()
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    with pytest.raises(AgentUnreachable):
        await call(sock_path, "echo", silence_s=5)
    async with serving(sock_path):
        await still_serving(sock_path)
    assert not exists(sock_path)


async def test_a_second_server_where_one_listens_raises_oserror(sock_path: Path) -> None:
    async with serving(sock_path):
        with pytest.raises(OSError, match="already listens"):
            async with ControlServer(sock_path, HANDLERS):
                pass
        # The first one is untouched: its file is there and it answers.
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        await still_serving(sock_path)


async def test_a_file_that_is_not_a_socket_is_left_alone(sock_path: Path) -> None:
    write(sock_path, "someone's notes\n")
    with pytest.raises(OSError, match="not a socket"):
        async with ControlServer(sock_path, HANDLERS):
            pass
    assert read(sock_path) == "someone's notes\n"


# -- the client ---------------------------------------------------------------------------------


async def test_call_on_a_missing_path_raises_agent_unreachable(sock_path: Path) -> None:
    with pytest.raises(AgentUnreachable):
        await call(sock_path, "status", silence_s=5)
    with pytest.raises(AgentUnreachable):
        await call(sock_path.parent / "no-dir" / "c.sock", "status", silence_s=5)


async def test_call_on_a_path_through_a_file_raises_agent_unreachable(sock_path: Path) -> None:
    write(sock_path, "")
    with pytest.raises(AgentUnreachable):
        await call(sock_path / "c.sock", "status", silence_s=5)  # NotADirectoryError


async def test_call_without_permission_raises_agent_refused(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # root passes any mode bits, so the kernel's EACCES is stood in for.
    async def denied(*args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(asyncio, "open_unix_connection", denied)
    with pytest.raises(AgentRefused, match="permission denied"):
        await call(sock_path, "status", silence_s=5)


async def test_an_agent_that_hangs_up_mid_answer_is_lost_not_unreachable(sock_path: Path) -> None:
    # Not "unreachable": the agent took the request, so the CLI must not do it again alone.
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b'{"progress": {"step": "connected"}}\n')
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(hang_up, path=sock_path)
    try:
        with pytest.raises(AgentLost, match="closed"):
            await call(sock_path, "pair", silence_s=5)
    finally:
        server.close()
        await server.wait_closed()


# -- who is asking ------------------------------------------------------------------------------


async def test_by_is_the_peers_login_name(sock_path: Path) -> None:
    async with serving(sock_path):
        own = await call(sock_path, "echo", by=ME, silence_s=10)
        claimed = await call(sock_path, "echo", by="tech7", silence_s=10)
        (unsaid,) = await raw(sock_path, b'{"op": "echo"}\n')
        (odd,) = await raw(sock_path, b'{"op": "echo", "by": "tech7\\nroot"}\n')
        (not_a_name,) = await raw(sock_path, b'{"op": "echo", "by": 7}\n')
    assert own["result"]["by"] == ME
    # Only root (sudo) may say whom it acts for; anyone else is who the kernel says.
    assert claimed["result"]["by"] == (f"tech7 (as {ME})" if os.getuid() == 0 else ME)
    assert unsaid["result"]["by"] == ME
    assert odd["result"]["by"] == ME  # not printable: ignored
    assert not_a_name["result"]["by"] == ME


async def test_call_says_the_login_name_by_default(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUDO_USER", "tech9")
    async with serving(sock_path):
        doc = await call(sock_path, "echo", silence_s=10)
    assert doc["result"]["by"] == (f"tech9 (as {ME})" if os.getuid() == 0 else ME)
