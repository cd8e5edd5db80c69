"""The technician's operations when no agent runs: the CLI owns the radio for one command.

`status` and `devices` then read the state directory: the pairing registry, the outbox (live
counts, days with data) and the agent's last status snapshot (``<data_dir>/status.json``,
written when a session stored readings and when the agent stops).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any

from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData

from gateway import __version__
from gateway.ble.radio import Radio, open_radio
from gateway.config import GatewayConfig
from gateway.control import OpError
from gateway.days import current_days
from gateway.hub_state import agent_running, read_snapshot
from gateway.outbox import Outbox, OutboxError
from gateway.pairings import open_pairings
from gateway.timebase import hub_clock_plausible, hub_clock_synced

log = logging.getLogger(__name__)

class LocalHub:
    """gateway.technician.Host for a CLI working alone (async with)."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.pairings = open_pairings(cfg.devices, cfg.hub.data_dir)
        self.outbox: Outbox | None = None
        self._stack = contextlib.AsyncExitStack()
        self._radio: Radio | None = None
        self._scanner: BleakScanner | None = None
        self._listeners: list[Callable[[BLEDevice, AdvertisementData], None]] = []

    async def __aenter__(self) -> LocalHub:
        # Only an outbox that exists is opened: reading a status must not create a hub's state.
        if self.cfg.outbox_path.exists():
            try:
                self.outbox = await self._stack.enter_async_context(
                    Outbox(self.cfg.outbox_path, self.cfg.outbox))
            except OutboxError as e:
                log.warning("outbox %s not readable now: %s", self.cfg.outbox_path, e)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._stop_scanner()
        await self._stack.aclose()

    # -- radio --------------------------------------------------------------------------------

    async def get_radio(self) -> Radio:
        """Open the configured radio and start listening (once per command)."""
        if self._radio is None:
            self.cfg.hub.data_dir.mkdir(parents=True, exist_ok=True)
            if agent_running(self.cfg.hub.data_dir):
                raise OpError(f"an agent is running but does not answer on its control socket "
                              f"{self.cfg.hub.control_socket}; check `journalctl -u rpm-gateway` "
                              "(the socket's directory, permissions), or run this as a member of "
                              "the service's group", 69)
            try:
                self._radio = await self._stack.enter_async_context(
                    open_radio(self.cfg.radio, self.cfg.hub.zone))
            except (OSError, ConnectionError) as e:
                raise OpError(f"cannot open the Bluetooth radio: {e}", 69) from e
            await self._start_scanner()
        return self._radio

    def _on_advert(self, device: BLEDevice, adv: AdvertisementData) -> None:
        for listener in tuple(self._listeners):
            listener(device, adv)

    async def _start_scanner(self) -> None:
        assert self._radio is not None
        scanner = self._radio.scanner(self._on_advert)
        try:
            await scanner.start()
        except Exception as e:
            raise OpError(f"the Bluetooth radio cannot scan: {type(e).__name__}: {e}; check "
                          "that bluetoothd runs (systemctl status bluetooth) and the adapter "
                          "is not blocked (rfkill list)", 69) from e
        self._scanner = scanner

    async def _stop_scanner(self) -> None:
        scanner, self._scanner = self._scanner, None
        if scanner is not None:
            with contextlib.suppress(Exception):
                await scanner.stop()

    def listen(self, callback: Callable[[BLEDevice, AdvertisementData], None]) -> Callable[[], None]:
        """Hear advertisements until the returned call."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    @contextlib.asynccontextmanager
    async def exclusive(self, address: str) -> AsyncIterator[None]:
        """No agent to keep away; scanning pauses so that adapters that cannot do both connect."""
        del address
        await self._stop_scanner()
        try:
            yield
        finally:
            if self._radio is not None:
                with contextlib.suppress(OpError):
                    await self._start_scanner()

    # -- time ---------------------------------------------------------------------------------

    def clock_trusted(self) -> bool:
        """As the agent decides it: hub.trust_clock, else NTP's word, and a plausible date."""
        trust = self.cfg.hub.trust_clock
        synced = hub_clock_synced() if trust is None else trust
        return synced and hub_clock_plausible(dt.datetime.now(dt.UTC))

    def local_now(self) -> dt.datetime:
        """The patient's local wall time, naive."""
        return dt.datetime.now(self.cfg.hub.zone).replace(tzinfo=None)

    def pairings_changed(self) -> None:
        """Nothing to do: the next agent publishes the journalled events."""

    def readings_assigned(self) -> None:
        """Nothing to do: the next agent delivers them."""

    # -- state --------------------------------------------------------------------------------

    async def status_doc(self) -> dict[str, Any]:
        """The last status the agent saved, with live outbox counts and days with data."""
        snapshot = read_snapshot(self.cfg.hub.data_dir)
        doc: dict[str, Any] = {"hub_id": self.cfg.hub.id, "version": __version__, **snapshot,
                               "agent": "not running", "last_known_at": snapshot.get("at")}
        devices: dict[str, Any] = dict(snapshot.get("devices") or {})
        for bound in self.pairings.all():
            devices[bound.binding.address] = bound.fill(devices.get(bound.binding.address) or {})
        doc["devices"] = {a: devices[a] for a in sorted(devices) if self.pairings.bound(a)}
        doc["paired_devices"] = len(self.pairings)
        if self.pairings.registry is not None and self.pairings.registry.problem:
            doc["pairing_registry"] = self.pairings.registry.problem
        with contextlib.suppress(OutboxError):
            if self.outbox is not None:
                doc["outbox"] = dataclasses.asdict(await self.outbox.stats())
            doc["days_with_data"] = await current_days(self.pairings, self.outbox,
                                                       self.local_now().date())
        broker = doc.get("broker")
        if isinstance(broker, dict):
            doc["broker"] = {**broker, "state": "unknown (agent not running)"}
        return doc
