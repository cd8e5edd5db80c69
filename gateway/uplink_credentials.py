"""The password and TLS context for one connection attempt, with errors that name the file.

Read at every attempt (so a rotated password or certificate is picked up without a restart),
which also means a file deleted or damaged after start-up shows up here, at run time: that is a
state of its own (``credentials_unreadable``), not a network error to retry at the normal rate.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from gateway.config import ConfigError, MqttConfig, TlsConfig, read_password
from gateway.uplink_errors import CredentialsUnreadableError

log = logging.getLogger(__name__)


def _why(e: OSError | ssl.SSLError) -> str:
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    return e.strerror or str(e)


def _check_readable(key: str, path: Path) -> None:
    # ssl's own errors for a missing file do not say which file; this one does.
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        raise CredentialsUnreadableError(f"{key}: cannot read {path}: {_why(e)}") from e


def ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """The client TLS context; raises CredentialsUnreadableError naming a file it cannot use."""
    if tls.ca_file is not None:
        _check_readable("mqtt.tls.ca_file", tls.ca_file)
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
        )
    except (OSError, ssl.SSLError) as e:
        where = f"mqtt.tls.ca_file: cannot use {tls.ca_file}" if tls.ca_file else "system CA store"
        raise CredentialsUnreadableError(f"{where}: {_why(e)}") from e
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None:
        _check_readable("mqtt.tls.cert_file", tls.cert_file)
        if tls.key_file is not None:
            _check_readable("mqtt.tls.key_file", tls.key_file)
        try:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        except (OSError, ssl.SSLError) as e:
            key = f" with key {tls.key_file}" if tls.key_file else ""
            raise CredentialsUnreadableError(
                f"mqtt.tls.cert_file: cannot use {tls.cert_file}{key}: {_why(e)}"
            ) from e
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def load_credentials(cfg: MqttConfig) -> tuple[str | None, ssl.SSLContext | None]:
    """The password and TLS context for one attempt (file I/O: call it in a thread)."""
    try:
        password = read_password(cfg)
    except ConfigError as e:
        raise CredentialsUnreadableError(str(e)) from e
    return password, None if cfg.tls is None else ssl_context(cfg.tls)
