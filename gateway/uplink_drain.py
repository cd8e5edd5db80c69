"""Draining the outbox on one connection: readings in seq order, a bounded window in flight, the
next rows fetched while the window is out, and the PUBACK'd seqs marked delivered in batches.

Why it is shaped so (issue 8): the outbox has one thread. A drain that fetched one window and
then waited for it ran in lock-step with the fsync'd COMMIT of the previous marks, and the event
loop sat idle a sixth of the time. Here the next rows are asked for as soon as a batch arrives
(``FETCH_ROWS`` at a time, a query every several windows instead of every window), and marks are
written by one writer that lets acknowledged seqs gather for ``MARK_GATHER_S`` and marks them
all in one transaction: a 20,000-reading backlog took 679 fsync'd mark transactions without the
gathering, which kept the outbox thread busy the whole drain and the fetches waiting behind
them, and 22 with it (bench/drain.py: 2.6 s -> 1.7 s). A seq whose PUBACK has not arrived with
a success code is never marked. The price: a reading the broker took before a `kill -9` but
whose mark had not committed (the gathering, the commit, and any wait on the outbox thread:
at most ``MAX_UNMARKED`` plus two windows of readings) is sent again after the restart, a
duplicate (same reading_id), never a loss.

There is no task, semaphore or timer per reading: a PUBACK is handled in paho's callback (on the
event loop), and one watchdog ends the connection when the oldest unanswered reading has waited
``publish_timeout_s``. A refusal is handled by its own task: permanent ones are quarantined (the
drain goes on behind them), a transient one ends the connection (the reading stays pending).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from paho.mqtt.reasoncodes import ReasonCode

from gateway.outbox import Outbox, OutboxError, Pending
from gateway.uplink_client import MqttLink, publish_packet_size
from gateway.uplink_codes import describe, is_transient
from gateway.uplink_errors import PublishRejectedError, PublishTimeoutError
from gateway.uplink_quarantine import QuarantineBook

# One logger for the whole uplink: its records are what the technician and the tests read.
log = logging.getLogger("gateway.uplink")

FETCH_ROWS = 200
"""Rows asked of the outbox at a time (at least one window): ~200 KB of typical readings."""


MARK_GATHER_S = 0.05
"""How long the mark writer lets acknowledged seqs gather before one transaction marks them."""

MAX_UNMARKED = 1000
"""Acknowledged seqs allowed to wait for their mark: at this many the drain marks them before
it sends more. It bounds what a kill -9 sends again (at most this plus two windows) however
slow the outbox thread. Above the ~900 a 50 ms gathering collects at full speed on this
machine, so a healthy drain never waits for it (500 cost bench/drain 5-10%)."""



@dataclass(slots=True)
class DrainCounts:
    """Counts since the uplink was created (kept across connections)."""

    published: int = 0  # reading PUBLISH packets sent, re-sends included
    acked: int = 0  # readings the broker acknowledged with a success code
    rejected: int = 0  # reading PUBLISHes the broker refused (PUBACK with a failure code)


@dataclass(slots=True)
class AckBook:
    """Seqs the broker acknowledged and not yet marked delivered; one writer marks them in batches.

    Kept across connections: what a connection's PUBACKs took is marked even if that connection
    (or the agent) is going away. A seq leaves the list only after its UPDATE committed.
    """

    outbox: Outbox
    seqs: list[int] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    transactions: int = 0
    # One flush at a time (the writer, the drain going idle, the session's end): a second one
    # waits and marks only what the first did not take, instead of marking the same seqs twice.
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def add(self, seq: int) -> None:
        """A PUBACK with a success code arrived for this seq."""
        self.seqs.append(seq)
        self.ready.set()

    async def writer(self) -> None:
        """Mark acknowledged seqs until cancelled: one transaction for all that arrived meanwhile."""
        while True:
            await self.ready.wait()
            # Let a burst of PUBACKs gather: one fsync'd transaction for a backlog's many
            # windows, and the outbox thread free for the drain's next fetch meanwhile.
            await asyncio.sleep(MARK_GATHER_S)
            self.ready.clear()
            await self.flush()

    async def flush(self) -> None:
        """Mark every seq acknowledged so far (one transaction)."""
        async with self._lock:
            seqs = list(self.seqs)
            if not seqs:
                return
            try:
                await self.outbox.mark_delivered(seqs)
                self.transactions += 1
            except OutboxError as e:
                # They stay pending and are sent again: a duplicate (same reading_id), not a loss.
                log.error("uplink: could not mark %d reading(s) delivered: %s", len(seqs), e)
            del self.seqs[: len(seqs)]


@dataclass(slots=True)
class _InFlight:
    item: Pending
    sent_at: float
    answered: bool = False  # a refusal arrived; it is being handled


SetAside = Callable[[Pending, str], Awaitable[None]]


class Drain:
    """The outbox's readings on one connection; ``run`` raises when the connection must end."""

    def __init__(
        self,
        link: MqttLink,
        outbox: Outbox,
        *,
        topic: Callable[[str], str],
        inflight: int,
        publish_timeout_s: float,
        counts: DrainCounts,
        acks: AckBook,
        quarantine: QuarantineBook,
        set_aside: SetAside,
    ) -> None:
        self._link = link
        self._outbox = outbox
        self._topic = topic
        self._window = inflight
        self._timeout_s = publish_timeout_s
        self._counts = counts
        self._acks = acks
        self._quarantine = quarantine
        self._set_aside = set_aside
        self._flight: dict[int, _InFlight] = {}  # by seq, in the order sent
        self._room = asyncio.Event()  # the window has a free slot
        self._settled = asyncio.Event()  # nothing in flight, no refusal being handled
        self._settled.set()
        self._refused: deque[tuple[Pending, ReasonCode]] = deque()
        self._refused_ready = asyncio.Event()

    async def run(self, tg: asyncio.TaskGroup) -> None:
        """Send until the connection ends (raises); the watchdog and refusals run in ``tg``."""
        tg.create_task(self._watchdog(), name="uplink watchdog")
        tg.create_task(self._refusals(), name="uplink refusals")
        cursor = 0
        ahead: asyncio.Task[list[Pending]] | None = None
        try:
            while True:
                if ahead is not None:
                    batch, ahead = await ahead, None
                else:
                    batch = await self._outbox.pending(FETCH_ROWS, after_seq=cursor)
                if not batch:
                    if await self._idle():
                        cursor = 0  # quarantined readings are due again: back to the lowest seq
                    continue
                cursor = batch[-1].seq
                if len(batch) == FETCH_ROWS:
                    # The next rows come off the outbox thread while this batch goes out.
                    ahead = asyncio.ensure_future(
                        self._outbox.pending(FETCH_ROWS, after_seq=cursor))
                for item in batch:
                    while len(self._flight) >= self._window:
                        self._room.clear()
                        await self._room.wait()
                    if len(self._acks.seqs) >= MAX_UNMARKED:
                        await self._acks.flush()
                    await self._send(item)
        finally:
            if ahead is not None:
                ahead.cancel()
                with contextlib.suppress(asyncio.CancelledError, OutboxError):
                    await ahead

    async def _send(self, item: Pending) -> None:
        topic = self._topic(item.topic)
        if not self._link.fits(topic, item.payload):
            # The broker would drop the connection on it, and it would block the queue for
            # ever: set it aside without sending it.
            size = publish_packet_size(topic, item.payload)
            await self._set_aside(item, f"packet too large: {size} bytes, the broker takes at "
                                  f"most {self._link.max_packet_size}")
            return
        self._counts.published += 1
        log.debug("uplink: publishing seq %d reading %s", item.seq, item.reading_id)
        self._flight[item.seq] = _InFlight(item, time.monotonic())
        self._settled.clear()
        # Runs from the PUBACK itself, so a shutdown that ends this drain still marks what the
        # broker took (the goodbye's own PUBACK comes after these).
        self._link.send(topic, item.payload, on_ack=functools.partial(self._on_ack, item.seq))

    def _on_ack(self, seq: int, rc: ReasonCode) -> None:
        entry = self._flight.get(seq)
        if entry is None:
            return
        if rc.is_failure:
            self._counts.rejected += 1
            entry.answered = True
            self._refused.append((entry.item, rc))
            self._refused_ready.set()
            return
        self._counts.acked += 1
        self._acks.add(seq)
        self._release(seq)

    def _release(self, seq: int) -> None:
        del self._flight[seq]
        self._room.set()
        if not self._flight:
            self._settled.set()

    async def _refusals(self) -> None:
        while True:
            await self._refused_ready.wait()
            self._refused_ready.clear()
            while self._refused:
                item, rc = self._refused.popleft()
                if is_transient(rc):
                    # Kept pending and retried after a reconnect with backoff.
                    raise PublishRejectedError(
                        f"broker refused reading seq {item.seq} for now ({describe(rc)}); "
                        "it stays queued"
                    )
                await self._set_aside(item, f"broker refused it: {describe(rc)}")
                self._release(item.seq)

    async def _watchdog(self) -> None:
        # One timer for the whole window: the oldest unanswered reading bounds the wait.
        while True:
            now = time.monotonic()
            oldest = next((f for f in self._flight.values() if not f.answered), None)
            if oldest is None:
                await asyncio.sleep(self._timeout_s)
                continue
            left = oldest.sent_at + self._timeout_s - now
            if left <= 0:
                raise PublishTimeoutError(
                    f"no PUBACK within {self._timeout_s}s on {self._topic(oldest.item.topic)}"
                )
            await asyncio.sleep(left)

    async def _idle(self) -> bool:
        """Wait for a new reading, or for quarantined ones to be due: True for the latter."""
        # The cursor has moved past a quarantined reading; without this it would be offered
        # again only after the next reconnect, which a healthy connection may never need.
        self._quarantine.changed.clear()
        delay = self._quarantine.due_in()
        if delay > 0:
            await self._wait_for_work(delay)
            return False
        # Start over only with nothing in flight and every PUBACK written, so readings the
        # broker has just taken are not offered again.
        await self._settled.wait()
        await self._acks.flush()
        self._quarantine.swept()
        return True

    async def _wait_for_work(self, timeout: float | None) -> None:
        # A new reading, or a reading quarantined meanwhile (its due time is the new deadline).
        waits = {
            asyncio.ensure_future(self._outbox.wait_for_pending()),
            asyncio.ensure_future(self._quarantine.changed.wait()),
        }
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
