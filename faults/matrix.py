"""The rows of the matrix: name, class, how to run it, whether the short run (`make test`) has it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from faults import (
    rows_broker,
    rows_config,
    rows_corrupt,
    rows_device,
    rows_disk,
    rows_fuzz,
    rows_kill,
    rows_radio,
    rows_refused,
)
from faults.report import Row
from faults.rig import Ctx

CLASSES = ("kill", "broker", "network", "refused", "oversize", "disk", "corrupt", "radio", "bond",
           "clock", "config", "fuzz")


@dataclass(frozen=True)
class Fault:
    """One row of the matrix."""

    name: str
    cls: str
    run: Callable[[Ctx], Awaitable[Row]]
    short: bool = False  # part of `--short`, the version `make test` runs


def _clock(name: str, opts: tuple[str, ...], trust: bool) -> Callable[[Ctx], Awaitable[Row]]:
    return lambda ctx: rows_radio.device_clock(ctx, name, opts, trust=trust)


def _config(name: str) -> Callable[[Ctx], Awaitable[Row]]:
    return lambda ctx: rows_config.bad_config(ctx, name)


def _corrupt(name: str, damage: Callable[..., str] | None) -> Callable[[Ctx], Awaitable[Row]]:
    return lambda ctx: rows_corrupt.corrupt(ctx, name, damage)


FAULTS: tuple[Fault, ...] = (
    Fault("agent-kill-9", "kill",
          lambda c: rows_kill.agent_kill(c, "agent-kill-9", commit_delay_ms=0), short=True),
    Fault("agent-kill-9-slow-disk", "kill",
          lambda c: rows_kill.agent_kill(c, "agent-kill-9-slow-disk", commit_delay_ms=50)),
    Fault("broker-outage-backlog", "broker", rows_broker.broker_outage, short=True),
    Fault("broker-kill-9-mid-drain", "broker", rows_broker.broker_kill),
    Fault("network-frozen-drain", "network",
          lambda c: rows_broker.frozen_network(c, during_drain=True), short=True),
    Fault("network-frozen-idle", "network",
          lambda c: rows_broker.frozen_network(c, during_drain=False)),
    Fault("broker-refuses-readings-acl", "refused", rows_refused.refused, short=True),
    Fault("oversize-reading", "oversize", rows_refused.oversize, short=True),
    Fault("disk-full-2mib", "disk", rows_disk.disk_small),
    Fault("disk-full-then-space", "disk", rows_disk.disk_fills, short=True),
    Fault("outbox-truncated", "corrupt", _corrupt("outbox-truncated", rows_corrupt.truncate)),
    Fault("outbox-garbage-header", "corrupt",
          _corrupt("outbox-garbage-header", rows_corrupt.garbage_header)),
    Fault("outbox-zero-length", "corrupt", _corrupt("outbox-zero-length", rows_corrupt.zero_length)),
    Fault("outbox-payload-byte-changed", "corrupt", _corrupt("outbox-payload-byte-changed", None),
          short=True),
    Fault("outbox-locked", "corrupt", _corrupt("outbox-locked", None)),
    Fault("radio-link-dropped", "radio", rows_radio.link_dropped),
    Fault("radio-garbage-bytes", "radio", rows_radio.garbage),
    Fault("radio-resend-stored", "radio",
          lambda c: rows_radio.resend_stored(c, timestamps=True), short=True),
    Fault("radio-resend-untimestamped", "radio",
          lambda c: rows_radio.resend_stored(c, timestamps=False)),
    Fault("radio-constant-advertiser", "radio", rows_radio.constant_advertiser),
    Fault("radio-att-error", "radio", rows_device.att_error),
    Fault("radio-never-answer", "radio", rows_device.never_answer),
    Fault("radio-never-answer-deadline", "radio", rows_device.never_answer_deadline),
    Fault("bond-user-slots", "bond", rows_radio.user_slots, short=True),
    Fault("bond-bonded-cuff-kill", "bond", rows_radio.bonded),
    Fault("bond-forgot-bond", "bond", rows_device.forgot_bond),
    *(Fault(n, "clock", _clock(n, o, t), short=(n == "clock-device-years-off"))
      for n, o, t in rows_radio.CLOCK_CASES),
    Fault("clock-hub-timezone", "clock", rows_radio.hub_timezone),
    Fault("clock-hub-stepped", "clock", rows_radio.hub_clock_stepped),
    *(Fault(n, "config", _config(n), short=(n == "config-missing-password-file"))
      for n in rows_config.CASES),
    Fault("config-wrong-credentials", "config", rows_config.wrong_credentials, short=True),
    Fault("fuzz-decoders", "fuzz", rows_fuzz.fuzz, short=True),
)
