"""bleak's BlueZ client, with the gateway's pairing agent standing by while it pairs.

bleak's BlueZ backend calls ``Device1.Pair`` but registers no agent, so whichever agent
happens to be default (a desktop's, bluetoothctl's, or none) would answer the pairing's
questions. Here our own agent is registered as default for exactly the duration of the pairing
and answers only for the device being paired.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from bleak import BleakClient
from bleak.exc import BleakError

from gateway.ble import prompts
from gateway.ble.bluez_agent import (
    DEFAULT_CAPABILITY,
    AgentRegistrationError,
    PairingAgent,
    device_path,
)

# One pairing at a time per event loop: bluetoothd asks only the newest default agent, and
# ours answers only for its own device, so two at once would refuse each other's questions.
_PAIRING_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary())


def _pairing_lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _PAIRING_LOCKS.get(loop)
    if lock is None:
        lock = _PAIRING_LOCKS[loop] = asyncio.Lock()
    return lock


class AgentBleakClient(BleakClient):
    """A BleakClient whose `pair()` runs under the gateway's Agent1 (see the module doc)."""

    def __init__(self, *args: Any, adapter: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._agent_adapter = adapter or "hci0"

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        """Pair (and bond) with the device, answering only its own pairing questions."""
        passkey, show = prompts.current()
        # A technician at the keyboard (rpm-gateway pair) can type the digits a glucometer
        # shows: KeyboardDisplay makes SMP choose passkey entry for a display-only device,
        # where DisplayYesNo would fall back to Just Works, which such a device refuses.
        capability = "KeyboardDisplay" if passkey is not None else DEFAULT_CAPABILITY
        async with _pairing_lock():
            try:
                async with PairingAgent(capability=capability) as agent:
                    with agent.expect(device_path(self.address, self._agent_adapter),
                                      passkey=passkey, show=show):
                        await super().pair(*args, **kwargs)
            except AgentRegistrationError as e:
                # A session error like the others (bluetoothd refused or is gone), not a bug.
                raise BleakError(f"pairing agent not registered: {e}") from e
