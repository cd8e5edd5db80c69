"""Exit statuses of the real `rpm-gateway` process: what systemd and scripts rely on.

78 (EX_CONFIG) for a config or a file it names that will not fix itself, so the unit's
RestartPreventExitStatus=78 stops the restart loop; 73 (EX_CANTCREAT) when the hub cannot
store readings; always one line on stderr and never a traceback.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import gateway.agent
from gateway.cli import main as cli_main
from gateway.config import ConfigError
from gateway.outbox import StorageError

pytestmark = pytest.mark.integration

EX_CANTCREAT = 73
EX_CONFIG = 78
DEVICE = '[[devices]]\naddress = "A4:C1:38:00:00:01"\npatient_id = "patient-1"\n'


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m gateway.cli ARGV` to completion."""
    return subprocess.run([sys.executable, "-m", "gateway.cli", *argv],
                          capture_output=True, text=True, timeout=60)


def write_config(tmp_path: Path, extra: str = "", *, data_dir: Path | None = None) -> Path:
    """A config that is valid on its own; the broker is never reached in these tests."""
    path = tmp_path / "gateway.toml"
    path.write_text(f'[hub]\nid = "hub-1"\ndata_dir = "{data_dir or tmp_path / "state"}"\n'
                    f'trust_clock = true\n[radio]\nkind = "virtual"\n{DEVICE}{extra}')
    return path


def one_line(p: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed run (asserting there is exactly one, no traceback)."""
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_missing_ca_file_exits_78_naming_the_file(tmp_path: Path) -> None:
    ca = tmp_path / "tls" / "ca.pem"
    cfg = write_config(tmp_path, f'[mqtt]\nport = 8883\n[mqtt.tls]\nca_file = "{ca}"\n')
    p = cli("run", "--config", str(cfg))
    assert p.returncode == EX_CONFIG
    assert one_line(p) == (f"rpm-gateway: configuration error: {cfg}: mqtt.tls.ca_file: "
                           f"CA file {ca} does not exist")
    check = cli("config", "check", str(cfg))
    assert check.returncode == EX_CONFIG
    assert check.stdout.splitlines() == [f"ERROR mqtt.tls.ca_file: CA file {ca} does not exist",
                                         f"{cfg}: 1 error, 0 warnings"]


def test_config_check_of_a_missing_file_exits_78(tmp_path: Path) -> None:
    p = cli("config", "check", str(tmp_path / "none.toml"))
    assert p.returncode == EX_CONFIG
    assert p.stdout.splitlines()[0] == (
        f"ERROR cannot read {tmp_path / 'none.toml'}: no such file or directory")


def test_garbage_ca_file_exits_78(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    cfg = write_config(tmp_path, f'[mqtt.tls]\nca_file = "{ca}"\n')
    p = cli("run", "--config", str(cfg))
    assert p.returncode == EX_CONFIG
    assert f"mqtt.tls.ca_file: CA file {ca} holds no PEM certificate" in one_line(p)


def test_missing_password_file_exits_78(tmp_path: Path) -> None:
    pw = tmp_path / "mqtt-password"
    cfg = write_config(tmp_path, f'[mqtt]\nusername = "hub-1"\npassword_file = "{pw}"\n')
    p = cli("run", "--config", str(cfg))
    assert p.returncode == EX_CONFIG
    assert one_line(p) == (f"rpm-gateway: configuration error: {cfg}: mqtt.password_file: "
                           f"password file {pw} does not exist")


def test_world_readable_password_file_is_a_config_check_error(tmp_path: Path) -> None:
    pw = tmp_path / "mqtt-password"
    pw.write_text("s3cret\n")
    pw.chmod(0o644)
    cfg = write_config(tmp_path, f'[mqtt]\nusername = "hub-1"\npassword_file = "{pw}"\n')
    p = cli("config", "check", str(cfg))
    assert p.returncode == EX_CONFIG
    assert p.stdout.splitlines()[0] == (f"ERROR mqtt.password_file: {pw} can be read by every "
                                        f"user on this machine: run `chmod 600 {pw}`")
    assert "s3cret" not in p.stdout + p.stderr
    as_json = json.loads(cli("config", "check", "--json", str(cfg)).stdout)
    assert as_json == {"ok": False, "problems": [{
        "severity": "error", "key": "mqtt.password_file",
        "message": f"{pw} can be read by every user on this machine: run `chmod 600 {pw}`"}]}
    pw.chmod(0o600)
    p = cli("config", "check", str(cfg))
    assert p.returncode == 0, p.stdout
    assert p.stdout.startswith(f"{cfg}: OK")


# These tests run as root, and root ignores file modes: an unusable data_dir is simulated with
# a path whose parent is a regular file, which stops root as well.
def test_data_dir_under_a_file_exits_73_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    state = tmp_path / "afile" / "state"
    cfg = write_config(tmp_path, data_dir=state)
    p = cli("run", "--config", str(cfg))
    assert p.returncode == EX_CANTCREAT
    assert one_line(p) == (f"rpm-gateway: cannot store readings: {cfg}: hub.data_dir: data "
                           f"directory {state} cannot be created: {tmp_path / 'afile'} is a "
                           "file, not a directory")


def test_outbox_of_a_newer_version_exits_73(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with sqlite3.connect(state / "outbox.db") as conn:
        conn.execute("PRAGMA user_version = 999")
    conn.close()
    p = cli("run", "--config", str(write_config(tmp_path)))
    assert p.returncode == EX_CANTCREAT, p.stderr
    assert "Traceback" not in p.stderr
    # The agent logged its start; the failure itself is the last line, and only one.
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rpm-gateway: cannot use the outbox: {state / 'outbox.db'} has "
                           "schema version 999")


def test_config_check_lists_all_three_errors_with_1_based_positions(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[hub]\nid = "hub-1"\ndata_dir = "{tmp_path}"\n'
                   '[mqtt]\nport = 0\n'
                   + DEVICE
                   + '[[devices]]\naddress = "A4-C1-38-00-00-02"\npatient_id = "patient-2"\n'
                   + '[[devices]]\nadress = "A4:C1:38:00:00:03"\npatient_id = "patient-3"\n')
    p = cli("config", "check", str(cfg))
    assert p.returncode == EX_CONFIG
    assert "Traceback" not in p.stderr
    assert p.stdout.splitlines() == [
        "ERROR mqtt.port: must be at least 1 (got 0)",
        'ERROR devices[2].address: must look like A4:C1:38:00:00:01 (got "A4-C1-38-00-00-02") '
        "([[devices]] entry 2, line 9)",
        'ERROR devices[3].adress: unknown key (misspelt?): did you mean "address"? '
        "([[devices]] entry 3, line 12)",
        f"{cfg}: 3 errors, 0 warnings (positions such as devices[2] count from 1)",
    ]
    # `run` says the same in one line and points at `config check`.
    run = cli("run", "--config", str(cfg))
    assert run.returncode == EX_CONFIG
    assert one_line(run) == (f"rpm-gateway: configuration error: {cfg}: mqtt.port: must be at "
                             f"least 1 (got 0) (and 2 more: run `rpm-gateway config check {cfg}`)")


def test_config_check_json_ok_with_a_warning(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[hub]\nid = "hub-1"\ndata_dir = "{tmp_path / "state"}"\n')
    p = cli("config", "check", "--json", str(cfg))
    assert p.returncode == 0
    assert json.loads(p.stdout) == {"ok": True, "problems": [{
        "severity": "warning", "key": "devices",
        "message": "no paired devices: nothing will be read (pair one with "
        "`rpm-gateway pair ADDRESS --patient ID`, or add a [[devices]] entry)"}]}
    assert not (tmp_path / "state").exists()


# --- failures inside the agent, in-process with a stand-in Agent -----------------------------


class _FailingAgent:
    """Stands in for gateway.agent.Agent: run() raises what the test chose."""

    error: BaseException = RuntimeError("systolic 129 for patient-1")

    def __init__(self, cfg: object) -> None:
        self.cfg = cfg

    async def run(self) -> None:
        raise self.error


def run_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str], error: BaseException) -> tuple[int, str]:
    """`rpm-gateway run` through cli.main with an agent whose run() raises `error`."""
    monkeypatch.setattr(_FailingAgent, "error", error)
    monkeypatch.setattr(gateway.agent, "Agent", _FailingAgent)
    code = cli_main(["run", "--config", str(write_config(tmp_path))])
    return code, capsys.readouterr().err


_FAILING_AGENT = """
import sys
import gateway.agent

class Agent:
    def __init__(self, cfg):
        pass

    async def run(self):
        raise ExceptionGroup("tasks", [RuntimeError("systolic 129 for patient-1")])

gateway.agent.Agent = Agent
from gateway.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("debug", [False, True])
def test_an_unexpected_error_is_one_line_exit_70(tmp_path: Path, debug: bool) -> None:
    cfg = write_config(tmp_path)
    if debug:
        cfg.write_text('log_level = "debug"\n' + cfg.read_text())
    p = subprocess.run([sys.executable, "-c", _FAILING_AGENT, "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 70
    hint = "the traceback is above" if debug else 'set log_level = "debug" for the details'
    assert p.stderr.strip().splitlines()[-1] == (
        f"rpm-gateway: the agent failed unexpectedly (RuntimeError); {hint}")
    if debug:
        assert "Traceback" in p.stderr
        assert "systolic 129" in p.stderr
    else:
        assert p.stderr.strip().splitlines() == p.stderr.strip().splitlines()[-1:]
        assert "patient-1" not in p.stderr  # the message may quote patient values


def test_outbox_error_inside_a_task_group_exits_73(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_in_process(tmp_path, monkeypatch, capsys,
                               ExceptionGroup("tasks", [StorageError("database is locked")]))
    assert code == EX_CANTCREAT
    assert err.strip().splitlines()[-1] == (
        f"rpm-gateway: cannot use the outbox: {tmp_path / 'state' / 'outbox.db'}: "
        "database is locked")


def test_os_error_in_the_data_dir_exits_73(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "state" / "outbox.db"
    code, err = run_in_process(tmp_path, monkeypatch, capsys,
                               PermissionError(13, "Permission denied", str(target)))
    assert code == EX_CANTCREAT
    assert err.strip().splitlines()[-1] == (
        f"rpm-gateway: cannot store readings: {target}: permission denied")


def test_config_error_inside_the_agent_exits_78(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_in_process(tmp_path, monkeypatch, capsys,
                               ConfigError("mqtt.password_file: cannot read /x: permission denied"))
    assert code == EX_CONFIG
    assert err.strip().splitlines()[-1] == (
        "rpm-gateway: configuration error: mqtt.password_file: cannot read /x: permission denied")


def test_simulated_devices_not_running_exits_69_with_the_command_to_start(tmp_path: Path) -> None:
    # Development only: radio.link names a simulate process that is not there (was exit 70).
    path = tmp_path / "gateway.toml"
    path.write_text(f'[hub]\nid = "hub-1"\ndata_dir = "{tmp_path / "state"}"\n'
                    '[radio]\nkind = "virtual"\nlink = "tcp:127.0.0.1:1"\noperation_timeout_s = 1\n'
                    f'{DEVICE}')
    p = cli("run", "--config", str(path))
    assert p.returncode == 69, p.stderr
    assert "Traceback" not in p.stderr
    assert "rpm-gateway simulate" in p.stderr
