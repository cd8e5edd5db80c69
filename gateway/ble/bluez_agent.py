"""The gateway's own BlueZ pairing agent: bonds the one device being paired, and nothing else.

bluetoothd asks a registered ``org.bluez.Agent1`` whenever pairing needs a decision (numeric
comparison, Just Works confirmation, service authorisation). Without an agent of ours, a
desktop agent or bluetoothd's fallback could answer for us; with a permissive one, any
neighbour's device in range that starts pairing with the hub would be bonded. So this agent
refuses everything unless the gateway is, at that moment, pairing exactly that device
(``PairingAgent.expect``), and refuses passkey entry outright until the hub has a way to take
one.

bluetoothd calls the agent on the *unique* bus name that registered it (the sender of
``RegisterAgent``), at the object path given there; the agent therefore keeps its own bus
connection for as long as it is registered.

Production code: imports dbus-fast and the standard library only.
"""

# No `from __future__ import annotations` here: dbus-fast reads D-Bus signatures from the
# annotations when the class is created, and a postponed `-> None` reaches it as the string
# "None", which it literal-evals to None and rejects as a signature (dbus-fast 5.2).

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterator
from types import TracebackType
from typing import Any, NamedTuple, Self

from dbus_fast import BusType, DBusError, Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusObjectPath, DBusStr, DBusUInt16, DBusUInt32
from dbus_fast.service import ServiceInterface, dbus_method

from gateway.ble.prompts import PasskeyShow, PasskeySource

log = logging.getLogger(__name__)

BLUEZ_SERVICE = "org.bluez"
AGENT_MANAGER_PATH = "/org/bluez"
AGENT_MANAGER_INTERFACE = "org.bluez.AgentManager1"
AGENT_INTERFACE = "org.bluez.Agent1"
ERROR_REJECTED = "org.bluez.Error.Rejected"

DEFAULT_AGENT_PATH = "/org/rpm_gateway/agent"
DEFAULT_CAPABILITY = "DisplayYesNo"
"""Numeric comparison where the device supports it, else Just Works; never passkey entry."""

DEFAULT_CALL_TIMEOUT_S = 5.0
"""Upper bound for each of the agent's own calls to bluetoothd (it answers in milliseconds)."""

CAPABILITIES = frozenset(
    {"DisplayOnly", "DisplayYesNo", "KeyboardOnly", "NoInputNoOutput", "KeyboardDisplay", ""}
)
"""The IO capabilities bluetoothd accepts in RegisterAgent ("" means its default, KeyboardDisplay)."""

_ADDRESS = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")


def device_path(address: str, adapter: str = "hci0") -> str:
    """BlueZ's object path for the device at `address` on `adapter`: /org/bluez/hci0/dev_AA_BB_..."""
    if not _ADDRESS.match(address):
        raise ValueError(f"not a Bluetooth address: {address!r}")
    return f"{AGENT_MANAGER_PATH}/{adapter}/dev_{address.upper().replace(':', '_')}"


class AgentRegistrationError(Exception):
    """bluetoothd did not take the agent (refused, absent, or did not answer in time).

    ``dbus_error`` is the D-Bus error name when bluetoothd (or the bus) answered with one.
    """

    def __init__(self, what: str, detail: str, dbus_error: str | None = None) -> None:
        self.dbus_error = dbus_error
        self.detail = detail
        super().__init__(
            f"{what}: {detail}; check that bluetoothd is running (systemctl status bluetooth) "
            "and that this user may talk to org.bluez on the system bus"
        )


MAX_PASSKEY = 999_999


class AgentRequest(NamedTuple):
    """One question bluetoothd asked the agent, and the answer it got."""

    method: str
    device: str
    accepted: bool


class PairingAgent:
    """An ``org.bluez.Agent1`` that accepts only the device the gateway is pairing right now.

    Use as an async context manager: entering connects to the system bus (unless `bus` is
    given), exports the agent at `path` and registers it as bluetoothd's default agent;
    leaving unregisters it. Around each pairing, ``with agent.expect(device_path(address)):``
    lets bluetoothd's questions about that one device be answered yes.

    `timeout` bounds each of the agent's own calls to bluetoothd (and the bus connection).
    """

    def __init__(
        self,
        *,
        path: str = DEFAULT_AGENT_PATH,
        capability: str = DEFAULT_CAPABILITY,
        bus: MessageBus | None = None,
        timeout: float = DEFAULT_CALL_TIMEOUT_S,
    ) -> None:
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown agent capability {capability!r}")
        self.path = path
        self.capability = capability
        self.timeout = timeout
        self.requests: list[AgentRequest] = []
        """Every question bluetoothd asked, in order (for tests and diagnostics)."""
        self.cancelled = 0
        """How many times bluetoothd cancelled a request (it gave up waiting, or pairing failed)."""
        self.released = False
        """bluetoothd unregistered the agent itself (another default agent, or it restarted)."""
        self._bus = bus
        self._own_bus = bus is None
        self._interface: _Agent1 | None = None
        self._registered = False
        self._expected: str | None = None
        self._authorized: set[str] = set()
        self._passkey: PasskeySource | None = None
        self._show: PasskeyShow | None = None

    # -- pairing decisions --------------------------------------------------------------------

    @property
    def bus(self) -> MessageBus | None:
        """The bus connection bluetoothd calls the agent on (its unique name is the agent's address)."""
        return self._bus

    @property
    def expected(self) -> str | None:
        """The device path being paired now, if any."""
        return self._expected

    @property
    def authorized(self) -> frozenset[str]:
        """Device paths whose service connections are authorised outside a pairing."""
        return frozenset(self._authorized)

    @contextlib.contextmanager
    def expect(
        self,
        device_path: str,
        *,
        passkey: PasskeySource | None = None,
        show: PasskeyShow | None = None,
    ) -> Iterator[None]:
        """Accept bluetoothd's pairing questions about `device_path` (only) while inside.

        `passkey` answers passkey entry (the device shows six digits, the hub types them:
        e.g. a technician's prompt); without it passkey entry is refused. `show` is told the
        six digits when the device is the one that types (the hub displays). A Bluetooth
        address is taken too, as the device on hci0. One device at a time: the gateway pairs
        devices one after the other, and a second expectation would widen what a stranger
        could slip in.
        """
        path = _as_device_path(device_path)
        if self._expected is not None:
            raise RuntimeError(f"already pairing {self._expected}; cannot also expect {path}")
        self._expected = path
        self._passkey, self._show = passkey, show
        try:
            yield
        finally:
            self._expected = None
            self._passkey = self._show = None

    def allow(self, device_path: str) -> None:
        """Authorise `device_path`'s service connections (AuthorizeService) from now on."""
        self._authorized.add(_as_device_path(device_path))

    def disallow(self, device_path: str) -> None:
        """Withdraw an `allow` (no error if there was none)."""
        self._authorized.discard(_as_device_path(device_path))

    def _decide(self, method: str, device: str, *, also: frozenset[str] = frozenset()) -> None:
        accepted = device == self._expected or device in also
        self.requests.append(AgentRequest(method, device, accepted))
        if accepted:
            log.info("agent: %s for %s accepted", method, device)
            return
        why = "no pairing in progress" if self._expected is None else f"pairing {self._expected}"
        log.warning("agent: %s for %s refused (%s)", method, device, why)
        raise DBusError(ERROR_REJECTED, f"{device} is not the device being paired ({why})")

    def _refuse(self, method: str, device: str, text: str) -> None:
        self.requests.append(AgentRequest(method, device, False))
        log.warning("agent: %s for %s refused (%s)", method, device, text)
        raise DBusError(ERROR_REJECTED, text)

    async def _passkey_for(self, device: str) -> int:
        """Passkey entry for the expected device, from the caller's source; else Rejected."""
        if device != self._expected or self._passkey is None:
            why = ("passkey entry is not supported yet" if device == self._expected
                   else f"{device} is not the device being paired")
            self._refuse("RequestPasskey", device, why)
        source = self._passkey
        assert source is not None
        value = await source()
        if value is None or not 0 <= value <= MAX_PASSKEY:
            self._refuse("RequestPasskey", device, "no passkey was entered")
            return 0  # not reached: _refuse raises
        self.requests.append(AgentRequest("RequestPasskey", device, True))
        log.info("agent: RequestPasskey for %s answered", device)
        return value

    def _display(self, method: str, device: str, passkey: int) -> None:
        self._decide(method, device)
        if self._show is not None:
            self._show(passkey)

    def _on_release(self) -> None:
        self.released = True
        self._registered = False
        self.requests.append(AgentRequest("Release", "", True))
        log.info("agent released by bluetoothd")

    def _on_cancel(self) -> None:
        self.cancelled += 1
        self.requests.append(AgentRequest("Cancel", self._expected or "", True))
        log.info("pairing cancelled by bluetoothd")

    # -- registration -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Connect (if needed), export the agent and register it as the default agent."""
        if self._bus is None:
            try:
                async with asyncio.timeout(self.timeout):
                    self._bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
            except (OSError, EOFError, TimeoutError, DBusError) as err:
                self._bus = None
                raise AgentRegistrationError(
                    "cannot connect to the system bus", f"{type(err).__name__}: {err}") from err
        self._interface = _Agent1(self)
        self._bus.export(self.path, self._interface)
        try:
            await self._call_manager("RegisterAgent", "os", [self.path, self.capability])
            self._registered = True
            await self._call_manager("RequestDefaultAgent", "o", [self.path])
        except BaseException:
            await self._teardown()
            raise
        log.info("pairing agent registered at %s (%s)", self.path, self.capability)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Unregister (bluetoothd may already be gone: that is not an error), unexport, disconnect."""
        await self._teardown()

    async def _teardown(self) -> None:
        bus = self._bus
        try:
            if bus is not None and self._registered and bus.connected:
                try:
                    await self._call_manager("UnregisterAgent", "o", [self.path])
                except AgentRegistrationError as err:
                    # bluetoothd restarted or stopped: it has forgotten the agent anyway.
                    log.info("pairing agent not unregistered: %s", err.detail)
        finally:
            self._registered = False
            self._expected = None
            if bus is not None:
                if self._interface is not None:
                    bus.unexport(self.path, self._interface)
                if self._own_bus:
                    self._bus = None
                    bus.disconnect()
                    # Wait for the socket to close, so nothing outlives the context; a bus
                    # that already failed reports that failure here, which is moot now.
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(self.timeout):
                            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
            self._interface = None

    async def _call_manager(self, member: str, signature: str, body: list[Any]) -> None:
        """Call AgentManager1.`member`, turning every way it can fail into AgentRegistrationError."""
        assert self._bus is not None
        what = f"{AGENT_MANAGER_INTERFACE}.{member}"
        message = Message(
            destination=BLUEZ_SERVICE,
            path=AGENT_MANAGER_PATH,
            interface=AGENT_MANAGER_INTERFACE,
            member=member,
            signature=signature,
            body=body,
        )
        try:
            async with asyncio.timeout(self.timeout):
                reply = await self._bus.call(message)
        except TimeoutError:
            raise AgentRegistrationError(
                what, f"bluetoothd did not answer within {self.timeout:g} s") from None
        except (OSError, EOFError) as err:
            raise AgentRegistrationError(what, f"the bus connection failed: {err}") from err
        if reply.message_type is MessageType.ERROR:
            text = str(reply.body[0]) if reply.body else ""
            raise AgentRegistrationError(what, f"{reply.error_name}: {text}", reply.error_name)


def _as_device_path(device: str) -> str:
    return device_path(device) if _ADDRESS.match(device) else device


class _Agent1(ServiceInterface):
    """The exported ``org.bluez.Agent1``; every decision is the PairingAgent's."""

    def __init__(self, agent: PairingAgent) -> None:
        super().__init__(AGENT_INTERFACE)
        self._agent = agent

    @dbus_method()
    def Release(self) -> None:
        """bluetoothd dropped the agent; nothing to undo on our side."""
        self._agent._on_release()

    @dbus_method()
    def RequestPinCode(self, device: DBusObjectPath) -> DBusStr:
        """Legacy PIN entry: refused, the hub has no way to enter one yet."""
        self._agent._refuse("RequestPinCode", device, "passkey entry is not supported yet")
        return ""

    @dbus_method()
    async def RequestPasskey(self, device: DBusObjectPath) -> DBusUInt32:
        """Passkey entry: the six digits the device shows, from the pairing's passkey source."""
        return await self._agent._passkey_for(device)

    @dbus_method()
    def DisplayPinCode(self, device: DBusObjectPath, pincode: DBusStr) -> None:
        """The device is to type `pincode`; the hub has no display, so it is only logged."""
        # A PIN is a secret: never logged above debug.
        log.debug("agent: PIN for %s is %s", device, pincode)
        self._agent._decide("DisplayPinCode", device)

    @dbus_method()
    def DisplayPasskey(self, device: DBusObjectPath, passkey: DBusUInt32, entered: DBusUInt16) -> None:
        """The device is to type `passkey`; logged at debug only."""
        # A passkey is a secret: never logged above debug.
        log.debug("agent: passkey for %s is %06d (%d typed)", device, passkey, entered)
        self._agent._display("DisplayPasskey", device, passkey)

    @dbus_method()
    def RequestConfirmation(self, device: DBusObjectPath, passkey: DBusUInt32) -> None:
        """Numeric comparison: yes for the device being paired, Rejected for any other."""
        log.debug("agent: confirm passkey %06d for %s", passkey, device)
        self._agent._decide("RequestConfirmation", device)

    @dbus_method()
    def RequestAuthorization(self, device: DBusObjectPath) -> None:
        """Just Works pairing: yes for the device being paired, Rejected for any other."""
        self._agent._decide("RequestAuthorization", device)

    @dbus_method()
    def AuthorizeService(self, device: DBusObjectPath, uuid: DBusStr) -> None:
        """A service connection: yes for the device being paired or one `allow`ed."""
        self._agent._decide("AuthorizeService", device, also=frozenset(self._agent._authorized))

    @dbus_method()
    def Cancel(self) -> None:
        """bluetoothd gave up on the outstanding request."""
        self._agent._on_cancel()
