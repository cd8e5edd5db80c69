"""systemd integration: the notify protocol (gateway.sd_notify) and journal priorities (cli)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import sd_notify
from gateway.cli import JournalFormatter, stderr_is_journal
from gateway.sd_notify import Notifier, encode, watchdog_interval


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound where systemd's would be, and the $NOTIFY_SOCKET that names it."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on `sock`, without blocking."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2)
    return out


# -- encoding and environment -----------------------------------------------------------------


def test_a_message_is_newline_separated_assignments() -> None:
    assert encode({"READY": "1", "STATUS": "3 pending, broker connected"}) == (
        b"READY=1\nSTATUS=3 pending, broker connected")


def test_a_value_never_carries_a_second_assignment() -> None:
    # A line break in a status text would make systemd read "MAINPID=1" as its own field.
    assert encode({"STATUS": "radio unavailable\nMAINPID=1"}) == b"STATUS=radio unavailable"
    assert encode({"STATUS": ""}) == b"STATUS="


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "400000"}) == pytest.approx(0.2)
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == pytest.approx(15.0)


def test_watchdog_is_for_the_process_systemd_names() -> None:
    me = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": me}) == pytest.approx(0.2)
    # Inherited by a child (or a parent's variables): not ours to ping.
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}) is None


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon"])
def test_no_watchdog_without_a_usable_interval(usec: str) -> None:
    assert watchdog_interval({"WATCHDOG_USEC": usec}) is None


def test_nothing_is_sent_without_notify_socket() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.send(READY="1") is False
    assert n.watchdog_s is None  # WATCHDOG_USEC alone asks for nothing
    assert Notifier({"WATCHDOG_USEC": "400000"}).watchdog_s is None


async def test_keep_alive_returns_at_once_without_notify_socket() -> None:
    await asyncio.wait_for(Notifier({}).keep_alive(lambda: "x"), 1)


def test_an_address_that_is_no_socket_path_is_ignored() -> None:
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


# -- the socket -------------------------------------------------------------------------------


def test_messages_arrive_on_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    n.ready("outbox open, broker starting, radio starting")
    n.stopping()
    n.close()
    assert sock.recv(4096) == b"READY=1\nSTATUS=outbox open, broker starting, radio starting"
    assert sock.recv(4096) == b"STOPPING=1"


def test_messages_arrive_on_an_abstract_socket() -> None:
    # systemd passes "@name" for Linux's abstract namespace: the name's first byte is NUL.
    name = f"rpm-gateway-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.send(WATCHDOG="1")
        n.close()
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_status_is_sent_only_when_it_changes(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    for text in ("0 pending, broker connected", "0 pending, broker connected",
                 "1 pending, broker connected", "x" * 500):
        n.status(text)
    n.close()
    got = received(sock)
    assert got[:2] == [b"STATUS=0 pending, broker connected", b"STATUS=1 pending, broker connected"]
    assert got[2] == b"STATUS=" + b"x" * sd_notify.STATUS_MAX_CHARS
    assert len(got) == 3


def test_a_missing_socket_is_logged_at_debug_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.sd_notify")
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.enabled
    assert [n.send(WATCHDOG="1") for _ in range(5)] == [False] * 5
    n.close()
    lines = [r for r in caplog.records if r.name == "gateway.sd_notify"]
    assert len(lines) == 1
    assert lines[0].levelno == logging.DEBUG
    assert "WATCHDOG" in lines[0].getMessage()


def test_a_receiver_that_does_not_read_never_blocks_the_sender(
    listener: tuple[socket.socket, str]
) -> None:
    # systemd busy: its queue fills and a blocking send would freeze the event loop.
    _, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    t0 = time.monotonic()
    sent = [n.send(WATCHDOG="1") for _ in range(5000)]
    n.close()
    assert time.monotonic() - t0 < 2
    assert sent[0] is True
    assert sent[-1] is False  # dropped, not waited for


async def test_keep_alive_pings_every_half_interval_and_tracks_the_status(
    listener: tuple[socket.socket, str]
) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})  # ping every 50 ms
    texts = iter(["0 pending, broker connecting"] * 3 + ["0 pending, broker connected"] * 1000)
    task = asyncio.create_task(n.keep_alive(lambda: next(texts)))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    n.close()
    got = received(sock)
    pings = got.count(b"WATCHDOG=1")
    assert 6 <= pings <= 12, got
    assert [g for g in got if g.startswith(b"STATUS=")] == [
        b"STATUS=0 pending, broker connecting", b"STATUS=0 pending, broker connected"]


async def test_keep_alive_survives_a_failing_status_line(
    listener: tuple[socket.socket, str]
) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})

    def broken() -> str:
        raise RuntimeError("bug")

    task = asyncio.create_task(n.keep_alive(broken))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    n.close()
    assert received(sock).count(b"WATCHDOG=1") >= 2


# -- journal priorities -----------------------------------------------------------------------


def _record(level: int, msg: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("gateway.agent", level, __file__, 1, msg, None, exc_info)


@pytest.mark.parametrize(("level", "prefix"), [
    (logging.CRITICAL, "<2>"), (logging.ERROR, "<3>"), (logging.WARNING, "<4>"),
    (logging.INFO, "<6>"), (logging.DEBUG, "<7>"),
])
def test_each_level_gets_its_syslog_priority(level: int, prefix: str) -> None:
    line = JournalFormatter("%(levelname)s %(name)s: %(message)s").format(_record(level, "hi"))
    assert line == f"{prefix}{logging.getLevelName(level)} gateway.agent: hi"


def test_every_line_of_a_traceback_keeps_the_records_priority() -> None:
    text = JournalFormatter("%(message)s").format(_record(logging.ERROR, "failed", exc=True))
    lines = text.splitlines()
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines), lines


def test_stderr_is_the_journal_only_when_its_device_and_inode_match(tmp_path: Path) -> None:
    with (tmp_path / "journal").open("w") as stream, (tmp_path / "other").open("w") as other:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stderr_is_journal(stream, env)
        assert not stderr_is_journal(other, env)  # inherited variable, redirected stderr
        assert not stderr_is_journal(stream, {})
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": "garbage"})


def _agent_log(tmp_path: Path, journal: bool) -> str:
    """What `rpm-gateway`'s logging setup writes to a stderr that is (or is not) the journal."""
    err = tmp_path / "stderr"
    with err.open("w") as stream:
        st = os.fstat(stream.fileno())
        env = {**os.environ}
        env.pop("JOURNAL_STREAM", None)
        if journal:
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        code = ("import logging; from gateway.cli import _setup_logging; _setup_logging('debug');"
                "log = logging.getLogger('gateway.agent');"
                "log.error('e'); log.warning('w'); log.info('i'); log.debug('d')")
        subprocess.run([sys.executable, "-c", code], stderr=stream, env=env, check=True,
                       timeout=60)
    return err.read_text()


def test_the_journal_gets_priorities_and_no_timestamp(tmp_path: Path) -> None:
    assert _agent_log(tmp_path, journal=True).splitlines() == [
        "<3>ERROR gateway.agent: e", "<4>WARNING gateway.agent: w",
        "<6>INFO gateway.agent: i", "<7>DEBUG gateway.agent: d"]


def test_a_terminal_or_file_keeps_the_timestamped_format(tmp_path: Path) -> None:
    lines = _agent_log(tmp_path, journal=False).splitlines()
    assert len(lines) == 4
    assert all(not line.startswith("<") for line in lines)
    # 2026-12-02 17:40:02,888 ERROR gateway.agent: e
    assert lines[0].split(" ", 2)[2] == "ERROR gateway.agent: e"
    assert lines[0][:4].isdigit()
