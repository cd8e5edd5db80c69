"""The outbox under real faults: SIGKILL mid-stream, and a full disk."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import OutboxConfig
from gateway.outbox import Outbox, OutboxError, OutboxFullError, PutResult
from tests.conftest import make_item

REPO = Path(__file__).resolve().parents[2]

# The child stores readings as fast as it can and prints each id only after put() returned,
# i.e. after the COMMIT: every printed id is a promise that the reading is on disk.
CHILD = """
import asyncio, sys
from pathlib import Path
from gateway.config import OutboxConfig
from gateway.outbox import Outbox
from tests.conftest import make_item

async def main() -> None:
    async with Outbox(Path(sys.argv[1]), OutboxConfig()) as ob:
        n = int(sys.argv[2])
        while True:
            await ob.put(make_item(n))
            sys.stdout.write(make_item(n).reading_id + "\\n")
            sys.stdout.flush()
            n += 1

asyncio.run(main())
"""


async def _run_and_kill(
    db: Path, start: int, kill_after: int, *, commit_delay_ms: int = 0
) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if commit_delay_ms:
        env["RPM_GATEWAY_FAULT_COMMIT_DELAY_MS"] = str(commit_delay_ms)  # a slow SD card
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(db), str(start),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    printed: list[str] = []
    try:
        async with asyncio.timeout(10):
            while len(printed) < kill_after:
                line = await proc.stdout.readline()
                if not line:
                    err = await proc.stderr.read() if proc.stderr else b""
                    pytest.fail(f"child exited early: {err.decode(errors='replace')[-2000:]}")
                printed.append(line.decode().strip())
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-put, most likely: no clean shutdown of any kind
        rest, _ = await proc.communicate()
    # Lines already in the pipe were printed after their put() returned too; a torn last line
    # (no newline) was not fully printed, so it promised nothing.
    printed += [ln for ln in rest.decode().split("\n")[:-1] if ln]
    assert proc.returncode == -signal.SIGKILL
    return printed


async def test_sigkill_mid_stream_loses_no_committed_reading(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    promised: list[str] = []
    start = 0
    for kill_after in (40, 113, 257):  # three crashes into the same file, WAL recovered each time
        printed = await _run_and_kill(db, start, kill_after)
        promised += printed
        start += len(printed) + 1  # the child may have committed one more it never printed
        async with Outbox(db, OutboxConfig()) as ob:
            stored = [p.reading_id for p in await ob.pending(100_000)]
        missing = set(promised) - set(stored)
        assert not missing, f"{len(missing)} committed reading(s) lost after SIGKILL: {missing}"
        ordered = [r for r in stored if r in set(promised)]
        assert ordered == promised  # seq order is put order
    assert len(promised) >= 40 + 113 + 257


async def test_sigkill_with_a_slow_disk_loses_no_committed_reading(tmp_path: Path) -> None:
    # With a 40 ms commit most kills land inside a commit: what was promised is still there,
    # and the reading whose commit was cut is either fully stored or not at all.
    db = tmp_path / "outbox.db"
    promised: list[str] = []
    start = 0
    for kill_after in (7, 19):
        loop = asyncio.get_running_loop()
        began = loop.time()
        printed = await _run_and_kill(db, start, kill_after, commit_delay_ms=40)
        assert loop.time() - began >= kill_after * 0.04  # the delay reached the child
        promised += printed
        start += len(printed) + 1
        async with Outbox(db, OutboxConfig()) as ob:
            assert ob.recovery is None
            stored = [p.reading_id for p in await ob.pending(100_000)]
        assert set(promised) <= set(stored)
        assert len(stored) - len(promised) <= 2  # at most the cut commit of each kill


@contextlib.contextmanager
def _no_mount(tmp_path: Path) -> Iterator[bool]:
    (tmp_path / "tiny").mkdir()
    yield False


@contextlib.contextmanager
def _tiny_tmpfs(where: Path, size: str) -> Iterator[bool]:
    """Mount a small tmpfs at ``where`` if we may (root); yields whether it is mounted."""
    where.mkdir()
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if os.geteuid() != 0 or mount is None or umount is None:
        yield False
        return
    r = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True, check=False,
    )  # fmt: skip
    if r.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run([umount, "-l", str(where)], check=False)


@pytest.mark.parametrize("fs", ["tmpfs", "page-limit"])
async def test_disk_full_raises_clear_error_keeps_rows_and_recovers(tmp_path: Path, fs: str) -> None:
    # "tmpfs" is a real ENOSPC on a 1 MiB filesystem when we may mount one (root); otherwise, and
    # always for "page-limit", SQLite's max_page_count raises the same SQLITE_FULL.
    with _tiny_tmpfs(tmp_path / "tiny", "1m") if fs == "tmpfs" else _no_mount(tmp_path) as real_fs:
        db = tmp_path / "tiny" / "outbox.db"
        filler = tmp_path / "tiny" / "filler"
        async with Outbox(db, OutboxConfig()) as ob:
            if real_fs:
                # Leave ~192 KiB free: room for a few readings, then ENOSPC for real.
                st = os.statvfs(db.parent)
                filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - 192 * 1024))
            else:
                # Not root / no tmpfs: SQLite's own size cap gives the same SQLITE_FULL error.
                await ob._run(lambda conn: conn.execute("PRAGMA max_page_count = 60"))
            stored: list[str] = []
            with pytest.raises(OutboxFullError) as failure:
                for n in range(1000):
                    assert await ob.put(make_item(n, extra=b" " * 4000)) is PutResult.STORED
                    stored.append(make_item(n).reading_id)
            assert isinstance(failure.value, OutboxError)
            assert "full" in str(failure.value)
            assert len(stored) >= 3
            # Everything committed before the failure is intact and still in order.
            assert [p.reading_id for p in await ob.pending(10_000)] == stored
            # The failed reading was not stored: a retry is a real store, not a DUPLICATE.
            if real_fs:
                filler.unlink()
            else:
                await ob._run(lambda conn: conn.execute("PRAGMA max_page_count = 1000000"))
            assert await ob.put(make_item(len(stored), extra=b" " * 4000)) is PutResult.STORED
            assert len(await ob.pending(10_000)) == len(stored) + 1
        async with Outbox(db, OutboxConfig()) as ob:
            assert len(await ob.pending(10_000)) == len(stored) + 1
