"""Config: the example is valid, and every error names the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = '[hub]\nid = "hub-1"\n'


def test_example_config_is_valid() -> None:
    cfg = load_config(ROOT / "config" / "gateway.example.toml")
    assert cfg.hub.id == "hub-0001"
    assert cfg.radio.kind == "bluez"
    assert [d.patient_id for d in cfg.devices] == ["patient-0001", "patient-0001"]


def test_development_hub_config_is_valid() -> None:
    # README's terminal session runs on it: the patient's devices in pairing mode, none paired.
    cfg = load_config(ROOT / "config" / "virtual.toml")
    assert cfg.radio.kind == "virtual" and cfg.devices == ()
    assert [d.pairing_mode_s > 0 for d in cfg.radio.simulated] == [True, True, False]


def test_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.mqtt.port == 1883
    assert cfg.outbox.when_full == "reject_new"
    assert cfg.outbox_path == Path("/var/lib/rpm-gateway/outbox.db")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "hub: required table [hub] is missing"),
        ('[hub]\nid = "has space"\n', "hub.id:"),
        (MINIMAL + "[mqtt]\nport = 70000\n", "mqtt.port:"),
        (MINIMAL + "[mqtt]\nprot = 1\n", 'mqtt.prot: unknown key (misspelt?): did you mean "port"?'),
        ('[hub]\nid = "h"\ntimezone = "Mars/Olympus"\n', "hub.timezone:"),
        (MINIMAL + '[[devices]]\naddress = "nope"\npatient_id = "p"\n',
         "devices[1].address: must look like A4:C1:38:00:00:01"),
        (MINIMAL + '[[devices]]\naddress = "AA:BB:CC:DD:EE:FF"\npatient_id = "p"\n'
         '[[devices]]\naddress = "aa:bb:cc:dd:ee:ff"\npatient_id = "q"\n', "listed twice"),
        ("[hub\n", "line 1, column 5: not valid TOML"),
    ],
)
def test_errors_name_the_key(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "gw.toml")
    assert fragment in str(e.value)
    assert str(e.value).startswith("gw.toml:")


def test_cli_config_error_exit_78_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "gw.toml"
    bad.write_text(MINIMAL + "[mqtt]\nport = 0\n")
    for argv, stream in ((["run", "--config", str(bad)], "stderr"),
                         (["config", "check", str(bad)], "stdout")):
        p = subprocess.run([sys.executable, "-m", "gateway.cli", *argv],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 78
        assert "mqtt.port: must be at least 1" in getattr(p, stream)
        assert "Traceback" not in p.stderr


def test_cli_config_error_for_a_missing_file(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "--config",
                        str(tmp_path / "none.toml")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 78
    assert p.stderr.strip().splitlines() == [
        f"rpm-gateway: configuration error: {tmp_path / 'none.toml'}: does not exist "
        "(start from config/gateway.example.toml)"]


def test_cli_config_check_ok(tmp_path: Path) -> None:
    # The example with its data_dir moved to tmp_path: /var/lib may not be writable here.
    example = (ROOT / "config" / "gateway.example.toml").read_text()
    gw = tmp_path / "gateway.toml"
    gw.write_text(example.replace('"/var/lib/rpm-gateway"', f'"{tmp_path / "state"}"', 1))
    p = subprocess.run([sys.executable, "-m", "gateway.cli", "config", "check", str(gw)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines() == [
        f"{gw}: OK: hub hub-0001, radio bluez, 2 paired device(s), broker localhost:1883"]


def test_radio_shorthand() -> None:
    assert parse_config(MINIMAL.replace("[hub]", 'radio = "virtual"\n[hub]')).radio.kind == "virtual"
    with pytest.raises(ConfigError, match=r"radio\.kind"):
        parse_config(MINIMAL.replace("[hub]", 'radio = "bluetooth"\n[hub]'))
