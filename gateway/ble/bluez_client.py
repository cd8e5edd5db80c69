"""bleak's BlueZ client, with the gateway's pairing agent standing by while it pairs.

bleak's BlueZ backend calls ``Device1.Pair`` but registers no agent, so whichever agent
happens to be default (a desktop's, bluetoothctl's, or none) would answer the pairing's
questions. Here our own agent is registered as default for exactly the duration of the pairing
and answers only for the device being paired.
"""

from __future__ import annotations

from typing import Any

from bleak import BleakClient

from gateway.ble.bluez_agent import PairingAgent, device_path


class AgentBleakClient(BleakClient):
    """A BleakClient whose `pair()` runs under the gateway's Agent1 (see the module doc)."""

    def __init__(self, *args: Any, adapter: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._agent_adapter = adapter or "hci0"

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        """Pair (and bond) with the device, answering only its own pairing questions."""
        async with PairingAgent() as agent:
            with agent.expect(device_path(self.address, self._agent_adapter)):
                await super().pair(*args, **kwargs)
