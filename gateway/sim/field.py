"""Simulated devices on a link of their own, with the hub's controller served to another process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Self, TypeVar

from bumble import hci
from bumble.link import LocalLink

from gateway.sim.hci_server import HubControllerServer
from gateway.sim.radio import DEFAULT_OP_TIMEOUT_S, Peripheral

_P = TypeVar("_P", bound=Peripheral)


class DeviceField:
    """The devices' side of a split virtual radio: an async context manager (see Medium).

    ``async with DeviceField() as field:`` then ``await field.add_peripheral(device)`` and
    ``await field.serve(host, port)``; an agent with ``radio.link = "tcp:HOST:PORT"`` then
    drives the hub's controller on this link from its own process.
    """

    def __init__(
        self,
        *,
        op_timeout: float = DEFAULT_OP_TIMEOUT_S,
        on_hub_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._op_timeout = op_timeout
        self._on_hub_change = on_hub_change
        self._link: LocalLink | None = None
        self._server: HubControllerServer | None = None
        self._peripherals: dict[str, Peripheral] = {}

    async def __aenter__(self) -> Self:
        """Create the link; must run inside the loop that will use it."""
        self._link = LocalLink()  # type: ignore[no-untyped-call]  # bumble left it unannotated
        self._server = HubControllerServer(self._link, self._on_hub_change, self._rssi_of)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Hang up on the hub, then switch every device off."""
        if self._server is not None:
            await self._server.close()
        for peripheral in list(self._peripherals.values()):
            self._peripherals.pop(peripheral.address.upper(), None)
            async with asyncio.timeout(self._op_timeout):
                await peripheral.detach()

    def _rssi_of(self, address: hci.Address) -> int | None:
        """The scripted signal strength of the device advertising from `address`."""
        peripheral = self._peripherals.get(address.to_string(with_type_qualifier=False))
        return peripheral.rssi if peripheral is not None else None

    @property
    def link(self) -> LocalLink:
        """The shared link (Medium)."""
        if self._link is None:
            raise RuntimeError("DeviceField is not entered: use `async with DeviceField()`")
        return self._link

    @property
    def op_timeout(self) -> float:
        """Upper bound for one radio operation (Medium)."""
        return self._op_timeout

    @property
    def server(self) -> HubControllerServer:
        """The hub controller's HCI server."""
        if self._server is None:
            raise RuntimeError("DeviceField is not entered: use `async with DeviceField()`")
        return self._server

    @property
    def peripherals(self) -> Mapping[str, Peripheral]:
        """The devices switched on, by address."""
        return dict(self._peripherals)

    async def add_peripheral(self, peripheral: _P) -> _P:
        """Switch a device on; returns it for chaining."""
        address = peripheral.address.upper()
        if address in self._peripherals:
            raise ValueError(f"address {address} is already on this field")
        async with asyncio.timeout(self._op_timeout):
            await peripheral.attach(self)
        self._peripherals[address] = peripheral
        return peripheral

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Serve the hub's controller on host:port (0: a free port); the bound address."""
        return await self.server.start(host, port)
