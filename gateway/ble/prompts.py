"""Who answers a pairing's questions: set by `rpm-gateway pair` around the bond, read by the
radio's pairing agent (gateway.ble.bluez_client). A context variable, so a pairing started by
the agent's own sessions (a device that asks for encryption) never reaches a technician's prompt.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Iterator

PasskeySource = Callable[[], Awaitable[int | None]]
"""Asks for the six digits the device shows (None: nobody typed them)."""
PasskeyShow = Callable[[int], None]
"""Told the six digits when the hub must show them and the device is the one that types."""

_PROMPTS: contextvars.ContextVar[tuple[PasskeySource | None, PasskeyShow | None]] = (
    contextvars.ContextVar("pairing_prompts", default=(None, None)))


@contextlib.contextmanager
def pairing_prompts(passkey: PasskeySource | None, show: PasskeyShow | None) -> Iterator[None]:
    """Let pairings made inside (this task and its children) ask `passkey` and tell `show`."""
    token = _PROMPTS.set((passkey, show))
    try:
        yield
    finally:
        _PROMPTS.reset(token)


def current() -> tuple[PasskeySource | None, PasskeyShow | None]:
    """The prompts of the pairing under way in this context, if any."""
    return _PROMPTS.get()
