"""`rpm-gateway config check`: every problem of a config file at once, in a technician's words."""

from __future__ import annotations

import difflib
import json
import re
import shutil
import ssl
import tempfile
import tomllib
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from gateway.config import (
    ADDRESS_RE,
    ID_RE,
    LINK_RE,
    GatewayConfig,
    HubConfig,
    MqttConfig,
    OutboxConfig,
    TlsConfig,
)

Severity = Literal["error", "warning"]

# Keys whose problems mean "the hub cannot store readings" (EX_CANTCREAT), not a bad config.
STORAGE_KEYS = frozenset({"hub.data_dir", "outbox.path"})


def _field_pattern(model: type[BaseModel], name: str) -> str | None:
    field = model.model_fields.get(name)
    for meta in field.metadata if field is not None else ():
        pattern = getattr(meta, "pattern", None)
        if isinstance(pattern, str):
            return pattern
    return None


# What the patterns in gateway.config mean, said so a technician can fix the value.
_PATTERN_WORDS = {
    ADDRESS_RE.pattern: "must look like A4:C1:38:00:00:01",
    ID_RE.pattern: "only letters, digits, '.', '_' and '-', up to 64 characters",
    LINK_RE.pattern: "must look like tcp:127.0.0.1:7000 (what `rpm-gateway simulate` prints)",
    _field_pattern(MqttConfig, "topic_prefix"):
        "only letters, digits, '.', '_', '-' and '/', up to 128 characters",
}
# Values of these keys are patient data: never echoed (the one-line error reaches the journal).
_PRIVATE_KEYS = frozenset({"patient_id"})
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_AT_END = re.compile(r"\s*\(at end of document\)\s*$")
_MAX_SHOWN = 40


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the configuration or the files and directories it names."""

    severity: Severity
    key: str  # the key path in TOML terms, e.g. "devices[2].address"; "" for the whole file
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message

    def as_dict(self) -> dict[str, str]:
        """The JSON form printed by `config check --json`."""
        return {"severity": self.severity, "key": self.key, "message": self.message}


def _error(key: str, message: str) -> Problem:
    return Problem("error", key, message)


def _warning(key: str, message: str) -> Problem:
    return Problem("warning", key, message)


# --- validation: pydantic's errors in TOML terms --------------------------------------------


def toml_key(loc: Sequence[int | str]) -> str:
    """A pydantic location as a TOML key path with 1-based positions: devices[2].address."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part + 1}]"
        else:
            name = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part)
            out += f".{name}" if out else name
    return out or "(top level)"


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _model_at(loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model whose fields live at this location (None if the path leaves the models)."""
    model: type[BaseModel] | None = GatewayConfig
    for part in loc:
        if isinstance(part, int):
            continue  # a position in a tuple of models: the element model is already chosen
        if model is None or part not in model.model_fields:
            return None
        model = _inner_model(model.model_fields[part].annotation)
    return model


def _all_sections() -> dict[str, type[BaseModel]]:
    out: dict[str, type[BaseModel]] = {}

    def walk(prefix: str, model: type[BaseModel]) -> None:
        out[prefix] = model
        for name, field in model.model_fields.items():
            inner = _inner_model(field.annotation)
            if inner is not None:
                walk(f"{prefix}.{name}" if prefix else name, inner)

    walk("", GatewayConfig)
    return out


def _unknown_key(loc: Sequence[int | str]) -> str:
    name = str(loc[-1])
    msg = "unknown key (misspelt?)"
    parent = _model_at(loc[:-1])
    if parent is not None:
        fields = list(parent.model_fields)
        close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
        if not close:
            # "user_slot" for "user_index", "ca" for "ca_file": the same first word.
            word = name.split("_", maxsplit=1)[0]
            close = [f for f in fields if f.split("_", maxsplit=1)[0] == word][:2]
            close = close if len(close) == 1 else []
        if close:
            return f'{msg}: did you mean "{close[0]}"?'
    # A right key in the wrong table is a common slip: say where it belongs.
    homes = [f"[{prefix}]" if prefix else "the top level"
             for prefix, model in _all_sections().items() if name in model.model_fields]
    if homes:
        return f"{msg}: \"{name}\" belongs in {' or '.join(homes)}"
    return msg


def _table_name(loc: Sequence[int | str]) -> str:
    return ".".join(str(p) for p in loc if isinstance(p, str))


def _number(value: object) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _shown(value: object) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 1] + "…"


def _wording(err: ErrorDetails) -> str:
    """What is wrong, without pydantic's regexes and class names."""
    loc = err["loc"]
    kind = err["type"]
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    table = _table_name(loc)
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == "missing":
        if _model_at(loc) is not None:
            return f"required table [{table}] is missing"
        return "required key is missing"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"must be a table: write it as [{table}] with its keys on the lines below"
    if kind in ("tuple_type", "list_type"):
        return f"must be a list: one [[{table}]] table per entry"
    words: str
    if kind == "string_pattern_mismatch":
        words = _PATTERN_WORDS.get(str(ctx.get("pattern")), "contains characters that are not allowed")
    elif kind == "literal_error":
        words = "must be one of " + str(ctx.get("expected", "")).replace("'", '"')
    elif kind == "greater_than_equal":
        words = f"must be at least {_number(ctx['ge'])}"
    elif kind == "less_than_equal":
        words = f"must be at most {_number(ctx['le'])}"
    elif kind == "greater_than":
        words = f"must be more than {_number(ctx['gt'])}"
    elif kind == "less_than":
        words = f"must be less than {_number(ctx['lt'])}"
    elif kind == "string_too_short":
        words = "must not be empty" if ctx.get("min_length") == 1 else (
            f"must be at least {ctx.get('min_length')} characters")
    elif kind == "string_too_long":
        words = f"must be at most {ctx.get('max_length')} characters"
    elif kind in ("string_type", "path_type"):
        words = 'must be text in double quotes, e.g. "value"'
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        words = "must be a whole number (without quotes)"
    elif kind in ("float_type", "float_parsing"):
        words = "must be a number (without quotes)"
    elif kind in ("bool_type", "bool_parsing"):
        words = "must be true or false (without quotes)"
    elif kind.startswith(("date_", "datetime_")):
        words = "must be a date written as 2026-11-02 (year-month-day)"
    elif kind == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    else:
        words = str(err["msg"])
    if str(loc[-1]) in _PRIVATE_KEYS or isinstance(err["input"], dict | list):
        return words
    return f"{words} (got {_shown(err['input'])})"


def _array_header_lines(text: str, table: str) -> list[int]:
    """1-based line numbers of each [[table]] header, in order."""
    parts = [re.escape(p) for p in table.split(".")]
    header = re.compile(r"^\s*\[\[\s*" + r"\s*\.\s*".join(parts) + r"\s*\]\]")
    return [n for n, line in enumerate(text.splitlines(), 1) if header.match(line)]


def _where(loc: Sequence[int | str], text: str) -> str:
    """ " ([[devices]] entry 2, line 14)" for a key inside an array of tables, else ""."""
    positions = [i for i, p in enumerate(loc) if isinstance(p, int)]
    if not positions:
        return ""
    i = positions[-1]
    index = int(loc[i])
    table = _table_name(loc[:i])
    lines = _array_header_lines(text, table)
    at = f", line {lines[index]}" if index < len(lines) else ""
    return f" ([[{table}]] entry {index + 1}{at})"


def validation_problems(err: ValidationError, text: str = "") -> list[Problem]:
    """Every error pydantic found, one Problem each, in TOML terms (text gives line numbers)."""
    details = err.errors()
    worded = [(e, _wording(e)) for e in details]
    # A misspelt required key is one mistake, not two: "did you mean" says it all.
    suggested = {(*e["loc"][:-1], m[1]) for e, w in worded
                 if e["type"] == "extra_forbidden" and (m := re.search(r'did you mean "(.+)"', w))}
    return [_error(toml_key(e["loc"]), w + _where(e["loc"], text)) for e, w in worded
            if not (e["type"] == "missing" and tuple(e["loc"]) in suggested)]


def syntax_problem(err: tomllib.TOMLDecodeError) -> Problem:
    """A TOML syntax error with its line and column."""
    detail = str(err)
    where = "somewhere in the file"
    if m := _TOML_POSITION.search(detail):
        where = f"line {m[1]}, column {m[2]}"
        detail = detail[: m.start()]
    elif m := _TOML_AT_END.search(detail):
        where = "at the end of the file"
        detail = detail[: m.start()]
    detail = detail[:1].lower() + detail[1:]
    return _error("", f"{where}: not valid TOML: {detail}")


def _duplicate_addresses(devices: object) -> list[Problem]:
    # The model's own check runs only once every entry is valid; this one does not wait.
    if not isinstance(devices, list):
        return []
    seen: dict[str, int] = {}
    problems = []
    for n, entry in enumerate(devices, 1):
        address = entry.get("address") if isinstance(entry, dict) else None
        if not isinstance(address, str):
            continue
        address = address.upper()
        if address in seen:
            problems.append(_error(f"devices[{n}].address", f"device {address} is listed twice: "
                                   f"[[devices]] entries {seen[address]} and {n}"))
        else:
            seen[address] = n
    return problems


def check_config_text(text: str, source: str) -> list[Problem]:
    """All syntax and validation problems of a config file's text (no files are opened)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return [syntax_problem(e)]
    try:
        GatewayConfig.model_validate(data)
    except ValidationError as e:
        problems = validation_problems(e, text)
        if not any("listed twice" in p.message for p in problems):
            problems += _duplicate_addresses(data.get("devices"))
        if not data:
            problems.insert(0, _error("", f"{source} has no settings at all: start from "
                                          "config/gateway.example.toml"))
        return problems
    return []


# --- the environment: files and directories the config names --------------------------------


def _strerror(e: OSError) -> str:
    return (e.strerror or type(e).__name__).lower()


def _read_file(key: str, path: Path, what: str) -> tuple[bytes | None, list[Problem]]:
    try:
        return path.read_bytes(), []
    except FileNotFoundError:
        return None, [_error(key, f"{what} {path} does not exist")]
    except IsADirectoryError:
        return None, [_error(key, f"{what} {path} is a directory, not a file")]
    except OSError as e:
        return None, [_error(key, f"cannot read {what} {path}: {_strerror(e)}")]


def _world_readable(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & 0o007)
    except OSError:
        return False


class _Encrypted(Exception):
    """The key asked for a passphrase, which an unattended hub cannot type."""


def _passphrase() -> bytes:
    raise _Encrypted


def _check_certificates(key: str, path: Path, what: str) -> list[Problem]:
    data, problems = _read_file(key, path, what)
    if data is None:
        return problems
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, ValueError, OSError):
        return [_error(key, f"{what} {path} holds no PEM certificate "
                            "(expected '-----BEGIN CERTIFICATE-----' blocks)")]
    return []


def _check_tls(tls: TlsConfig) -> list[Problem]:
    problems: list[Problem] = []
    if tls.ca_file is not None:
        problems += _check_certificates("mqtt.tls.ca_file", tls.ca_file, "CA file")
    if tls.insecure_skip_verify:
        problems.append(_warning("mqtt.tls.insecure_skip_verify",
                                 "certificate checking is off: never on a real hub"))
    if tls.cert_file is None:
        if tls.key_file is not None:
            problems.append(_error("mqtt.tls.key_file", "is set but mqtt.tls.cert_file is not: "
                                   "a client key needs its certificate"))
        return problems
    cert_problems = _check_certificates("mqtt.tls.cert_file", tls.cert_file, "client certificate")
    key_problems: list[Problem] = []
    if tls.key_file is not None:
        key_problems = _read_file("mqtt.tls.key_file", tls.key_file, "client key")[1]
        if not key_problems and _world_readable(tls.key_file):
            problems.append(_warning("mqtt.tls.key_file", f"{tls.key_file} can be read by every "
                                     f"user on this machine: run `chmod 600 {tls.key_file}`"))
    problems += cert_problems + key_problems
    if cert_problems or key_problems:
        return problems
    key_key, key_path = (("mqtt.tls.key_file", tls.key_file) if tls.key_file is not None
                         else ("mqtt.tls.cert_file", tls.cert_file))
    try:
        ctx = ssl.create_default_context()
        ctx.load_cert_chain(str(tls.cert_file), str(key_path), password=_passphrase)
    except _Encrypted:
        problems.append(_error(key_key, f"the private key in {key_path} is protected by a "
                               "passphrase, which the hub cannot type: store it without one"))
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e):
            problems.append(_error(key_key, f"the private key in {key_path} does not belong to "
                                   f"the certificate in {tls.cert_file}"))
        elif tls.key_file is None:
            problems.append(_error("mqtt.tls.cert_file", f"{tls.cert_file} holds no private key:"
                                   " set mqtt.tls.key_file to the client key's file"))
        else:
            problems.append(_error(key_key, f"{key_path} holds no PEM private key "
                                   "(expected a '-----BEGIN ... PRIVATE KEY-----' block)"))
    except (OSError, ValueError) as e:
        problems.append(_error(key_key, f"cannot load the client certificate and key: {e}"))
    return problems


def _check_password(mqtt: MqttConfig) -> list[Problem]:
    path = mqtt.password_file
    if path is None:
        return []
    key = "mqtt.password_file"
    data, problems = _read_file(key, path, "password file")
    if data is None:
        return problems
    if _world_readable(path):
        problems.append(_error(key, f"{path} can be read by every user on this machine: "
                               f"run `chmod 600 {path}`"))
    if not data.strip():
        problems.append(_warning(key, f"{path} is empty: the broker will get an empty password"))
    if mqtt.username is None:
        problems.append(_warning(key, "is set but mqtt.username is not: most brokers ignore a "
                                 "password without a user name"))
    return problems


def _check_mqtt(mqtt: MqttConfig) -> list[Problem]:
    problems: list[Problem] = []
    if not mqtt.host.strip():
        problems.append(_error("mqtt.host", "is empty: set the clinic broker's host name or address"))
    problems += _check_password(mqtt)
    if mqtt.tls is not None:
        problems += _check_tls(mqtt.tls)
    return problems


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path("/")


def _check_writable_dir(key: str, path: Path, what: str) -> list[Problem]:
    """Whether `path` is, or can be made, a directory we can write in; creates nothing."""
    base = _existing_ancestor(path.absolute())
    if not base.is_dir():
        if base == path.absolute():
            return [_error(key, f"{what} {path} is a file, not a directory")]
        return [_error(key, f"{what} {path} cannot be created: {base} is a file, not a directory")]
    try:
        # An anonymous temporary file (O_TMPFILE where available): nothing is left behind.
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        if base == path.absolute():
            return [_error(key, f"cannot write in {what} {path}: {_strerror(e)}")]
        return [_error(key, f"{what} {path} cannot be created: cannot write in {base}: "
                            f"{_strerror(e)}")]
    return []


def _check_storage(hub: HubConfig, outbox: OutboxConfig) -> list[Problem]:
    problems = _check_writable_dir("hub.data_dir", hub.data_dir, "data directory")
    db = outbox.path or hub.data_dir / "outbox.db"
    db_key = "outbox.path" if outbox.path is not None else "hub.data_dir"
    if outbox.path is not None:
        problems += _check_writable_dir("outbox.path", outbox.path.parent, "the outbox's directory")
    elif problems:
        return problems
    if db.is_dir():
        problems.append(_error(db_key, f"the outbox {db} is a directory, not a file"))
    elif db.exists():
        try:
            # Opening for update, then closing, changes nothing (no lock is kept).
            with db.open("r+b"):
                pass
        except OSError as e:
            problems.append(_error(db_key, f"cannot write the outbox {db}: {_strerror(e)}"))
    if not any(p.severity == "error" for p in problems):
        base = _existing_ancestor(db.absolute().parent)
        free_mb = shutil.disk_usage(base).free / (1024 * 1024)  # the outbox counts in MiB
        if free_mb < outbox.min_free_mb:
            problems.append(_warning(db_key, f"only {free_mb:.1f} MB free on {base}: no device is "
                                     f"read below outbox.min_free_mb = {outbox.min_free_mb}"))
    return problems


def _registry_bindings(hub: HubConfig | None) -> int:
    """Bindings made with `rpm-gateway pair` (kept in the state directory, not the config)."""
    if hub is None:
        return 0
    from gateway.pairings import FILENAME  # noqa: PLC0415

    # Read, never repaired: a check must not move an unreadable registry aside.
    try:
        doc = json.loads((hub.data_dir / FILENAME).read_text(encoding="utf-8"))
        return len(doc.get("bindings") or [])
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


def _environment(hub: HubConfig | None, mqtt: MqttConfig | None, outbox: OutboxConfig | None,
                 devices: Iterable[object] | None) -> list[Problem]:
    problems: list[Problem] = []
    if mqtt is not None:
        problems += _check_mqtt(mqtt)
    if hub is not None and outbox is not None:
        problems += _check_storage(hub, outbox)
    if devices is not None and not list(devices) and not _registry_bindings(hub):
        problems.append(_warning("devices", "no paired devices: nothing will be read (pair "
                                 "one with `rpm-gateway pair ADDRESS --patient ID`, or add a "
                                 "[[devices]] entry)"))
    return problems


def check_environment(cfg: GatewayConfig) -> list[Problem]:
    """Open every file and directory the config names; what the service would trip over."""
    return _environment(cfg.hub, cfg.mqtt, cfg.outbox, cfg.devices)


def _lenient(model: type[BaseModel], raw: object, fill: dict[str, object]) -> Any:
    """The section with its invalid keys left out (defaults instead), or None if it is no table."""
    if not isinstance(raw, dict):
        return None
    data = dict(raw)
    for _ in range(3):
        try:
            return model.model_validate({**fill, **data})
        except ValidationError as e:
            bad = {str(err["loc"][0]) for err in e.errors() if err["loc"]}
            if not bad & data.keys():
                return None
            for key in bad:
                data.pop(key, None)
    return None


def check_file(path: Path) -> list[Problem]:
    """What `config check` reports: the text's problems and, where sections are valid, the files'."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return [_error("", f"{path} is not UTF-8 text")]
    except OSError as e:
        return [_error("", f"cannot read {path}: {_strerror(e)}")]
    problems = check_config_text(text, str(path))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return problems
    # Check the files whatever else is wrong (its errors are reported above), so a typo in
    # [[devices]] or a bad hub id does not hide a missing CA file; the id is not needed here.
    hub = _lenient(HubConfig, data.get("hub"), {"id": "hub"})
    mqtt = _lenient(MqttConfig, data.get("mqtt", {}), {})
    if mqtt is not None and mqtt.tls is None and isinstance(data.get("mqtt"), dict):
        tls = _lenient(TlsConfig, data["mqtt"].get("tls"), {})
        mqtt = mqtt.model_copy(update={"tls": tls})
    devices = data.get("devices", ())
    env = _environment(hub, mqtt, _lenient(OutboxConfig, data.get("outbox", {}), {}),
                       devices if isinstance(devices, list | tuple) else None)
    return problems + env


def summary(problems: Sequence[Problem]) -> tuple[int, int]:
    """(errors, warnings)."""
    errors = sum(p.severity == "error" for p in problems)
    return errors, len(problems) - errors


def one_line(source: str, problems: Sequence[Problem]) -> str:
    """The first problem, and how many more: the one-line form used by `run` and ConfigError."""
    first = problems[0]
    more = len(problems) - 1
    command = "rpm-gateway config check" + ("" if source.startswith("<") else f" {source}")
    tail = f" (and {more} more: run `{command}`)" if more else ""
    return f"{source}: {first}{tail}"


def is_storage(problem: Problem) -> bool:
    """A problem with where the hub keeps its state (EX_CANTCREAT rather than EX_CONFIG)."""
    return problem.key in STORAGE_KEYS

