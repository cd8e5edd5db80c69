"""When each binding was first seen: the anchor of its 30-day billing periods (gateway.days).

A binding provisioned in the config may say `enrolled = YYYY-MM-DD`; otherwise the hub records
the local day it first ran with the binding, in ``<data_dir>/enrolment.json``, written
atomically (temporary file, fsync, rename, fsync of the directory): a crash mid-write leaves
the old file or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from gateway.config import DeviceBinding

log = logging.getLogger(__name__)

FILENAME = "enrolment.json"


class EnrolmentStore:
    """First-seen days per device address; a missing or unreadable file starts empty."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._first_seen: dict[str, dt.date] = {}
        self._dirty = False  # days in memory not yet on disk
        self._failing = False  # the last write failed (warned once)
        self._load()

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            seen = doc["first_seen"]
            self._first_seen = {str(a).upper(): dt.date.fromisoformat(d) for a, d in seen.items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            # Kept aside, not overwritten: it is the evidence of when monitoring started.
            aside = self.path.with_suffix(".json.unreadable")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            log.warning("enrolment dates in %s unreadable (%s); moved to %s, starting afresh",
                        self.path, type(e).__name__, aside.name)

    def first_seen(self, address: str) -> dt.date | None:
        """The recorded first day for `address`, if any."""
        return self._first_seen.get(address.upper())

    def ensure(self, addresses: Iterable[str], today: dt.date) -> bool:
        """Record `today` for every address without a day; True once it is on disk.

        A write that fails (disk full, read-only) is logged and retried at the next call; the
        day is kept in memory meanwhile.
        """
        new = {a.upper() for a in addresses} - set(self._first_seen)
        for address in new:
            self._first_seen[address] = today
        self._dirty = self._dirty or bool(new) or not self.path.exists()
        if not self._dirty:
            return True
        try:
            self._write()
        except OSError as e:
            # Once per failure streak: on a full disk this is retried every housekeeping round.
            (log.debug if self._failing else log.warning)(
                "could not record enrolment dates in %s: %s", self.path, e)
            self._failing = True
            return False
        if self._failing:
            log.info("enrolment dates recorded in %s", self.path)
        self._dirty = self._failing = False
        return True

    def _write(self) -> None:
        doc = {"version": 1,
               "first_seen": {a: d.isoformat() for a, d in sorted(self._first_seen.items())}}
        directory = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=".enrolment-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def enrolled_on(binding: DeviceBinding, store: EnrolmentStore, today: dt.date) -> dt.date:
    """The binding's enrolment day: configured, else first seen, else today."""
    return binding.enrolled or store.first_seen(binding.address) or today
