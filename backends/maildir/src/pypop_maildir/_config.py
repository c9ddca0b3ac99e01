"""Options of the ``maildir`` backend, validated once at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = ["ConfigError", "MaildirConfig", "UnsafeUser", "expand_template", "parse_options"]

LockMethod = Literal["auto", "dotlock", "fcntl"]


class ConfigError(ValueError):
    """A ``[backend]`` option of the maildir backend is missing or invalid."""


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


_BOOL_WORDS = {
    "1": True, "yes": True, "true": True, "on": True,
    "0": False, "no": False, "false": False, "off": False,
}  # fmt: skip


def _bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ConfigError(f"maildir backend: option {name!r} must be a boolean, got {value!r}")


def _number(name: str, value: object, *, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"maildir backend: option {name!r} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(
            f"maildir backend: option {name!r} must be a number, got {value!r}"
        ) from None
    if not number >= minimum:  # also rejects NaN
        raise ConfigError(f"maildir backend: option {name!r} must be >= {minimum}, got {value!r}")
    return number


def _check_template(template: str) -> None:
    if not template:
        raise ConfigError("maildir backend: option 'template' must not be empty")
    if template.startswith("/"):
        raise ConfigError("maildir backend: option 'template' must be relative to 'root'")
    i = 0
    seen_var = False
    while i < len(template):
        if template[i] == "%":
            code = template[i + 1 : i + 2]
            if code not in ("u", "n", "d", "%"):
                raise ConfigError(
                    f"maildir backend: option 'template' has an unknown variable "
                    f"'%{code}' (supported: %u user, %n local part, %d domain, %% percent)"
                )
            seen_var = seen_var or code != "%"
            i += 2
        else:
            i += 1
    if not seen_var:
        raise ConfigError(
            "maildir backend: option 'template' must contain %u, %n or %d "
            "(otherwise every user would share one maildir)"
        )
    for part in template.split("/"):
        if part in ("", ".", ".."):
            raise ConfigError(
                f"maildir backend: option 'template' has an empty, '.' or '..' component: "
                f"{template!r}"
            )


_KNOWN = {
    "root", "template", "save_uidl", "lock", "lock_stale_timeout", "flag_updates",
    "autocreate", "filename_sizes", "size_cache", "fsync", "io_threads",
}  # fmt: skip


def parse_options(options: Mapping[str, object]) -> MaildirConfig:
    """Validate the options; raises :class:`ConfigError` with a readable message."""
    unknown = sorted(set(options) - _KNOWN)
    if unknown:
        raise ConfigError(
            f"maildir backend: unknown option(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(_KNOWN))})"
        )
    root = options.get("root")
    if not isinstance(root, str | os.PathLike) or not os.fspath(root):
        raise ConfigError("maildir backend: option 'root' (directory of all maildirs) is required")
    root_s = os.path.abspath(os.fspath(root))
    if not isinstance(root_s, str):  # a bytes path-like
        raise ConfigError("maildir backend: option 'root' must be a text path")
    if not os.path.isdir(root_s):
        raise ConfigError(f"maildir backend: root {root_s!r} is not a directory")
    template = options.get("template", "%u")
    if not isinstance(template, str):
        raise ConfigError(f"maildir backend: option 'template' must be a string, got {template!r}")
    _check_template(template)
    lock = options.get("lock", "auto")
    if lock not in ("auto", "dotlock", "fcntl"):
        raise ConfigError(
            f"maildir backend: option 'lock' must be 'auto', 'dotlock' or 'fcntl', got {lock!r}"
        )
    io_threads = _number("io_threads", options.get("io_threads", 16), minimum=1)
    if io_threads != int(io_threads):
        raise ConfigError(f"maildir backend: option 'io_threads' must be an integer: {io_threads}")
    return MaildirConfig(
        root=root_s,
        template=template,
        save_uidl=_bool("save_uidl", options.get("save_uidl", False)),
        lock=lock,
        lock_stale_timeout=_number(
            "lock_stale_timeout", options.get("lock_stale_timeout", 1800), minimum=1
        ),
        flag_updates=_bool("flag_updates", options.get("flag_updates", True)),
        autocreate=_bool("autocreate", options.get("autocreate", True)),
        filename_sizes=_bool("filename_sizes", options.get("filename_sizes", True)),
        size_cache=_bool("size_cache", options.get("size_cache", True)),
        fsync=_bool("fsync", options.get("fsync", True)),
        io_threads=int(io_threads),
    )


def _unsafe_char(value: str) -> bool:
    return any(c in "/\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in value)


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
