"""Fixtures for the integration tests that use the virtual radio."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.sim.radio import VirtualRadio


@pytest.fixture
async def radio() -> AsyncIterator[VirtualRadio]:
    """A fresh virtual radio per test (bonds live in its key store)."""
    async with VirtualRadio() as r:
        yield r
