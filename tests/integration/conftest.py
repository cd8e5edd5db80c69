"""Fixtures for the integration tests: the virtual radio, broker credentials."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.sim.radio import VirtualRadio


@pytest.fixture
async def radio() -> AsyncIterator[VirtualRadio]:
    """A fresh virtual radio per test (bonds live in its key store)."""
    async with VirtualRadio() as r:
        yield r


@pytest.fixture
def broker_passwords(tmp_path: Path) -> Path:
    """A mosquitto password file with user hub-1."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.fail("mosquitto_passwd (package mosquitto) is needed to make a password file")
    passwords = tmp_path / "passwd"
    subprocess.run([tool, "-c", "-b", str(passwords), "hub-1", "s3cret-pw"], check=True)
    return passwords
