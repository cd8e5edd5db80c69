"""Every driver is distinct, matches its own profile and no other's."""

from __future__ import annotations

from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData

from drivers import registry, uuids


def adv(*services: int) -> AdvertisementData:
    return AdvertisementData(local_name="x", manufacturer_data={}, service_data={},
                             service_uuids=[uuids.full(s) for s in services], tx_power=None,
                             rssi=-60, platform_data=())


DEV = BLEDevice("AA:BB:CC:DD:EE:FF", "x", None)


def test_names_unique() -> None:
    registry.check_unique_names()
    assert len({d.name for d in registry.ALL_DRIVERS}) == len(registry.ALL_DRIVERS)


def test_each_profile_matches_exactly_one_driver() -> None:
    assert registry.match(DEV, adv(uuids.BLOOD_PRESSURE)).name == "sig_blood_pressure"  # type: ignore[union-attr]
    assert registry.match(DEV, adv(uuids.WEIGHT_SCALE)).name == "sig_weight_scale"  # type: ignore[union-attr]
    assert registry.match(DEV, adv(0x180F)) is None


def test_a_device_claimed_twice_is_an_error() -> None:
    try:
        registry.match(DEV, adv(uuids.BLOOD_PRESSURE, uuids.WEIGHT_SCALE))
    except registry.AmbiguousDriverError as e:
        assert "several drivers" in str(e)
    else:
        raise AssertionError("expected AmbiguousDriverError")


def test_uuid_forms() -> None:
    assert uuids.short("0x2A35") == uuids.short("2a35") == uuids.short(uuids.full(0x2A35)) == "2a35"
