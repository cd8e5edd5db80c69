"""Terminal output a person reads: reading values, times, ages, flags, and the CLI's table style.

The value functions are pure (no I/O, no clock) and never raise on a payload's contents: a
reading comes from a device and the network, and a table must still print one line for it.
Every string they return is one line of printable text (no control characters, no newlines).

For a command's output (`scan`, `devices`, `status`, ...)::

    from gateway import render

    out = render.console(json_mode=args.json)
    if args.json:
        out.out(json.dumps(rows))            # plain, never wrapped, nothing added
    else:
        t = render.table(["address", "name", "RSSI", "driver", "patient"])
        for d in devices:
            t.add_row(d.address, d.name, str(d.rssi), d.driver, d.patient)  # None prints "—"
        out.print(t)

Cells are rich `Text`, never console markup: a UCUM unit such as `[lb_av]` or a device name in
square brackets prints as it is.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from zoneinfo import ZoneInfo

from rich import box
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from drivers.blood_pressure import (
    LOINC_DIASTOLIC,
    LOINC_MEAN_ARTERIAL,
    LOINC_PULSE_RATE,
    LOINC_SYSTOLIC,
)
from drivers.weight_scale import LOINC_BMI, LOINC_BODY_HEIGHT, LOINC_BODY_WEIGHT

MISSING: Final = "—"
"""What a value that is absent, not a number or not readable prints as."""

MAX_WIDTH: Final = 100
"""The widest a CLI table gets, whatever the terminal: an SSH session on a technician's phone
is narrower, a wide monitor gains nothing."""

# LOINC codes of kinds the hub does not read yet (health-devices.md §9.1), so that a driver
# added for them renders well without touching this module.
LOINC_SPO2: Final = ("59408-5", "2708-6")
LOINC_BODY_TEMPERATURE: Final = "8310-5"
LOINC_GLUCOSE: Final = ("41653-7", "2339-0", "14743-9")
LOINC_BODY_FAT: Final = "41982-0"

# UCUM (as in the payload) to what a person reads.
_UNITS: Final[Mapping[str, str]] = {
    "mm[Hg]": "mmHg",
    "[lb_av]": "lb",
    "[in_i]": "in",
    "[degF]": "°F",
    "Cel": "°C",
    "kg/m2": "kg/m²",
    "{beats}/min": "/min",
    "1": "",
}

# Decimals a reading is shown with, by readable unit: the device's resolution is finer than a
# person reads it (a scale sends 82.195 kg; its own display says 82.2).
_DECIMALS: Final[Mapping[str, int]] = {
    "mmHg": 0, "kPa": 1, "/min": 0, "kg": 1, "lb": 1, "g": 0, "kg/m²": 1, "m": 2, "cm": 0,
    "in": 0, "°C": 1, "°F": 1, "%": 0, "mg/dL": 0, "mmol/L": 1,
}

# Short words for a reading's status flags (drivers/base.py STATUS_FLAGS).
_FLAGS: Final[Mapping[str, str]] = {
    "body_movement": "moved",
    "cuff_loose": "cuff loose",
    "irregular_pulse": "irregular",
    "pulse_above_range": "pulse high",
    "pulse_below_range": "pulse low",
    "improper_position": "position",
}

_TIME_SOURCES: Final[Mapping[str, str]] = {
    "device_clock": "device",
    "device_clock_corrected": "adjusted",
    "hub_receipt": "hub",
}

_KINDS: Final[Mapping[str, str]] = {"blood_pressure": "BP cuff", "body_weight": "scale"}

_SPACES = re.compile(r"\s+")
_UCUM_BRACKETS = re.compile(r"\[([^\]_]*)(?:_[^\]]*)?\]")


def one_line(value: object, limit: int = 200) -> str:
    """`value` as one line of printable text: control and separator characters become spaces,
    runs of spaces one space, and anything past `limit` characters an ellipsis."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit * 4:
        text = text[: limit * 4]  # the work below stays bounded on hostile input
    text = "".join(c if c.isprintable() else " " for c in text)
    text = _SPACES.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def unit_label(ucum: object) -> str:
    """A UCUM unit as a person reads it: mm[Hg] → mmHg, [lb_av] → lb, Cel → °C, kg/m2 → kg/m²;
    other bracketed units lose their brackets ([iU] → iU); a pulse's /min is left to the caller
    ("pulse 76")."""
    if not isinstance(ucum, str):
        return ""
    if ucum in _UNITS:
        return _UNITS[ucum]
    return one_line(_UCUM_BRACKETS.sub(r"\1", ucum), 16)


def number(value: float | None, unit: str = "") -> str:
    """`value` with the decimals a person reads for `unit` (a readable unit); — when missing."""
    if value is None or not math.isfinite(value):
        return MISSING
    decimals = _DECIMALS.get(unit)
    if decimals is None:  # an unknown quantity: enough digits to tell values apart
        decimals = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
        text = f"{value:.{decimals}f}" if abs(value) < 1e9 else f"{value:.3g}"
        if "." in text and "e" not in text:
            text = text.rstrip("0").rstrip(".")
    else:
        text = f"{value:.{decimals}f}" if abs(value) < 1e12 else f"{value:.3g}"
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text  # not "-0.0"


@dataclass(frozen=True)
class _Obs:
    code: str
    name: str
    value: float | None
    unit: str  # readable


def _observations(payload: Mapping[str, Any]) -> list[_Obs]:
    raw = payload.get("observations") if isinstance(payload, Mapping) else None
    if not isinstance(raw, Iterable) or isinstance(raw, str | bytes | Mapping):
        return []
    out: list[_Obs] = []
    for o in raw:
        if not isinstance(o, Mapping):
            continue
        v = o.get("value")
        value = float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None
        if value is not None and not math.isfinite(value):
            value = None
        code = o.get("code")
        name = o.get("name")
        out.append(_Obs(code=code if isinstance(code, str) else "",
                        name=one_line(name, 40) if isinstance(name, str) else "",
                        value=value, unit=unit_label(o.get("unit"))))
    return out


def _with_unit(o: _Obs) -> str:
    return f"{number(o.value, o.unit)} {o.unit}".rstrip()


def _generic(o: _Obs) -> str:
    name = o.name or o.code or "value"
    return f"{name} {_with_unit(o)}"


def _pulse(o: _Obs) -> str:
    # "pulse 76": per minute goes without saying; any other unit is shown.
    return f"pulse {number(o.value, o.unit)}" + ("" if o.unit == "/min" else f" {o.unit}".rstrip())


def reading_values(payload: Mapping[str, Any]) -> str:
    """A reading payload's observations as a person reads them, in one line.

    "132/87 mmHg, pulse 76"; "82.2 kg, BMI 24.1"; "181.2 lb"; "SpO2 98 %, pulse 72";
    "5.4 mmol/L"; "36.8 °C". The mean arterial pressure is left out when systolic and
    diastolic are shown (a home reading is judged on those two). A value that is not a number
    prints as —; a kind this module does not know prints "name value unit" per observation.
    """
    obs = _observations(payload)
    codes = {o.code for o in obs}
    pair = LOINC_SYSTOLIC in codes and LOINC_DIASTOLIC in codes
    parts: list[str] = []
    pressure_shown = False
    for o in obs:
        if pair and o.code in (LOINC_SYSTOLIC, LOINC_DIASTOLIC, LOINC_MEAN_ARTERIAL):
            if o.code != LOINC_MEAN_ARTERIAL and not pressure_shown:
                parts.append(_pressure(obs))  # where the first of the two stands
                pressure_shown = True
            continue
        if o.code == LOINC_MEAN_ARTERIAL:
            parts.append(f"MAP {_with_unit(o)}")
        elif o.code == LOINC_PULSE_RATE:
            parts.append(_pulse(o))
        elif o.code == LOINC_BMI:
            parts.append(f"BMI {number(o.value, o.unit)}")
        elif o.code in (LOINC_BODY_WEIGHT, LOINC_BODY_TEMPERATURE, *LOINC_GLUCOSE):
            parts.append(_with_unit(o))  # the unit says what it is
        elif o.code == LOINC_BODY_HEIGHT:
            parts.append(f"height {_with_unit(o)}")
        elif o.code in LOINC_SPO2:
            parts.append(f"SpO2 {_with_unit(o)}")
        elif o.code == LOINC_BODY_FAT:
            parts.append(f"body fat {number(o.value, 'kg/m²')} {o.unit}".rstrip())  # 1 decimal
        else:
            parts.append(_generic(o))
    return one_line(", ".join(parts), 120) or MISSING


def _pressure(obs: Sequence[_Obs]) -> str:
    sys_ = next(o for o in obs if o.code == LOINC_SYSTOLIC)
    dia = next(o for o in obs if o.code == LOINC_DIASTOLIC)
    unit = sys_.unit or dia.unit
    return f"{number(sys_.value, unit)}/{number(dia.value, unit)} {unit}".rstrip()


def _zone(zone: str | dt.tzinfo | None) -> dt.tzinfo | None:
    return ZoneInfo(zone) if isinstance(zone, str) else zone


def local_time(utc_iso: str, zone: str | dt.tzinfo | None = None, *,
               fmt: str = "%Y-%m-%d %H:%M") -> str:
    """A UTC instant ("2026-12-02T07:14:05Z") as wall time in `zone`: "2026-12-02 08:14".

    `zone` is an IANA name, a tzinfo, or None for this machine's zone; a name this machine
    does not know raises ZoneInfoNotFoundError (a KeyError), a malformed one ValueError: a
    zone is configuration, not data. A time without an offset is taken as UTC; one that does
    not parse prints as —. `fmt="%H:%M:%S"` gives "08:14:05".
    """
    tz = _zone(zone)
    try:
        when = dt.datetime.fromisoformat(utc_iso.strip())
    except (ValueError, TypeError, AttributeError):
        return MISSING
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    try:
        return one_line(when.astimezone(tz).strftime(fmt), 40)
    except (OverflowError, ValueError):  # the year 1 in UTC is the year 0 somewhere east
        return MISSING


def age(seconds: float | None, *, ago: bool = False) -> str:
    """How long ago, in the largest whole unit: "45 s", "3 min", "2 h", "5 d" (hours up to 48).

    `ago=True` reads as a sentence: "3 min ago", "just now", and "in 2 min" for a time ahead
    of now (a device or hub clock that is off). None or not a number prints as —.
    """
    if seconds is None or not math.isfinite(seconds):
        return MISSING
    ahead = seconds < 0
    s = abs(seconds)
    if ago and s < 1:
        return "just now"
    if s < 60:
        text = f"{int(s)} s"
    elif s < 3600:
        text = f"{int(s // 60)} min"
    elif s < 48 * 3600:
        text = f"{int(s // 3600)} h"
    else:
        text = f"{int(s // 86400)} d"
    if not ago:
        return f"-{text}" if ahead else text
    return f"in {text}" if ahead else f"{text} ago"


def short_flags(status: Iterable[object], valid: bool) -> str:
    """A reading's status flags in short words ("irregular, moved"); "ok" when there are none;
    "INVALID" first when the device said the measurement failed."""
    words: list[str] = [] if valid else ["INVALID"]
    if isinstance(status, Iterable) and not isinstance(status, str | bytes):
        for flag in status:
            word = _FLAGS.get(flag, "") if isinstance(flag, str) else ""
            word = word or one_line(str(flag).replace("_", " "), 20)
            if word and word not in words:
                words.append(word)
    return ", ".join(words) or "ok"


def time_source(source: object) -> str:
    """Where a reading's time came from, in a word: device, adjusted (device clock corrected by
    the offset the hub measured), hub (the hub's clock when it arrived)."""
    if isinstance(source, str) and source in _TIME_SOURCES:
        return _TIME_SOURCES[source]
    return one_line(source, 12) or MISSING


def device_label(device: Mapping[str, Any], kind: object = None, width: int = 13) -> str:
    """A device in `width` characters: its model (or kind) and the last 5 of its address,
    "SIM-BP1 BC:01"; a long model is cut, never the address."""
    address = device.get("address") if isinstance(device, Mapping) else None
    tail = one_line(address, 40)[-5:] if isinstance(address, str) else ""
    model = device.get("model") if isinstance(device, Mapping) else None
    name = one_line(model, 40) if isinstance(model, str) and model.strip() else ""
    if not name and isinstance(kind, str):
        name = _KINDS.get(kind, one_line(kind, 40))
    if not name and isinstance(device, Mapping) and isinstance(device.get("driver"), str):
        name = one_line(device["driver"], 40)
    room = max(width - len(tail) - 1, 1) if tail else width
    if len(name) > room:
        name = name[: room - 1] + "…"
    return f"{name} {tail}".strip() or MISSING


# --- the CLI's consoles and tables ---------------------------------------------------------


def console(json_mode: bool = False) -> Console:
    """The console a command prints to: stdout, at most MAX_WIDTH columns.

    On a terminal: colour and bold where the terminal has them, width = min(terminal, 100).
    Not a terminal (a pipe, a CI log, `| less`): no colour, no control codes, no emoji
    substitution, width from $COLUMNS or 80 (capped at 100); tables still fit and cut long
    cells with … instead of wrapping them.
    `json_mode=True`: nothing but what the command writes; write each JSON document with
    `console.out(json.dumps(obj))` (`out` never wraps, highlights or adds markup).
    """
    tty = sys.stdout.isatty()
    if json_mode:
        return Console(color_system=None, force_terminal=False, highlight=False, markup=False,
                       emoji=False, soft_wrap=True, width=10_000)
    probe = Console()
    return Console(color_system="auto" if tty else None, force_terminal=None if tty else False,
                   highlight=False, markup=False, emoji=False, width=min(probe.width, MAX_WIDTH))


class HouseTable(Table):
    """A rich Table whose `add_row` takes plain strings (or None for —) and prints each cell on
    one line, cut with … when the table is too wide: the widest columns give way first, so a
    short column (RSSI, a ✓) stays whole while a long name shrinks, and no column is dropped."""

    def add_row(self, *renderables: RenderableType | None, style: Any = None,
                end_section: bool = False) -> None:
        """Add a row; a `str` cell is shown as it is (no markup), None as —."""
        super().add_row(*(_cell(c) for c in renderables), style=style, end_section=end_section)


def _cell(value: RenderableType | None) -> RenderableType:
    if value is None:
        return Text(MISSING, no_wrap=True, overflow="ellipsis")
    if isinstance(value, str):
        return Text(one_line(value, 500), no_wrap=True, overflow="ellipsis")
    return value


def table(columns: Sequence[str], *, title: str | None = None) -> HouseTable:
    """An empty table in the house style for `columns` (header words, in order).

    box.SIMPLE_HEAD: a rule under the header, no vertical lines, two spaces between columns, no
    outer edge; bold header on a colour terminal. Every cell stays on one line: the widest
    columns are cut with … when the table does not fit (see HouseTable). Right-align a numeric
    column with `t.columns[i].justify = "right"`.
    """
    t = HouseTable(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                   header_style="bold", title=title, title_justify="left")
    for name in columns:
        t.add_column(Text(one_line(name, 40), no_wrap=True, overflow="ellipsis"))
    return t
