"""The ``[backend]`` options of the imap backend, checked at start-up."""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from pypop.backend_kit import MaildropLocks, OptionError, Options

from pypop_imap._connection import Endpoint
from pypop_imap._protocol import quote
from pypop_imap._uidl import DEFAULT_UIDL_FORMAT, UidlFormat

__all__ = ["ImapSettings", "parse_options"]

TLS_MODES = ("implicit", "starttls", "none")


@dataclass(frozen=True)
class ImapSettings:
    endpoint: Endpoint
    mailbox: str
    mailbox_arg: bytes
    """The mailbox name as a command argument (quoted)."""
    uidl: UidlFormat
    master_user: str | None
    master_password: str | None
    master_separator: str
    mark_seen: bool
    forward_client: bool
    reuse_idle: float
    reuse_max_age: float
    reuse_max: int
    locks: MaildropLocks


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _ssl_context(opts: Options, ca_file: str | None) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise opts.error(f"option 'ca_file' {ca_file}: cannot load it ({exc})") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8314 §4.1
    return ctx


def _master_password(opts: Options, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise opts.error(f"option 'master_password_file' {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise opts.error(f"option 'master_password_file' {path}: not UTF-8") from None
    password = text.rstrip("\r\n")
    if not password or "\n" in password or "\0" in password:
        raise opts.error(
            f"option 'master_password_file' {path}: must hold the password on one line"
        )
    mode = os.stat(path).st_mode
    if mode & 0o004:
        raise opts.error(
            f"option 'master_password_file' {path}: readable by everyone (chmod 600 it)"
        )
    return password


def parse_options(options: Mapping[str, object]) -> ImapSettings:
    """The backend's options, checked; :class:`OptionError` (a ValueError) names the
    first bad one."""
    from pypop.registry import PluginLoadError, create_locks

    opts = Options("imap", options)
    host = opts.text("host", required=True)
    if not host or any(c in host for c in " /\t\r\n"):
        raise opts.error(f"option 'host' must be a host name or address, got {host!r}")
    tls = opts.choice("tls", "implicit", TLS_MODES)
    port = opts.integer("port", 993 if tls == "implicit" else 143, minimum=1, maximum=65535)
    if tls == "none" and not _is_loopback(host):
        raise opts.error(
            "tls = 'none' is allowed only to a loopback address (127.0.0.1, ::1, "
            f"localhost), not {host!r}: passwords would cross the network in clear"
        )
    ca_file = opts.optional_text("ca_file")
    if ca_file is not None:
        ca_file = opts.path("ca_file")
    ssl_context = _ssl_context(opts, ca_file) if tls != "none" else None
    timeout = opts.number("timeout", 30.0, minimum=0.1, maximum=3600)
    mailbox = opts.text("mailbox", "INBOX")
    arg = quote(mailbox.encode("utf-8")) if mailbox.isascii() else None
    if not mailbox or arg is None:
        raise opts.error(
            f"option 'mailbox' must be a non-empty ASCII name (give a non-ASCII name in "
            f"the server's modified UTF-7, as it lists it), got {mailbox!r}"
        )
    try:
        uidl = UidlFormat(opts.text("uidl_format", DEFAULT_UIDL_FORMAT))
    except ValueError as exc:
        raise opts.error(f"option 'uidl_format': {exc}") from None
    master_user = opts.optional_text("master_user")
    password_file = opts.optional_text("master_password_file")
    if (master_user is None) != (password_file is None):
        raise opts.error("options 'master_user' and 'master_password_file' go together")
    master_password = None
    if password_file is not None:
        master_password = _master_password(opts, opts.path("master_password_file"))
    separator = opts.text("master_separator", "")
    if separator and master_user is None:
        raise opts.error("option 'master_separator' needs 'master_user'")
    if len(separator) > 1 or separator.isalnum():
        raise opts.error(
            f"option 'master_separator' must be one non-alphanumeric character (Dovecot's "
            f"auth_master_user_separator, e.g. '*'), got {separator!r}"
        )
    mark_seen = opts.flag("mark_seen", False)
    forward_client = opts.flag("forward_client", True)
    reuse_idle = opts.number("reuse_idle", 30.0, minimum=0, maximum=1800)
    reuse_max_age = opts.number("reuse_max_age", 300.0, minimum=0, maximum=86400)
    reuse_max = opts.integer("reuse_max", 256, minimum=0, maximum=100000)
    lock = opts.raw("lock")  # a name, or a table with "name" and the plugin's options
    opts.finish()
    lock_name, lock_options = "local", {}
    if isinstance(lock, str):
        lock_name = lock
    elif isinstance(lock, Mapping):
        table = dict(lock)
        name = table.pop("name", None)
        if not isinstance(name, str):
            raise opts.error("option 'lock' as a table needs a name")
        lock_name, lock_options = name, table
    elif lock is not None:
        raise opts.error(f"option 'lock' must be a name or a table, got {lock!r}")
    try:
        locks = create_locks(lock_name, lock_options)
    except PluginLoadError as exc:
        raise OptionError(f"imap backend: option 'lock': {exc}") from None
    return ImapSettings(
        endpoint=Endpoint(host, port, tls, ssl_context, timeout),
        mailbox=mailbox,
        mailbox_arg=arg,
        uidl=uidl,
        master_user=master_user,
        master_password=master_password,
        master_separator=separator,
        mark_seen=mark_seen,
        forward_client=forward_client,
        reuse_idle=reuse_idle,
        reuse_max_age=reuse_max_age,
        reuse_max=reuse_max,
        locks=locks,
    )
