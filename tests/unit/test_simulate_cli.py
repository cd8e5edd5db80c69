"""The simulate command's options, frames and ledger, without a radio."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from drivers.codec.blood_pressure import decode_blood_pressure_measurement
from drivers.codec.errors import DecodeError
from drivers.codec.weight import decode_weight_measurement
from gateway.sim.ledger import Ledger, read_ledger
from gateway.sim.simulate_cli import ADDRESSES, FrameMaker, build_parser, main, make_device


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_defaults() -> None:
    a = parse()
    assert a.devices == ["scale", "cuff"]
    assert a.listen == ("127.0.0.1", 0)
    assert (a.readings, a.interval, a.stored, a.garbage_every) == (3, 2.0, 0, 0)
    assert a.user_slots == [1] and a.timezone == ZoneInfo("UTC") and a.clock == "set"
    assert not (a.bonding or a.resend_stored or a.constant_advertiser or a.no_timestamp)
    assert a.ledger is None and a.drop_link_after is None


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse("--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--devices", "--listen", "--readings", "--interval", "--stored",
                   "--resend-stored", "--bonding", "--timezone", "--clock-offset", "--clock",
                   "--drop-link-after", "--garbage-every", "--user-slots",
                   "--constant-advertiser", "--no-timestamp", "--ledger", "--att-error",
                   "--att-error-code", "--att-error-on", "--never-answer",
                   "--never-answer-from", "--forget-bond-after"):
        assert option in out


@pytest.mark.parametrize("argv", [
    ["--devices", "scale,toaster"], ["--devices", "cuff,cuff"], ["--devices", ""],
    ["--user-slots", "1,256"], ["--user-slots", "a"], ["--timezone", "Mars/Olympus"],
    ["--listen", "7000"], ["--readings", "-1"], ["--clock", "later"],
])
def test_bad_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2


def test_every_nth_frame_is_garbage_and_no_decoder_takes_it() -> None:
    maker = FrameMaker("cuff", parse("--stored", "4", "--readings", "4", "--garbage-every", "3"))
    frames = maker.stored() + maker.scheduled()
    garbage = [i for i, f in enumerate(frames, 1) if isinstance(f, bytes)]
    assert garbage == [3, 6]
    for frame in frames:
        if isinstance(frame, bytes):
            with pytest.raises(DecodeError):
                decode_blood_pressure_measurement(frame)
            with pytest.raises(DecodeError):
                decode_weight_measurement(frame)


def test_cuff_readings_cycle_through_the_user_slots() -> None:
    maker = FrameMaker("cuff", parse("--stored", "2", "--readings", "5", "--garbage-every", "4",
                                     "--user-slots", "1,2,255"))
    users = [f.user_id for f in maker.stored() + maker.scheduled() if not isinstance(f, bytes)]
    assert users == [1, 2, 255, 1, 2, 255]  # 7 frames, the 4th garbage: 6 readings


def test_stored_frames_are_stamped_in_the_past_of_the_zone_and_scheduled_ones_are_not() -> None:
    zone = ZoneInfo("Pacific/Auckland")
    maker = FrameMaker("scale", parse("--stored", "3", "--timezone", "Pacific/Auckland"))
    now = dt.datetime.now(zone).replace(tzinfo=None)
    stamps = [f.timestamp.to_datetime() for f in maker.stored()]  # type: ignore[union-attr]
    assert all(s is not None and now - dt.timedelta(days=4) < s < now for s in stamps)
    assert all(f.timestamp is None for f in maker.scheduled())  # type: ignore[union-attr]


def test_no_timestamp_strips_stored_frames_too() -> None:
    maker = FrameMaker("cuff", parse("--stored", "2", "--no-timestamp"))
    assert [f.timestamp for f in maker.stored()] == [None, None]  # type: ignore[union-attr]


def test_device_options_reach_the_script() -> None:
    args = parse("--stored", "2", "--bonding", "--resend-stored", "--constant-advertiser",
                 "--clock", "epoch", "--clock-offset", "-30", "--drop-link-after", "1",
                 "--timezone", "Europe/Paris")
    cuff = make_device("cuff", args, FrameMaker("cuff", args))
    s = cuff.script
    assert cuff.address == ADDRESSES["cuff"] and cuff.unsent == 2
    assert s.bonding_required and s.resend_stored and s.pairing_mode
    assert (s.clock, s.clock_offset_s, s.drop_link_after) == ("epoch", -30, 1)
    assert s.zone == ZoneInfo("Europe/Paris")
    neighbour = make_device("neighbour", args, FrameMaker("neighbour", args))
    assert neighbour.address == ADDRESSES["neighbour"] and not neighbour.script.bonding_required


def test_ledger_lines_have_the_agreed_shape(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        ledger.produced("C0:00:00:00:BC:01", 0, b"\x1e\x80")
        ledger.confirmed("C0:00:00:00:BC:01", 0, b"\x1e\x80")
        ledger.connected("C0:00:00:00:BC:01")
        ledger.disconnected("C0:00:00:00:BC:01")
        # Flushed per line: readable while the ledger is still open.
        assert len(path.read_text().splitlines()) == 4
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [sorted(e) for e in lines] == [
        ["device", "event", "index", "payload", "t"], ["device", "event", "index", "payload", "t"],
        ["device", "event", "t"], ["device", "event", "t"]]
    assert [e["event"] for e in lines] == ["produced", "confirmed", "connected", "disconnected"]
    assert lines[0]["payload"] == "1e80" and lines[0]["index"] == 0
    assert all(isinstance(e["t"], float) for e in lines)
    with path.open("a") as f:
        f.write('{"event": "produ')  # a torn last line
    assert len(read_ledger(path)) == 4


def test_a_taken_port_is_one_line_and_status_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["--devices", "scale", "--listen", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rpm-gateway simulate:") and len(err.splitlines()) == 1


def test_rpm_gateway_simulate_takes_options_without_a_separator() -> None:
    # argparse's REMAINDER refused "simulate --devices ..." ("unrecognized arguments").
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "gateway.cli", "simulate", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "--devices" in p.stdout


def test_radio_fault_options_reach_the_script() -> None:
    args = parse("--bonding", "--att-error", "2", "--att-error-code", "0x80", "--att-error-on",
                 "cccd", "--never-answer", "3", "--never-answer-from", "connect",
                 "--forget-bond-after", "1")
    s = make_device("cuff", args, FrameMaker("cuff", args)).script
    assert (s.att_error_connections, s.att_error_code, s.att_error_on) == (2, 0x80, {"cccd"})
    assert (s.never_answer_connections, s.never_answer_from) == (3, "connect")
    assert s.forget_bond_after == 1


def test_radio_faults_are_off_by_default() -> None:
    s = make_device("scale", parse(), FrameMaker("scale", parse())).script
    assert s.att_error_connections == 0 and s.never_answer_connections == 0
    assert s.forget_bond_after is None
    assert s.att_error_code == 0x0E and s.att_error_on == {"info", "cccd"}  # Unlikely Error
    assert s.never_answer_from == "session"


@pytest.mark.parametrize("argv", [
    ["--att-error", "-1"], ["--att-error-code", "0"], ["--att-error-code", "0x100"],
    ["--att-error-code", "E"], ["--att-error-on", "cccd,toaster"], ["--att-error-on", ""],
    ["--never-answer", "-2"], ["--never-answer-from", "later"], ["--forget-bond-after", "x"],
])
def test_bad_radio_fault_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2


def test_forgetting_a_bond_needs_bonding(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--devices", "cuff", "--forget-bond-after", "1"])
    assert e.value.code == 2
    assert "--bonding" in capsys.readouterr().err
