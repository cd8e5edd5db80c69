"""The pairing agent over a real dbus-daemon, questioned the way bluetoothd questions it.

A private bus (gateway.sim.bluez.bus) stands in for the hub's system bus; a few lines of
AgentManager1 at /org/bluez stand in for bluetoothd's agent manager. Like bluetoothd, it calls
the agent on the unique bus name that registered it, at the path it registered.
"""

# No `from __future__ import annotations` here: dbus-fast reads D-Bus signatures from the
# annotations when the class is created, and a postponed `-> None` reaches it as the string
# "None", which it literal-evals to None and rejects as a signature (dbus-fast 5.2).

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import BusType, DBusError, Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusObjectPath, DBusStr
from dbus_fast.service import ServiceInterface, dbus_method

from gateway.ble.bluez_agent import (
    AGENT_INTERFACE,
    ERROR_REJECTED,
    AgentRegistrationError,
    AgentRequest,
    PairingAgent,
    device_path,
)
from gateway.sim.bluez import bus as bus_module
from gateway.sim.bluez.bus import SYSTEM_BUS_VARIABLE, PrivateBus, system_bus_env, use_as_system_bus

CUFF = device_path("C0:FF:EE:00:00:10")
NEIGHBOUR = device_path("C0:FF:EE:00:00:99")
WAIT = 2.0  # bound for one D-Bus round trip; they take milliseconds


class FakeAgentManager(ServiceInterface):
    """org.bluez.AgentManager1 as bluetoothd implements it, reduced to what the agent uses."""

    def __init__(self, bus: MessageBus) -> None:
        super().__init__("org.bluez.AgentManager1")
        self.bus = bus
        self.agents: dict[tuple[str, str], str] = {}  # (sender, path) -> capability
        self.default: tuple[str, str] | None = None
        self.unregistered: list[tuple[str, str]] = []
        self.wedged = False  # swallow AgentManager1 calls without ever answering
        self._sender = ""

    def observe(self, msg: Message) -> bool | None:
        """Message handler: note who is calling (a ServiceInterface method cannot see that)."""
        if msg.interface != "org.bluez.AgentManager1" or msg.message_type is not MessageType.METHOD_CALL:
            return None
        self._sender = msg.sender or ""
        return True if self.wedged else None  # True: handled, and no reply ever goes out

    @dbus_method()
    def RegisterAgent(self, agent: DBusObjectPath, capability: DBusStr) -> None:
        # Like bluetoothd: one agent per bus connection.
        if any(sender == self._sender for sender, _ in self.agents):
            raise DBusError("org.bluez.Error.AlreadyExists", "Already Exists")
        self.agents[(self._sender, agent)] = capability

    @dbus_method()
    def RequestDefaultAgent(self, agent: DBusObjectPath) -> None:
        key = (self._sender, agent)
        if key not in self.agents:
            raise DBusError("org.bluez.Error.DoesNotExist", "Does Not Exist")
        self.default = key

    @dbus_method()
    def UnregisterAgent(self, agent: DBusObjectPath) -> None:
        key = (self._sender, agent)
        if self.agents.pop(key, None) is None:
            raise DBusError("org.bluez.Error.DoesNotExist", "Does Not Exist")
        self.unregistered.append(key)
        if self.default == key:
            self.default = None

    async def ask(self, member: str, signature: str = "", body: list[Any] | None = None) -> Message:
        """Call the default agent's `member` the way bluetoothd does; returns the reply."""
        assert self.default is not None, "no default agent registered"
        sender, path = self.default
        msg = Message(destination=sender, path=path, interface=AGENT_INTERFACE, member=member,
                      signature=signature, body=body or [])
        return await asyncio.wait_for(self.bus.call(msg), WAIT)


def accepted(reply: Message) -> bool:
    """True for a normal return; False for org.bluez.Error.Rejected; anything else fails the test."""
    if reply.message_type is MessageType.METHOD_RETURN:
        return True
    assert reply.message_type is MessageType.ERROR
    assert reply.error_name == ERROR_REJECTED, (reply.error_name, reply.body)
    return False


@pytest.fixture
async def private_bus() -> AsyncIterator[PrivateBus]:
    """A private dbus-daemon, made this process's system bus."""
    async with PrivateBus() as bus:
        with use_as_system_bus(bus.address):
            yield bus


@pytest.fixture
async def bluez(private_bus: PrivateBus) -> AsyncIterator[FakeAgentManager]:
    """org.bluez owned on the private bus, serving AgentManager1 at /org/bluez."""
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    manager = FakeAgentManager(bus)
    bus.add_message_handler(manager.observe)
    bus.export("/org/bluez", manager)
    await bus.request_name("org.bluez")
    yield manager
    bus.disconnect()
    await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]


async def test_bluez_agent_registers_as_default_and_unregisters_on_exit(bluez: FakeAgentManager) -> None:
    async with PairingAgent() as agent:
        assert agent.bus is not None
        me = (agent.bus.unique_name, "/org/rpm_gateway/agent")
        assert me[0] is not None and me[0].startswith(":")
        assert bluez.agents == {me: "DisplayYesNo"}
        assert bluez.default == me
        agent_bus = agent.bus
    assert bluez.unregistered == [me]
    assert bluez.agents == {}
    assert not agent_bus.connected
    assert agent.bus is None


async def test_bluez_agent_on_a_given_bus_leaves_it_connected(bluez: FakeAgentManager) -> None:
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        async with PairingAgent(bus=bus, path="/test/agent", capability="NoInputNoOutput") as agent:
            assert agent.bus is bus
            assert bluez.default == (bus.unique_name, "/test/agent")
            assert bluez.agents[(bus.unique_name or "", "/test/agent")] == "NoInputNoOutput"
        assert bus.connected
        assert bluez.unregistered == [(bus.unique_name, "/test/agent")]
    finally:
        bus.disconnect()


@pytest.mark.parametrize(
    ("method", "signature", "extra"),
    [("RequestConfirmation", "ou", [123456]), ("RequestAuthorization", "o", [])],
    ids=["numeric-comparison", "just-works"],
)
async def test_bluez_agent_accepts_only_the_expected_device(
    bluez: FakeAgentManager, method: str, signature: str, extra: list[Any]
) -> None:
    async with PairingAgent() as agent:
        assert not accepted(await bluez.ask(method, signature, [CUFF, *extra])), "nothing expected"
        with agent.expect(CUFF):
            assert agent.expected == CUFF
            assert accepted(await bluez.ask(method, signature, [CUFF, *extra]))
            assert not accepted(await bluez.ask(method, signature, [NEIGHBOUR, *extra]))
        assert agent.expected is None
        assert not accepted(await bluez.ask(method, signature, [CUFF, *extra])), "pairing over"
    assert agent.requests == [
        AgentRequest(method, CUFF, False),
        AgentRequest(method, CUFF, True),
        AgentRequest(method, NEIGHBOUR, False),
        AgentRequest(method, CUFF, False),
    ]


async def test_bluez_agent_rejection_says_why(bluez: FakeAgentManager) -> None:
    async with PairingAgent() as agent:
        with agent.expect(CUFF):
            reply = await bluez.ask("RequestConfirmation", "ou", [NEIGHBOUR, 1])
    assert reply.error_name == ERROR_REJECTED
    assert NEIGHBOUR in reply.body[0] and CUFF in reply.body[0]


async def test_bluez_agent_expect_takes_an_address_and_one_device_at_a_time(bluez: FakeAgentManager) -> None:
    async with PairingAgent() as agent:
        with agent.expect("c0:ff:ee:00:00:10"):
            assert agent.expected == CUFF
            assert accepted(await bluez.ask("RequestAuthorization", "o", [CUFF]))
            with pytest.raises(RuntimeError, match="already pairing"), agent.expect(NEIGHBOUR):
                pass
            assert agent.expected == CUFF


async def test_bluez_agent_authorizes_services_for_expected_or_allowed_devices(
    bluez: FakeAgentManager,
) -> None:
    hrs = "0000180d-0000-1000-8000-00805f9b34fb"
    async with PairingAgent() as agent:
        assert not accepted(await bluez.ask("AuthorizeService", "os", [CUFF, hrs]))
        with agent.expect(CUFF):
            assert accepted(await bluez.ask("AuthorizeService", "os", [CUFF, hrs]))
        agent.allow(NEIGHBOUR)
        assert agent.authorized == {NEIGHBOUR}
        assert accepted(await bluez.ask("AuthorizeService", "os", [NEIGHBOUR, hrs]))
        assert not accepted(await bluez.ask("AuthorizeService", "os", [CUFF, hrs]))
        agent.disallow(NEIGHBOUR)
        assert not accepted(await bluez.ask("AuthorizeService", "os", [NEIGHBOUR, hrs]))


@pytest.mark.parametrize("method", ["RequestPasskey", "RequestPinCode"])
async def test_bluez_agent_refuses_passkey_entry_even_for_the_expected_device(
    bluez: FakeAgentManager, method: str
) -> None:
    async with PairingAgent() as agent:
        with agent.expect(CUFF):
            reply = await bluez.ask(method, "o", [CUFF])
    assert not accepted(reply)
    assert "passkey entry is not supported yet" in reply.body[0]
    assert agent.requests == [AgentRequest(method, CUFF, False)]


async def test_bluez_agent_display_keeps_the_passkey_at_debug(
    bluez: FakeAgentManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.ble.bluez_agent")
    async with PairingAgent() as agent:
        with agent.expect(CUFF):
            assert accepted(await bluez.ask("DisplayPasskey", "ouq", [CUFF, 424242, 2]))
            assert accepted(await bluez.ask("DisplayPinCode", "os", [CUFF, "909090"]))
            assert accepted(await bluez.ask("RequestConfirmation", "ou", [CUFF, 717171]))
        assert not accepted(await bluez.ask("DisplayPasskey", "ouq", [NEIGHBOUR, 313131, 0]))
    secrets = ("424242", "909090", "717171", "313131")
    assert any("424242" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    loud = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
    assert loud, "decisions are logged above debug"
    assert not [m for m in loud if any(s in m for s in secrets)]


async def test_bluez_agent_records_cancel_and_release(
    bluez: FakeAgentManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.ble.bluez_agent")
    async with PairingAgent() as agent:
        with agent.expect(CUFF):
            assert accepted(await bluez.ask("Cancel"))
        assert agent.cancelled == 1
        assert "pairing cancelled by bluetoothd" in caplog.text
        assert accepted(await bluez.ask("Release"))
        assert agent.released
        # bluetoothd forgets a released agent; the manager here must not be asked again.
        bluez.agents.clear()
    assert bluez.unregistered == []
    assert agent.requests == [AgentRequest("Cancel", CUFF, True), AgentRequest("Release", "", True)]


async def test_bluez_agent_exit_tolerates_bluetoothd_gone(bluez: FakeAgentManager) -> None:
    async with PairingAgent(timeout=WAIT) as agent:
        bluez.bus.disconnect()
        await bluez.bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
        agent_bus = agent.bus
    assert agent_bus is not None and not agent_bus.connected


async def test_bluez_agent_without_bluetoothd_fails_fast(private_bus: PrivateBus) -> None:
    start = time.monotonic()
    agent = PairingAgent()
    with pytest.raises(AgentRegistrationError) as err:
        async with agent:
            pytest.fail("registered without org.bluez on the bus")
    assert time.monotonic() - start < WAIT
    assert err.value.dbus_error == "org.freedesktop.DBus.Error.ServiceUnknown"
    assert "RegisterAgent" in str(err.value)
    assert agent.bus is None, "its own bus connection is closed again"


async def test_bluez_agent_refused_registration_names_the_error(bluez: FakeAgentManager) -> None:
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        async with PairingAgent(bus=bus):
            with pytest.raises(AgentRegistrationError) as err:
                async with PairingAgent(bus=bus, path="/org/rpm_gateway/second"):
                    pass
            # The refused agent took its object off the bus; the registered one still answers.
            assert accepted(await bluez.ask("Cancel"))
    finally:
        bus.disconnect()
    assert err.value.dbus_error == "org.bluez.Error.AlreadyExists"
    assert "AlreadyExists" in str(err.value)


async def test_bluez_agent_wedged_bluetoothd_times_out(bluez: FakeAgentManager) -> None:
    bluez.wedged = True
    start = time.monotonic()
    agent = PairingAgent(timeout=0.3)
    with pytest.raises(AgentRegistrationError, match=r"did not answer within 0\.3 s"):
        async with agent:
            pass
    assert time.monotonic() - start < WAIT
    assert agent.bus is None


async def test_bluez_agent_without_a_system_bus_fails_clearly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(SYSTEM_BUS_VARIABLE, f"unix:path={tmp_path / 'nothing-here'}")
    with pytest.raises(AgentRegistrationError, match="cannot connect to the system bus"):
        async with PairingAgent(timeout=WAIT):
            pass


def test_bluez_device_path_from_address() -> None:
    assert device_path("aa:bb:cc:dd:ee:ff") == "/org/bluez/hci0/dev_AA_BB_CC_DD_EE_FF"
    assert device_path("AA:BB:CC:DD:EE:FF", adapter="hci1") == "/org/bluez/hci1/dev_AA_BB_CC_DD_EE_FF"
    with pytest.raises(ValueError, match="not a Bluetooth address"):
        device_path("AA:BB:CC:DD:EE")
    with pytest.raises(ValueError, match="capability"):
        PairingAgent(capability="Telepathy")


# -- the private bus itself ------------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie nobody reaped yet (PID 1 in a container may not) is gone too
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status


async def test_bluez_private_bus_leaves_no_daemon_behind() -> None:
    bus = PrivateBus()
    with pytest.raises(ZeroDivisionError):
        async with bus:
            pid, directory = bus.pid, bus.directory
            assert pid is not None and directory is not None
            assert bus.address.startswith(f"unix:path={directory}") and ",guid=" in bus.address
            assert not _gone(pid)
            _ = 1 / 0
    assert pid is not None and directory is not None
    assert _gone(pid)
    assert not directory.exists()
    assert bus.pid is None
    with pytest.raises(RuntimeError, match="not running"):
        _ = bus.address


async def test_bluez_private_bus_cancelled_body_still_stops_daemon() -> None:
    started = asyncio.Event()
    pids: list[int] = []

    async def body() -> None:
        async with PrivateBus() as bus:
            assert bus.pid is not None
            pids.append(bus.pid)
            started.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(body())
    await asyncio.wait_for(started.wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _gone(pids[0])


def test_bluez_private_bus_synchronous_use() -> None:
    with PrivateBus(listen="unix:dir=/tmp") as bus:
        pid = bus.pid
        assert pid is not None
        assert bus.address.startswith("unix:path=/tmp/")
    assert _gone(pid)


def test_bluez_private_bus_missing_daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(bus_module, "DBUS_DAEMON", str(tmp_path / "no-such-daemon"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"dbus-daemon not found: apt-get install dbus"), PrivateBus():
        pass


async def test_bluez_private_bus_silent_daemon_times_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    silent = tmp_path / "silent-daemon"
    pid_file = tmp_path / "pid"
    silent.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 30\n")
    silent.chmod(0o755)
    monkeypatch.setattr(bus_module, "DBUS_DAEMON", str(silent))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"printed no address within 0\.5 s"):
        async with PrivateBus(start_timeout=0.5):
            pass
    assert time.monotonic() - start < WAIT
    assert _gone(int(pid_file.read_text()))


def test_bluez_private_bus_daemon_exiting_early_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    broken = tmp_path / "broken-daemon"
    broken.write_text("#!/bin/sh\necho 'Failed to start message bus: bad config' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(bus_module, "DBUS_DAEMON", str(broken))
    with pytest.raises(RuntimeError, match="exited before printing its address: Failed"), PrivateBus():
        pass


def test_bluez_use_as_system_bus_restores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert system_bus_env("unix:path=/x") == {"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/x"}
    monkeypatch.delenv(SYSTEM_BUS_VARIABLE, raising=False)
    with use_as_system_bus("unix:path=/a"):
        assert os.environ[SYSTEM_BUS_VARIABLE] == "unix:path=/a"
    assert SYSTEM_BUS_VARIABLE not in os.environ
    monkeypatch.setenv(SYSTEM_BUS_VARIABLE, "unix:path=/before")
    with pytest.raises(KeyError), use_as_system_bus("unix:path=/b"):
        raise KeyError("body failed")
    assert os.environ[SYSTEM_BUS_VARIABLE] == "unix:path=/before"


def test_bluez_private_bus_dies_with_a_killed_parent() -> None:
    # `simulate --bluez` killed with SIGKILL must not leave its dbus-daemon running.
    code = ("import time; from gateway.sim.bluez.bus import PrivateBus\n"
            "b = PrivateBus(); b.start(); print(b.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert not _gone(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while not _gone(pid):
            assert time.monotonic() < deadline, "dbus-daemon outlived its killed parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()


async def test_bluez_agent_passkey_entry_only_for_the_expected_device(bluez: FakeAgentManager) -> None:
    shown: list[int] = []

    async def technician_types() -> int | None:
        return 123456

    async with PairingAgent(capability="KeyboardDisplay") as agent:
        with agent.expect(CUFF, passkey=technician_types, show=shown.append):
            reply = await bluez.ask("RequestPasskey", "o", [CUFF])
            assert accepted(reply) and reply.body == [123456]
            other = await bluez.ask("RequestPasskey", "o", [NEIGHBOUR])
            assert other.error_name == ERROR_REJECTED
            assert accepted(await bluez.ask("DisplayPasskey", "ouq", [CUFF, 654321, 0]))
            assert not accepted(await bluez.ask("DisplayPasskey", "ouq", [NEIGHBOUR, 111111, 0]))
        assert shown == [654321]  # only the device being paired gets its digits shown

        async def nobody_typed() -> int | None:
            return None

        with agent.expect(CUFF, passkey=nobody_typed):
            assert (await bluez.ask("RequestPasskey", "o", [CUFF])).error_name == ERROR_REJECTED
