"""SMP pairing on the hub's bumble device, with the user's part asked of the registered Agent1.

bluetoothd sets the adapter's IO capability from the default agent's capability and forwards
each question (numeric comparison, passkey, authorisation) to that agent; an agent that does
not answer within REQUEST_TIMEOUT fails the pairing, and bluetoothd tells it Cancel().
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from bumble.pairing import PairingDelegate
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from gateway.sim.bluez import policy

log = logging.getLogger(__name__)

_IO = PairingDelegate.IoCapability
CAPABILITIES = {
    "DisplayOnly": _IO.DISPLAY_OUTPUT_ONLY,
    "DisplayYesNo": _IO.DISPLAY_OUTPUT_AND_YES_NO_INPUT,
    "KeyboardOnly": _IO.KEYBOARD_INPUT_ONLY,
    "NoInputNoOutput": _IO.NO_OUTPUT_NO_INPUT,
    "KeyboardDisplay": _IO.DISPLAY_OUTPUT_AND_KEYBOARD_INPUT,
    "": _IO.DISPLAY_OUTPUT_AND_KEYBOARD_INPUT,  # BlueZ's default when none is given
}


@dataclass
class RegisteredAgent:
    """An Agent1 some client registered: where to call it and what it can do."""

    sender: str
    path: str
    capability: str


class AgentOutcome:
    """Why the last pairing's agent exchange failed, for the D-Bus error Pair returns."""

    def __init__(self) -> None:
        self.timed_out = False
        self.rejected = False


class AgentDelegate(PairingDelegate):
    """Forwards bumble's pairing questions about one device to the default agent."""

    def __init__(
        self,
        bus: MessageBus,
        agent: RegisteredAgent | None,
        device_path: str,
        bluez_policy: policy.BluezPolicy,
        outcome: AgentOutcome,
    ) -> None:
        capability = CAPABILITIES.get(agent.capability, _IO.NO_OUTPUT_NO_INPUT) if agent else None
        super().__init__(io_capability=capability or _IO.NO_OUTPUT_NO_INPUT)
        self._bus = bus
        self._agent = agent
        self._device_path = device_path
        self._policy = bluez_policy
        self._outcome = outcome

    async def _ask(self, member: str, signature: str, body: list[object]) -> Message | None:
        """Call the agent; None when it failed, was refused, or did not answer in time."""
        agent = self._agent
        if agent is None:
            return None
        call = Message(
            destination=agent.sender, path=agent.path, interface=policy.AGENT, member=member,
            signature=signature, body=body,
        )
        try:
            async with asyncio.timeout(self._policy.agent_timeout_s):
                reply = await self._bus.call(call)
        except TimeoutError:
            self._outcome.timed_out = True
            log.debug("agent %s did not answer %s in time; cancelling", agent.path, member)
            await self._bus.send(Message(
                destination=agent.sender, path=agent.path, interface=policy.AGENT,
                member="Cancel", flags=1,  # NO_REPLY_EXPECTED
            ))
            return None
        if reply is None or reply.message_type == MessageType.ERROR:
            self._outcome.rejected = True
            return None
        return reply

    async def accept(self) -> bool:
        """A pairing request from the peer is accepted (the questions come after)."""
        return True

    async def confirm(self, auto: bool = False) -> bool:
        """Just Works: the kernel accepts a locally started one unless policy asks the agent."""
        del auto  # bumble asks this for every Just Works pairing, with auto left False
        if not self._policy.ask_agent_for_just_works:
            return True
        return await self._ask("RequestAuthorization", "o", [self._device_path]) is not None

    async def compare_numbers(self, number: int, digits: int) -> bool:
        """Numeric comparison: the agent confirms the six digits or the pairing fails."""
        del digits
        return await self._ask("RequestConfirmation", "ou", [self._device_path, number]) is not None

    async def get_number(self) -> int | None:
        """Passkey entry on the hub's side: the agent types what the device shows."""
        reply = await self._ask("RequestPasskey", "o", [self._device_path])
        return int(reply.body[0]) if reply is not None else None

    async def display_number(self, number: int, digits: int) -> None:
        """Passkey display: the agent shows what to type on the device."""
        del digits
        await self._ask("DisplayPasskey", "ouq", [self._device_path, number, 0])


def delegate_factory(
    bus: MessageBus,
    agent: Callable[[], RegisteredAgent | None],
    bluez_policy: policy.BluezPolicy,
) -> Callable[[str, AgentOutcome], AgentDelegate]:
    """A maker of delegates for a device path, bound to whichever agent is default then."""

    def make(device_path: str, outcome: AgentOutcome) -> AgentDelegate:
        return AgentDelegate(bus, agent(), device_path, bluez_policy, outcome)

    return make
