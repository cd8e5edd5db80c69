"""A loopback TCP proxy of the test's own: cut, refuse, black-hole or freeze a live link."""

from __future__ import annotations

import asyncio
import socket


def hold_port() -> socket.socket:
    """A loopback TCP port held for a server that comes and goes: bound, never listening.

    While held, connections to it are refused (RST) and no outgoing connection is given it as its
    ephemeral port; a server with SO_REUSEADDR (asyncio's, mosquitto's) can still bind and listen
    on it. Without the hold, a port released during an outage can be taken by another socket.
    """
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


class TcpProxy:
    """A loopback TCP proxy that can cut live connections and refuse new ones (a network fault)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.host = "127.0.0.1"
        self._hold = hold_port()
        self.port = int(self._hold.getsockname()[1])
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._stalled: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Cleared by freeze(): nothing is read or written, nothing is closed (a frozen network).
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.connections = 0

    @property
    def listening(self) -> bool:
        """Whether new connections are accepted."""
        return self._server is not None

    @property
    def frozen(self) -> bool:
        """Whether forwarding is stopped by freeze()."""
        return not self._flowing.is_set()

    async def start(self) -> None:
        """Listen (again) on the same port."""
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True
        )

    async def stop_listening(self) -> None:
        """Refuse new connections (existing ones stay up)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def stall(self) -> None:
        """Silently discard all further traffic on the live connections (a black-holed link)."""
        self._stalled |= self._writers

    def freeze(self) -> None:
        """Stop forwarding in both directions without closing anything; new connections hang too.

        Bytes are held, not dropped (TCP would retransmit them on a real link), so thaw() resumes
        every connection intact.
        """
        self._flowing.clear()

    def thaw(self) -> None:
        """Resume forwarding after freeze()."""
        self._flowing.set()

    def sever(self) -> None:
        """Cut every live connection abruptly, as a dead network link would."""
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        """Stop listening, cut connections and stop the copy tasks."""
        await self.stop_listening()
        self.thaw()
        self.sever()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._hold.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await src.read(65536)
                if not data:
                    break
                # Read before the freeze, written after it: held, never lost.
                await self._flowing.wait()
                if dst in self._stalled:
                    continue
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.transport.abort()
            self._writers.discard(dst)
