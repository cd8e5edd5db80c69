"""`config check`: every problem at once, in a technician's words, and the files the config names."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.config import ConfigError, parse_config
from gateway.config_check import (
    Problem,
    check_config_text,
    check_environment,
    check_file,
    one_line,
    toml_key,
)

MINIMAL = '[hub]\nid = "hub-1"\n'
DEVICE = '[[devices]]\naddress = "A4:C1:38:00:00:01"\npatient_id = "patient-1"\n'


def messages(text: str) -> dict[str, str]:
    """key -> message of every problem in the text (all errors: the text alone has no warnings)."""
    problems = check_config_text(text, "gw.toml")
    assert all(p.severity == "error" for p in problems)
    return {p.key: p.message for p in problems}


# --- wording of validation errors ------------------------------------------------------------


def test_toml_syntax_error_has_line_and_column() -> None:
    [p] = check_config_text('[hub]\nid = "h"\n[mqtt\n', "gw.toml")
    assert p == Problem("error", "", "line 3, column 6: not valid TOML: expected ']' at the end "
                                     "of a table declaration")


def test_toml_error_at_end_of_document() -> None:
    [p] = check_config_text('[hub]\nid = "h"\nid = "i"\n', "gw.toml")
    assert "not valid TOML" in p.message
    assert p.message.startswith(("line 3", "at the end of the file"))


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        (MINIMAL + "[mqtt]\nprot = 1\n", "mqtt.prot", 'unknown key (misspelt?): did you mean "port"?'),
        (MINIMAL + "[mqqt]\nport = 1\n", "mqqt", 'unknown key (misspelt?): did you mean "mqtt"?'),
        (MINIMAL + "password_file = 'x'\n", "hub.password_file",
         'unknown key (misspelt?): "password_file" belongs in [mqtt]'),
        (MINIMAL + "zzz = 1\n", "hub.zzz", "unknown key (misspelt?)"),
        ("[mqtt]\nport = 1\n", "hub", "required table [hub] is missing"),
        ("[hub]\ntimezone = 'UTC'\n", "hub.id", "required key is missing"),
        ('[hub]\nid = "has space"\n', "hub.id",
         "only letters, digits, '.', '_' and '-', up to 64 characters (got \"has space\")"),
        (MINIMAL + "[mqtt]\ntopic_prefix = 'a b'\n", "mqtt.topic_prefix",
         "only letters, digits, '.', '_', '-' and '/', up to 128 characters (got \"a b\")"),
        (MINIMAL + "[outbox]\nwhen_full = 'drop'\n", "outbox.when_full",
         'must be one of "reject_new" or "drop_oldest" (got "drop")'),
        (MINIMAL + "[mqtt]\nport = 0\n", "mqtt.port", "must be at least 1 (got 0)"),
        (MINIMAL + "[mqtt]\nport = 70000\n", "mqtt.port", "must be at most 65535 (got 70000)"),
        (MINIMAL + "[mqtt]\nreconnect_min_s = 0\n", "mqtt.reconnect_min_s",
         "must be more than 0 (got 0)"),
        (MINIMAL + "[mqtt]\nhost = 3\n", "mqtt.host",
         'must be text in double quotes, e.g. "value" (got 3)'),
        (MINIMAL + "[mqtt]\nport = 'x'\n", "mqtt.port",
         'must be a whole number (without quotes) (got "x")'),
        (MINIMAL + "[mqtt]\nport = 1.5\n", "mqtt.port", "must be a whole number (without quotes) (got 1.5)"),
        (MINIMAL + "[mqtt]\npublish_timeout_s = 'x'\n", "mqtt.publish_timeout_s",
         'must be a number (without quotes) (got "x")'),
        ('[hub]\nid = "h"\ntrust_clock = "maybe"\n',
         "hub.trust_clock", 'must be true or false (without quotes) (got "maybe")'),
        (MINIMAL + '[[devices]]\naddress = "A4:C1:38:00:00:01"\npatient_id = "p"\n'
         'enrolled = "last week"\n', "devices[1].enrolled",
         'must be a date written as 2026-11-02 (year-month-day) (got "last week") '
         '([[devices]] entry 1, line 3)'),
        (MINIMAL + "outbox = 3\n", "hub.outbox",
         'unknown key (misspelt?): "outbox" belongs in the top level'),
        ('outbox = 3\n' + MINIMAL, "outbox",
         "must be a table: write it as [outbox] with its keys on the lines below"),
        ('devices = 3\n' + MINIMAL, "devices", "must be a list: one [[devices]] table per entry"),
        ('[hub]\nid = "h"\ntimezone = "Mars/Olympus"\n', "hub.timezone",
         "unknown IANA time zone 'Mars/Olympus'"),
    ],
)
def test_each_kind_of_error_in_plain_words(text: str, key: str, message: str) -> None:
    got = messages(text)
    assert got.get(key) == message, got


def test_no_regexes_or_class_names_in_messages() -> None:
    text = ('radio = 5\n[hub]\nid = "a b"\n[mqtt]\ntls = 3\n'
            '[[devices]]\naddress = "nope"\npatient_id = "p q"\n')
    for message in messages(text).values():
        assert "^" not in message
        assert "Config" not in message
        assert "Input should" not in message


def test_positions_count_from_one_and_name_the_entry_and_line() -> None:
    text = (MINIMAL + DEVICE
            + '[[devices]]\naddress = "nope"\npatient_id = "patient-2"\n'
            + '[[devices]]\naddress = "A4:C1:38:00:00:03"\npatient_id = "p"\nuser_slot = 1\n')
    got = messages(text)
    assert got["devices[2].address"] == (
        'must look like A4:C1:38:00:00:01 (got "NOPE") ([[devices]] entry 2, line 6)')
    assert got["devices[3].user_slot"] == (
        'unknown key (misspelt?): did you mean "user_index"?' " ([[devices]] entry 3, line 9)")
    assert len(got) == 2


def test_a_misspelt_required_key_is_one_problem_not_two() -> None:
    got = messages(MINIMAL + '[[devices]]\nadress = "A4:C1:38:00:00:01"\npatient_id = "p"\n')
    assert got == {"devices[1].adress": 'unknown key (misspelt?): did you mean "address"? '
                                        "([[devices]] entry 1, line 3)"}


def test_simulated_devices_are_positioned_too() -> None:
    text = MINIMAL + ('[radio]\nkind = "virtual"\n[[radio.simulated]]\nprofile = "weight_scale"\n'
                      'address = "C0:00:00:00:5C:01"\n[[radio.simulated]]\nprofile = "toaster"\n'
                      'address = "C0:00:00:00:5C:02"\n')
    got = messages(text)
    assert got["radio.simulated[2].profile"].endswith("([[radio.simulated]] entry 2, line 8)")


def test_patient_ids_are_never_echoed() -> None:
    got = messages(MINIMAL + '[[devices]]\naddress = "A4:C1:38:00:00:01"\npatient_id = "Jane Doe"\n')
    assert "Jane" not in got["devices[1].patient_id"]


def test_duplicate_addresses_name_both_entries() -> None:
    text = MINIMAL + DEVICE + DEVICE.replace("A4:C1", "a4:c1").replace("patient-1", "p2")
    assert messages(text) == {"devices": "device A4:C1:38:00:00:01 is listed twice: "
                                         "[[devices]] entries 1 and 2"}


def test_duplicate_addresses_found_even_when_another_entry_is_bad() -> None:
    text = (MINIMAL + DEVICE + '[[devices]]\naddress = "nope"\npatient_id = "p"\n'
            + DEVICE.replace("patient-1", "p3"))
    got = messages(text)
    assert "devices[2].address" in got
    assert got["devices[3].address"] == ("device A4:C1:38:00:00:01 is listed twice: "
                                         "[[devices]] entries 1 and 3")


def test_every_error_at_once() -> None:
    text = ('[hub]\nid = "a b"\n[mqtt]\nport = 0\nprot = 1\n'
            '[[devices]]\naddress = "nope"\npatient_id = "p"\n')
    assert set(messages(text)) == {"hub.id", "mqtt.port", "mqtt.prot", "devices[1].address"}


def test_an_empty_file_says_so() -> None:
    got = messages("# nothing here\n")
    assert got[""] == "gw.toml has no settings at all: start from config/gateway.example.toml"
    assert got["hub"] == "required table [hub] is missing"


def test_a_valid_text_has_no_problems() -> None:
    assert check_config_text(MINIMAL + DEVICE, "gw.toml") == []


def test_toml_key() -> None:
    assert toml_key(("devices", 0, "address")) == "devices[1].address"
    assert toml_key(("mqtt", "tls", "ca_file")) == "mqtt.tls.ca_file"
    assert toml_key(("hub", "my key")) == 'hub."my key"'
    assert toml_key(()) == "(top level)"


# --- the one-line ConfigError uses the same words -------------------------------------------


def test_config_error_is_the_first_problem_and_a_count() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config('[hub]\nid = "a b"\n[mqtt]\nport = 0\nprot = 1\n', "/etc/gw.toml")
    assert str(e.value) == (
        "/etc/gw.toml: hub.id: only letters, digits, '.', '_' and '-', up to 64 characters "
        '(got "a b") (and 2 more: run `rpm-gateway config check /etc/gw.toml`)')


def test_config_error_for_one_problem_has_no_count() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(MINIMAL + "[mqtt]\nport = 0\n", "gw.toml")
    assert str(e.value) == "gw.toml: mqtt.port: must be at least 1 (got 0)"


def test_config_error_for_toml_syntax() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config("[hub\n", "gw.toml")
    assert str(e.value).startswith("gw.toml: line 1, column 5: not valid TOML: ")


def test_one_line_without_a_file_name() -> None:
    problems = [Problem("error", "a", "x"), Problem("error", "b", "y")]
    assert one_line("<config>", problems) == (
        "<config>: a: x (and 1 more: run `rpm-gateway config check`)")


# --- the environment ---------------------------------------------------------------------------


def _openssl(cwd: Path, *args: str) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        pytest.fail("the openssl command is needed to make throwaway test certificates")
    subprocess.run([exe, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two self-signed certificates with their keys, and a passphrase-protected key."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    for name in ("a", "b"):
        _openssl(d, "req", "-x509", *ec, "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.pem", "-days", "2", "-subj", f"/CN={name}")
    _openssl(d, "pkey", "-in", "a.key", "-aes256", "-passout", "pass:secret", "-out", "enc.key")
    (d / "both.pem").write_bytes((d / "a.pem").read_bytes() + (d / "a.key").read_bytes())
    for key in d.glob("*.key"):
        key.chmod(0o600)
    (d / "garbage.pem").write_text("this is not a certificate\n")
    return d


def env(tmp_path: Path, text: str = "") -> list[Problem]:
    """check_environment of MINIMAL + a device, data_dir in tmp_path, plus `text`."""
    cfg = parse_config(f'[hub]\nid = "h"\ndata_dir = "{tmp_path / "state"}"\n{DEVICE}{text}')
    return check_environment(cfg)


def errors(problems: list[Problem]) -> dict[str, str]:
    """key -> message of the errors."""
    return {p.key: p.message for p in problems if p.severity == "error"}


def test_a_sound_environment_has_no_problems(tmp_path: Path) -> None:
    assert env(tmp_path) == []


def test_empty_broker_host(tmp_path: Path) -> None:
    assert errors(env(tmp_path, '[mqtt]\nhost = " "\n')) == {
        "mqtt.host": "is empty: set the clinic broker's host name or address"}


def test_no_paired_devices_is_a_warning(tmp_path: Path) -> None:
    cfg = parse_config(f'[hub]\nid = "h"\ndata_dir = "{tmp_path}"\n')
    assert check_environment(cfg) == [Problem(
        "warning", "devices",
        "no paired devices: nothing will be read (pair one with "
        "`rpm-gateway pair ADDRESS --patient ID`, or add a [[devices]] entry)")]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.pem", "CA file {} does not exist"),
        ("garbage.pem", "CA file {} holds no PEM certificate "
                        "(expected '-----BEGIN CERTIFICATE-----' blocks)"),
        ("a.key", "CA file {} holds no PEM certificate "
                  "(expected '-----BEGIN CERTIFICATE-----' blocks)"),
        (".", "CA file {} is a directory, not a file"),
    ],
)
def test_ca_file_problems(tmp_path: Path, pki: Path, name: str, message: str) -> None:
    ca = pki / name
    assert errors(env(tmp_path, f'[mqtt.tls]\nca_file = "{ca}"\n')) == {
        "mqtt.tls.ca_file": message.format(ca)}


def test_a_good_ca_and_client_pair(tmp_path: Path, pki: Path) -> None:
    text = (f'[mqtt.tls]\nca_file = "{pki / "b.pem"}"\ncert_file = "{pki / "a.pem"}"\n'
            f'key_file = "{pki / "a.key"}"\n')
    assert env(tmp_path, text) == []
    # The key may also sit in the certificate's file.
    assert env(tmp_path, f'[mqtt.tls]\ncert_file = "{pki / "both.pem"}"\n') == []


@pytest.mark.parametrize(
    ("cert", "key", "bad_key", "message"),
    [
        ("a.pem", "b.key", "mqtt.tls.key_file",
         "the private key in {key} does not belong to the certificate in {cert}"),
        ("a.pem", "enc.key", "mqtt.tls.key_file",
         "the private key in {key} is protected by a passphrase, which the hub cannot type: "
         "store it without one"),
        ("a.pem", "garbage.pem", "mqtt.tls.key_file",
         "{key} holds no PEM private key (expected a '-----BEGIN ... PRIVATE KEY-----' block)"),
        ("a.pem", "missing.key", "mqtt.tls.key_file", "client key {key} does not exist"),
        ("garbage.pem", "a.key", "mqtt.tls.cert_file",
         "client certificate {cert} holds no PEM certificate "
         "(expected '-----BEGIN CERTIFICATE-----' blocks)"),
        ("missing.pem", "a.key", "mqtt.tls.cert_file", "client certificate {cert} does not exist"),
        ("a.pem", None, "mqtt.tls.cert_file",
         "{cert} holds no private key: set mqtt.tls.key_file to the client key's file"),
        (None, "a.key", "mqtt.tls.key_file",
         "is set but mqtt.tls.cert_file is not: a client key needs its certificate"),
    ],
)
def test_client_certificate_problems(tmp_path: Path, pki: Path, cert: str | None,
                                     key: str | None, bad_key: str, message: str) -> None:
    text = "[mqtt.tls]\n"
    if cert:
        text += f'cert_file = "{pki / cert}"\n'
    if key:
        text += f'key_file = "{pki / key}"\n'
    got = errors(env(tmp_path, text))
    assert got == {bad_key: message.format(cert=pki / (cert or ""), key=pki / (key or ""))}


def test_world_readable_key_is_a_warning(tmp_path: Path, pki: Path) -> None:
    key = tmp_path / "open.key"
    key.write_bytes((pki / "a.key").read_bytes())
    key.chmod(0o644)
    problems = env(tmp_path, f'[mqtt.tls]\ncert_file = "{pki / "a.pem"}"\nkey_file = "{key}"\n')
    assert problems == [Problem("warning", "mqtt.tls.key_file",
                                f"{key} can be read by every user on this machine: "
                                f"run `chmod 600 {key}`")]


def test_insecure_skip_verify_is_a_warning(tmp_path: Path) -> None:
    problems = env(tmp_path, "[mqtt.tls]\ninsecure_skip_verify = true\n")
    assert [(p.severity, p.key) for p in problems] == [("warning", "mqtt.tls.insecure_skip_verify")]


def password(tmp_path: Path, mode: int | None, content: str = "s3cret\n",
             username: bool = True) -> list[Problem]:
    """check_environment with a password file of this mode (None: no file)."""
    pw = tmp_path / "mqtt-password"
    if mode is not None:
        pw.write_text(content)
        pw.chmod(mode)
    user = 'username = "hub-1"\n' if username else ""
    return env(tmp_path, f'[mqtt]\n{user}password_file = "{pw}"\n')


def test_password_file_ok(tmp_path: Path) -> None:
    assert password(tmp_path, 0o600) == []
    assert password(tmp_path, 0o640) == []


def test_password_file_missing(tmp_path: Path) -> None:
    assert errors(password(tmp_path, None)) == {
        "mqtt.password_file": f"password file {tmp_path / 'mqtt-password'} does not exist"}


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o666])
def test_world_readable_password_file_is_an_error(tmp_path: Path, mode: int) -> None:
    pw = tmp_path / "mqtt-password"
    assert errors(password(tmp_path, mode)) == {
        "mqtt.password_file": f"{pw} can be read by every user on this machine: "
                              f"run `chmod 600 {pw}`"}


def test_password_is_never_in_a_message(tmp_path: Path) -> None:
    for mode in (0o600, 0o644):
        assert not any("s3cret" in p.message for p in password(tmp_path, mode, username=False))


def test_empty_password_file_and_no_username_are_warnings(tmp_path: Path) -> None:
    problems = password(tmp_path, 0o600, content="\n", username=False)
    assert {p.severity for p in problems} == {"warning"}
    assert [p.key for p in problems] == ["mqtt.password_file"] * 2


def test_data_dir_that_does_not_exist_yet_is_fine_and_is_not_created(tmp_path: Path) -> None:
    cfg = parse_config(f'[hub]\nid = "h"\ndata_dir = "{tmp_path / "a" / "b"}"\n{DEVICE}')
    assert check_environment(cfg) == []
    assert list(tmp_path.iterdir()) == []  # checked without leaving anything behind


def test_data_dir_check_leaves_no_file_behind(tmp_path: Path) -> None:
    cfg = parse_config(f'[hub]\nid = "h"\ndata_dir = "{tmp_path}"\n{DEVICE}')
    assert check_environment(cfg) == []
    assert list(tmp_path.iterdir()) == []


# These run as root in CI, and root ignores file modes: "cannot create" is simulated with a
# path whose parent is a regular file, which stops root too.
def test_data_dir_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    d = tmp_path / "afile" / "state"
    cfg = parse_config(f'[hub]\nid = "h"\ndata_dir = "{d}"\n{DEVICE}')
    assert errors(check_environment(cfg)) == {
        "hub.data_dir": f"data directory {d} cannot be created: {tmp_path / 'afile'} is a file, "
                        "not a directory"}


def test_data_dir_is_a_file(tmp_path: Path) -> None:
    d = tmp_path / "state"
    d.write_text("")
    cfg = parse_config(f'[hub]\nid = "h"\ndata_dir = "{d}"\n{DEVICE}')
    assert errors(check_environment(cfg)) == {
        "hub.data_dir": f"data directory {d} is a file, not a directory"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a directory of mode 0500")
def test_data_dir_not_writable(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    d.mkdir(mode=0o500)
    cfg = parse_config(f'[hub]\nid = "h"\ndata_dir = "{d}"\n{DEVICE}')
    assert errors(check_environment(cfg))["hub.data_dir"].startswith(f"cannot write in data directory {d}")


def test_outbox_path_under_a_file_and_outbox_a_directory(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    cfg = parse_config(f'[hub]\nid = "h"\ndata_dir = "{tmp_path}"\n{DEVICE}'
                       f'[outbox]\npath = "{tmp_path / "afile" / "o.db"}"\n')
    assert set(errors(check_environment(cfg))) == {"outbox.path"}
    (tmp_path / "outbox.db").mkdir()
    cfg = parse_config(f'[hub]\nid = "h"\ndata_dir = "{tmp_path}"\n{DEVICE}')
    assert errors(check_environment(cfg)) == {
        "hub.data_dir": f"the outbox {tmp_path / 'outbox.db'} is a directory, not a file"}


def test_check_file_reports_files_even_when_other_keys_are_wrong(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    gw = tmp_path / "gw.toml"
    gw.write_text(f'[hub]\nid = "a b"\ndata_dir = "{tmp_path / "afile" / "x"}"\n'
                  f'[mqtt]\nprot = 1\npassword_file = "{tmp_path / "nope"}"\n'
                  f'[mqtt.tls]\nca_file = "{tmp_path / "ca.pem"}"\n'
                  '[[devices]]\naddress = "nope"\npatient_id = "p"\n')
    assert set(errors(check_file(gw))) == {
        "hub.id", "mqtt.prot", "devices[1].address", "mqtt.password_file", "mqtt.tls.ca_file",
        "hub.data_dir"}


def test_check_file_that_cannot_be_read(tmp_path: Path) -> None:
    assert check_file(tmp_path / "none.toml") == [
        Problem("error", "", f"cannot read {tmp_path / 'none.toml'}: no such file or directory")]


def test_a_bad_simulate_link_is_explained() -> None:
    problems = check_config_text('[hub]\nid = "h"\n[radio]\nkind = "virtual"\nlink = "127.0.0.1:7000"\n',
                                 "t.toml")
    assert [p.key for p in problems] == ["radio.link"]
    assert "tcp:127.0.0.1:7000" in problems[0].message
