"""Which devices this hub may read and which patient each belongs to (the allowlist)."""

from __future__ import annotations

from collections.abc import Iterable

from gateway.config import DeviceBinding


class Pairings:
    """Default deny: a device not bound to a patient here is never read or published."""

    def __init__(self, bindings: Iterable[DeviceBinding]) -> None:
        self._by_address = {b.address.upper(): b for b in bindings}

    def lookup(self, address: str) -> DeviceBinding | None:
        """The binding for an address, None for anyone else's device."""
        return self._by_address.get(address.upper())

    def addresses(self) -> set[str]:
        """Every bound device's address (upper case)."""
        return set(self._by_address)

    def __len__(self) -> int:
        return len(self._by_address)
