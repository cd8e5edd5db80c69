"""systemd/: the unit verifies clean, rates 2.5 or lower, restarts as the README says, and
install.sh installs the same tree twice without touching the outbox, registry or config.

systemd is not running here: `systemd-analyze verify` and `security --offline=yes` read the
file alone, and the unit's shell lines (ExecStart=, ExecStopPost=) are run as systemd would
run them, with fakes for the agent and for `sleep`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from faults.rows_corrupt import RESTART_AFTER_73_S, RESTART_S
from gateway.config import HubConfig
from tests.conftest import needs_tools
from tests.systemd_unit import (
    AGENT,
    INSTALL,
    SYSTEMD,
    UNIT,
    command,
    directives,
    needs_analyze,
    one,
    seconds,
    unit_syscall_allow_list,
)

MAX_EXPOSURE = 2.5  # issue 8: "rates it 2.5 or lower" (8.0 before)
# The ExecStopPost= wait after exit 73, whatever RestartSec= adds (issue 8: at least 30 s).
MIN_DELAY_AFTER_73_S = 30



# -- systemd-analyze ---------------------------------------------------------------------------


@needs_analyze
def test_unit_verifies_clean(tmp_path: Path) -> None:
    # On a dev machine /opt/rpm-gateway does not exist: verify a copy that names an executable
    # that does (ExecStart= is /bin/sh today, so only a future direct ExecStart= needs this).
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(AGENT, shutil.which("true") or "/bin/true"))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                       capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "rpm-gateway" not in out, out


@needs_analyze
def test_security_exposure_is_at_most_2_5() -> None:
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for rpm-gateway\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m[1]) <= MAX_EXPOSURE, r.stdout


@needs_analyze
def test_system_call_filter_keeps_adjtimex_for_the_ntp_question() -> None:
    # gateway/timebase.py asks adjtimex(2) whether NTP has synchronised the clock; glibc makes
    # that clock_adjtime. @system-service has neither: filtered, the question fails with EPERM
    # and the hub clock would never count as synchronised.
    assert {"adjtimex", "clock_adjtime"} <= unit_syscall_allow_list()
    # ProtectClock= would deny @clock in a filter of its own, whatever the list says.
    assert "Service.ProtectClock" not in directives()


# -- restart policy ----------------------------------------------------------------------------


def fake_agent(tmp_path: Path, check_status: int | None) -> Path:
    """An 'rpm-gateway' that logs its argv and pid; `config check` exits with check_status, or
    (None) the real `rpm-gateway config check` runs."""
    log = tmp_path / "calls"
    fake = tmp_path / "rpm-gateway"
    check = (f"exec {sys.executable} -m gateway.cli \"$@\"" if check_status is None
             else f"exit {check_status}")
    fake.write_text(f"""#!/bin/sh
echo "$$ $*" >> {log}
[ "$1" = config ] && {check}
exit 0
""")
    fake.chmod(0o755)
    return fake


def run_exec_start(tmp_path: Path, check_status: int | None, config: Path | None = None
                   ) -> tuple[subprocess.Popen[bytes], list[str]]:
    """The unit's ExecStart= line with the agent faked, and `config` (if given) in place of
    /etc/rpm-gateway/gateway.toml; the process and the agent's calls."""
    argv = [a.replace(AGENT, str(fake_agent(tmp_path, check_status))) for a in
            command("Service.ExecStart")]
    if config is not None:
        argv = [a.replace("/etc/rpm-gateway/gateway.toml", str(config)) for a in argv]
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    proc.wait(timeout=60)
    return proc, (tmp_path / "calls").read_text().splitlines()


def test_config_errors_are_not_restarted(tmp_path: Path) -> None:
    assert one("Service.Restart") == "on-failure"
    assert "78" in one("Service.RestartPreventExitStatus").split()
    # RestartPreventExitStatus= looks at the main process only (systemd's service.c,
    # service_shall_restart): a config check in ExecStartPre= exiting 78 would be restarted.
    assert not any("config check" in v for v in directives().get("Service.ExecStartPre", []))
    # The real check on a config with an empty mqtt.host: the main process exits 78 and the
    # agent never runs.
    broken = tmp_path / "gateway.toml"
    broken.write_text('[hub]\nid = "hub-1"\n[mqtt]\nhost = ""\n')
    proc, calls = run_exec_start(tmp_path, check_status=None, config=broken)
    assert proc.returncode == 78  # the main process's status: the restart is prevented
    assert [c.split(" ", 1)[1] for c in calls] == [f"config check {broken}"]


def test_a_good_config_execs_the_agent_in_the_main_process(tmp_path: Path) -> None:
    proc, calls = run_exec_start(tmp_path, check_status=0)
    assert proc.returncode == 0
    check, run = (c.split(" ", 1) for c in calls)
    assert run[1] == "run --config /etc/rpm-gateway/gateway.toml"
    # exec: the agent is the PID systemd forked, so NotifyAccess=main and $WATCHDOG_PID hold.
    assert int(run[0]) == proc.pid
    assert int(check[0]) != proc.pid


def stop_post_sleeps(tmp_path: Path, code: str, status: str) -> list[str]:
    """What ExecStopPost= asks `sleep` for after a main process ended with code/status."""
    bin_dir = tmp_path / f"bin-{code}-{status}"
    bin_dir.mkdir()
    log = bin_dir / "slept"
    fake = bin_dir / "sleep"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "EXIT_CODE": code, "EXIT_STATUS": status,
           "SERVICE_RESULT": "exit-code"}
    r = subprocess.run(command("Service.ExecStopPost"), env=env, timeout=30)
    assert r.returncode == 0  # a failing ExecStopPost= would mark the unit failed for nothing
    return log.read_text().split() if log.exists() else []


def test_exit_73_waits_at_least_30_s_before_the_restart(tmp_path: Path) -> None:
    slept = stop_post_sleeps(tmp_path, "exited", "73")
    assert len(slept) == 1
    wait = seconds(slept[0])
    assert wait + seconds(one("Service.RestartSec")) >= MIN_DELAY_AFTER_73_S
    # TimeoutStopSec= is ExecStopPost='s budget too: the wait must end well before it.
    assert seconds(one("Service.TimeoutStopSec")) >= wait + 10
    # Everything else restarts after RestartSec= alone (or, 0 and 78, not at all).
    for code, status in [("exited", "0"), ("exited", "70"), ("exited", "78"), ("killed", "TERM"),
                         ("dumped", "ABRT"), ("killed", "73")]:
        assert stop_post_sleeps(tmp_path, code, status) == [], (code, status)


def test_the_fault_matrix_restarts_the_agent_as_the_unit_does(tmp_path: Path) -> None:
    restart = seconds(one("Service.RestartSec"))
    assert restart == RESTART_S
    after_73 = restart + sum(seconds(s) for s in stop_post_sleeps(tmp_path, "exited", "73"))
    assert after_73 == RESTART_AFTER_73_S


def test_start_limit_stops_crash_loops_but_not_the_wait_for_a_disk() -> None:
    interval = seconds(one("Unit.StartLimitIntervalSec"))
    burst = int(one("Unit.StartLimitBurst"))
    restart = seconds(one("Service.RestartSec"))
    # An agent that dies at once: one start per RestartSec= trips the limit (no spinning).
    assert burst * restart < interval
    # Exit 73 (sleep + RestartSec per round) and a watchdog kill (>= WatchdogSec per round)
    # never trip it: a data disk mounted late is still picked up.
    assert burst * (MIN_DELAY_AFTER_73_S + restart) > interval
    assert burst * (seconds(one("Service.WatchdogSec")) + restart) > interval


def test_notify_watchdog_and_the_agents_directories() -> None:
    d = directives()
    assert one("Service.Type") == "notify"
    assert one("Service.NotifyAccess") == "main"
    assert 10 <= seconds(one("Service.WatchdogSec")) <= 300
    # Wants= alone orders nothing.
    for target in ("time-sync.target", "bluetooth.service", "network-online.target"):
        assert any(target in v.split() for v in d["Unit.Wants"]), target
        assert any(target in v.split() for v in d["Unit.After"]), target
    # The agent's defaults are the unit's directories.
    defaults = HubConfig(id="hub-1")
    assert defaults.data_dir == Path("/var/lib") / one("Service.StateDirectory")
    assert defaults.control_socket.parent == Path("/run") / one("Service.RuntimeDirectory")
    assert one("Service.ConfigurationDirectory") == "rpm-gateway"
    assert "/etc/rpm-gateway/gateway.toml" in one("Service.ExecStart")
    assert one("Service.User") == "rpm-gateway"
    assert "bluetooth" in one("Service.SupplementaryGroups").split()
    assert one("Service.RuntimeDirectoryMode") == "0750"
    assert one("Service.StateDirectoryMode") == "0700"
    # D-Bus, control socket, notify; MQTT. No AF_BLUETOOTH: bleak's BlueZ backend is D-Bus only.
    assert one("Service.RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]


# -- install.sh --------------------------------------------------------------------------------


def test_install_script_parses() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)


@needs_tools("shellcheck", package="shellcheck")
def test_install_script_is_shellcheck_clean() -> None:
    r = subprocess.run(["shellcheck", str(INSTALL)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout


def install(root: Path, tools: Path, *args: str) -> str:
    """install.sh --root `root`; every system tool it might call is a fake that logs."""
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"}
    r = subprocess.run([str(INSTALL), "--root", str(root), *args], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def fake_tools(tmp_path: Path) -> tuple[Path, Path]:
    tools = tmp_path / "tools"
    tools.mkdir()
    log = tmp_path / "tools-called"
    for name in ("adduser", "useradd", "usermod", "systemctl", "runuser", "pip", "python3",
                 "chown"):
        (tools / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n')
        (tools / name).chmod(0o755)
    return tools, log


def modes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): oct(stat.S_IMODE(p.stat().st_mode))
            for p in sorted(root.rglob("*"))}


def test_install_twice_into_a_root_keeps_outbox_registry_and_config(tmp_path: Path) -> None:
    root = tmp_path / "root"
    tools, called = fake_tools(tmp_path)
    first = install(root, tools, "--polkit", "js")
    assert modes(root) == {
        "etc": "0o755", "etc/polkit-1": "0o755", "etc/polkit-1/rules.d": "0o755",
        "etc/polkit-1/rules.d/50-rpm-gateway.rules": "0o644",
        "etc/rpm-gateway": "0o750", "etc/rpm-gateway/gateway.toml": "0o640",
        "etc/systemd": "0o755", "etc/systemd/system": "0o755",
        "etc/systemd/system/rpm-gateway.service": "0o644",
        "opt": "0o755", "opt/rpm-gateway": "0o755", "opt/rpm-gateway/README.md": "0o644",
        "var": "0o755", "var/lib": "0o755", "var/lib/rpm-gateway": "0o700",
    }
    repo = SYSTEMD.parent
    assert (root / "etc/rpm-gateway/gateway.toml").read_bytes() == \
        (repo / "config/gateway.example.toml").read_bytes()
    assert (root / "etc/systemd/system/rpm-gateway.service").read_bytes() == UNIT.read_bytes()
    # The user, the venv and systemctl are printed, never run, under --root.
    assert not called.exists()
    assert "would run: adduser --system --group" in first
    assert "would run: adduser rpm-gateway bluetooth" in first
    assert "would run: systemctl enable rpm-gateway.service" in first
    assert "not started: edit /etc/rpm-gateway/gateway.toml" in first  # the example is no hub

    # A hub that has run: its own config, an outbox, a registry.
    state = root / "var/lib/rpm-gateway"
    (state / "outbox.db").write_bytes(b"SQLite format 3\0 readings")
    (state / "pairings.json").write_text('{"devices": []}')
    (root / "etc/rpm-gateway/gateway.toml").write_text('[hub]\nid = "hub-7"\n')
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    second = install(root, tools, "--polkit", "js")
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert not called.exists()
    assert "kept /etc/rpm-gateway/gateway.toml" in second
    # The upgrade path: check the config as the service user, then restart.
    assert "would run: runuser -u rpm-gateway -- /opt/rpm-gateway/.venv/bin/rpm-gateway " \
           "config check /etc/rpm-gateway/gateway.toml" in second
    assert "would run: systemctl restart rpm-gateway.service" in second


def test_install_polkit_choices(tmp_path: Path) -> None:
    tools, _ = fake_tools(tmp_path)
    install(tmp_path / "pkla", tools, "--polkit", "pkla")
    assert (tmp_path / "pkla/etc/polkit-1/localauthority/50-local.d/rpm-gateway.pkla").is_file()
    assert not (tmp_path / "pkla/etc/polkit-1/rules.d").exists()
    install(tmp_path / "none", tools, "--polkit", "none")
    assert not (tmp_path / "none/etc/polkit-1").exists()


# The polkit rule's JavaScript is run by node (polkitd itself embeds duktape).
@needs_tools("node", package="nodejs")
def test_polkit_rule_allows_only_restarting_bluetooth_as_rpm_gateway(tmp_path: Path) -> None:
    cases = [
        {"user": "rpm-gateway", "unit": "bluetooth.service", "verb": "restart"},
        {"user": "rpm-gateway", "unit": "bluetooth.service", "verb": "stop"},
        {"user": "rpm-gateway", "unit": "ssh.service", "verb": "restart"},
        {"user": "pi", "unit": "bluetooth.service", "verb": "restart"},
    ]
    script = tmp_path / "eval.js"
    script.write_text("""
const fs = require("fs");
let rule = null;
const polkit = {Result: {YES: "yes", NO: "no", NOT_HANDLED: null},
                addRule(f) { rule = f; }};
eval(fs.readFileSync(process.argv[2], "utf8"));
const out = JSON.parse(process.argv[3]).map(c => rule(
    {id: "org.freedesktop.systemd1.manage-units", lookup: k => c[k]}, {user: c.user}));
console.log(JSON.stringify(out));
""")
    r = subprocess.run(["node", str(script), str(SYSTEMD / "polkit/50-rpm-gateway.rules"),
                        json.dumps(cases)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ["yes", None, None, None]
