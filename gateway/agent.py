"""The agent: wires radio, sessions, outbox and uplink under one TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import os
import signal
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from gateway.ble.recovery import RecoveryLadder, Step
from gateway.ble.scan_gate import ScanGate
from gateway.config import DeviceBinding, GatewayConfig
from gateway.days import current_days
from gateway.hub_state import hold_agent_lock, write_snapshot
from gateway.lograte import StateLog
from gateway.outbox import Outbox, OutboxError, PutResult
from gateway.pairings import RegistryError, open_pairings
from gateway.sd_notify import Notifier
from gateway.status import HubStatus
from gateway.timebase import hub_clock_plausible, hub_clock_synced
from gateway.uplink_health import BrokerState

# What READY=1 does not wait for is imported after it, where it is first used: the radio
# (bleak, the drivers, sessions), the uplink (paho) and the control socket's
# handlers are a third of the agent's start on a slow hub, and systemd need not wait for
# them to count the unit as started (the radio and the broker retry for ever anyway).
if TYPE_CHECKING:
    from bleak import BleakScanner
    from bleak.backends.device import BLEDevice
    from bleak.backends.scanner import AdvertisementData

    from drivers.base import DeviceInfo, Driver, Measurement
    from gateway.ble.radio import Radio
    from gateway.ble.session import SessionContext
    from gateway.uplink import Uplink

log = logging.getLogger(__name__)

# A device keeps advertising for a moment after it disconnects; don't chase that echo.
RECONNECT_COOLDOWN_S = 2.0
# A session that keeps failing (out of range, interference) is retried at most this rarely;
# sessions that bring nothing back off up to radio.idle_backoff_max_s.
FAILED_BACKOFF_MAX_S = 60.0
# How often the storage gate is re-checked (statvfs: cheap), so it reopens by itself.
STORAGE_CHECK_S = 5.0
# The last this many commit windows (notification callback → commit returned) are summarised.
COMMIT_WINDOWS_KEPT = 2000
HOUSEKEEPING_INTERVAL_S = 60.0
# How often the pairing registry's file is looked at (a stat) for changes made by the CLI.
PAIRINGS_CHECK_S = 1.0
PRUNE_INTERVAL_S = 3600.0
SCAN_RETRY_MIN_S = 2.0
SCAN_RETRY_MAX_S = 60.0
ADVICE_RADIO = ("check that bluetoothd is running (systemctl status bluetooth), that the adapter "
                "is present (bluetoothctl list) and not blocked (rfkill list)")
# The radio watchdog looks this often (or every tenth of radio.scan_silence_s if that is less).
RADIO_CHECK_S = 5.0
RADIO_CHECK_MIN_S = 0.2
# Upper bound for one scanner start or stop (a wedged BlueZ must not hang the scan loop).
SCANNER_OP_TIMEOUT_S = 30.0
# bleak cannot stop a scanner of a bluetoothd that is gone; give up on it this soon.
STALE_SCANNER_STOP_S = 1.0
# Upper bound for a power cycle or bluetoothd restart (each also bounds itself).
ADAPTER_CONTROL_TIMEOUT_S = 90.0
_STEP_WORDS = {Step.RESTART_DISCOVERY: "restarting discovery",
               Step.POWER_CYCLE: "power-cycling the adapter",
               Step.RESTART_BLUETOOTH: "restarting bluetooth.service"}
# The stack watch reopens the scanner at once; the same reason again backs off up to the max.
STACK_RESCAN_MIN_S = 5.0
STACK_RESCAN_MAX_S = 300.0
# Drift worth telling the clinic about: beyond it a reading's minute, even day, is in doubt.
CLOCK_DRIFT_EVENT_S = 60.0


class _Stop(Exception):
    """Raised inside the TaskGroup to end it cleanly."""


class Agent:
    """Owns the long-lived tasks; `run()` returns when `stop()` is called or a signal arrives."""

    def __init__(self, cfg: GatewayConfig, *, clock_synced: Callable[[], bool] | None = None,
                 radio: Radio | None = None) -> None:
        self.cfg = cfg
        self._radio = radio  # an already-open radio (tests); None: open the configured one
        self.pairings = open_pairings(cfg.devices, cfg.hub.data_dir)
        self.status = HubStatus(hub_id=cfg.hub.id)
        self._sync_status_devices()  # every binding is in the status from the start
        trust = cfg.hub.trust_clock
        self._clock_synced = clock_synced or (hub_clock_synced if trust is None else lambda: trust)
        self.status.hub_clock_synced = self._clock_synced()
        self._stop = asyncio.Event()
        self._active: set[str] = set()
        self._cooldown_until: dict[str, float] = {}
        self._wanted: asyncio.Queue[tuple[BLEDevice, AdvertisementData]] = asyncio.Queue()
        self._known_info: dict[str, DeviceInfo] = {}  # per address, from the first session
        self._refresh = asyncio.Event()  # the status changed: publish it now
        self._idle_runs: dict[str, int] = {}  # sessions in a row that brought nothing, per device
        self._adv_signature: dict[str, object] = {}  # vendor/service data at the last session
        self._storage_block: str | None = None
        self._storage_checked = False
        self._commit_windows: deque[float] = deque(maxlen=COMMIT_WINDOWS_KEPT)
        # One line per change of state, then rate-limited: a flood fills the SD card.
        self._log_state = StateLog(log)
        radio_cfg = cfg.radio
        self._ladder = RecoveryLadder(radio_cfg.scan_silence_s,
                                      max_interval_s=radio_cfg.recovery_max_interval_s,
                                      restart_bluetooth=radio_cfg.recovery_restart_bluetooth,
                                      now=time.monotonic())
        self._rescan = asyncio.Event()  # set: the scan loop drops its scanner and opens a new one
        self._gate = ScanGate(self._rescan, exclusive=radio_cfg.pause_scan_to_connect)
        self._background: set[asyncio.Task[object]] = set()
        self._stack_backoff: dict[str, tuple[float, float]] = {}  # reason -> (next at, delay)
        self._stack_was_reset = False  # bluetoothd restarted under the current scanner
        self._scan_attempts = 0
        # A restart of discovery waits here for the outcome of scan attempt >= the number.
        self._rescan_waiter: tuple[int, asyncio.Future[str | None]] | None = None
        self._scan_error: str | None = None  # why the scanner last failed to start, until it starts
        self.outbox: Outbox | None = None
        self.uplink: Uplink | None = None
        self._radio_open: Radio | None = None
        self._snapshot_due = False  # a session stored readings: save the status for the CLI
        self._taking_events = False  # a take of the registry's journalled events is under way
        # Technicians' scans and pairings over the control socket hear adverts here.
        self._listeners: list[Callable[[BLEDevice, AdvertisementData], None]] = []
        # systemd's notify socket (Type=notify, WatchdogSec=); does nothing without one.
        self.notifier = Notifier()

    def stop(self) -> None:
        """Ask the agent to finish: sessions are cancelled, committed readings stay committed."""
        self._stop.set()

    @property
    def commit_windows(self) -> tuple[float, ...]:
        """The latest commit windows in seconds (notification callback → commit returned)."""
        return tuple(self._commit_windows)

    @property
    def stop_requested(self) -> bool:
        """Whether stop() was called (or a signal arrived)."""
        return self._stop.is_set()

    async def run(self) -> None:
        """Run until stopped."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        log.info("agent starting: hub %s, radio %s, %d paired device(s)",
                 self.cfg.hub.id, self.cfg.radio.kind, len(self.pairings))
        notifier = self.notifier
        try:
            async with Outbox(self.cfg.outbox_path, self.cfg.outbox) as outbox, \
                    contextlib.AsyncExitStack() as stack:
                self.outbox = outbox
                # Tells a CLI that cannot reach the control socket that the radio is owned.
                lock_fd = await asyncio.to_thread(hold_agent_lock, self.cfg.hub.data_dir)
                if lock_fd is not None:
                    stack.callback(os.close, lock_fd)
                # Config, pairing registry and outbox are open: every reading from here on is
                # kept. The radio and the broker are not waited for: both retry for ever, and
                # a unit that is not "started" until the clinic answers would hold up boot.
                notifier.ready(self._systemd_status())
                from drivers import registry as drivers  # noqa: PLC0415 (after READY)
                from gateway.ble.radio import open_radio  # noqa: PLC0415
                from gateway.uplink import Uplink  # noqa: PLC0415

                drivers.check_unique_names()
                self.uplink = Uplink(self.cfg.mqtt, self.cfg.hub.id, outbox, self._status_dict)
                self._report_recovery(outbox)
                self._publish_registry_events()  # journalled while no agent ran
                radio = await stack.enter_async_context(
                    contextlib.nullcontext(self._radio) if self._radio is not None
                    else open_radio(self.cfg.radio, self.cfg.hub.zone))
                self._radio_open = radio
                try:
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self.uplink.run(), name="uplink")
                        tg.create_task(self._watch_storage(), name="storage gate")
                        tg.create_task(self._watch_pairings(), name="pairing registry")
                        tg.create_task(self._scan(radio), name="scanner")
                        tg.create_task(self._watch_radio(radio), name="radio watchdog")
                        tg.create_task(self._watch_stack(radio), name="stack watch")
                        tg.create_task(self._dispatch(radio, tg), name="dispatch")
                        tg.create_task(self._housekeeping(outbox), name="housekeeping")
                        tg.create_task(self._serve_control(), name="control socket")
                        tg.create_task(notifier.keep_alive(self._systemd_status),
                                       name="systemd watchdog")
                        await self._stop.wait()
                        notifier.stopping()
                        raise _Stop
                except* _Stop:
                    pass
                await self._save_snapshot()
        finally:
            notifier.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        log.info("agent stopped")

    # -- scanning and dispatch --------------------------------------------------------------

    def _on_advertisement(self, device: BLEDevice, adv: AdvertisementData) -> None:
        # Any advertisement, ours or not, shows the radio hears: the recovery ladder resets.
        helped = self._ladder.on_advert(time.monotonic())
        if helped is not None:
            self._radio_recovered(helped)
        for listener in tuple(self._listeners):
            try:
                listener(device, adv)
            except Exception:  # a technician's scan must never break the agent's own
                log.debug("advertisement listener failed", exc_info=True)
        address = device.address.upper()
        if self.pairings.lookup(address) is None:
            self.status.saw_unknown(address)
            return
        entry = self.status.device(address)
        entry.last_seen = _now()
        entry.rssi = adv.rssi
        if address in self._active:
            return
        signature = _signature(adv)
        if address in self._adv_signature and self._adv_signature[address] != signature:
            # Its advertisement changed since the last session (a record counter, a flag): it
            # may have news, so the back-off after empty sessions ends. Once per session: a
            # device whose data alternates must not cancel its back-off on every advert.
            del self._adv_signature[address]
            self._idle_runs.pop(address, None)
            self._cooldown_until.pop(address, None)
        if asyncio.get_running_loop().time() < self._cooldown_until.get(address, 0.0):
            return
        self._active.add(address)
        self._wanted.put_nowait((device, adv))

    async def _scan(self, radio: Radio) -> None:
        # A radio that cannot scan must not take the agent down: the uplink still has readings
        # to deliver, and the adapter may come back (bluetoothd restarted, dongle re-plugged).
        # The recovery ladder restarts discovery by setting self._rescan.
        delay = SCAN_RETRY_MIN_S
        released = False
        while True:
            self._rescan.clear()
            await self._gate.wait_open()  # held shut while an exclusive adapter connects
            self._scan_attempts += 1
            attempt = self._scan_attempts
            scanner = radio.scanner(self._on_advertisement)
            self._gate.scanner_running(True)  # from before start: a connection must wait for it
            try:
                async with asyncio.timeout(SCANNER_OP_TIMEOUT_S):
                    await scanner.start()
            except Exception as e:  # any radio failure is retried, never fatal
                self._gate.scanner_running(False)
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if isinstance(e, FileNotFoundError | ConnectionRefusedError):
                    reason = "cannot reach the D-Bus system bus (is dbus running?)"
                elif isinstance(e, TimeoutError):
                    reason = f"the scanner did not start within {SCANNER_OP_TIMEOUT_S:g} s"
                    await self._stop_scanner(scanner)  # it may be half started
                self._scan_error = reason
                self._scan_outcome(attempt, reason)
                self.status.radio = f"unavailable: {reason}"
                self._log_state.error(
                    "radio", reason, "Bluetooth radio unavailable (%s); %s; retrying with back-off",
                    reason, ADVICE_RADIO)
                log.debug("radio failure; retrying in %.0f s", delay, exc_info=True)
                self._refresh.set()
                # The back-off ends early when the ladder asks for a restart.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._rescan.wait()
                delay = min(delay * 2, SCAN_RETRY_MAX_S)
                continue
            self._scan_error = None
            self._scan_outcome(attempt, None)
            if not released:
                # Once the stack answers: links a killed agent left behind. Tried again with
                # the next scanner if it could not be done now.
                released = await self._release_stale(radio)
            if self.status.radio != "ok":
                log.info("Bluetooth radio scanning")
                self._log_state.clear("radio")
                self._refresh.set()
            self.status.radio = "ok"
            delay = SCAN_RETRY_MIN_S
            try:
                await self._rescan.wait()
            finally:
                await self._stop_scanner(scanner)
                self._gate.scanner_running(False)
            log.debug("scanner stopped for a restart of discovery")

    async def _watch_stack(self, radio: Radio) -> None:
        """Reopen the scanner whenever the stack says it died underneath (bluetoothd, adapter)."""
        try:
            await radio.watch(functools.partial(self._stack_changed, radio))
        except Exception as e:  # the watch is a help: without it the ladder still recovers
            log.debug("stack watch ended: %s", type(e).__name__, exc_info=True)

    def _stack_changed(self, radio: Radio, reason: str) -> None:
        if reason == "bluetoothd restarted":
            self._stack_was_reset = True
            self._event("bluetoothd_restarted", {})
            self._spawn(self._release_stale(radio))
        if self._gate.paused and reason.startswith("discovery stopped"):
            return  # discovery is off on purpose: a connection holds the adapter
        now = asyncio.get_running_loop().time()
        allowed_at, delay = self._stack_backoff.get(reason, (0.0, STACK_RESCAN_MIN_S))
        if now < allowed_at:
            # The same change again so soon (a controller whose discovery keeps dying): the
            # scan loop's own retry and the recovery ladder take over; no tight loop.
            self._stack_backoff[reason] = (allowed_at, delay)
            log.debug("radio: %s again within %.0f s; not reopening the scanner yet", reason, delay)
            return
        if now - allowed_at > STACK_RESCAN_MAX_S:
            delay = STACK_RESCAN_MIN_S  # quiet for long enough: forgiven
        self._stack_backoff[reason] = (now + delay, min(delay * 2, STACK_RESCAN_MAX_S))
        self._log_state.warning("stack", reason, "radio: %s; opening a new scanner", reason)
        self._rescan.set()

    async def _release_stale(self, radio: Radio) -> bool:
        """Disconnect bound devices the stack keeps connected outside our sessions; done?"""
        try:
            released = await radio.release_stale(self.pairings.addresses(),
                                                 lambda: set(self._active))
        except Exception as e:
            log.debug("could not check for stale links: %s", type(e).__name__, exc_info=True)
            return False
        for address in released:
            log.warning("%s: bluetoothd held a link to it outside any session (left by an agent "
                        "that stopped without disconnecting); disconnected it", address)
        return True

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        """Run `coro` in the background, held until done (events, stale-link release)."""
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _stop_scanner(self, scanner: BleakScanner) -> None:
        """Stop a scanner, bounded; a failure only matters at debug level (a new one follows)."""
        # A scanner of a bluetoothd that went away cannot be stopped: bleak sends StopDiscovery
        # on its dead bus and waits forever, holding its bus lock (and so every new scanner).
        # Its callbacks are removed first, so a short wait is enough.
        wait = STALE_SCANNER_STOP_S if self._stack_was_reset else SCANNER_OP_TIMEOUT_S
        self._stack_was_reset = False
        try:
            async with asyncio.timeout(wait):
                await scanner.stop()
        except Exception as e:
            log.debug("scanner stop failed (%s)", type(e).__name__, exc_info=True)

    def _scan_outcome(self, attempt: int, error: str | None) -> None:
        """Hand a scan attempt's outcome to a restart of discovery that waits for it."""
        waiter = self._rescan_waiter
        if waiter is not None and attempt >= waiter[0] and not waiter[1].done():
            waiter[1].set_result(error)

    async def _restart_discovery(self) -> str | None:
        """Make the scan loop open a new scanner; None once it scans, else why it does not."""
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._rescan_waiter = (self._scan_attempts + 1, future)
        self._rescan.set()
        wait_s = 2 * SCANNER_OP_TIMEOUT_S + SCAN_RETRY_MIN_S
        try:
            async with asyncio.timeout(wait_s):
                return await future
        except TimeoutError:
            return f"the scanner did not restart within {wait_s:g} s"
        finally:
            self._rescan_waiter = None

    # -- radio recovery ladder --------------------------------------------------------------

    async def _watch_radio(self, radio: Radio) -> None:
        """Climb the recovery ladder while paired devices exist and nothing at all is heard."""
        period = max(RADIO_CHECK_MIN_S, min(RADIO_CHECK_S, self.cfg.radio.scan_silence_s / 10))
        while True:
            await asyncio.sleep(period)
            try:
                await self._recovery_tick(radio)
            except Exception as e:  # the watchdog must never take the agent down
                self._log_state.error("radio recovery", f"internal {type(e).__name__}",
                                      "radio recovery: internal error (%s); set log_level = "
                                      "\"debug\" for the traceback", type(e).__name__)
                log.debug("radio recovery failure", exc_info=True)

    async def _recovery_tick(self, radio: Radio) -> None:
        ladder = self._ladder
        now = time.monotonic()
        step = ladder.due(now, has_bindings=len(self.pairings) > 0, session_active=bool(self._active))
        if step is None:
            return
        reason = f"no advertisement for {ladder.silent_for(now):.0f} s"
        if self._scan_error is not None:
            reason += f"; the scanner fails to start ({self._scan_error})"
        error: str | None = None
        try:
            error = await self._perform(radio, step)
        finally:
            # Even if cancelled: the ladder must never stay with a step in progress.
            helped = ladder.done(step, error is None, time.monotonic())
        self._recovery_step_done(step, reason, error)
        if helped is not None:
            self._radio_recovered(helped)

    async def _perform(self, radio: Radio, step: Step) -> str | None:
        """Take one step; None if it worked, else why not (never raises but on cancellation)."""
        from gateway.ble.adapter_control import AdapterControlError  # noqa: PLC0415

        if step is Step.RESTART_DISCOVERY:
            return await self._restart_discovery()
        error: str | None = None
        control = getattr(radio, "control", None)
        try:
            if control is None:
                raise AdapterControlError(f"the {radio.kind} radio has no adapter control")
            async with asyncio.timeout(ADAPTER_CONTROL_TIMEOUT_S):
                if step is Step.POWER_CYCLE:
                    await control.power_cycle()
                else:
                    await control.restart_bluetooth()
        except AdapterControlError as e:
            error = str(e)
        except TimeoutError:
            error = f"{step.value} not done within {ADAPTER_CONTROL_TIMEOUT_S:g} s"
        except Exception as e:
            error = f"internal error: {type(e).__name__}"
            log.debug("recovery step %s failed", step.value, exc_info=True)
        # An adapter that went off (or a bluetoothd that restarted) ended discovery: scan anew.
        rescan = await self._restart_discovery()
        if rescan is not None:
            log.debug("after %s the scanner does not start yet: %s", step.value, rescan)
        return error

    def _recovery_step_done(self, step: Step, reason: str, error: str | None) -> None:
        ladder = self._ladder
        rs = self.status.radio_recovery
        current = ladder.current_step
        rs.step = None if current is None else current.value
        rs.last_step = step.value
        rs.last_step_at = _now()
        rs.last_result = "ok" if error is None else f"failed: {error}"
        rs.steps_taken, rs.steps_failed = ladder.steps_taken, ladder.steps_failed
        rung = ladder.steps.index(step) + 1
        next_in = max(0.0, ladder.next_at - time.monotonic()) if ladder.climbing else None
        self._event("radio_recovery", {"step": step.value, "result": "ok" if error is None else "failed",
                                       "reason": reason, "error": error,
                                       "next_step_in_s": None if next_in is None else round(next_in)})
        if error is None:
            self._log_state.clear(f"radio recovery {step.value}")
            log.warning("radio: %s, with %d paired device(s): %s done (recovery step %d of %d)",
                        reason, len(self.pairings), _STEP_WORDS[step], rung, len(ladder.steps))
        else:
            # A step that keeps failing the same way (no polkit rule, no systemd) is logged once.
            self._log_state.warning(
                f"radio recovery {step.value}", error,
                "radio: %s; %s failed (recovery step %d of %d, counted; the ladder goes on): %s",
                reason, _STEP_WORDS[step], rung, len(ladder.steps), error)
        self._refresh.set()

    def _radio_recovered(self, helped: Step) -> None:
        ladder = self._ladder
        rs = self.status.radio_recovery
        rs.step = None
        log.info("radio: advertisements heard again after %.0f s of silence (%d recovery step(s); "
                 "the last: %s)", ladder.recovered_after_s, ladder.recovered_steps, helped.value)
        self._event("radio_recovered", {"step": helped.value, "step_result": rs.last_result,
                                        "steps": ladder.recovered_steps,
                                        "silent_s": round(ladder.recovered_after_s, 1)})
        self._refresh.set()

    async def _dispatch(self, radio: Radio, tg: asyncio.TaskGroup) -> None:
        while True:
            device, adv = await self._wanted.get()
            address = device.address.upper()
            binding = self.pairings.lookup(address)
            driver = self._driver_for(device, adv, binding)
            if binding is None or driver is None:
                self._active.discard(address)
                continue
            if not self._hub_clock_ok() or await self._storage_blocked() is not None:
                # Most devices forget a record once indicated: leave them their memory until
                # the hub can both date and keep what they would send.
                self._active.discard(address)
                self._cooldown_until[address] = asyncio.get_running_loop().time() + STORAGE_CHECK_S
                continue
            self._adv_signature[address] = _signature(adv)
            tg.create_task(self._session(radio, device, binding, driver), name=f"session {address}")

    def _driver_for(self, device: BLEDevice, adv: AdvertisementData,
                    binding: DeviceBinding | None) -> Driver | None:
        from drivers import registry as drivers  # noqa: PLC0415

        address = device.address.upper()
        found = drivers.match_all(device, adv)
        if binding is not None and binding.driver:
            try:
                pinned = drivers.by_name(binding.driver)
            except KeyError as e:
                self._log_state.error(f"driver {address}", "unknown", "%s: %s", address, e)
                return None
            # A pin chooses the driver, it does not hide the device's other profiles.
            found = [pinned, *(d for d in found if d.name != pinned.name)]
        if not found:
            self._log_state.warning(
                f"driver {address}", "none",
                "%s is paired but no driver recognises its advertisement; it is not read", address)
            return None
        self._log_state.clear(f"driver {address}")
        return found[0] if len(found) == 1 else drivers.combine(found)

    async def _session(self, radio: Radio, device: BLEDevice, binding: DeviceBinding,
                       driver: Driver) -> None:
        from drivers.base import StorageUnavailableError  # noqa: PLC0415
        from gateway.ble.errors import AdapterBusyError, BondLostError, SessionError  # noqa: PLC0415
        from gateway.ble.session import SessionContext, run_session  # noqa: PLC0415

        address = device.address.upper()
        entry = self.status.device(address)
        synced = self._clock_synced()
        self.status.hub_clock_synced = synced
        ctx = SessionContext(self.cfg.radio, zone_now=self._local_now, clock_trusted=lambda: synced,
                             on_reject=self._rejected, known_info=self._known_info.get(address),
                             storage_blocked=self._storage_blocked,
                             on_commit=self._commit_windows.append,
                             on_commit_failed=functools.partial(self._commit_failed, address),
                             address=address)
        unattributed = 0

        async def handle(m: Measurement, c: SessionContext) -> None:
            nonlocal unattributed
            if not await self._commit(m, c, address, binding, driver, synced):
                unattributed += 1

        brought = False
        failed = False
        deferred = False
        try:
            async with self._gate.connecting():
                stats = await run_session(radio, device, driver, self.cfg.radio, ctx, handle)
            self._gate.connected_while_scanning()
            brought = stats.stored > 0
            entry.sessions_ok += 1
            entry.last_error = None
            entry.clock_offset_s = stats.clock.offset_s if stats.clock else None
            entry.clock_set = stats.clock.set_ok if stats.clock else None
            entry.battery_level = stats.info.battery_level
            entry.kind = driver.kind
            entry.model = stats.info.model or entry.model
            entry.serial = stats.info.serial or entry.serial
            if any((stats.info.manufacturer, stats.info.model, stats.info.serial)):
                self._known_info[address] = stats.info
            if entry.clock_offset_s is not None and abs(entry.clock_offset_s) > CLOCK_DRIFT_EVENT_S:
                self._event("clock_drift", {"device": address, "offset_s": entry.clock_offset_s,
                                            "set": entry.clock_set})
            self._log_state.clear(f"session {address}")
            log.info("%s: session done (%d stored, %d already had, %d undecodable, %d unattributed)",
                     address, stats.stored, stats.duplicates, stats.rejected, unattributed)
        except StorageUnavailableError as e:
            # Not the device's fault: it keeps its memory until the outbox can take it.
            deferred = True
            entry.last_error = f"deferred: {e}"
        except SessionError as e:
            failed = True
            entry.sessions_failed += 1
            entry.last_error = str(e)
            if (isinstance(e, AdapterBusyError) and not e.connected and self._gate.scanning
                    and self._gate.refused_while_scanning()):
                self._event("radio_exclusive", {"reason": "connect refused while scanning"})
            if isinstance(e, AdapterBusyError) and not e.connected:
                failed = False  # not the device's fault: try again at its next advert
            if self._log_state.warning(f"session {address}", e.kind, "%s", e) and \
                    isinstance(e, BondLostError):
                self._event("bond_lost", {"device": address, "advice": e.advice})
        except OutboxError as e:
            failed = True
            entry.sessions_failed += 1
            entry.last_error = f"storage: {e}"
            self._log_state.error(f"session {address}", "storage",
                                  "%s: could not store a reading; session ended, the device keeps "
                                  "the rest: %s", address, e)
            await self._storage_blocked()  # shut the gate now, not at the next check
        except Exception as e:
            # A driver bug must cost one session, never the agent. Its message may quote values
            # (a validation error does), so only the type above debug level.
            failed = True
            entry.sessions_failed += 1
            entry.last_error = f"internal error: {type(e).__name__}"
            self._log_state.error(f"session {address}", f"internal {type(e).__name__}",
                                  "%s: session failed on an internal error (%s); set log_level = "
                                  "\"debug\" for the traceback", address, type(e).__name__)
            log.debug("session failure", exc_info=True)
        finally:
            entry.last_session = _now()
            self._active.discard(address)
            wait = (STORAGE_CHECK_S if deferred
                    else self._cooldown(address, brought=brought, failed=failed))
            self._cooldown_until[address] = asyncio.get_running_loop().time() + wait
            if unattributed:
                self._event("unattributed_readings", {"device": address, "count": unattributed})
            self._snapshot_due = self._snapshot_due or brought or unattributed > 0
            self._refresh.set()

    def _cooldown(self, address: str, *, brought: bool, failed: bool) -> float:
        """Seconds before the next session: short after news, doubling after empty sessions."""
        if brought:
            self._idle_runs.pop(address, None)
            return RECONNECT_COOLDOWN_S
        runs = self._idle_runs[address] = self._idle_runs.get(address, 0) + 1
        ceiling = FAILED_BACKOFF_MAX_S if failed else self.cfg.radio.idle_backoff_max_s
        return float(min(ceiling, RECONNECT_COOLDOWN_S * 2.0 ** min(runs, 16)))

    async def _commit(self, m: Measurement, ctx: SessionContext, address: str,
                      binding: DeviceBinding, driver: Driver, synced: bool) -> bool:
        """Store one measurement; False when it is not the bound patient's (stored unattributed)."""
        from drivers.standard_profile import CombinedDriver  # noqa: PLC0415
        from gateway.intake import belongs_to, build_reading, commit  # noqa: PLC0415

        assert self.outbox is not None
        # Unpaired or re-bound while the session ran: not the session's patient any more.
        attributed = self.pairings.lookup(address) == binding and belongs_to(binding, m)
        part = driver.part_for(m.characteristic) if isinstance(driver, CombinedDriver) else driver
        reading = build_reading(
            m, hub_id=self.cfg.hub.id, binding=binding, address=address, info=ctx.stats.info,
            driver_name=part.name, driver_version=part.version, clock=ctx.stats.clock,
            received_at=dt.datetime.now(dt.UTC), zone=self.cfg.hub.zone, hub_clock_synced=synced,
            connection=ctx.connection_id, occurrence=ctx.occurrence(m.characteristic, m.raw),
            attributed=attributed,
        )
        result = await commit(self.outbox, reading, self.cfg.hub.zone)
        if result is PutResult.STORED:
            ctx.stats.stored += 1
            if attributed:
                self.status.stored += 1
                entry = self.status.device(address)
                entry.readings += 1
                entry.last_reading = _now()
                if self.uplink is not None:
                    self.uplink.reading_stored()
            else:
                # A guest or another slot on a shared device: kept, never filed under this patient.
                self.status.unattributed += 1
        elif result is PutResult.DUPLICATE:
            ctx.stats.duplicates += 1
            self.status.duplicates += 1
        # No REJECTED_FULL: a confirmed reading is kept past the bound (the gate stops the
        # next session instead), since the device has already let go of it.
        return attributed

    # -- reading gates ---------------------------------------------------------------------------

    def _hub_clock_ok(self) -> bool:
        """False while the hub clock is certainly wrong: readings would be dated by it."""
        now = dt.datetime.now(dt.UTC)
        if hub_clock_plausible(now):
            if self.status.hub_clock != "ok":
                self._log_state.clear("hub clock")
                log.warning("hub clock now reads %s: devices are read again", now.date())
                self.status.hub_clock = "ok"
                self._refresh.set()
            return True
        self.status.hub_clock = f"implausible: {now.date().isoformat()}"
        if self._log_state.error("hub clock", "implausible",
                                 "hub clock reads %s, before this release was made: devices are "
                                 "not read until it is set (check NTP: timedatectl); they keep "
                                 "their readings", now.date()):
            self._refresh.set()
        return False

    async def _storage_blocked(self) -> str | None:
        """Why no device may be read now (None: the outbox can take readings); cheap."""
        if self.outbox is None:
            return "outbox not open"
        try:
            reason = await self.outbox.accepting()
        except OutboxError as e:
            reason = f"storage failing: {e}"
        self.status.storage = reason or "ok"
        # The state is the reason's kind ("disk nearly full", "outbox full", ...): the free
        # MiB in its text move all the time and must not make a new event each time.
        if _kind(reason) != _kind(self._storage_block) or not self._storage_checked:
            changed = self._storage_checked or reason is not None
            self._storage_checked = True
            self._storage_block = reason
            if changed:
                if reason is None:
                    log.warning("storage: the outbox can take readings again; devices are read")
                else:
                    log.error("storage: %s; devices are not read until it is fixed (they keep "
                              "their readings)", reason)
                self._event("storage_pressure", {"state": "ok" if reason is None else "blocked",
                                                 "reason": reason})
                self._refresh.set()
        return reason

    async def _watch_storage(self) -> None:
        while True:
            await self._storage_blocked()
            await asyncio.sleep(STORAGE_CHECK_S)

    async def _watch_pairings(self) -> None:
        """Pick up bindings made or removed by `rpm-gateway pair`/`unpair` (one stat a second)."""
        while True:
            await asyncio.sleep(PAIRINGS_CHECK_S)
            if self.pairings.refresh():
                self.pairings_changed()
            else:
                self._publish_registry_events()  # journalled while the broker was away

    def pairings_changed(self) -> None:
        """The allowlist changed: new devices are read from their next advertisement, removed
        ones no more (a session under way stores what it gets as unattributed)."""
        bound = self.pairings.addresses()
        for address in bound - set(self.status.devices):
            self._cooldown_until.pop(address, None)
            self._idle_runs.pop(address, None)
        for address in set(self.status.devices) - bound:
            del self.status.devices[address]
        self._sync_status_devices()
        log.info("pairing registry changed: %d paired device(s)", len(bound))
        self._publish_registry_events()
        self._refresh.set()

    def _sync_status_devices(self) -> None:
        """Each binding's entry in the status: whose it is, where it is bound, what it is."""
        for bound in self.pairings.all():
            entry = self.status.device(bound.binding.address)
            for key, value in bound.fill(vars(entry)).items():
                setattr(entry, key, value)

    def _publish_registry_events(self) -> None:
        """Publish the events `pair`, `unpair` and `assign` journalled (here or by a CLI alone)."""
        registry = self.pairings.registry
        if registry is not None and registry.has_events() and not self._taking_events:
            self._taking_events = True
            self._spawn(self._take_registry_events())

    async def _take_registry_events(self) -> None:
        registry, uplink = self.pairings.registry, self.uplink
        try:
            # Taken from the file only while the broker is there: the uplink's event queue
            # is memory, and the journal is the record of who paired what.
            if registry is None or uplink is None or uplink.state is not BrokerState.CONNECTED:
                return
            try:
                events = await asyncio.to_thread(registry.take_events)
            except RegistryError as e:
                log.warning("pairing registry: could not take its events (%s); kept for later", e)
                return
            for event in events:
                detail, at = event.get("detail"), event.get("at")
                if isinstance(detail, dict):
                    self._event(str(event.get("name")), detail, at if isinstance(at, str) else None)
        finally:
            self._taking_events = False

    # -- the technician's operations (gateway.technician.Host) ---------------------------------

    async def get_radio(self) -> Radio:
        """The agent's own radio."""
        from gateway.control import OpError  # noqa: PLC0415

        if self._radio_open is None:
            raise OpError("the agent's radio is not open yet; try again in a moment", 69)
        return self._radio_open

    def listen(self, callback: Callable[[BLEDevice, AdvertisementData], None]) -> Callable[[], None]:
        """Hear every advertisement the agent's scanner hears, until the returned call."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    @contextlib.asynccontextmanager
    async def exclusive(self, address: str) -> AsyncIterator[None]:
        """Keep the agent's own sessions off `address` while a technician pairs or unpairs it."""
        from gateway.control import OpError  # noqa: PLC0415
        from gateway.technician import BUSY_WAIT_S, EXIT_TEMPFAIL  # noqa: PLC0415

        address = address.upper()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BUSY_WAIT_S
        while address in self._active:
            if loop.time() > deadline:
                raise OpError(f"{address} is busy in a session with the agent; try again in a "
                              "minute", EXIT_TEMPFAIL)
            await asyncio.sleep(0.2)
        self._active.add(address)
        try:
            async with self._gate.connecting():
                yield
        finally:
            self._active.discard(address)
            self._cooldown_until.pop(address, None)

    def clock_trusted(self) -> bool:
        """Whether the hub clock may set device clocks now."""
        return self._clock_synced() and hub_clock_plausible(dt.datetime.now(dt.UTC))

    def local_now(self) -> dt.datetime:
        """The patient's local wall time, naive."""
        return self._local_now()

    def readings_assigned(self) -> None:
        """A technician made unattributed readings pending: deliver them now."""
        if self.uplink is not None:
            self.uplink.reading_stored()
        self._refresh.set()

    async def status_doc(self) -> dict[str, Any]:
        """The status as published, with the broker's state, for `rpm-gateway status`."""
        if self.outbox is not None:
            with contextlib.suppress(OutboxError):
                self.status.outbox = dataclasses.asdict(await self.outbox.stats())
                self.status.days_with_data = await self._days_with_data(self.outbox)
        doc = self._status_dict()
        if self.uplink is not None:
            doc["broker"] = self.uplink.broker_status()
        doc["agent"] = "running"
        return doc

    async def _save_snapshot(self) -> None:
        """The status as of now in <data_dir>/status.json, for `status` while no agent runs.

        Written only when readings came in and at stop: a few small writes a day, not a
        heartbeat's wear on the SD card.
        """
        doc = self._status_dict()
        if self.uplink is not None:
            doc["broker"] = self.uplink.broker_status()
        try:
            await asyncio.to_thread(write_snapshot, self.cfg.hub.data_dir, doc)
        except OSError as e:
            log.debug("status snapshot not saved: %s", e)

    async def _serve_control(self) -> None:
        """Answer `rpm-gateway` commands on the control socket while the agent runs."""
        from gateway import technician  # noqa: PLC0415
        from gateway.control import ControlServer  # noqa: PLC0415

        path = self.cfg.hub.control_socket
        try:
            async with ControlServer(path, technician.handlers(self)):
                self.status.control_socket = str(path)
                log.info("control socket: %s", path)
                await asyncio.Event().wait()
        except OSError as e:
            self.status.control_socket = None
            # The readings do not depend on it; a technician's command then works alone.
            log.warning("control socket %s unavailable (%s); `rpm-gateway` commands on this hub "
                        "will not reach the agent", path, e.strerror or e)

    def _report_recovery(self, outbox: Outbox) -> None:
        report = outbox.recovery
        if report is None:
            return
        detail: dict[str, object] = {
            "kind": report.kind, "salvaged": report.salvaged, "lost": report.lost,
            "moved_to": str(report.moved_to) if report.moved_to else None, "detail": report.detail,
        }
        self.status.outbox_recovery = detail
        self._event("outbox_recovered", detail)

    def _status_dict(self) -> dict[str, object]:
        rs, ladder = self.status.radio_recovery, self._ladder
        heard = ladder.last_advert
        rs.last_advert_age_s = None if heard is None else round(time.monotonic() - heard, 1)
        current = ladder.current_step
        rs.step = None if current is None else current.value
        rs.steps_taken, rs.steps_failed = ladder.steps_taken, ladder.steps_failed
        doc = self.status.as_dict()
        windows = list(self._commit_windows)
        if windows:
            doc["commit_window_ms"] = _window_summary(windows)
        return doc

    def _systemd_status(self) -> str:
        """The line `systemctl status` shows: counts and states only, never patient data."""
        pending = (self.status.outbox or {}).get("pending")
        parts = [f"{pending} pending" if isinstance(pending, int) else "outbox open",
                 f"broker {self.uplink.state.value if self.uplink is not None else 'starting'}",
                 f"radio {self.status.radio}"]
        step = self.status.radio_recovery.step
        if step is not None:
            parts.append(f"radio recovery {step}")
        if self.status.storage not in ("ok", "starting"):
            parts.append(f"storage {self.status.storage}")
        if self.status.hub_clock != "ok":
            parts.append(f"hub clock {self.status.hub_clock}")
        return ", ".join(parts)

    def _commit_failed(self, address: str, characteristic: str, error: BaseException) -> None:
        # The device confirmed it and the store refused it for ~20 s: it is gone. Counted,
        # logged and published so that nobody has to reason about whether it happened.
        self.status.readings_lost += 1
        log.error("%s: a reading on 0x%s could not be stored after every retry and is lost (%s)",
                  address, characteristic, type(error).__name__)
        self._event("reading_lost", {"device": address, "characteristic": characteristic,
                                     "error": type(error).__name__})

    def _rejected(self, characteristic: str, raw: bytes, reason: str) -> None:
        self.status.decode_errors += 1
        log.warning("undecodable value on 0x%s: %s", characteristic, reason.split(":", maxsplit=1)[0])
        log.debug("undecodable value on 0x%s: %s (%s)", characteristic, reason, raw.hex())
        self._event("decode_error", {"characteristic": characteristic})

    def _event(self, name: str, detail: dict[str, object], at: str | None = None) -> None:
        """Queue an event for the events topic without waiting; `at`: when, if not now."""
        if self.uplink is None:
            return
        self._spawn(self.uplink.publish_event(name, detail, at=at))

    def _local_now(self) -> dt.datetime:
        return dt.datetime.now(self.cfg.hub.zone).replace(tzinfo=None)

    async def _housekeeping(self, outbox: Outbox) -> None:
        """Keep the status fresh (after every session, else once a minute) and prune hourly."""
        loop = asyncio.get_running_loop()
        last_prune = -PRUNE_INTERVAL_S
        while True:
            try:
                if loop.time() - last_prune >= PRUNE_INTERVAL_S:
                    last_prune = loop.time()
                    await outbox.prune()
                stats = await outbox.stats()
                self.status.outbox = dataclasses.asdict(stats)
                self.status.days_with_data = await self._days_with_data(outbox)
            except OutboxError as e:
                log.error("outbox housekeeping failed: %s", e)
            if self.uplink is not None:
                self.uplink.status_changed()
            if self._snapshot_due:
                self._snapshot_due = False
                await self._save_snapshot()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HOUSEKEEPING_INTERVAL_S):
                    await self._refresh.wait()
            self._refresh.clear()

    async def _days_with_data(self, outbox: Outbox) -> dict[str, dict[str, object]]:
        """Per patient: days with data in the current 30-day period (gateway.days)."""
        return await current_days(self.pairings, outbox, self._local_now().date())


def _kind(reason: str | None) -> str | None:
    """The kind of a storage gate reason: its words before the first colon."""
    return None if reason is None else reason.split(":", 1)[0]


def _signature(adv: AdvertisementData) -> object:
    """What in an advertisement can announce news (vendor record counters, service data)."""
    return (tuple(sorted(adv.manufacturer_data.items())), tuple(sorted(adv.service_data.items())))


def _window_summary(windows: list[float]) -> dict[str, float]:
    """p50 / p99 / max of commit windows in milliseconds."""
    ms = sorted(w * 1000.0 for w in windows)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {"n": len(ms), "p50": round(statistics.median(ms), 3), "p99": round(p99, 3),
            "max": round(ms[-1], 3)}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
