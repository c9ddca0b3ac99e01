"""Options of the ``maildir`` backend, validated once at start-up."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast

from pypop.backend_kit import OptionError, Options

__all__ = [
    "MaildirConfig",
    "OptionError",
    "UnsafeUser",
    "expand_template",
    "location_path",
    "parse_options",
]

LockMethod = Literal["auto", "dotlock", "fcntl"]


class UnsafeUser(ValueError):
    """The user name cannot be mapped to a folder under the root."""


@dataclass(frozen=True, slots=True)
class MaildirConfig:
    root: str
    template: str = "%u"
    save_uidl: bool = False
    lock: LockMethod = "auto"
    lock_stale_timeout: float = 1800.0
    flag_updates: bool = True
    autocreate: bool = True
    filename_sizes: bool = True
    size_cache: bool = True
    fsync: bool = True
    io_threads: int = 16
    io_timeout: float = 30.0
    expire_days: int | None = None
    home_maildir: str = "Maildir"
    listing_cache: int = 100_000


def _check_template(opts: Options, template: str) -> None:
    if not template:
        raise opts.error("option 'template' must not be empty")
    if template.startswith("/"):
        raise opts.error("option 'template' must be relative to 'root'")
    i = 0
    seen_var = False
    while i < len(template):
        if template[i] == "%":
            code = template[i + 1 : i + 2]
            if code not in ("u", "n", "d", "%"):
                raise opts.error(
                    f"option 'template' has an unknown variable "
                    f"'%{code}' (supported: %u user, %n local part, %d domain, %% percent)"
                )
            seen_var = seen_var or code != "%"
            i += 2
        else:
            i += 1
    if not seen_var:
        raise opts.error(
            "option 'template' must contain %u, %n or %d "
            "(otherwise every user would share one maildir)"
        )
    for part in template.split("/"):
        if part in ("", ".", ".."):
            raise opts.error(f"option 'template' has an empty, '.' or '..' component: {template!r}")


def parse_options(options: Mapping[str, object]) -> MaildirConfig:
    """Validate the options; raises :class:`OptionError` with a readable message."""
    opts = Options("maildir", options)
    if not opts.has("root"):
        raise opts.error("option 'root' (directory of all maildirs) is required")
    root = opts.path("root", required=True)
    if not os.path.isdir(root):
        raise opts.error(f"root {root!r} is not a directory")
    template = opts.text("template", "%u")
    _check_template(opts, template)
    config = MaildirConfig(
        root=root,
        template=template,
        save_uidl=opts.flag("save_uidl", False),
        lock=cast(LockMethod, opts.choice("lock", "auto", ("auto", "dotlock", "fcntl"))),
        lock_stale_timeout=opts.number("lock_stale_timeout", 1800.0, minimum=1),
        flag_updates=opts.flag("flag_updates", True),
        autocreate=opts.flag("autocreate", True),
        filename_sizes=opts.flag("filename_sizes", True),
        size_cache=opts.flag("size_cache", True),
        fsync=opts.flag("fsync", True),
        io_threads=opts.integer("io_threads", 16, minimum=1),
        io_timeout=opts.number("io_timeout", 30.0, minimum=0.1),
        expire_days=opts.expire_days(),
        home_maildir=opts.text("home_maildir", "Maildir"),
        listing_cache=opts.integer("listing_cache", 100_000, minimum=0),
    )
    opts.finish()
    return config


_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")


def _unsafe_char(value: str) -> bool:
    return _UNSAFE.search(value) is not None


def expand_template(template: str, user: str) -> str:
    """The maildir path of ``user`` relative to the root (Dovecot-like variables).

    ``%u`` is the whole user name, ``%n`` the part before the first ``@``, ``%d`` the
    part after it (empty without ``@``). Raises :class:`UnsafeUser` if a value holds
    ``/``, ``\\``, NUL or another control character, or if any path component comes
    out empty or starting with ``.`` (which covers ``.`` and ``..``).
    """
    local, _, domain = user.partition("@")
    values = {"u": user, "n": local, "d": domain}
    if not user or _unsafe_char(user):
        raise UnsafeUser("user name is empty or holds '/', '\\' or a control character")
    out: list[str] = []
    i = 0
    while i < len(template):
        ch = template[i]
        if ch == "%":
            code = template[i + 1]
            out.append("%" if code == "%" else values[code])
            i += 2
        else:
            out.append(ch)
            i += 1
    path = "".join(out)
    for part in path.split("/"):
        if not part or part.startswith("."):
            raise UnsafeUser("user name maps to an empty or dot-prefixed path component")
    return path


def location_path(mail: str | None, home: str | None, user: str, home_maildir: str) -> str:
    """The maildir a user database names (:class:`pypop.backend.Account`).

    ``mail`` is Dovecot's mail location: ``maildir:PATH[:KEY=VALUE...]`` or a bare
    path; ``~`` at its start is the home directory, and ``%u``, ``%n``, ``%d``
    expand as in the template. Without ``mail``, ``home`` + ``home_maildir``.
    Raises ``ValueError`` for another driver (``mbox:``, ``sdbox:`` ...), a relative
    result, or a ``~`` without a home; :class:`UnsafeUser` for a user name that
    cannot go into a path.
    """
    if mail is None:
        if home is None:
            raise ValueError("no mail location and no home")
        mail = f"~/{home_maildir}"
    driver, sep, rest = mail.partition(":")
    if sep and "/" not in driver and driver != "~":
        if driver != "maildir":
            raise ValueError(f"mail location driver {driver!r} is not maildir")
        mail = rest.split(":", 1)[0]  # options (LAYOUT=, INDEX= ...) mean nothing here
    if "%" in mail:
        if not user or _unsafe_char(user):
            raise UnsafeUser("user name holds '/', '\\' or a control character")
        local, _, domain = user.partition("@")
        mail = mail.replace("%%", "\0").replace("%u", user).replace("%n", local)
        mail = mail.replace("%d", domain).replace("\0", "%")
    if mail == "~" or mail.startswith("~/"):
        if not home:
            raise ValueError("mail location uses ~ but the user has no home")
        mail = home.rstrip("/") + mail[1:]
    if not os.path.isabs(mail):
        raise ValueError("mail location is not an absolute path")
    return os.path.normpath(mail)
