"""Which devices this hub may read and which patient each belongs to: the allowlist (default deny).

Two sources, one view (`Pairings`): bindings provisioned in the config file, and bindings a
technician made with `rpm-gateway pair`, kept in the pairing registry ``<data_dir>/pairings.json``.
The registry also records the day the hub first ran with each binding (the anchor of its 30-day
billing periods when the config gives no `enrolled` date).

The registry is written atomically (temporary file, fsync, rename, fsync of the directory) under
an exclusive lock, re-reading the file first: the agent and a CLI that works alone never undo
each other's change, and a crash mid-write leaves the old file or the new one. A running agent
notices a change by the file's identity (inode, size, mtime) and picks it up without a restart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from gateway.config import DeviceBinding

log = logging.getLogger(__name__)

FILENAME = "pairings.json"
# Written by the release before the registry held them; read once, never written again.
LEGACY_ENROLMENT_FILE = "enrolment.json"
VERSION = 1
# A change waits this long for another process's change to the file to finish.
LOCK_TIMEOUT_S = 5.0

Source = Literal["config", "registry"]
# What a device's status shows from its pairing until a session of the agent's says better.
FILLED_FROM_PAIRING = ("kind", "model", "serial", "battery_level", "clock_offset_s")


class RegistryError(Exception):
    """The registry could not be written; the message says where and why."""


class _Unavailable(Exception):
    """The file cannot be used now: unreadable (EIO, EACCES: contents unknown) or locked."""


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    """A binding made with `pair`, and who made it when."""

    binding: DeviceBinding
    paired_at: str  # UTC, ...Z
    paired_by: str | None = None
    # What `pair` learnt of the device (manufacturer, model, serial, firmware, kind, driver):
    # `devices` shows it while the agent has not connected yet.
    device: Mapping[str, str | int | float | None] = dataclasses.field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        """The entry as stored in the file."""
        b = self.binding
        return {"address": b.address, "patient_id": b.patient_id, "user_index": b.user_index,
                "driver": b.driver, "enrolled": b.enrolled.isoformat() if b.enrolled else None,
                "paired_at": self.paired_at, "paired_by": self.paired_by,
                "device": dict(self.device)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RegistryEntry:
        """An entry from the file; raises ValueError/KeyError/ValidationError when malformed."""
        binding = DeviceBinding.model_validate(
            {k: doc[k] for k in ("address", "patient_id", "user_index", "driver", "enrolled")
             if doc.get(k) is not None})
        device = doc.get("device") or {}
        if not isinstance(device, dict):
            raise TypeError("device is not an object")
        return cls(binding, str(doc["paired_at"]), doc.get("paired_by"),
                   {str(k): v if v is None or isinstance(v, int | float) else str(v)
                    for k, v in device.items()})


@dataclasses.dataclass(frozen=True)
class Bound:
    """One entry of the allowlist with where it comes from."""

    binding: DeviceBinding
    source: Source
    entry: RegistryEntry | None = None  # the registry's record, for a binding made with `pair`

    def fill(self, status: Mapping[str, object]) -> dict[str, object]:
        """A device's status entry with whose it is, and what `pair` learnt of the device where
        no session has told yet (kind, model, serial; battery and clock drift at pairing)."""
        known = self.entry.device if self.entry is not None else {}
        out = {**status, "patient_id": self.binding.patient_id, "source": self.source}
        for key in FILLED_FROM_PAIRING:
            if out.get(key) is None:
                out[key] = known.get(key)
        return out


class PairingRegistry:
    """The registry file: bindings made with `pair`, and first-seen days of every binding.

    A missing file is an empty registry. An unreadable one is moved aside (it is the evidence
    of who was bound) and the registry starts empty: default deny, never a guess.
    """

    def __init__(self, path: Path, *, legacy_enrolment: Path | None = None) -> None:
        self.path = path
        self._legacy = legacy_enrolment
        self._entries: dict[str, RegistryEntry] = {}
        self._first_seen: dict[str, dt.date] = {}
        # Events (paired, unpaired, re-bound) not yet handed to a running agent's uplink.
        self._events: list[dict[str, object]] = []
        self._identity: tuple[int, int, int] | None = None
        self._dirty = False  # first-seen days in memory not yet on disk
        self._failing = False  # the last write of first-seen days failed (warned once)
        self.problem: str | None = None  # why the file could not be read, if it could not
        self.load()

    # -- reading ------------------------------------------------------------------------------

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def changed_on_disk(self) -> bool:
        """Whether the file is not the one last read or written here (cheap: one stat)."""
        return self._stat() != self._identity

    def load(self) -> None:
        """(Re)read the file; on a read error the last good state is kept and retried later."""
        identity = self._stat()
        try:
            self._entries, self._first_seen, self._events, self.problem = self._read()
        except _Unavailable as e:
            # Not "empty": an empty registry written back would forget every binding.
            self.problem = str(e)
            self._identity = None  # looked at again at the next refresh
            return
        self._identity = identity
        if identity is None and self._legacy is not None:
            self._import_legacy(self._legacy)

    def _read(self) -> tuple[dict[str, RegistryEntry], dict[str, dt.date],
                             list[dict[str, object]], str | None]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}, {}, [], None
        except OSError as e:
            # Not moved aside: the file may be fine and the error passing (EIO, EACCES).
            problem = f"cannot read {self.path}: {(e.strerror or type(e).__name__).lower()}"
            # Retried every second by the agent: said once per streak, not once a second.
            (log.debug if self.problem == problem else log.error)(
                "pairing registry: %s; the bindings read before are kept, nothing is written "
                "until it can be read", problem)
            raise _Unavailable(problem) from e
        try:
            doc = json.loads(text)
            entries = {}
            for raw in doc.get("bindings", []):
                entry = RegistryEntry.from_json(raw)
                entries[entry.binding.address] = entry
            seen = {str(a).upper(): dt.date.fromisoformat(d)
                    for a, d in doc.get("first_seen", {}).items()}
            events = [e for e in doc.get("events", []) if isinstance(e, dict)]
        except (ValueError, KeyError, TypeError, AttributeError, ValidationError) as e:
            aside = self.path.with_name(self.path.name + ".unreadable")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            problem = f"{self.path} was unreadable ({type(e).__name__}); kept as {aside.name}"
            log.error("pairing registry: %s; its devices are not read until paired again",
                      problem)
            self._identity = None
            return {}, {}, [], problem
        return entries, seen, events, None

    def _import_legacy(self, path: Path) -> None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            seen = json.loads(path.read_text(encoding="utf-8"))["first_seen"]
            self._first_seen = {str(a).upper(): dt.date.fromisoformat(d) for a, d in seen.items()}
            self._dirty = bool(self._first_seen)

    def entries(self) -> dict[str, RegistryEntry]:
        """The bindings made with `pair`, by address (upper case)."""
        return dict(self._entries)

    def first_seen(self, address: str) -> dt.date | None:
        """The day the hub first ran with a binding of `address`, if recorded."""
        return self._first_seen.get(address.upper())

    # -- writing ------------------------------------------------------------------------------

    def bind(self, binding: DeviceBinding, *, by: str | None = None,
             now: dt.datetime | None = None,
             device: Mapping[str, str | int | float | None] | None = None,
             check: Callable[[RegistryEntry | None], None] | None = None) -> RegistryEntry:
        """Add or replace the binding of `binding.address`; on disk when this returns.

        `check` is given the binding on disk, under the lock, and may raise to refuse (two
        technicians pairing one device at once: the second sees the first's binding).
        Journals a `device_paired` event, or `device_rebound` when the device was bound to
        another patient, for the agent to publish.
        """
        at = _utc(now)
        entry = RegistryEntry(binding, at, by, dict(device or {}))

        def change(state: _State) -> None:
            old = state.entries.get(binding.address)
            if check is not None:
                check(old)
            state.entries[binding.address] = entry
            if old is not None and old.binding.patient_id != binding.patient_id:
                state.events.append({"name": "device_rebound", "at": at, "detail": {
                    "device": binding.address, "from_patient_id": old.binding.patient_id,
                    "to_patient_id": binding.patient_id, "by": by}})
            elif old is None or old.binding != binding:
                state.events.append({"name": "device_paired", "at": at, "detail": {
                    "device": binding.address, "patient_id": binding.patient_id,
                    "kind": entry.device.get("kind"), "user_index": binding.user_index,
                    "by": by}})

        self._update(change)
        return entry

    def unbind(self, address: str, *, by: str | None = None,
               now: dt.datetime | None = None) -> RegistryEntry | None:
        """Remove the binding of `address` (None if the registry had none); on disk when done."""
        removed: list[RegistryEntry] = []
        at = _utc(now)

        def change(state: _State) -> None:
            entry = state.entries.pop(address.upper(), None)
            if entry is not None:
                removed.append(entry)
                # A later `pair` starts a new enrolment; the old periods are the clinic's record.
                state.first_seen.pop(address.upper(), None)
                state.events.append({"name": "device_unpaired", "at": at, "detail": {
                    "device": entry.binding.address, "patient_id": entry.binding.patient_id,
                    "by": by}})

        self._update(change)
        return removed[0] if removed else None

    def journal(self, name: str, detail: Mapping[str, object], *,
                now: dt.datetime | None = None) -> None:
        """Add an event for the agent to publish (e.g. a reading assigned by the CLI alone)."""
        event: dict[str, object] = {"name": name, "at": _utc(now), "detail": dict(detail)}

        def change(state: _State) -> None:
            state.events.append(event)

        self._update(change)

    def has_events(self) -> bool:
        """Whether journalled events wait (as last read)."""
        return bool(self._events)

    def take_events(self) -> list[dict[str, object]]:
        """The journalled events, removed from the file (the caller publishes them now)."""
        if not self._events and not self.changed_on_disk():
            return []
        taken: list[dict[str, object]] = []

        def change(state: _State) -> None:
            taken.extend(state.events)
            state.events.clear()

        self._update(change)
        return taken

    def ensure(self, addresses: Iterable[str], today: dt.date) -> bool:
        """Record `today` as first seen for every address without a day; True once on disk.

        A write that fails (disk full, read-only) is logged once per failure streak and tried
        again at the next call; the days are kept in memory meanwhile.
        """
        new = {a.upper() for a in addresses} - set(self._first_seen)
        for address in new:
            self._first_seen[address] = today
        self._dirty = self._dirty or bool(new)
        if not self._dirty:
            return True
        wanted = dict(self._first_seen)

        def change(state: _State) -> None:
            for address, day in wanted.items():
                state.first_seen.setdefault(address, day)

        try:
            self._update(change)
        except RegistryError as e:
            (log.debug if self._failing else log.warning)(
                "could not record enrolment dates: %s", e)
            self._failing = True
            return False
        if self._failing:
            log.info("enrolment dates recorded in %s", self.path)
        self._dirty = self._failing = False
        return True

    def _update(self, change: Callable[[_State], None]) -> None:
        """Re-read under the lock, apply `change`, write atomically; raises RegistryError."""
        try:
            with self._locked():
                if self.changed_on_disk() or self.problem is not None:
                    # _Unavailable propagates: never write over a file that could not be read.
                    entries, seen, events, problem = self._read()
                    if problem is None:
                        self._entries, self._events = entries, events
                        self._first_seen = {**self._first_seen, **seen}
                state = _State(dict(self._entries), dict(self._first_seen), list(self._events))
                change(state)
                write_atomically(self.path, _dump(state))
                self._entries, self._first_seen = state.entries, state.first_seen
                self._events = state.events
                self._identity = self._stat()
                self.problem = None
        except _Unavailable as e:
            raise RegistryError(str(e)) from e
        except OSError as e:
            raise RegistryError(
                f"cannot write {self.path}: {(e.strerror or type(e).__name__).lower()}") from e

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.path.with_name("." + self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o660)
        try:
            # Bounded: a process that holds the lock and hangs (stopped with Ctrl-Z) must cost
            # one refused change, not a pairing that never answers.
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError as e:
                    if time.monotonic() >= deadline:
                        raise _Unavailable(f"{self.path} is locked by another process (held over "
                                          f"{LOCK_TIMEOUT_S:g} s); try again") from e
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing releases the lock


@dataclasses.dataclass
class _State:
    entries: dict[str, RegistryEntry]
    first_seen: dict[str, dt.date]
    events: list[dict[str, object]]


# Events a stopped agent never took: bounded, the oldest go first (the bindings stay).
MAX_EVENTS = 200


def _dump(state: _State) -> str:
    doc = {"version": VERSION,
           "bindings": [state.entries[a].as_json() for a in sorted(state.entries)],
           "first_seen": {a: d.isoformat() for a, d in sorted(state.first_seen.items())},
           "events": state.events[-MAX_EVENTS:]}
    return json.dumps(doc, indent=1) + "\n"


def _utc(now: dt.datetime | None) -> str:
    when = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` by `text` so a crash leaves the old file or the new one, never half."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o640)
        if os.geteuid() == 0:
            # `sudo rpm-gateway pair` with no agent running must leave a file the service
            # user still owns (else its next read fails): the old file's owner, or the
            # directory's for a new one.
            try:
                owner = os.stat(path)
            except FileNotFoundError:
                owner = os.stat(directory)
            os.chown(tmp, owner.st_uid, owner.st_gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Pairings:
    """The allowlist: config bindings first, then the registry's; anyone else is never read.

    A config binding cannot be overridden from the registry: the clinic provisioned it, and
    the config file is where it is changed.
    """

    def __init__(self, config: Iterable[DeviceBinding], registry: PairingRegistry | None = None) -> None:
        self._config = {b.address.upper(): b for b in config}
        self.registry = registry
        self._by_address: dict[str, Bound] = {}
        self._rebuild()

    def _rebuild(self) -> None:
        merged: dict[str, Bound] = {}
        if self.registry is not None:
            for address, entry in self.registry.entries().items():
                merged[address] = Bound(entry.binding, "registry", entry)
        for address, binding in self._config.items():
            merged[address] = Bound(binding, "config")
        self._by_address = merged

    def refresh(self) -> bool:
        """Re-read the registry if it changed on disk; True when the allowlist changed."""
        if self.registry is None or not self.registry.changed_on_disk():
            return False
        before = {a: b.binding for a, b in self._by_address.items()}
        self.registry.load()
        self._rebuild()
        return before != {a: b.binding for a, b in self._by_address.items()}

    def reloaded(self) -> None:
        """Take the registry as it is in memory now (after a bind or unbind in this process)."""
        self._rebuild()

    def lookup(self, address: str) -> DeviceBinding | None:
        """The binding for an address, None for anyone else's device."""
        bound = self._by_address.get(address.upper())
        return None if bound is None else bound.binding

    def bound(self, address: str) -> Bound | None:
        """The binding with its source."""
        return self._by_address.get(address.upper())

    def all(self) -> list[Bound]:
        """Every binding, by address."""
        return [self._by_address[a] for a in sorted(self._by_address)]

    def addresses(self) -> set[str]:
        """Every bound device's address (upper case)."""
        return set(self._by_address)

    def __len__(self) -> int:
        return len(self._by_address)


def open_pairings(config: Iterable[DeviceBinding], data_dir: Path) -> Pairings:
    """The allowlist of a hub whose state lives in `data_dir`."""
    registry = PairingRegistry(data_dir / FILENAME, legacy_enrolment=data_dir / LEGACY_ENROLMENT_FILE)
    return Pairings(config, registry)


def enrolled_on(binding: DeviceBinding, registry: PairingRegistry | None, today: dt.date) -> dt.date:
    """The binding's enrolment day: set by `pair` or the config, else first seen, else today."""
    if binding.enrolled is not None:
        return binding.enrolled
    seen = registry.first_seen(binding.address) if registry is not None else None
    return seen or today
