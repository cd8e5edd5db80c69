"""The hub's controller served over HCI-over-TCP, so the agent can run in another process.

The agent's hub host connects with bumble's ``tcp-client:`` transport (``VirtualRadio(hci=...)``)
and speaks plain H4-framed HCI. Unlike bumble's own ``tcp-server:`` transport, which keeps one
packet parser and one controller for every client that ever connects, each connection here gets
a fresh controller and parser: an agent killed mid-packet leaves no half packet behind, and the
next agent starts from a power-on state (bumble's HCI Reset changes nothing in the controller).
When a connection ends, every link its controller held is dropped, so the peripherals see the
hub vanish as a real central's supervision timeout looks, keep their unconfirmed records, and
advertise again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from bumble import hci
from bumble.link import LocalLink
from bumble.transport.common import PacketParser

from gateway.sim.radio import _HubController

log = logging.getLogger(__name__)


class _Session(asyncio.Protocol):
    """One agent connection: its own controller on the shared link, until the socket closes."""

    def __init__(self, server: HubControllerServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._controller: _HubController | None = None
        self._parser: PacketParser | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """A hub host connected: give it a controller of its own on the link."""
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._controller = _HubController("rpm-gateway hub", link=self._server.link)
        self._controller.rssi_of = self._server.rssi_of
        self._controller.host = self  # we are its packet sink
        self._parser = PacketParser(self._controller)
        self._server._opened(self)

    def on_packet(self, packet: bytes) -> None:
        """Controller to host: one HCI packet onto the socket (dropped once it is closing)."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(packet)

    def data_received(self, data: bytes) -> None:
        """Host to controller: bytes of H4-framed HCI packets."""
        if self._parser is None:
            return
        try:
            self._parser.feed_data(data)
        except Exception:  # a garbled stream: this host is broken, let the next one in
            log.warning("hub host sent an invalid HCI stream; dropping it")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        """The hub host is gone (killed, closed): its links drop with it."""
        self.release()

    def release(self) -> None:
        """Drop every link the controller held and take it off the link (idempotent)."""
        controller, self._controller = self._controller, None
        self._parser = None
        if controller is not None:
            links = len(controller.le_connections)
            controller.release()
            log.info("hub host disconnected; dropped %d link(s)", links)
            self._server._closed(self)

    def close(self) -> None:
        """Hang up on this host (its controller is released at once)."""
        self.release()
        if self._transport is not None:
            self._transport.close()


class HubControllerServer:
    """Serves a fresh hub controller on `link` to each TCP client in turn; one at a time."""

    def __init__(
        self,
        link: LocalLink,
        on_change: Callable[[bool], None] | None = None,
        rssi_of: Callable[[hci.Address], int | None] | None = None,
    ) -> None:
        self.link = link
        self.rssi_of = rssi_of
        """The RSSI the hub's controller reports per advertiser (None: bumble's -50 dBm)."""
        self.sessions = 0
        """How many hub hosts have connected so far."""
        self._on_change = on_change
        self._current: _Session | None = None
        self._server: asyncio.Server | None = None

    @property
    def connected(self) -> bool:
        """True while a hub host is connected."""
        return self._current is not None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on host:port (0: any free port); returns the address actually bound."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Session(self), host, port)
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def close(self) -> None:
        """Stop listening and hang up on the current host."""
        if self._current is not None:
            self._current.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            self._server = None

    def _opened(self, session: _Session) -> None:
        """A new host took over; an older one (half-open socket) is hung up on."""
        old, self._current = self._current, session
        if old is not None:
            log.warning("a second hub host connected; dropping the first")
            old.close()
        self.sessions += 1
        log.info("hub host connected (session %d)", self.sessions)
        if self._on_change is not None:
            self._on_change(True)

    def _closed(self, session: _Session) -> None:
        """Forget a session that ended."""
        if self._current is session:
            self._current = None
            if self._on_change is not None:
                self._on_change(False)
