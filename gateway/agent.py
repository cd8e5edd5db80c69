"""The agent: wires radio, sessions, outbox and uplink under one TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import signal
from collections.abc import Callable

from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData

from drivers import registry as drivers
from drivers.base import DeviceInfo, Driver, Measurement
from gateway.ble.radio import Radio, open_radio
from gateway.ble.session import SessionContext, SessionError, run_session
from gateway.config import DeviceBinding, GatewayConfig
from gateway.intake import belongs_to, build_reading, commit
from gateway.outbox import Outbox, OutboxError, PutResult
from gateway.registry import Pairings
from gateway.status import HubStatus
from gateway.timebase import hub_clock_synced
from gateway.uplink import Uplink

log = logging.getLogger(__name__)

# A device keeps advertising for a moment after it disconnects; don't chase that echo.
RECONNECT_COOLDOWN_S = 2.0
HOUSEKEEPING_INTERVAL_S = 60.0
PRUNE_INTERVAL_S = 3600.0
SCAN_RETRY_MIN_S = 2.0
SCAN_RETRY_MAX_S = 60.0
ADVICE_RADIO = ("check that bluetoothd is running (systemctl status bluetooth), that the adapter "
                "is present (bluetoothctl list) and not blocked (rfkill list)")
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
        self.pairings = Pairings(cfg.devices)
        self.status = HubStatus(hub_id=cfg.hub.id)
        trust = cfg.hub.trust_clock
        self._clock_synced = clock_synced or (hub_clock_synced if trust is None else lambda: trust)
        self._stop = asyncio.Event()
        self._active: set[str] = set()
        self._cooldown_until: dict[str, float] = {}
        self._wanted: asyncio.Queue[tuple[BLEDevice, AdvertisementData]] = asyncio.Queue()
        self._events: set[asyncio.Task[None]] = set()
        self._known_info: dict[str, DeviceInfo] = {}  # per address, from the first session
        self._refresh = asyncio.Event()  # the status changed: publish it now
        self.outbox: Outbox | None = None
        self.uplink: Uplink | None = None

    def stop(self) -> None:
        """Ask the agent to finish: sessions are cancelled, committed readings stay committed."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        """Whether stop() was called (or a signal arrived)."""
        return self._stop.is_set()

    async def run(self) -> None:
        """Run until stopped."""
        drivers.check_unique_names()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        log.info("agent starting: hub %s, radio %s, %d paired device(s)",
                 self.cfg.hub.id, self.cfg.radio.kind, len(self.pairings))
        try:
            radio_cm = (contextlib.nullcontext(self._radio) if self._radio is not None
                        else open_radio(self.cfg.radio))
            async with radio_cm as radio, \
                    Outbox(self.cfg.outbox_path, self.cfg.outbox) as outbox:
                self.outbox = outbox
                self.uplink = Uplink(self.cfg.mqtt, self.cfg.hub.id, outbox, self.status.as_dict)
                try:
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self.uplink.run(), name="uplink")
                        tg.create_task(self._scan(radio), name="scanner")
                        tg.create_task(self._dispatch(radio, tg), name="dispatch")
                        tg.create_task(self._housekeeping(outbox), name="housekeeping")
                        await self._stop.wait()
                        raise _Stop
                except* _Stop:
                    pass
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        log.info("agent stopped")

    # -- scanning and dispatch --------------------------------------------------------------

    def _on_advertisement(self, device: BLEDevice, adv: AdvertisementData) -> None:
        address = device.address.upper()
        if self.pairings.lookup(address) is None:
            self.status.saw_unknown(address)
            return
        entry = self.status.device(address)
        entry.last_seen = _now()
        entry.rssi = adv.rssi
        if address in self._active:
            return
        if asyncio.get_running_loop().time() < self._cooldown_until.get(address, 0.0):
            return
        self._active.add(address)
        self._wanted.put_nowait((device, adv))

    async def _scan(self, radio: Radio) -> None:
        # A radio that cannot scan must not take the agent down: the uplink still has readings
        # to deliver, and the adapter may come back (bluetoothd restarted, dongle re-plugged).
        delay = SCAN_RETRY_MIN_S
        while True:
            try:
                async with radio.scanner(self._on_advertisement):
                    if self.status.radio != "ok":
                        log.info("Bluetooth radio scanning")
                    self.status.radio = "ok"
                    delay = SCAN_RETRY_MIN_S
                    await asyncio.Event().wait()
            except Exception as e:  # any radio failure is retried, never fatal
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if isinstance(e, FileNotFoundError | ConnectionRefusedError):
                    reason = "cannot reach the D-Bus system bus (is dbus running?)"
                self.status.radio = f"unavailable: {reason}"
                log.error("Bluetooth radio unavailable (%s); %s; retrying in %.0f s",
                          reason, ADVICE_RADIO, delay)
                log.debug("radio failure", exc_info=True)
                self._refresh.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, SCAN_RETRY_MAX_S)

    async def _dispatch(self, radio: Radio, tg: asyncio.TaskGroup) -> None:
        while True:
            device, adv = await self._wanted.get()
            address = device.address.upper()
            binding = self.pairings.lookup(address)
            driver = self._driver_for(device, adv, binding)
            if binding is None or driver is None:
                self._active.discard(address)
                continue
            tg.create_task(self._session(radio, device, binding, driver), name=f"session {address}")

    def _driver_for(self, device: BLEDevice, adv: AdvertisementData,
                    binding: DeviceBinding | None) -> Driver | None:
        try:
            if binding is not None and binding.driver:
                return drivers.by_name(binding.driver)
            found = drivers.match(device, adv)
        except (KeyError, drivers.AmbiguousDriverError) as e:
            log.error("%s: %s", device.address, e)
            return None
        if found is None:
            log.warning("%s is paired but no driver recognises its advertisement", device.address)
        return found

    async def _session(self, radio: Radio, device: BLEDevice, binding: DeviceBinding,
                       driver: Driver) -> None:
        address = device.address.upper()
        entry = self.status.device(address)
        synced = self._clock_synced()
        self.status.hub_clock_synced = synced
        ctx = SessionContext(self.cfg.radio, zone_now=self._local_now, clock_trusted=lambda: synced,
                             on_reject=self._rejected, known_info=self._known_info.get(address))

        async def handle(m: Measurement, c: SessionContext) -> None:
            await self._commit(m, c, address, binding, driver, synced)

        try:
            stats = await run_session(radio, device, driver, self.cfg.radio, ctx, handle)
            entry.sessions_ok += 1
            entry.last_error = None
            entry.clock_offset_s = stats.clock.offset_s if stats.clock else None
            entry.clock_set = stats.clock.set_ok if stats.clock else None
            entry.battery_level = stats.info.battery_level
            if any((stats.info.manufacturer, stats.info.model, stats.info.serial)):
                self._known_info[address] = stats.info
            if entry.clock_offset_s is not None and abs(entry.clock_offset_s) > CLOCK_DRIFT_EVENT_S:
                self._event("clock_drift", {"device": address, "offset_s": entry.clock_offset_s,
                                            "set": entry.clock_set})
            log.info("%s: session done (%d stored, %d already had, %d undecodable)",
                     address, stats.stored, stats.duplicates, stats.rejected)
        except SessionError as e:
            entry.sessions_failed += 1
            entry.last_error = str(e)
            log.warning("%s", e)
        except OutboxError as e:
            entry.sessions_failed += 1
            entry.last_error = f"storage: {e}"
            log.error("%s: could not store a reading, session ended: %s", address, e)
        except Exception as e:
            # A driver bug must cost one session, never the agent. Its message may quote values
            # (a validation error does), so only the type above debug level.
            entry.sessions_failed += 1
            entry.last_error = f"internal error: {type(e).__name__}"
            log.error("%s: session failed on an internal error (%s); set log_level = \"debug\" "
                      "for the traceback", address, type(e).__name__)
            log.debug("session failure", exc_info=True)
        finally:
            entry.last_session = _now()
            self._active.discard(address)
            self._cooldown_until[address] = asyncio.get_running_loop().time() + RECONNECT_COOLDOWN_S
            self._refresh.set()

    async def _commit(self, m: Measurement, ctx: SessionContext, address: str,
                      binding: DeviceBinding, driver: Driver, synced: bool) -> None:
        assert self.outbox is not None
        if not belongs_to(binding, m):
            # Someone else's slot on a shared device: never filed under this patient.
            self.status.other_user += 1
            log.info("%s: reading from user slot %s ignored (bound to slot %s)",
                     address, m.user_index, binding.user_index)
            return
        reading = build_reading(
            m, hub_id=self.cfg.hub.id, binding=binding, address=address, info=ctx.stats.info,
            driver_name=driver.name, driver_version=driver.version, clock=ctx.stats.clock,
            received_at=dt.datetime.now(dt.UTC), zone=self.cfg.hub.zone, hub_clock_synced=synced,
        )
        result = await commit(self.outbox, reading, self.cfg.hub.zone)
        if result is PutResult.STORED:
            ctx.stats.stored += 1
            self.status.stored += 1
            self.status.device(address).readings += 1
        elif result is PutResult.DUPLICATE:
            ctx.stats.duplicates += 1
            self.status.duplicates += 1
        else:
            self._event("storage_pressure", {"device": address, "when_full": self.cfg.outbox.when_full})

    def _rejected(self, characteristic: str, raw: bytes, reason: str) -> None:
        self.status.decode_errors += 1
        log.warning("undecodable value on 0x%s: %s", characteristic, reason.split(":", maxsplit=1)[0])
        log.debug("undecodable value on 0x%s: %s (%s)", characteristic, reason, raw.hex())
        self._event("decode_error", {"characteristic": characteristic})

    def _event(self, name: str, detail: dict[str, object]) -> None:
        """Queue an event for the events topic without waiting (no patient data in it)."""
        if self.uplink is None:
            return
        task = asyncio.get_running_loop().create_task(self.uplink.publish_event(name, detail))
        self._events.add(task)
        task.add_done_callback(self._events.discard)

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
            except OutboxError as e:
                log.error("outbox housekeeping failed: %s", e)
            if self.uplink is not None:
                self.uplink.status_changed()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HOUSEKEEPING_INTERVAL_S):
                    await self._refresh.wait()
            self._refresh.clear()

def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
