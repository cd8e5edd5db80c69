"""config: bad config, unreadable CA, missing password file, wrong credentials, unusable data_dir."""

from __future__ import annotations

import re
import time
from pathlib import Path

from faults.report import Row
from faults.rig import Ctx, Rig
from faults.tally import Tally

EX_CONFIG, EX_CANTCREAT = 78, 73
# Within this long the agent must have given up on a configuration it cannot use.
EXIT_WITHIN_S = 15.0
MAX_LINES = 5  # one line of explanation, give or take the logging preamble


def _lines(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if ln.strip() and not ln.startswith("--- start")]


async def _exits(rig: Rig, command: str, want: int) -> tuple[int | None, float, str]:
    assert rig.agent is not None
    rig.agent.log.write_bytes(b"")
    t0 = time.monotonic()
    await rig.agent.start(command)
    code = await rig.agent.wait(EXIT_WITHIN_S)
    took = time.monotonic() - t0
    if code is None:
        await rig.agent.stop()
    return code, took, rig.agent.log_text()


CASES: dict[str, tuple[str, int]] = {
    "config-bad-key": ("an unknown key", EX_CONFIG),
    "config-missing-ca": ("tls.ca_file names a file that does not exist", EX_CONFIG),
    "config-garbage-ca": ("tls.ca_file is not a certificate", EX_CONFIG),
    "config-missing-password-file": ("mqtt.password_file does not exist", EX_CONFIG),
    "config-unusable-data-dir": ("hub.data_dir under a regular file", EX_CANTCREAT),
}


def _extra(name: str, d: Path) -> dict[str, dict[str, object]]:
    if name == "config-bad-key":
        return {"mqtt": {"hots": "broker.example"}}
    if name == "config-missing-ca":
        return {"mqtt.tls": {"ca_file": str(d / "no-such-ca.pem")}}
    if name == "config-garbage-ca":
        (d / "garbage-ca.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64!\n")
        return {"mqtt.tls": {"ca_file": str(d / "garbage-ca.pem")}}
    if name == "config-missing-password-file":
        return {"mqtt": {"username": "hub", "password_file": str(d / "no-such-password")}}
    (d / "a-file").write_text("x")
    return {"hub": {"data_dir": str(d / "a-file" / "state")}}


async def bad_config(ctx: Ctx, name: str) -> Row:
    """`run` and `config check` exit with the right status, at once, in a line or two."""
    what, want = CASES[name]
    notes: list[str] = []
    bad: list[str] = []
    worst = 0.0
    async with Rig(ctx, name, with_sim=False) as rig:
        rig.write_config(extra=_extra(name, rig.dir))
        commands = ["run"] if name == "config-unusable-data-dir" else ["check", "run"]
        for command in commands:
            code, took, log = await _exits(rig, command, want)
            worst = max(worst, took)
            lines = _lines(log)
            notes.append(f"{command}: exit {code} in {took:.1f} s, {len(lines)} line(s)")
            if code != want:
                bad.append(f"{command} exited {code}, want {want} ({what})")
            if "Traceback" in log:
                bad.append(f"{command} printed a traceback")
            if command == "run" and len(lines) > MAX_LINES:
                bad.append(f"{command} logged {len(lines)} lines")
            if name in ("config-missing-ca", "config-garbage-ca") and code == want \
                    and "ca.pem" not in log:
                bad.append(f"{command}: the message does not name the CA file")
    row = Row.of(name, "config", len(commands), Tally(), worst)
    row.notes += notes
    for b in bad:
        row.fail(b)
    return row


async def wrong_credentials(ctx: Ctx) -> Row:
    """The broker refuses the password: a long backoff and one ERROR, not a retry loop."""
    name = "config-wrong-credentials"
    watch = ctx.pick_s(4.0, 12.0, 20.0)
    async with Rig(ctx, name, sim_args=["--devices", "scale"], users={"hub": "right"},
                   anonymous=True) as rig:
        assert rig.agent is not None
        pw = rig.dir / "pw"
        pw.write_text("wrong\n")
        pw.chmod(0o600)
        rig.write_config(extra={"mqtt": {"username": "hub", "password_file": str(pw),
                                         "reconnect_min_s": 0.2, "reconnect_max_s": 1.0}})
        await rig.agent.start()
        code = await rig.agent.wait(watch)
        log = rig.agent.log_text()
        broker_log = rig.broker.log_text()
    # Every TCP connection, less the clinic's own subscriber.
    attempts = len(re.findall(r"New connection from", broker_log)) - \
        len(re.findall(r"New client connected from \S+ as faults-clinic", broker_log))
    errors = sum(1 for ln in log.splitlines() if " ERROR " in ln or " CRITICAL " in ln)
    row = Row.of(name, "config", 1, Tally())
    row.notes.append(f"{attempts} connection attempt(s) and {errors} ERROR line(s) in "
                     f"{watch:.0f} s; exit {code}")
    # The normal reconnect ceiling here is 1 s: a loop would try ~watch times.
    if code not in (None, EX_CONFIG):
        row.fail(f"exited {code}")
    if attempts > 3:
        row.fail(f"{attempts} connection attempts in {watch:.0f} s: no long backoff")
    if errors > 2:
        row.fail(f"{errors} ERROR lines in {watch:.0f} s")
    return row
