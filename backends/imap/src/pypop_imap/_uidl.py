"""UIDLs in Dovecot's ``pop3_uidl_format`` syntax, so that users moving between
Dovecot's POP3 and this backend keep their UIDLs (and do not download everything
again).

The default is Dovecot's: ``%08Xu%08Xv``, the IMAP UID then the UIDVALIDITY, each as
lower-case hex zero-padded to 8 digits. Over IMAP only these variables exist:
``%u``/``%{uid}``, ``%v``/``%{uidvalidity}``, ``%g``/``%{guid}`` (Dovecot's mail GUID,
fetched as ``X-GUID``). Modifiers as in Dovecot's var-expand: ``X`` hex, ``L``
lower case, ``U`` upper case; ``0`` then a width pads with zeros, a width alone keeps
the first characters (``%08Xu``, ``%4g``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pypop.backend import is_valid_uid

__all__ = ["DEFAULT_UIDL_FORMAT", "UidlFormat"]

DEFAULT_UIDL_FORMAT: Final = "%08Xu%08Xv"

_TOKEN: Final = re.compile(r"%(?:(%)|(0?)([0-9]*)([LUX]*)(?:([a-zA-Z])|\{([a-z]+)\}))")
_VARS: Final = {"u": "uid", "v": "uidvalidity", "g": "guid"}
_LONG: Final = frozenset(_VARS.values())
_UNAVAILABLE: Final = {
    "m": "the header MD5 (%m) is not available over IMAP",
    "f": "the maildir file name (%f) is not available over IMAP",
}


@dataclass(frozen=True, slots=True)
class _Part:
    literal: str = ""
    var: str = ""
    zero: bool = False
    width: int = 0
    modifiers: str = ""


class UidlFormat:
    """A compiled format; ``UidlFormat(text)`` raises ``ValueError`` naming the problem."""

    def __init__(self, text: str) -> None:
        self.text = text
        parts: list[_Part] = []
        pos = 0
        for m in _TOKEN.finditer(text):
            if m.start() > pos:
                parts.append(_Part(literal=text[pos : m.start()]))
            pos = m.end()
            if m.group(1):
                parts.append(_Part(literal="%"))
                continue
            short, long = m.group(5), m.group(6)
            name = _VARS.get(short, "") if short else (long if long in _LONG else "")
            if not name:
                what = short or long or ""
                raise ValueError(
                    _UNAVAILABLE.get(what, f"unknown variable %{what} in uidl_format {text!r}")
                    + "; use %u, %v or %g"
                )
            width = int(m.group(3)) if m.group(3) else 0
            parts.append(_Part(var=name, zero=bool(m.group(2)), width=width, modifiers=m.group(4)))
        rest = text[pos:]
        if "%" in rest:
            raise ValueError(f"uidl_format {text!r}: a lone or malformed %")
        if rest:
            parts.append(_Part(literal=rest))
        if not any(p.var for p in parts):
            raise ValueError(f"uidl_format {text!r} has no variable: every UIDL would be equal")
        if not any(p.var in ("uid", "guid") for p in parts):
            raise ValueError(f"uidl_format {text!r} needs %u or %g to tell messages apart")
        self._parts = tuple(parts)
        self.needs_guid = any(p.var == "guid" for p in parts)
        self._render: Callable[[int, int, str], str] = self._compile()

    def _compile(self) -> Callable[[int, int, str], str]:
        if self.text == DEFAULT_UIDL_FORMAT:
            return lambda uid, validity, guid: f"{uid:08x}{validity:08x}"
        return self._slow

    def _slow(self, uid: int, validity: int, guid: str) -> str:
        out: list[str] = []
        for p in self._parts:
            if not p.var:
                out.append(p.literal)
                continue
            value = {"uid": str(uid), "uidvalidity": str(validity), "guid": guid}[p.var]
            for mod in p.modifiers:
                if mod == "X":
                    value = f"{int(value):x}" if value.isdigit() else value
                elif mod == "L":
                    value = value.lower()
                else:
                    value = value.upper()
            if p.width:
                value = value.rjust(p.width, "0") if p.zero else value[: p.width]
            out.append(value)
        return "".join(out)

    def __call__(self, uid: int, uidvalidity: int, guid: str = "") -> str:
        """The UIDL; ``ValueError`` if it is not a valid one (RFC 1939 §7)."""
        value = self._render(uid, uidvalidity, guid)
        if not is_valid_uid(value):
            raise ValueError(f"uidl_format {self.text!r} made an invalid UIDL {value!r}")
        return value
