"""Simulated twins of the drivers: bumble GATT peripherals for the virtual radio (sim only)."""

from drivers.simulated.blood_pressure import (
    SimulatedBloodPressureMonitor,
    demo_bp_readings,
    demo_cuff,
)
from drivers.simulated.device import SimClock, SimScript, SimulatedDevice
from drivers.simulated.weight_scale import (
    SimulatedWeightScale,
    demo_scale,
    demo_weight_readings,
)

__all__ = [
    "SimClock",
    "SimScript",
    "SimulatedBloodPressureMonitor",
    "SimulatedDevice",
    "SimulatedWeightScale",
    "demo_bp_readings",
    "demo_cuff",
    "demo_scale",
    "demo_weight_readings",
]
