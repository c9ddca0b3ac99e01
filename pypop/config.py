"""Server settings: one dataclass, filled from a TOML file and/or CLI flags.

Example ``pypop.toml`` (every key optional)::

    [server]
    listen = ["127.0.0.1:110"]          # plain POP3 (STLS when [tls] is set)
    listen_tls = ["127.0.0.1:995"]      # implicit TLS (RFC 8314)
    hostname = "mail.example.org"       # used in APOP/CRAM-MD5 challenges
    implementation = "pypop"            # CAPA IMPLEMENTATION; "" hides it
    greeting = "POP3 server ready"
    workers = 0                         # worker processes; 0 = one per core
    proxy_from = ["127.0.0.1/32"]       # PROXY protocol v1/v2 from these networks only

    [limits]
    idle_timeout = 600                  # seconds; RFC 1939 §3 wants >= 600
    line_timeout = 60                   # seconds for a command line, first octet to LF
    max_connections = 1000
    max_connections_per_ip = 50
    max_bad_commands = 20
    max_auth_failures = 5
    shutdown_timeout = 30
    auth_failure_delay = 2.0            # before every -ERR [AUTH]
    auth_penalty_max = 15.0             # per-IP delay grows 2, 4, 8 .. this; 0 = off
    auth_penalty_initial = 2.0          # the first step of that (then doubled)
    max_auth_per_client = 2             # authentications one IP runs at once
    lock_wait = 1.0                     # seconds a login waits for a locked maildrop

    [auth]
    passwd_file = "/etc/pypop/passwd"   # Dovecot passwd-file format
    apop = false
    allow_plaintext = false             # USER/PASS, PLAIN, LOGIN without TLS
                                        # (always allowed on loopback)
    mechanisms = ["SCRAM-SHA-256", "PLAIN", "LOGIN"]   # SASL AUTH, in CAPA order
    tokens_file = "/etc/pypop/tokens"   # user:token lines for OAUTHBEARER/XOAUTH2
    login_delay = 0                     # RFC 2449 LOGIN-DELAY, seconds; 0 = off
    secret_file = "/etc/pypop/passwd.secret"   # default: <passwd_file>.secret
    gssapi_keytab = "/etc/pypop/pop.keytab"     # Kerberos (SASL GSSAPI, RFC 4752);
                                        # needs pip install 'pypop3[gssapi]'
    gssapi_hostname = "mail.example.org"  # accept pop/<this>; "*": any key in the
                                        # keytab; default: server.hostname

    [tls]
    cert = "/etc/pypop/cert.pem"        # PEM chain; both files are read again on
    key = "/etc/pypop/key.pem"          # SIGHUP (a bad new pair keeps the old one)

    [backend]
    name = "maildir"
    root = "/var/mail"                  # every other key goes to the backend

    # Instead of auth.passwd_file, any credential store plugin (pypop.credentials):
    # [credentials]
    # name = "passwd-file"
    # path = "/etc/pypop/passwd"        # every other key goes to the store

    [policy]
    expire = "NEVER"                    # CAPA EXPIRE; "" hides it
    utf8_headers = "refuse"             # RFC 6856: 8-bit headers to non-UTF8 clients:
                                        # "refuse" (-ERR [UTF8]) or "send"

    [metrics]
    listen = "127.0.0.1:9110"           # Prometheus /metrics and /healthz; off if unset

    [log]
    target = "stderr"                   # "stderr", "syslog[:/dev/log]", or a file path
    format = "text"                     # "text" or "json" (one object a line)
    level = "INFO"
"""

from __future__ import annotations

import difflib
import math
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pypop.auth.sasl import ALL_MECHANISMS, DEFAULT_MECHANISMS

__all__ = ["ConfigError", "ServerConfig", "load_config", "parse_address"]


class ConfigError(ValueError):
    """A setting is missing or wrong; the message says which."""


def parse_address(text: str, default_port: int = 110) -> tuple[str, int]:
    """``"127.0.0.1:110"``, ``"[::1]:110"``, ``"localhost"`` -> (host, port)."""
    text = text.strip()
    host, port_s = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"bad listen address {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"bad listen address {text!r}")
            port_s = rest[1:]
    elif text.count(":") == 1:
        host, port_s = text.split(":")
    try:
        port = int(port_s) if port_s else default_port
    except ValueError:
        raise ConfigError(f"bad port in listen address {text!r}") from None
    if not 0 <= port <= 65535 or not host:
        raise ConfigError(f"bad listen address {text!r}")
    return host, port


DEFAULT_LISTEN = ("127.0.0.1", 110)


@dataclass
class ServerConfig:
    # The plain listener defaults to 127.0.0.1:110, unless only TLS listeners are
    # configured: then only TLS is served (set_listen_tls).
    listen: list[tuple[str, int]] = field(default_factory=lambda: [DEFAULT_LISTEN])
    listen_tls: list[tuple[str, int]] = field(default_factory=list)
    listen_explicit: bool = field(default=False, repr=False)
    hostname: str = field(default_factory=socket.gethostname)
    implementation: str = "pypop"
    greeting: str = "POP3 server ready"
    expire: str = "NEVER"
    utf8_headers: str = "refuse"

    idle_timeout: float = 600.0
    line_timeout: float = 60.0
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    max_bad_commands: int = 20
    max_auth_failures: int = 5
    shutdown_timeout: float = 30.0
    auth_failure_delay: float = 2.0
    auth_penalty_max: float = 15.0
    auth_penalty_initial: float = 2.0
    max_auth_per_client: int = 2
    lock_wait: float = 1.0

    passwd_file: Path | None = None
    # The server secret (fake SCRAM salts); None: <passwd_file>.secret, if there is one.
    secret_file: Path | None = None
    apop: bool = False
    allow_plaintext: bool = False
    loopback_is_secure: bool = True
    mechanisms: list[str] = field(default_factory=lambda: list(DEFAULT_MECHANISMS))
    tokens_file: Path | None = None
    login_delay: int = 0
    gssapi_keytab: Path | None = None
    gssapi_hostname: str | None = None

    tls_cert: Path | None = None
    tls_key: Path | None = None

    # Worker processes (pypop.server.workers); 0 = one per core (1 for a backend that
    # keeps its state in the process, such as memory).
    workers: int = 0
    # PROXY protocol: networks whose connections must start with a header (and the
    # only ones whose header is believed).
    proxy_from: list[str] = field(default_factory=list)
    metrics_listen: str | None = None
    log_target: str = "stderr"
    log_format: str = "text"
    log_level: str = "INFO"

    backend: str = "memory"
    backend_options: dict[str, object] = field(default_factory=dict)
    # A credential store plugin (entry point group pypop.credentials); None = the
    # passwd-file of auth.passwd_file.
    credentials: str | None = None
    credentials_options: dict[str, object] = field(default_factory=dict)

    def set_listen(self, addresses: list[tuple[str, int]]) -> None:
        self.listen = addresses
        self.listen_explicit = True

    def set_listen_tls(self, addresses: list[tuple[str, int]]) -> None:
        """Implicit-TLS listeners; without an explicit plain listener, only TLS."""
        self.listen_tls = addresses
        if addresses and not self.listen_explicit:
            self.listen = []

    def validate(self) -> None:
        for name, (attr, kind) in _SECTIONS["limits"].items():
            if kind == (int, float) and math.isnan(getattr(self, attr)):
                raise ConfigError(f"limits.{name} must be a number, got nan")  # a CLI flag
        if self.idle_timeout < 600:
            # RFC 1939 §3: an autologout timer MUST be at least 10 minutes.
            raise ConfigError("limits.idle_timeout must be at least 600 seconds (RFC 1939 §3)")
        for name in (
            "max_connections",
            "max_connections_per_ip",
            "max_bad_commands",
            "max_auth_failures",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"limits.{name} must be at least 1")
        if self.auth_penalty_initial <= 0:
            raise ConfigError("limits.auth_penalty_initial must be above 0")
        if min(self.shutdown_timeout, self.auth_failure_delay, self.auth_penalty_max) < 0:
            raise ConfigError("timeouts and delays must not be negative")
        if not 0 < self.line_timeout <= self.idle_timeout:
            raise ConfigError("limits.line_timeout must be above 0 and at most idle_timeout")
        if not 0 <= self.lock_wait <= 60:
            raise ConfigError("limits.lock_wait must be between 0 and 60 seconds")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls.cert and tls.key go together")
        if self.listen_tls and self.tls_cert is None:
            raise ConfigError("server.listen_tls needs tls.cert and tls.key")
        if not self.listen and not self.listen_tls:
            raise ConfigError("nothing to listen on")
        if not self.hostname or any(c in self.hostname for c in "<>@ \t\r\n"):
            raise ConfigError("server.hostname must be a plain host name")
        unknown = [m for m in self.mechanisms if m.upper() not in ALL_MECHANISMS]
        if unknown:
            raise ConfigError(
                f"auth.mechanisms: unknown {', '.join(unknown)} "
                f"(known: {', '.join(sorted(ALL_MECHANISMS))})"
            )
        if self.login_delay < 0:
            raise ConfigError("auth.login_delay must not be negative")
        if not 0 <= self.workers <= 1024:
            raise ConfigError("server.workers must be between 0 (one per core) and 1024")
        try:
            from pypop.server.proxy import TrustedProxies

            TrustedProxies(self.proxy_from)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.metrics_listen is not None:
            parse_address(self.metrics_listen, 9110)
        if self.log_format not in ("text", "json"):
            raise ConfigError(f'log.format must be "text" or "json", got {self.log_format!r}')
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("log.level must be DEBUG, INFO, WARNING or ERROR")
        if self.utf8_headers not in ("refuse", "send"):
            raise ConfigError('policy.utf8_headers must be "refuse" or "send"')
        if self.expire and self.expire != "NEVER" and not self.expire.isdigit():
            raise ConfigError('policy.expire must be a number of days, "NEVER" or ""')

    def worker_count(self) -> int:
        """``server.workers``, with 0 resolved to the number of usable cores."""
        if self.workers:
            return self.workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return max(1, os.cpu_count() or 1)


# Keys handled by hand in _apply, beside those of _SECTIONS.
_SPECIAL: dict[str, tuple[str, ...]] = {
    "server": ("listen", "listen_tls", "proxy_from"),
    "auth": ("passwd_file", "tokens_file", "mechanisms", "secret_file", "gssapi_keytab"),
}

_SECTIONS: dict[str, dict[str, tuple[str, type | tuple[type, ...]]]] = {
    "server": {
        "hostname": ("hostname", str),
        "implementation": ("implementation", str),
        "greeting": ("greeting", str),
        "workers": ("workers", int),
    },
    "metrics": {"listen": ("metrics_listen", str)},
    "log": {
        "target": ("log_target", str),
        "format": ("log_format", str),
        "level": ("log_level", str),
    },
    "policy": {"expire": ("expire", str), "utf8_headers": ("utf8_headers", str)},
    "limits": {
        "idle_timeout": ("idle_timeout", (int, float)),
        "line_timeout": ("line_timeout", (int, float)),
        "max_connections": ("max_connections", int),
        "max_connections_per_ip": ("max_connections_per_ip", int),
        "max_bad_commands": ("max_bad_commands", int),
        "max_auth_failures": ("max_auth_failures", int),
        "shutdown_timeout": ("shutdown_timeout", (int, float)),
        "auth_failure_delay": ("auth_failure_delay", (int, float)),
        "auth_penalty_max": ("auth_penalty_max", (int, float)),
        "auth_penalty_initial": ("auth_penalty_initial", (int, float)),
        "max_auth_per_client": ("max_auth_per_client", int),
        "lock_wait": ("lock_wait", (int, float)),
    },
    "auth": {
        "apop": ("apop", bool),
        "allow_plaintext": ("allow_plaintext", bool),
        "loopback_is_secure": ("loopback_is_secure", bool),
        "login_delay": ("login_delay", int),
        "gssapi_hostname": ("gssapi_hostname", str),
    },
}


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list"}  # fmt: skip


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        return "a number"
    return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)


def _check(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        got = type(value).__name__
        raise ConfigError(f"{where} must be {_type_name(kind)}, got {got} {value!r}")
    if isinstance(value, float) and math.isnan(value):
        # TOML has nan, and nan passes every range check (all comparisons are false).
        raise ConfigError(f"{where} must be a number, got nan")
    return value


def _unknown(what: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown {what} {name}{hint}")


def _path(base: Path, value: Any, where: str) -> Path:
    p = Path(_check(value, str, where))
    return p if p.is_absolute() else base / p


def load_config(path: Path, config: ServerConfig | None = None) -> ServerConfig:
    """Read a TOML file into ``config`` (a new default one if None). A
    :class:`ConfigError` names the file and the setting."""
    cfg = config if config is not None else ServerConfig()
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read {path}: not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        _apply(data, cfg, path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg


_OTHER_SECTIONS: dict[str, list[str]] = {"tls": ["cert", "key"], "backend": [], "credentials": []}


def _apply(data: dict[str, Any], cfg: ServerConfig, base: Path) -> None:
    known = [*_SECTIONS, *_OTHER_SECTIONS]
    for section in data:
        if section not in known:
            raise _unknown("section", f"[{section}]", [f"[{k}]" for k in known])
        _check(data[section], dict, f"[{section}]")
    for section, keys in _SECTIONS.items():
        table = data.get(section, {})
        names = [*keys, *_SPECIAL.get(section, ())]
        for key, value in table.items():
            where = f"{section}.{key}"
            if section == "server" and key == "listen":
                addrs = _check(value, list, where)
                cfg.set_listen([parse_address(_check(a, str, where)) for a in addrs])
            elif section == "server" and key == "listen_tls":
                addrs = _check(value, list, where)
                cfg.set_listen_tls([parse_address(_check(a, str, where), 995) for a in addrs])
            elif section == "server" and key == "proxy_from":
                nets = _check(value, list, where)
                cfg.proxy_from = [str(_check(n, str, where)) for n in nets]
            elif section == "auth" and key == "passwd_file":
                cfg.passwd_file = _path(base, value, where)
            elif section == "auth" and key == "tokens_file":
                cfg.tokens_file = _path(base, value, where)
            elif section == "auth" and key == "secret_file":
                cfg.secret_file = _path(base, value, where)
            elif section == "auth" and key == "gssapi_keytab":
                cfg.gssapi_keytab = _path(base, value, where)
            elif section == "auth" and key == "mechanisms":
                mechs = _check(value, list, where)
                cfg.mechanisms = [str(_check(m, str, where)).upper() for m in mechs]
            elif key in keys:
                attr, kind = keys[key]
                setattr(cfg, attr, _check(value, kind, where))
            else:
                raise _unknown("setting", where, [f"{section}.{k}" for k in names])
    for key, value in data.get("tls", {}).items():
        if key == "cert":
            cfg.tls_cert = _path(base, value, "tls.cert")
        elif key == "key":
            cfg.tls_key = _path(base, value, "tls.key")
        else:
            raise _unknown("setting", f"tls.{key}", ["tls.cert", "tls.key"])
    if "target" in data.get("log", {}) and not cfg.log_target.startswith(("stderr", "syslog")):
        cfg.log_target = str(_path(base, cfg.log_target, "log.target"))
    backend = dict(data.get("backend", {}))
    if "name" in backend:
        cfg.backend = str(_check(backend.pop("name"), str, "backend.name"))
    if backend:
        cfg.backend_options = backend
    credentials = dict(data.get("credentials", {}))
    if credentials:
        if "name" not in credentials:
            raise ConfigError('[credentials] needs a name (e.g. name = "passwd-file")')
        cfg.credentials = str(_check(credentials.pop("name"), str, "credentials.name"))
        for key in ("path", "file"):
            if isinstance(credentials.get(key), str):
                credentials[key] = str(_path(base, credentials[key], f"credentials.{key}"))
        cfg.credentials_options = credentials
