"""gateway.render: values, times, ages and flags as a person reads them; the CLI's table style."""

from __future__ import annotations

import datetime as dt
import io
import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from drivers.base import Measurement
from drivers.blood_pressure import decode_bp
from drivers.weight_scale import decode_weight
from gateway import render

SYS, DIA, MAP, PULSE = "8480-6", "8462-4", "8478-0", "8867-4"
WEIGHT, BMI, HEIGHT = "29463-7", "39156-5", "8302-2"


def obs(code: str, name: str, value: float | None, unit: str) -> dict[str, Any]:
    return {"code": code, "name": name, "value": value, "unit": unit}


def bp(sys_: float | None, dia: float | None, mean: float | None = None,
       pulse: float | None = 76.0, unit: str = "mm[Hg]") -> dict[str, Any]:
    o = [obs(SYS, "Systolic blood pressure", sys_, unit),
         obs(DIA, "Diastolic blood pressure", dia, unit),
         obs(MAP, "Mean blood pressure", mean, unit)]
    if pulse is not None:
        o.append(obs(PULSE, "Pulse rate", pulse, "/min"))
    return {"kind": "blood_pressure", "observations": o}


def payload_of(m: Measurement) -> dict[str, Any]:
    return {"kind": m.kind, "observations": [o.model_dump() for o in m.observations]}


# --- reading_values -----------------------------------------------------------------------------


def test_blood_pressure_reads_as_a_nurse_says_it() -> None:
    assert render.reading_values(bp(132.0, 87.0, 102.0, 76.0)) == "132/87 mmHg, pulse 76"


def test_blood_pressure_without_pulse_or_map() -> None:
    assert render.reading_values(bp(121.0, 79.0, None, None)) == "121/79 mmHg"


def test_blood_pressure_in_kpa() -> None:
    assert render.reading_values(bp(17.6, 11.6, None, 70.0, unit="kPa")) == "17.6/11.6 kPa, pulse 70"


def test_missing_pressures_are_dashes() -> None:
    assert render.reading_values(bp(None, 87.0)) == "—/87 mmHg, pulse 76"
    assert render.reading_values(bp(None, None, None, None)) == "—/— mmHg"
    assert render.reading_values(bp(132.0, 87.0, None, math.nan)) == "132/87 mmHg, pulse —"


def test_mean_pressure_alone_is_named() -> None:
    p = {"observations": [obs(MAP, "Mean blood pressure", 99.0, "mm[Hg]")]}
    assert render.reading_values(p) == "MAP 99 mmHg"


def test_weight_to_a_tenth_as_the_scale_shows_it() -> None:
    p = {"observations": [obs(WEIGHT, "Body weight", 82.195, "kg")]}
    assert render.reading_values(p) == "82.2 kg"
    p = {"observations": [obs(WEIGHT, "Body weight", 181.24, "[lb_av]")]}
    assert render.reading_values(p) == "181.2 lb"


def test_weight_with_bmi_and_height() -> None:
    p = {"observations": [obs(WEIGHT, "Body weight", 82.2, "kg"), obs(BMI, "Body mass index", 24.07, "kg/m2"),
                          obs(HEIGHT, "Body height", 1.848, "m")]}
    assert render.reading_values(p) == "82.2 kg, BMI 24.1, height 1.85 m"
    p = {"observations": [obs(WEIGHT, "Body weight", 181.2, "[lb_av]"),
                          obs(HEIGHT, "Body height", 72.4, "[in_i]")]}
    assert render.reading_values(p) == "181.2 lb, height 72 in"


@pytest.mark.parametrize(("observations", "expected"), [
    ([obs("59408-5", "Oxygen saturation", 98.0, "%"), obs(PULSE, "Pulse rate", 72.0, "/min")],
     "SpO2 98 %, pulse 72"),
    ([obs("41653-7", "Glucose", 5.44, "mmol/L")], "5.4 mmol/L"),
    ([obs("41653-7", "Glucose", 104.0, "mg/dL")], "104 mg/dL"),
    ([obs("8310-5", "Body temperature", 36.84, "Cel")], "36.8 °C"),
    ([obs("8310-5", "Body temperature", 98.24, "[degF]")], "98.2 °F"),
    ([obs("41982-0", "Body fat", 23.46, "%")], "body fat 23.5 %"),
])
def test_future_kinds_read_well(observations: list[dict[str, Any]], expected: str) -> None:
    assert render.reading_values({"observations": observations}) == expected


def test_unknown_kinds_read_name_value_unit() -> None:
    p = {"observations": [obs("9279-1", "Respiratory rate", 16.0, "/min"),
                          obs("x-1", "Peak flow", 412.5, "L/min"), obs("x-2", "Thing", 0.125, "[iU]"),
                          obs("x-3", "Thing", None, "kg")]}
    assert render.reading_values(p) == (
        "Respiratory rate 16 /min, Peak flow 412 L/min, Thing 0.12 iU, Thing — kg")


def test_no_observations_is_a_dash() -> None:
    assert render.reading_values({"observations": []}) == "—"
    assert render.reading_values({}) == "—"
    assert render.reading_values({"observations": "junk"}) == "—"


def test_drivers_output_renders() -> None:
    # The real decoders' observations, through the payload's JSON.
    cuff = decode_bp(bytes.fromhex("1e 84 00 57 00 66 00 e6 07 0c 02 08 0e 00 4c 00 01 00 00"))
    assert render.reading_values(json.loads(json.dumps(payload_of(cuff)))) == "132/87 mmHg, pulse 76"
    scale = decode_weight(bytes.fromhex("00 1b 40"))  # 16411 * 0.005 kg
    assert render.reading_values(payload_of(scale)) == "82.1 kg"


def test_negative_zero_is_zero() -> None:
    assert render.number(-0.04, "kg") == "0.0"
    assert render.number(-0.0001) == "0"
    assert render.number(-3.0, "°C") == "-3.0"


# Any observation list, including junk a broken payload might carry.
_values = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30),
                    st.booleans(), st.text(max_size=5))
_codes = st.sampled_from([SYS, DIA, MAP, PULSE, WEIGHT, BMI, HEIGHT, "59408-5", "2708-6", "8310-5",
                          "41653-7", "41982-0", ""]) | st.text(max_size=12)
_units = st.sampled_from(["mm[Hg]", "kPa", "/min", "kg", "[lb_av]", "kg/m2", "m", "[in_i]", "%", "Cel",
                          "[degF]", "mg/dL", "mmol/L", "1", "", "[", "]]", "[_]"]) | st.text(max_size=12)
_observation = st.fixed_dictionaries(
    {}, optional={"code": _codes | st.integers(), "name": st.text(max_size=60) | st.none(),
                  "value": _values, "unit": _units | st.none()})
observation_lists = st.lists(st.one_of(_observation, st.none(), st.integers(), st.text(max_size=5)),
                             max_size=8)


def _one_printable_line(text: str) -> bool:
    return bool(text) and text.isprintable() and "\n" not in text and text == text.strip()


@given(observation_lists)
def test_any_observation_list_renders_to_one_printable_line(observations: list[Any]) -> None:
    assert _one_printable_line(render.reading_values({"observations": observations}))


@given(st.dictionaries(st.text(max_size=12), st.none() | st.integers() | st.text(max_size=12), max_size=4))
def test_any_payload_shape_renders(payload: dict[str, Any]) -> None:
    assert _one_printable_line(render.reading_values(payload))


# --- times, ages, flags, devices -----------------------------------------------------------------


def test_local_time_in_the_patients_zone() -> None:
    assert render.local_time("2026-12-02T07:14:05Z", "Europe/Berlin") == "2026-12-02 08:14"
    assert render.local_time("2026-07-02T07:14:05+00:00", "America/New_York") == "2026-07-02 03:14"
    assert render.local_time("2026-12-02T07:14:05.250Z", dt.UTC, fmt="%H:%M:%S") == "07:14:05"


def test_local_time_without_offset_is_utc_and_junk_is_a_dash() -> None:
    assert render.local_time("2026-12-02T07:14:05", "Asia/Tokyo") == "2026-12-02 16:14"
    assert render.local_time("not a time", "UTC") == "—"
    assert render.local_time("", "UTC") == "—"
    assert render.local_time("0001-01-01T00:00:00Z", "America/New_York") == "—"


@given(st.text(max_size=40))
def test_local_time_never_raises(text: str) -> None:
    assert _one_printable_line(render.local_time(text, "Pacific/Kiritimati"))


@pytest.mark.parametrize(("seconds", "plain", "ago"), [
    (0, "0 s", "just now"), (0.4, "0 s", "just now"), (45, "45 s", "45 s ago"), (200, "3 min", "3 min ago"),
    (3599, "59 min", "59 min ago"), (7300, "2 h", "2 h ago"), (47 * 3600, "47 h", "47 h ago"),
    (5 * 86400 + 10, "5 d", "5 d ago"), (-130, "-2 min", "in 2 min"), (None, "—", "—"),
    (math.nan, "—", "—"), (math.inf, "—", "—"),
])
def test_age(seconds: float | None, plain: str, ago: str) -> None:
    assert render.age(seconds) == plain
    assert render.age(seconds, ago=True) == ago


def test_short_flags() -> None:
    assert render.short_flags([], True) == "ok"
    assert render.short_flags([], False) == "INVALID"
    assert render.short_flags(["irregular_pulse", "body_movement"], True) == "irregular, moved"
    assert render.short_flags(["cuff_loose", "improper_position", "pulse_above_range",
                               "pulse_below_range"], True) == "cuff loose, position, pulse high, pulse low"
    assert render.short_flags(["a_new_flag\n"], False) == "INVALID, a new flag"


@given(st.lists(st.text(max_size=20) | st.integers() | st.none(), max_size=5), st.booleans())
def test_short_flags_never_raises(status: list[Any], valid: bool) -> None:
    assert _one_printable_line(render.short_flags(status, valid))


def test_time_source() -> None:
    assert [render.time_source(s) for s in ("device_clock", "device_clock_corrected", "hub_receipt")] == [
        "device", "adjusted", "hub"]
    assert render.time_source(None) == "None"


def test_device_label_keeps_the_address_tail() -> None:
    assert render.device_label({"address": "C0:00:00:00:BC:01", "model": "SIM-BP1"}) == "SIM-BP1 BC:01"
    assert render.device_label({"address": "C0:00:00:00:BC:01", "model": "HEM-7155T-ESL"}) == "HEM-71… BC:01"
    scale = {"address": "C0:00:00:00:5C:01", "model": None}
    assert render.device_label(scale, "body_weight") == "scale 5C:01"
    assert render.device_label({}, None) == "—"


@given(st.dictionaries(st.sampled_from(["address", "model", "driver"]), st.text(max_size=30) | st.none()),
       st.text(max_size=20) | st.none())
def test_device_label_fits(device: dict[str, Any], kind: str | None) -> None:
    label = render.device_label(device, kind, width=13)
    assert _one_printable_line(label)
    assert len(label) <= 13


# --- console and table --------------------------------------------------------------------------


def test_console_off_a_terminal_is_plain_and_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    c = render.console()
    assert not c.is_terminal
    assert c.color_system is None
    assert c.width == render.MAX_WIDTH
    monkeypatch.setenv("COLUMNS", "72")
    assert render.console().width == 72


def test_json_console_never_wraps_or_decorates(capsys: pytest.CaptureFixture[str]) -> None:
    doc = {"name": "[bold]x[/bold]", "n": list(range(100))}
    render.console(json_mode=True).out(json.dumps(doc))
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert json.loads(out) == doc


def test_house_table_fits_cuts_and_keeps_every_column() -> None:
    t = render.table(["address", "name", "RSSI", "driver", "patient"])
    t.add_row("C0:00:00:00:5C:01", "SIM-WS1 with a very long advertised name indeed", "-61",
              "weight_scale", "patient-0001")
    t.add_row("C0:00:00:00:BC:99", "unit [lb_av] and mm[Hg]", "-80", None, "")
    for width in (60, 80, 100):
        c = Console(width=width, file=io.StringIO(), color_system=None)
        c.print(t)
        lines = c.file.getvalue().splitlines()  # type: ignore[attr-defined]
        assert all(len(line) <= width for line in lines), lines
        assert len(lines) == 4, lines  # header, rule, two rows: nothing wrapped
        assert lines[0].split() == ["address", "name", "RSSI", "driver", "patient"]
        assert " -61 " in lines[2]  # a short column stays whole
        assert "—" in lines[3]  # None
        if width >= 80:
            assert "[lb_av] and mm[Hg]" in lines[3]  # cells are text, not markup
