"""From a decoded measurement to a committed outbox row: identity, patient, time."""

from __future__ import annotations

import datetime as dt
import logging
from zoneinfo import ZoneInfo

from drivers.base import ClockCheck, DeviceInfo, Measurement
from gateway.config import DeviceBinding
from gateway.models import DeviceRef, Reading
from gateway.outbox import Outbox, OutboxItem, PutResult
from gateway.timebase import reading_id, resolve_measured_at

log = logging.getLogger(__name__)


def belongs_to(binding: DeviceBinding, m: Measurement) -> bool:
    """Whether a measurement is the bound patient's: a device with user slots says whose it is.

    A binding without a slot takes every reading of its device (the technician bound the
    device to one person). A binding to slot N takes only slot N: another slot (a spouse on
    the same cuff) and the device's own "unknown user" (255, a guest) are not this patient's.
    A value with no user field at all cannot tell, so the binding decides.
    """
    if binding.user_index is None or m.user_index is None:
        return True
    return m.user_index == binding.user_index


def build_reading(
    m: Measurement,
    *,
    hub_id: str,
    binding: DeviceBinding,
    address: str,
    info: DeviceInfo,
    driver_name: str,
    driver_version: str,
    clock: ClockCheck | None,
    received_at: dt.datetime,
    zone: ZoneInfo,
    hub_clock_synced: bool,
    connection: str = "",
    occurrence: int = 0,
    attributed: bool = True,
) -> Reading:
    """The payload for one measurement; pure, so every rule here is unit-testable.

    `connection` and `occurrence` identify a frame that carries neither time stamp nor
    sequence (see timebase.reading_id). An unattributed reading gets no patient id.
    """
    offset = clock.offset_s if clock is not None and hub_clock_synced else None
    measured_at, source = resolve_measured_at(m.device_time, offset, received_at, zone,
                                              hub_synced=hub_clock_synced)
    rid = reading_id(
        address, m.characteristic, m.raw,
        identified=m.device_time is not None or m.sequence is not None,
        connection=connection, occurrence=occurrence,
    )
    return Reading(
        reading_id=rid,
        hub_id=hub_id,
        patient_id=binding.patient_id if attributed else "",
        device=DeviceRef(address=address.upper(), manufacturer=info.manufacturer,
                         model=info.model, serial=info.serial, firmware=info.firmware,
                         system_id=info.system_id, driver=driver_name),
        kind=m.kind,
        observations=m.observations,
        status=m.status,
        valid=m.valid,
        measured_at=measured_at,
        received_at=received_at,
        time_source=source,
        device_time=m.device_time,
        timezone=zone.key,
        device_clock_offset_s=clock.offset_s if clock is not None else None,
        hub_clock_synced=hub_clock_synced,
        user_index=m.user_index,
        characteristic=m.characteristic,
        raw=m.raw.hex(),
        driver_version=driver_version,
    )


def outbox_item(r: Reading, zone: ZoneInfo) -> OutboxItem:
    """The outbox row for a reading; the day is the patient's local calendar day."""
    return OutboxItem(
        reading_id=r.reading_id,
        topic="readings",
        payload=r.to_json(),
        # No patient: stored and counted, never published (the outbox keeps it out of pending).
        patient_id=r.patient_id or None,
        kind=r.kind,
        measured_at=r.measured_at.astimezone(dt.UTC).isoformat(),
        measured_day=r.measured_at.astimezone(zone).date().isoformat(),
        valid=r.valid,
    )


async def commit(outbox: Outbox, r: Reading, zone: ZoneInfo) -> PutResult:
    """Store a reading durably; returns only after the commit reached the disk."""
    # The stack confirmed the indication already: the device may have forgotten it.
    result = await outbox.put(outbox_item(r, zone), confirmed=True)
    if result is PutResult.STORED and not r.patient_id:
        log.info("reading %s stored as unattributed (%s from %s)", r.reading_id, r.kind,
                 r.device.address)
    elif result is PutResult.STORED:
        log.info("reading %s stored (%s from %s)", r.reading_id, r.kind, r.device.address)
    elif result is PutResult.DUPLICATE:
        # Debug: a device that replays its memory every session would flood the journal.
        log.debug("reading %s already stored; device re-sent it", r.reading_id)
    else:
        log.warning("reading %s rejected: outbox full", r.reading_id)
    return result
