"""The pairing registry and the allowlist view over config and registry (gateway.pairings)."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import DeviceBinding
from gateway.pairings import PairingRegistry, Pairings, RegistryError, open_pairings

SCALE = "AA:BB:CC:DD:EE:01"
CUFF = "AA:BB:CC:DD:EE:02"


def _b(address: str, patient: str = "patient-1", **kw: object) -> DeviceBinding:
    return DeviceBinding.model_validate({"address": address, "patient_id": patient, **kw})


def test_bind_is_on_disk_when_it_returns_and_another_process_sees_it(tmp_path: Path) -> None:
    path = tmp_path / "pairings.json"
    reg = PairingRegistry(path)
    entry = reg.bind(_b(SCALE, enrolled=dt.date(2026, 12, 2)), by="tech1",
                     now=dt.datetime(2026, 12, 2, 15, 4, tzinfo=dt.UTC))
    assert entry.paired_at == "2026-12-02T15:04:00Z"
    doc = json.loads(path.read_text())
    assert doc["bindings"][0] == {"address": SCALE, "patient_id": "patient-1", "user_index": None,
                                  "driver": None, "enrolled": "2026-12-02",
                                  "paired_at": "2026-12-02T15:04:00Z", "paired_by": "tech1",
                                  "device": {}}
    assert [e["name"] for e in doc["events"]] == ["device_paired"]
    assert PairingRegistry(path).entries()[SCALE].binding.enrolled == dt.date(2026, 12, 2)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert path.stat().st_mode & 0o777 == 0o640


def test_two_writers_never_undo_each_other(tmp_path: Path) -> None:
    # The agent and a CLI working alone each hold the registry; each write re-reads under a lock.
    path = tmp_path / "pairings.json"
    agent, cli = PairingRegistry(path), PairingRegistry(path)
    cli.bind(_b(SCALE))
    assert agent.ensure([CUFF], dt.date(2026, 12, 2))  # the agent's own write, after the CLI's
    agent.bind(_b(CUFF, "patient-2"))
    cli.unbind(SCALE)
    final = PairingRegistry(path)
    assert set(final.entries()) == {CUFF}
    # Every change is journalled for the agent to publish, whoever made it; taken once.
    names = [e["name"] for e in final.take_events()]
    assert names == ["device_paired", "device_paired", "device_unpaired"]
    assert agent.take_events() == [] and PairingRegistry(path).take_events() == []
    agent.bind(_b(CUFF, "patient-3"), by="tech2")
    rebound = agent.take_events()
    assert rebound[0]["name"] == "device_rebound"
    assert rebound[0]["detail"] == {"device": CUFF, "from_patient_id": "patient-2",
                                    "to_patient_id": "patient-3", "by": "tech2"}
    assert final.first_seen(CUFF) == dt.date(2026, 12, 2)


def test_the_view_picks_up_changes_and_config_bindings_win(tmp_path: Path) -> None:
    pairings = open_pairings([_b(SCALE, "patient-cfg")], tmp_path)
    assert pairings.bound(SCALE) is not None and pairings.bound(SCALE).source == "config"  # type: ignore[union-attr]
    assert not pairings.refresh()
    other = PairingRegistry(tmp_path / "pairings.json")
    other.bind(_b(CUFF, "patient-2"))
    other.bind(_b(SCALE, "someone-else"))  # cannot override the provisioned binding
    assert pairings.refresh()
    assert pairings.lookup(CUFF) == _b(CUFF, "patient-2")
    assert pairings.lookup(SCALE) == _b(SCALE, "patient-cfg")
    assert pairings.lookup("aa:bb:cc:dd:ee:02") is not None
    other.unbind(CUFF)
    assert pairings.refresh()
    assert pairings.lookup(CUFF) is None
    assert len(pairings) == 1


def test_an_unreadable_registry_is_kept_aside_and_nothing_is_guessed(tmp_path: Path) -> None:
    path = tmp_path / "pairings.json"
    path.write_text('{"bindings": [{"address": "not an address"}]}')
    reg = PairingRegistry(path)
    assert reg.entries() == {}
    assert reg.problem is not None and "unreadable" in reg.problem
    assert (tmp_path / "pairings.json.unreadable").exists()
    assert len(Pairings([], reg)) == 0  # default deny


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_a_failed_bind_says_where_and_why(tmp_path: Path) -> None:
    reg = PairingRegistry(tmp_path / "pairings.json")
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(RegistryError, match=r"cannot write .*pairings.json: permission denied"):
            reg.bind(_b(SCALE))
    finally:
        tmp_path.chmod(0o700)
    assert reg.entries() == {}  # memory agrees with the disk


def test_the_previous_release_enrolment_file_is_imported(tmp_path: Path) -> None:
    (tmp_path / "enrolment.json").write_text(
        json.dumps({"version": 1, "first_seen": {SCALE: "2026-11-02"}}))
    pairings = open_pairings([_b(SCALE)], tmp_path)
    assert pairings.registry is not None
    assert pairings.registry.first_seen(SCALE) == dt.date(2026, 11, 2)
    assert pairings.registry.ensure([SCALE], dt.date(2026, 12, 2))
    assert json.loads((tmp_path / "pairings.json").read_text())["first_seen"] == {
        SCALE: "2026-11-02"}


_addresses = st.sampled_from([f"AA:BB:CC:DD:EE:{n:02X}" for n in range(6)])
_ops = st.lists(st.tuples(st.booleans(), _addresses, st.sampled_from(["p1", "p2"])), max_size=20)


@settings(max_examples=40, deadline=None)
@given(_ops)
def test_any_sequence_of_binds_and_unbinds_reads_back_the_same(ops: list[tuple[bool, str, str]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "pairings.json"
        reg = PairingRegistry(path)
        expected: dict[str, str] = {}
        for bind, address, patient in ops:
            if bind:
                reg.bind(_b(address, patient))
                expected[address] = patient
            else:
                reg.unbind(address)
                expected.pop(address, None)
        got = {a: e.binding.patient_id for a, e in PairingRegistry(path).entries().items()}
        assert got == expected


def test_a_failed_read_keeps_the_bindings_and_never_writes_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    path = tmp_path / "pairings.json"
    PairingRegistry(path).bind(_b(SCALE, "alice"))
    before = path.read_bytes()
    agent = PairingRegistry(path)
    PairingRegistry(path).bind(_b(CUFF, "bob"))  # the file changes: the agent reads it again
    real = Path.read_text

    def eio(self: Path, *a: object, **kw: object) -> str:
        if self == path:
            raise OSError(errno.EIO, "Input/output error")
        return real(self, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", eio)
    agent.load()
    assert set(agent.entries()) == {SCALE}  # the last good state, not "nothing"
    assert agent.problem is not None and "input/output error" in agent.problem
    assert not agent.ensure([SCALE], dt.date(2026, 12, 2))  # not written over an unknown file
    with pytest.raises(RegistryError, match="input/output error"):
        agent.bind(_b("AA:BB:CC:DD:EE:03", "carol"))
    monkeypatch.setattr(Path, "read_text", real)
    assert path.read_bytes() != before  # bob's binding is still there, untouched
    assert set(PairingRegistry(path).entries()) == {SCALE, CUFF}
    assert agent.ensure([SCALE], dt.date(2026, 12, 2))  # readable again: written, merged
    assert set(PairingRegistry(path).entries()) == {SCALE, CUFF}
    assert PairingRegistry(path).first_seen(SCALE) == dt.date(2026, 12, 2)


def test_a_bind_is_checked_against_the_file_under_the_lock(tmp_path: Path) -> None:
    # Two technicians pair one device at once: the second sees the first's binding.
    path = tmp_path / "pairings.json"
    first, second = PairingRegistry(path), PairingRegistry(path)
    first.bind(_b(CUFF, "patient-a"))

    def free(current: object) -> None:
        if current is not None:
            raise ValueError("bound meanwhile")

    with pytest.raises(ValueError, match="meanwhile"):
        second.bind(_b(CUFF, "patient-b"), check=free)
    assert PairingRegistry(path).entries()[CUFF].binding.patient_id == "patient-a"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_root_leaves_the_registry_owned_by_the_service_user(tmp_path: Path) -> None:
    # `sudo rpm-gateway pair` while no agent runs: the agent (its own user) must read it after.
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    PairingRegistry(state / "pairings.json").bind(_b(CUFF))
    st = (state / "pairings.json").stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)


def test_a_registry_locked_by_a_stuck_process_refuses_the_change_in_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl
    import time

    import gateway.pairings as pairings_module

    monkeypatch.setattr(pairings_module, "LOCK_TIMEOUT_S", 0.3)
    path = tmp_path / "pairings.json"
    reg = PairingRegistry(path)
    reg.bind(_b(SCALE))
    fd = os.open(tmp_path / ".pairings.json.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process holds it and hangs
    try:
        started = time.monotonic()
        with pytest.raises(RegistryError, match="locked by another process"):
            reg.bind(_b(CUFF))
        assert time.monotonic() - started < 2
    finally:
        os.close(fd)
    reg.bind(_b(CUFF))  # released: the change goes through
    assert set(PairingRegistry(path).entries()) == {SCALE, CUFF}
