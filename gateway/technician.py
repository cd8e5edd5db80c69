"""What a field technician asks of a hub: scan, pair, unpair, devices, status, unattributed.

Each operation runs where the radio is owned: inside the running agent (asked over the control
socket, gateway.control) or, when no agent runs, inside the CLI itself (gateway.local_hub).
Both give the operations the same `Host`, so the two paths cannot drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import re
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from bleak import BleakClient
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError

from drivers import registry as drivers
from drivers.base import ClockCheck, DeviceInfo, Driver, Provisioning
from gateway.ble import prompts
from gateway.ble.errors import classify
from gateway.ble.radio import Radio
from gateway.ble.session import SessionContext
from gateway.config import ADDRESS_RE, ID_RE, DeviceBinding, GatewayConfig
from gateway.control import Conversation, OpError
from gateway.outbox import AssignOutcome, Outbox
from gateway.pairings import Pairings, RegistryEntry, RegistryError
from gateway.tech_args import FIND_TIMEOUT_S

log = logging.getLogger(__name__)

# Exit codes a script can rely on (sysexits.h where one fits); the README lists them.
EXIT_NOT_DONE = 1  # the operation ran and did not succeed: the checklist says which step
EXIT_USAGE = 64
EXIT_DATAERR = 65  # the request itself is refused: bad address, bound elsewhere, not paired
EXIT_UNAVAILABLE = 69  # the radio or the agent cannot do it now
EXIT_CANTCREAT = 73  # the registry could not be written
EXIT_TEMPFAIL = 75  # the device is busy in a session: try again shortly

# SIG health services (health-devices.md §1) and vendors whose adverts are worth showing.
HEALTH_SERVICES = {0x1808: "glucose", 0x1809: "thermometer", 0x180D: "heart rate",
                   0x1810: "blood pressure", 0x181B: "body composition", 0x181D: "weight scale",
                   0x1822: "pulse oximeter", 0x183A: "insulin delivery"}
HEALTH_VENDORS = {0x020E: "Omron", 0x0157: "Xiaomi", 0x0069: "A&D"}
CONNECT_ATTEMPTS = 3
# How long the bond may take, a technician typing a device's PIN included.
BOND_TIMEOUT_S = 60.0
# A session under way with the device is waited for this long before `pair` gives up.
BUSY_WAIT_S = 30.0

_ADVICE_FIND = {
    "blood_pressure": "put the cuff in pairing mode (on most cuffs hold the Bluetooth or START "
                      "button until 'P' or the Bluetooth symbol blinks) and keep it within 2 m",
    "body_weight": "wake the scale (step on it, or hold its Bluetooth/SET button until it shows "
                   "pairing) and keep it within 2 m",
}
_ADVICE_FIND_ANY = ("put the device in pairing mode (see its manual: often a long press of its "
                    "Bluetooth button) and keep it within 2 m of the hub; check the address "
                    "with `rpm-gateway scan`")


def uuid16(uuid: str) -> int | None:
    """The 16-bit form of a SIG base UUID, None for a vendor's 128-bit one."""
    u = uuid.lower()
    if len(u) == 36 and u.endswith("-0000-1000-8000-00805f9b34fb") and u.startswith("0000"):
        return int(u[4:8], 16)
    return None


class Host(Protocol):
    """What the operations need from whoever owns the radio (the agent, or the CLI alone)."""

    cfg: GatewayConfig
    pairings: Pairings
    outbox: Outbox | None

    async def get_radio(self) -> Radio:
        """The radio (opened on first use by the CLI alone)."""
        ...

    def listen(self, callback: Callable[[BLEDevice, AdvertisementData], None]) -> Callable[[], None]:
        """Hear every advertisement until the returned function is called."""
        ...

    def exclusive(self, address: str) -> AbstractAsyncContextManager[None]:
        """Hold the device against the agent's own sessions (raises OpError if it stays busy)."""
        ...

    def clock_trusted(self) -> bool:
        """Whether the hub clock may set device clocks."""
        ...

    def local_now(self) -> dt.datetime:
        """The patient's local wall time, naive."""
        ...

    def pairings_changed(self) -> None:
        """The registry was written here: act on it (the agent publishes its events)."""
        ...

    def readings_assigned(self) -> None:
        """Readings became pending: deliver them (the agent wakes its uplink)."""
        ...

    async def status_doc(self) -> dict[str, Any]:
        """The hub's status as the status topic carries it (or as the state directory shows)."""
        ...


# -- scan ---------------------------------------------------------------------------------------


@dataclass
class Seen:
    """One device heard during a scan."""

    address: str
    name: str | None = None
    rssi: int | None = None
    driver: str | None = None
    kind: str | None = None
    services: list[str] = field(default_factory=list)
    interesting: bool = False
    heard: int = 0

    def row(self, pairings: Pairings, bonds: set[str]) -> dict[str, Any]:
        """The scan's JSON object for this device."""
        bound = pairings.bound(self.address)
        return {"address": self.address, "name": self.name, "rssi": self.rssi,
                "driver": self.driver, "kind": self.kind, "services": self.services,
                "paired": bound is not None or self.address in bonds,
                "bonded": self.address in bonds,
                "patient": bound.binding.patient_id if bound else None,
                "source": bound.source if bound else None}


def _recognise(seen: Seen, device: BLEDevice, adv: AdvertisementData) -> None:
    seen.name = adv.local_name or device.name or seen.name
    seen.rssi = adv.rssi
    seen.heard += 1
    found = drivers.match_all(device, adv)
    if found:
        driver = found[0] if len(found) == 1 else drivers.combine(found)
        seen.driver = driver.name
        seen.kind = driver.kind
    words = []
    for u in adv.service_uuids:
        short = uuid16(u)
        if short is not None and short in HEALTH_SERVICES:
            words.append(HEALTH_SERVICES[short])
    for company in adv.manufacturer_data:
        if company in HEALTH_VENDORS:
            words.append(f"{HEALTH_VENDORS[company]} data")
    seen.services = sorted(set(words))
    seen.interesting = seen.driver is not None or bool(words)


async def _bonds(radio: Radio) -> set[str]:
    try:
        async with asyncio.timeout(10):
            return await radio.bonds()
    except Exception as e:  # a listing is a help; the scan goes on without it
        log.debug("bonds unreadable: %s", type(e).__name__, exc_info=True)
        return set()


async def scan(host: Host, args: Mapping[str, Any], conv: Conversation) -> list[dict[str, Any]]:
    """Listen for `seconds`; progress carries the table so far, the result the final one."""
    seconds = _number(args.get("seconds", 10.0), "seconds", 0.5, 600.0)
    show_all = bool(args.get("all", False))
    radio = await host.get_radio()
    bonds = await _bonds(radio)
    seen: dict[str, Seen] = {}
    changed = asyncio.Event()

    def on_advert(device: BLEDevice, adv: AdvertisementData) -> None:
        address = device.address.upper()
        _recognise(seen.setdefault(address, Seen(address)), device, adv)
        changed.set()

    def table() -> list[dict[str, Any]]:
        rows = [s.row(host.pairings, bonds) for s in seen.values() if show_all or s.interesting
                or host.pairings.bound(s.address) is not None]
        rows.sort(key=lambda r: (r["driver"] is None, -(r["rssi"] or -999), r["address"]))
        return rows

    stop_listening = host.listen(on_advert)
    try:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):
                    await changed.wait()
            changed.clear()
            await conv.progress(devices=table(), hidden=len(seen) - len(table()),
                                left_s=round(max(0.0, deadline - time.monotonic()), 1))
    finally:
        stop_listening()
    return table()


# -- pair ---------------------------------------------------------------------------------------


@dataclass
class Step:
    """One line of the pairing checklist."""

    name: str
    ok: bool | None  # None: not applicable / skipped
    detail: str = ""
    advice: str | None = None
    required: bool = True

    def as_dict(self) -> dict[str, Any]:
        """For JSON and the socket."""
        return {"step": self.name, "ok": self.ok, "detail": self.detail, "advice": self.advice,
                "required": self.required}


def parse_address(value: object) -> str:
    """A Bluetooth address, upper case; OpError (65) for anything else."""
    text = str(value or "").strip().upper().replace("-", ":")
    if not ADDRESS_RE.match(text):
        raise OpError(f"{value!r} is not a Bluetooth address (like C0:00:00:00:BC:01)",
                      EXIT_DATAERR)
    return text


def parse_patient(value: object) -> str:
    """A patient id as topics and payloads allow; OpError (65) otherwise."""
    text = str(value or "").strip()
    if not ID_RE.match(text):
        raise OpError(f"{value!r} is not a patient id: 1-64 letters, digits, '.', '_' or '-'",
                      EXIT_DATAERR)
    return text


def _number(value: object, what: str, low: float, high: float) -> float:
    try:
        n = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise OpError(f"{what} must be a number", EXIT_USAGE) from e
    if not low <= n <= high:
        raise OpError(f"{what} must be between {low:g} and {high:g}", EXIT_USAGE)
    return n


def _slot(value: object) -> int | None:
    if value is None:
        return None
    n = _number(value, "--user-slot", 1, 254)
    if n != int(n):
        raise OpError("--user-slot must be a whole number", EXIT_USAGE)
    return int(n)


def _check_request(host: Host, address: str, patient: str, slot: int | None, force: bool) -> None:
    bound = host.pairings.bound(address)
    if bound is None:
        return
    b = bound.binding
    if bound.source == "config" and (b.patient_id != patient or b.user_index != slot):
        raise OpError(f"{address} is bound to patient {b.patient_id} in the config file; "
                      "change or remove its [[devices]] entry there", EXIT_DATAERR)
    if b.patient_id != patient and not force:
        raise OpError(f"{address} is already bound to patient {b.patient_id}; to move it to "
                      f"{patient}, run the same command with --force", EXIT_DATAERR)


async def _find(host: Host, address: str, timeout: float) -> tuple[BLEDevice, AdvertisementData] | None:
    found: asyncio.Future[tuple[BLEDevice, AdvertisementData]] = (
        asyncio.get_running_loop().create_future())

    def on_advert(device: BLEDevice, adv: AdvertisementData) -> None:
        if device.address.upper() == address and not found.done():
            found.set_result((device, adv))

    stop = host.listen(on_advert)
    try:
        async with asyncio.timeout(timeout):
            return await found
    except TimeoutError:
        return None
    finally:
        stop()


async def pair(host: Host, args: Mapping[str, Any], conv: Conversation) -> dict[str, Any]:
    """Connect, bond, identify, set the clock, bind; the checklist says how each step went."""
    address = parse_address(args.get("address"))
    patient = parse_patient(args.get("patient"))
    slot = _slot(args.get("user_slot"))
    force = bool(args.get("force", False))
    timeout = _number(args.get("timeout", FIND_TIMEOUT_S), "--timeout", 1, 600)
    _check_request(host, address, patient, slot, force)
    steps: list[Step] = []

    async def report(step: Step) -> None:
        steps.append(step)
        await conv.progress(**step.as_dict())

    def result(*, bound: bool) -> dict[str, Any]:
        return {"address": address, "patient": patient, "user_slot": slot, "bound": bound,
                "steps": [s.as_dict() for s in steps]}

    radio = await host.get_radio()
    await conv.progress(step="listening", ok=None, detail=f"for {address} up to {timeout:g} s")
    heard = await _find(host, address, timeout)
    if heard is None:
        await report(Step("found", False, f"not heard in {timeout:g} s", _ADVICE_FIND_ANY))
        return result(bound=False)
    device, adv = heard
    name = adv.local_name or device.name or "no name"
    await report(Step("found", True, f"{name}, RSSI {adv.rssi} dBm"))
    matched = drivers.match_all(device, adv)
    if not matched:
        await report(Step("supported", False, "no driver recognises its advertisement",
                          "this device is not one the hub can read; `rpm-gateway scan --all` "
                          "shows what it advertises"))
        return result(bound=False)
    driver = matched[0] if len(matched) == 1 else drivers.combine(matched)
    kind = driver.kind
    advice_find = _ADVICE_FIND.get(kind, _ADVICE_FIND_ANY)
    await report(Step("supported", True, f"{kind} ({driver.name})"))
    info = DeviceInfo()
    offset: float | None = None
    # Held until the binding is written: no session of the agent's starts under the old one.
    async with host.exclusive(address):
        _check_request(host, address, patient, slot, force)  # again: it may have changed
        client = await _connect(radio, device, host.cfg)
        if isinstance(client, Exception):
            await report(Step("connected", False, _short(client), advice_find))
            return result(bound=False)
        await report(Step("connected", True, f"MTU {client.mtu_size}"))
        try:
            if not await _bond(client, conv, report, advice_find):
                return result(bound=False)
            info = await _identify(driver, client, host, report)
            offset = await _clock(driver, client, host, report)
        finally:
            with contextlib.suppress(BleakError, TimeoutError, OSError):
                async with asyncio.timeout(host.cfg.radio.operation_timeout_s):
                    await client.disconnect()
        registry = host.pairings.registry
        if registry is None:  # pragma: no cover - every host has one
            raise OpError("no pairing registry", EXIT_CANTCREAT)
        previous = host.pairings.bound(address)
        if previous is not None and previous.source == "config":
            await report(Step("bound", True, f"to {patient} (provisioned in the config file)"))
            return result(bound=True)
        binding = DeviceBinding(address=address, patient_id=patient, user_index=slot,
                                enrolled=host.local_now().date())
        if previous is not None and previous.binding.enrolled \
                and previous.binding.patient_id == patient:
            # Pairing again (a new bond, a reset device) does not restart the billing period.
            binding = binding.model_copy(update={"enrolled": previous.binding.enrolled})

        def still_free(current: RegistryEntry | None) -> None:
            if current is not None and current.binding.patient_id != patient and not force:
                raise OpError(f"{address} was bound to patient {current.binding.patient_id} "
                              "meanwhile; run again with --force to move it", EXIT_DATAERR)

        details: dict[str, str | int | float | None] = {
            "manufacturer": info.manufacturer, "model": info.model, "serial": info.serial,
            "firmware": info.firmware, "kind": kind, "driver": driver.name, "name": name,
            "battery_level": info.battery_level,
            "clock_offset_s": None if offset is None else round(offset, 1)}
        try:
            # In a thread: the lock and the fsyncs must not stall the agent's event loop.
            await asyncio.to_thread(registry.bind, binding, by=conv.by, device=details,
                                    check=still_free)
        except RegistryError as e:
            await report(Step("bound", False, str(e), "free space on the hub's disk or check "
                              "the state directory's owner (the service user)"))
            return result(bound=False) | {"exit": EXIT_CANTCREAT}
        host.pairings.reloaded()
        host.pairings_changed()
    moved = previous is not None and previous.binding.patient_id != patient
    detail = f"to {patient}" + (f", user slot {slot}" if slot is not None else "") + (
        f" (was {previous.binding.patient_id})" if moved and previous is not None else "")
    await report(Step("bound", True, detail))
    return result(bound=True)


async def _connect(radio: Radio, device: BLEDevice, cfg: GatewayConfig) -> BleakClient | Exception:
    error: Exception = TimeoutError("not connected")
    for attempt in range(CONNECT_ATTEMPTS):
        client = radio.client(device, lambda _: None, cfg.radio.connect_timeout_s)
        try:
            async with asyncio.timeout(cfg.radio.connect_timeout_s + 5):
                await client.connect()
            return client
        except (BleakError, TimeoutError, OSError) as e:
            error = classify(device.address, e, connected=False)
            log.debug("pair: connect attempt %d failed", attempt + 1, exc_info=True)
            await asyncio.sleep(0.5 * (attempt + 1))
    return error


async def _bond(client: BleakClient, conv: Conversation,
                report: Callable[[Step], Any], advice_find: str) -> bool:
    shown: list[int] = []

    async def passkey() -> int | None:
        typed = await conv.ask("passkey", "The device shows a 6-digit PIN: type it here")
        digits = (typed or "").strip()
        return int(digits) if re.fullmatch(r"\d{1,6}", digits) else None

    with prompts.pairing_prompts(passkey, shown.append):
        try:
            async with asyncio.timeout(BOND_TIMEOUT_S):
                await client.pair()
        except (BleakError, TimeoutError, OSError) as e:
            await report(Step(
                "bonded", False, _short(e),
                "the device refused to bond: " + advice_find + "; if it was paired with "
                "another hub or phone before, clear its memory (see its manual) and try again"))
            return False
    if shown:
        await conv.progress(step="passkey shown", ok=None,
                            detail=f"type {shown[-1]:06d} on the device")
    await report(Step("bonded", True, "encrypted link, keys stored"))
    return True


def _hooks(host: Host) -> SessionContext:
    return SessionContext(host.cfg.radio, zone_now=host.local_now, clock_trusted=host.clock_trusted,
                          on_reject=lambda *_: None)


async def _identify(driver: Driver, client: BleakClient, host: Host,
                    report: Callable[[Step], Any]) -> DeviceInfo:
    if not isinstance(driver, Provisioning):
        await report(Step("identified", None, "this driver reads no device information",
                          required=False))
        return DeviceInfo()
    try:
        info = await driver.identify(client, _hooks(host))
    except (BleakError, TimeoutError) as e:
        await report(Step("identified", False, _short(e), "the device went quiet; it is bound "
                          "anyway and identified at its first reading", required=False))
        return DeviceInfo()
    words = " ".join(w for w in (info.manufacturer, info.model) if w) or "no model string"
    if info.serial:
        words += f", serial {info.serial}"
    if info.firmware:
        words += f", firmware {info.firmware}"
    await report(Step("identified", True, words, required=False))
    if info.battery_level is None:
        await report(Step("battery", None, "no battery service", required=False))
    else:
        low = info.battery_level < 20
        await report(Step("battery", not low, f"{info.battery_level} %",
                          "replace the batteries before leaving" if low else None,
                          required=False))
    return info


async def _clock(driver: Driver, client: BleakClient, host: Host,
                 report: Callable[[Step], Any]) -> float | None:
    """Read and set the device clock; the offset found (device minus hub), if read."""
    if not isinstance(driver, Provisioning):
        return None
    try:
        check: ClockCheck = await driver.check_clock(client, _hooks(host))
    except (BleakError, TimeoutError) as e:
        await report(Step("clock", False, _short(e), required=False))
        return None
    if check.device_time is None and not check.set_ok:
        await report(Step("clock", None, "the device has no readable clock; readings are dated "
                          "by the hub", required=False))
        return None
    was = ("" if check.offset_s is None else "was right; " if abs(check.offset_s) < 1
           else f"was {check.offset_s:+.0f} s off; ")
    if check.set_ok:
        await report(Step("clock", True, f"{was}set to hub time", required=False))
    elif not host.clock_trusted():
        await report(Step("clock", False, f"{was}not set: the hub clock is not synchronised",
                          "check the hub's network time (timedatectl); the agent sets the "
                          "device clock at a later connection", required=False))
    else:
        await report(Step("clock", False, f"{was}the device refused the new time",
                          "readings are corrected by the measured offset", required=False))
    return check.offset_s


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# -- unpair -------------------------------------------------------------------------------------


async def unpair(host: Host, args: Mapping[str, Any], conv: Conversation) -> dict[str, Any]:
    """Remove the binding and the bond."""
    address = parse_address(args.get("address"))
    bound = host.pairings.bound(address)
    if bound is not None and bound.source == "config":
        raise OpError(f"{address} is provisioned in the config file (patient "
                      f"{bound.binding.patient_id}); remove its [[devices]] entry there",
                      EXIT_DATAERR)
    radio = await host.get_radio()
    bonded = address in await _bonds(radio)
    if bound is None and not bonded:
        raise OpError(f"{address} is not paired with this hub", EXIT_DATAERR)
    registry = host.pairings.registry
    async with host.exclusive(address):
        if bound is not None and registry is not None:
            try:
                await asyncio.to_thread(registry.unbind, address, by=conv.by)
            except RegistryError as e:
                raise OpError(str(e), EXIT_CANTCREAT) from e
            host.pairings.reloaded()
            host.pairings_changed()
        bond_removed: bool | str
        try:
            async with asyncio.timeout(15):
                bond_removed = await radio.forget(address)
        except Exception as e:
            bond_removed = f"could not remove the bond: {_short(e)}"
    return {"address": address, "patient": bound.binding.patient_id if bound else None,
            "unbound": bound is not None, "bond_removed": bond_removed}


# -- devices, status, unattributed ---------------------------------------------------------------


async def devices(host: Host, args: Mapping[str, Any], conv: Conversation) -> list[dict[str, Any]]:
    """Every paired device with what the hub knows of it."""
    del args, conv
    status = await host.status_doc()
    live: Mapping[str, Any] = status.get("devices") or {}
    days: Mapping[str, Any] = status.get("days_with_data") or {}
    rows = []
    for bound in host.pairings.all():
        b = bound.binding
        entry = live.get(b.address) or {}  # filled from the pairing already (Bound.fill)
        rows.append({
            "address": b.address, "patient": b.patient_id, "user_slot": b.user_index,
            "source": bound.source, "kind": entry.get("kind"), "model": entry.get("model"),
            "serial": entry.get("serial"),
            "last_reading": entry.get("last_reading"), "last_seen": entry.get("last_seen"),
            "battery": entry.get("battery_level"),
            "clock_drift_s": entry.get("clock_offset_s"), "last_error": entry.get("last_error"),
            "enrolled": b.enrolled.isoformat() if b.enrolled else None,
            "paired_at": bound.entry.paired_at if bound.entry is not None else None,
            "days_with_data": days.get(b.patient_id),
        })
    return rows


async def status(host: Host, args: Mapping[str, Any], conv: Conversation) -> dict[str, Any]:
    """The hub's status."""
    del args, conv
    return await host.status_doc()


async def unattributed(host: Host, args: Mapping[str, Any], conv: Conversation) -> list[dict[str, Any]]:
    """Readings kept because no binding maps their user slot, oldest first."""
    del conv
    limit = int(_number(args.get("limit", 200), "--limit", 1, 1000))
    if host.outbox is None:
        return []
    return [dataclasses.asdict(r) for r in await host.outbox.unattributed(limit=limit)]


async def assign(host: Host, args: Mapping[str, Any], conv: Conversation) -> dict[str, Any]:
    """Give an unattributed reading to a patient who confirmed it was theirs."""
    reading_id = str(args.get("reading_id") or "").strip().lower()
    if not re.fullmatch(r"[0-9a-f]{32}", reading_id):
        raise OpError(f"{reading_id!r} is not a reading id (32 hex digits, from "
                      "`rpm-gateway unattributed`)", EXIT_DATAERR)
    patient = parse_patient(args.get("patient"))
    if host.outbox is None:
        raise OpError("no outbox on this hub yet", EXIT_DATAERR)
    outcome = await host.outbox.assign(reading_id, patient)
    if outcome.outcome is AssignOutcome.NOT_FOUND:
        raise OpError(f"no unattributed reading {reading_id} (see `rpm-gateway unattributed`)",
                      EXIT_DATAERR)
    if outcome.outcome is AssignOutcome.ALREADY_ATTRIBUTED:
        raise OpError(f"reading {reading_id} already belongs to patient {outcome.patient_id}",
                      EXIT_DATAERR)
    if outcome.outcome is AssignOutcome.DAMAGED:
        raise OpError(f"reading {reading_id} is damaged on disk and cannot be published",
                      EXIT_DATAERR)
    registry = host.pairings.registry
    if registry is not None:
        detail = {"reading_id": reading_id, "device": outcome.device_address,
                  "patient_id": patient, "by": conv.by}
        try:
            await asyncio.to_thread(registry.journal, "reading_assigned", detail)
        except RegistryError as e:
            log.warning("assign: the event could not be journalled (%s)", e)
    host.pairings_changed()
    host.readings_assigned()
    return {"reading_id": reading_id, "patient": patient, "assigned": True,
            "device": outcome.device_address, "kind": outcome.kind,
            "measured_at": outcome.measured_at, "assigned_at": outcome.assigned_at}


Operation = Callable[[Host, Mapping[str, Any], Conversation], Any]
OPERATIONS: dict[str, Operation] = {
    "scan": scan, "pair": pair, "unpair": unpair, "devices": devices, "status": status,
    "unattributed": unattributed, "assign": assign,
}


def handlers(host: Host) -> dict[str, Callable[[Mapping[str, Any], Conversation], Any]]:
    """The control socket's handlers, bound to `host`."""
    return {name: functools.partial(op, host) for name, op in OPERATIONS.items()}
