"""All drivers, and the one rule for choosing one: exactly one may match a device."""

from __future__ import annotations

from typing import TYPE_CHECKING

from drivers import blood_pressure, weight_scale
from drivers.base import Driver
from drivers.standard_profile import CombinedDriver, StandardProfileDriver

if TYPE_CHECKING:
    from bleak.backends.device import BLEDevice
    from bleak.backends.scanner import AdvertisementData

ALL_DRIVERS: tuple[Driver, ...] = (weight_scale.DRIVER, blood_pressure.DRIVER)


class AmbiguousDriverError(Exception):
    """More than one driver claims a device: a bug in the drivers, never guessed around."""


def by_name(name: str) -> Driver:
    """The driver called `name`; KeyError names the known ones."""
    for d in ALL_DRIVERS:
        if d.name == name:
            return d
    raise KeyError(f"no driver {name!r}; known: {', '.join(d.name for d in ALL_DRIVERS)}")


def match(device: BLEDevice, adv: AdvertisementData) -> Driver | None:
    """The one driver for an advertised device, None if no driver knows it."""
    found = [d for d in ALL_DRIVERS if d.matches(device, adv)]
    if len(found) > 1:
        names = ", ".join(d.name for d in found)
        raise AmbiguousDriverError(f"{device.address} matches several drivers: {names}")
    return found[0] if found else None


def match_all(device: BLEDevice, adv: AdvertisementData) -> list[Driver]:
    """Every driver that claims an advertised device (a combined device has several)."""
    return [d for d in ALL_DRIVERS if d.matches(device, adv)]


def combine(found: list[Driver]) -> Driver:
    """One driver that reads every profile in `found`: a combined device is read, not refused."""
    parts = [d for d in found if isinstance(d, StandardProfileDriver)]
    if len(parts) != len(found):
        # Only the standard conversation can be shared; read the first (most specific) one.
        return found[0]
    return CombinedDriver(tuple(parts))


def check_unique_names() -> None:
    """Raise if two drivers share a name (checked at agent start-up)."""
    names = [d.name for d in ALL_DRIVERS]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise AmbiguousDriverError(f"duplicate driver names: {sorted(dupes)}")
