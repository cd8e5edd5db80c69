"""`rpm-gateway decode`: spec bytes in, the payload's shape out; bad bytes exit 65 in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gateway.cli import main


def decode(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object], str]:
    code = main(["decode", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else {}), err


def test_bpm_with_everything(capsys: pytest.CaptureFixture[str]) -> None:
    # health-devices.md §12, BPM row 1.
    code, doc, _ = decode(capsys, "2a35", "1E 80 00 52 00 61 00 E9 07 03 0E 07 34 0A 40 00 01 04 00")
    assert code == 0
    assert doc == {
        "kind": "blood_pressure",
        "observations": [
            {"code": "8480-6", "name": "Systolic blood pressure", "value": 128.0, "unit": "mm[Hg]"},
            {"code": "8462-4", "name": "Diastolic blood pressure", "value": 82.0, "unit": "mm[Hg]"},
            {"code": "8478-0", "name": "Mean blood pressure", "value": 97.0, "unit": "mm[Hg]"},
            {"code": "8867-4", "name": "Pulse rate", "value": 64.0, "unit": "/min"},
        ],
        "status": ["irregular_pulse"],
        "valid": True,
        "device_time": "2025-03-14T07:52:10",
        "user_index": 1,
        "characteristic": "2a35",
        "raw": "1e80005200610 0e907030e07340a4000010400".replace(" ", ""),
    }


@pytest.mark.parametrize("uuid", ["0x2A35", "2a35", "00002a35-0000-1000-8000-00805f9b34fb",
                                  "00002A35-0000-1000-8000-00805F9B34FB"])
def test_uuid_forms(capsys: pytest.CaptureFixture[str], uuid: str) -> None:
    # health-devices.md §12, BPM row 3 (kPa, nothing optional).
    code, doc, _ = decode(capsys, uuid, "01A0F06BF07DF0")
    assert code == 0
    assert [o["value"] for o in doc["observations"]] == [16.0, 10.7, 12.5]  # type: ignore[index]
    assert {o["unit"] for o in doc["observations"]} == {"kPa"}  # type: ignore[union-attr]
    assert doc["device_time"] is None


def test_year_unknown_gives_null_time(capsys: pytest.CaptureFixture[str]) -> None:
    # health-devices.md §12, BPM row 5 (Nordic unit-test vector, year 0).
    code, doc, _ = decode(capsys, "2a35", "1E8A005800780000000411142 93B3C00012700".replace(" ", ""))
    assert code == 0
    assert doc["device_time"] is None
    assert doc["status"] == ["body_movement", "cuff_loose", "irregular_pulse", "improper_position"]


def test_weight_imperial(capsys: pytest.CaptureFixture[str]) -> None:
    # health-devices.md §12, weight row 3.
    code, doc, _ = decode(capsys, "2a9d", "03 78 46 E9 07 0B 02 06 05 00")
    assert code == 0
    assert doc["observations"] == [
        {"code": "29463-7", "name": "Body weight", "value": 180.4, "unit": "[lb_av]"}]
    assert doc["device_time"] == "2025-11-02T06:05:00"


def test_weight_with_bmi_and_height(capsys: pytest.CaptureFixture[str]) -> None:
    # health-devices.md §12, weight row 2.
    code, doc, _ = decode(capsys, "2A9D", "0E 8E 3F E9 07 03 0E 07 2D 1E 01 01 01 F4 06")
    assert code == 0
    assert [(o["code"], o["value"], o["unit"]) for o in doc["observations"]] == [  # type: ignore[index]
        ("29463-7", 81.35, "kg"), ("39156-5", 25.7, "kg/m2"), ("8302-2", 1.78, "m")]
    assert doc["user_index"] == 1


def test_weight_unsuccessful_is_invalid(capsys: pytest.CaptureFixture[str]) -> None:
    # health-devices.md §12, weight row 4: 0xFFFF = Measurement Unsuccessful.
    code, doc, _ = decode(capsys, "2a9d", "00FFFF")
    assert code == 0
    assert doc["valid"] is False
    assert doc["observations"][0]["value"] is None  # type: ignore[index]


@pytest.mark.parametrize(("uuid", "hexbytes"), [("2a35", "1E80"), ("2a9d", "02B036"), ("2a35", "zz")])
def test_bad_bytes_exit_65_one_line(uuid: str, hexbytes: str) -> None:
    p = subprocess.run([sys.executable, "-m", "gateway.cli", "decode", uuid, hexbytes],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 65
    assert p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr


def test_unknown_characteristic_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = decode(capsys, "2a1c", "00")
    assert code == 64
    assert "0x2A35" in err


def test_unknown_user_is_255_and_no_user_field_is_null(capsys: pytest.CaptureFixture[str]) -> None:
    # BPM row 1 with user id 0xFF ("unknown user", health-devices.md §4.1), and row 3 (no field).
    code, doc, _ = decode(capsys, "2a35", "1E800052006100E907030E07340A4000FF0400")
    assert code == 0
    assert doc["user_index"] == 255
    code, doc, _ = decode(capsys, "2a35", "01A0F06BF07DF0")
    assert code == 0
    assert doc["user_index"] is None
