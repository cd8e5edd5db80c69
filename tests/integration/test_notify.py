"""The agent speaks systemd's notify protocol to a socket of the test's own (NOTIFY_SOCKET).

The process tests run `rpm-gateway run` as systemd would start a Type=notify unit with
WatchdogSec=0.4 s; the wedge test runs the Agent in this test's own event loop and blocks that
loop, which is what a wedged agent is: the watchdog pings come from the loop, so they stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.agent import Agent
from gateway.broker import LocalBroker
from gateway.config import parse_config
from gateway.outbox_schema import SCHEMA_VERSION
from tests.integration.hub_toml import hub_toml
from tests.integration.test_agent_process import HUB, VIRTUAL, agent_process, stop, write_config

pytestmark = pytest.mark.integration

WATCHDOG_USEC = 400_000  # systemd's WatchdogSec=0.4s: a ping every 0.2 s
# The process test holds the pings to the deadline itself: 1 s (a ping every 0.5 s) leaves a
# loaded CI machine half a second of slack where 0.4 s left it 0.2 s.
PROCESS_WATCHDOG_USEC = 1_000_000


def _schema_version(path: Path) -> int | None:
    """The outbox file's schema version as another process reads it now; None if it cannot."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.Error:
        return None


@dataclass
class Notifications:
    """Every datagram that arrived on the test's notify socket, with when it arrived."""

    sock: socket.socket
    path: Path
    got: list[tuple[float, dict[str, str]]] = field(default_factory=list)
    # The outbox's schema version on disk the moment READY arrived (None: no usable file).
    on_ready: list[int | None] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def collect(self, stop: threading.Event, ready_check: Path | None) -> None:
        """Receive until `stop` (a thread: it must go on while the test's loop is blocked)."""
        self.sock.settimeout(0.05)
        while not stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            if "READY" in fields and ready_check is not None:
                self.on_ready.append(_schema_version(ready_check))
            with self._lock:
                self.got.append((time.monotonic(), fields))

    def messages(self) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return list(self.got)

    def values(self, key: str) -> list[str]:
        return [m[key] for _, m in self.messages() if key in m]

    def times(self, key: str) -> list[float]:
        return [t for t, m in self.messages() if key in m]

    async def wait_for(self, predicate: object, timeout: float = 20) -> None:
        assert callable(predicate)
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)


@contextlib.contextmanager
def notify_socket(tmp_path: Path, ready_check: Path | None = None) -> Iterator[Notifications]:
    """A datagram socket standing in for systemd's /run/systemd/notify, read by a thread."""
    path = tmp_path / "notify"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to 108 bytes"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        found = Notifications(sock, path)
        stop = threading.Event()
        reader = threading.Thread(target=found.collect, args=(stop, ready_check), daemon=True)
        reader.start()
        try:
            yield found
        finally:
            stop.set()
            reader.join(5)


def notified_agent(config: Path, notify: Path, **env: str
                   ) -> contextlib.AbstractAsyncContextManager[asyncio.subprocess.Process]:
    """`rpm-gateway run` as a Type=notify unit with a watchdog starts it."""
    return agent_process(config, {"NOTIFY_SOCKET": str(notify),
                                  "WATCHDOG_USEC": str(PROCESS_WATCHDOG_USEC), **env})


async def test_ready_status_watchdog_and_stopping_from_the_agent_process(
    tmp_path: Path, mosquitto: LocalBroker
) -> None:
    config = write_config(tmp_path, mosquitto, VIRTUAL)
    outbox = tmp_path / "state" / "outbox.db"
    with notify_socket(tmp_path, ready_check=outbox) as notes:
        async with notified_agent(config, notes.path) as proc:
            await notes.wait_for(lambda: notes.values("READY"))
            # The outbox was open, migrated and current when READY came: systemd may count the
            # unit as started.
            assert notes.on_ready == [SCHEMA_VERSION]
            await notes.wait_for(lambda: any("broker connected" in s and "radio ok" in s
                                             for s in notes.values("STATUS")))
            pings_before = len(notes.times("WATCHDOG"))
            await asyncio.sleep(3.0)
            pings = notes.times("WATCHDOG")[pings_before:]
            code, log = await stop(proc)
            await notes.wait_for(lambda: notes.values("STOPPING"), timeout=5)
    assert code == 0, log
    assert "Traceback" not in log
    # Every 0.5 s for 3 s: 6, give or take a busy machine; never a gap systemd would kill for.
    assert len(pings) >= 4, pings
    assert max(b - a for a, b in itertools.pairwise(pings)) < PROCESS_WATCHDOG_USEC / 1e6
    first = notes.messages()[0][1]
    assert first["READY"] == "1"
    assert "STATUS" in first  # what systemctl status shows from the start
    statuses = notes.values("STATUS")
    assert all("\n" not in s and len(s) <= 200 for s in statuses)
    assert not any("patient" in s for s in statuses)  # counts and states only
    assert any(s.endswith("pending, broker connected, radio ok") and s[0].isdigit()
               for s in statuses), statuses
    assert notes.values("STOPPING") == ["1"]
    # STOPPING is the last word: nothing (no ping) after the stop began.
    assert "STOPPING" in notes.messages()[-1][1]


async def test_ready_does_not_wait_for_the_radio_or_the_broker(
    tmp_path: Path, broker_factory: Callable[..., Awaitable[LocalBroker]]
) -> None:
    # No broker on the port, no D-Bus system bus: both retry for ever, and the unit is up.
    broker = await broker_factory()
    await broker.stop()
    config = tmp_path / "gateway.toml"
    config.write_text(hub_toml(HUB, tmp_path / "state", broker, radio='[radio]\nkind = "bluez"\n'))
    with notify_socket(tmp_path) as notes:
        async with notified_agent(
                config, notes.path,
                DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={tmp_path / 'no-bus'}") as proc:
            t0 = time.monotonic()
            await notes.wait_for(lambda: notes.values("READY"), timeout=10)
            ready_after = time.monotonic() - t0
            await notes.wait_for(lambda: any(
                "broker unreachable" in s and "radio unavailable" in s
                for s in notes.values("STATUS")))
            assert proc.returncode is None
            assert len(notes.times("WATCHDOG")) >= 2
            code, log = await stop(proc)
    assert code == 0, log
    assert ready_after < 5


async def test_nothing_is_sent_and_nothing_breaks_when_the_socket_is_gone(
    tmp_path: Path, mosquitto: LocalBroker
) -> None:
    # systemd restarted (its socket replaced) or a stale variable: the agent runs on regardless.
    config = write_config(tmp_path, mosquitto, VIRTUAL)
    async with notified_agent(config, tmp_path / "no-such-socket") as proc:
        await asyncio.sleep(2)
        assert proc.returncode is None
        code, log = await stop(proc)
    assert code == 0, log
    assert "Traceback" not in log


async def test_no_ready_from_an_agent_whose_outbox_is_unusable(
    tmp_path: Path, mosquitto: LocalBroker
) -> None:
    # A newer outbox (a downgrade): exit 73 before READY, so systemd never counts the unit as
    # started and the restart policy for 73 applies.
    config = write_config(tmp_path, mosquitto, VIRTUAL)
    (tmp_path / "state").mkdir(exist_ok=True)
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "outbox.db")) as conn:
        conn.execute("PRAGMA user_version = 999")
    with notify_socket(tmp_path) as notes:
        async with notified_agent(config, notes.path) as proc:
            _, err = await asyncio.wait_for(proc.communicate(), 20)
        await asyncio.sleep(0.2)  # a datagram sent just before the exit is read by now
    assert proc.returncode == 73, err.decode()
    assert notes.values("READY") == []


async def test_a_wedged_event_loop_stops_the_watchdog_pings(
    tmp_path: Path, mosquitto: LocalBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The agent runs in this test's loop; time.sleep blocks that loop as a wedged agent's
    # would be blocked (a sync call that hangs, a busy loop). A thread hears the socket.
    with notify_socket(tmp_path) as notes:
        monkeypatch.setenv("NOTIFY_SOCKET", str(notes.path))
        monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        cfg = parse_config(hub_toml(HUB, tmp_path / "state", mosquitto, radio=VIRTUAL))
        agent = Agent(cfg)
        task = asyncio.create_task(agent.run())
        try:
            await notes.wait_for(lambda: len(notes.times("WATCHDOG")) >= 3)
            wedged_at = time.monotonic()
            time.sleep(1.5)  # noqa: ASYNC251 (the point: the event loop is stuck)
            unwedged_at = time.monotonic()
            await notes.wait_for(lambda: any(t > unwedged_at for t in notes.times("WATCHDOG")),
                                 timeout=5)
        finally:
            agent.stop()
            await asyncio.wait_for(task, 20)
    pings = notes.times("WATCHDOG")
    # A datagram sent just before the block may be read just after it began.
    during = [t for t in pings if wedged_at + 0.1 < t < unwedged_at]
    assert during == [], "pings went on while the event loop was blocked"
    resumed = [t for t in pings if t > unwedged_at]
    assert resumed and resumed[0] - unwedged_at < 1.0
    assert notes.values("READY") == ["1"]
    assert notes.values("STOPPING") == ["1"]
