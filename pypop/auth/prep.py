"""UTF-8 user names and passwords, prepared as RFC 6856 asks (SASLprep or a successor).

SASLprep (RFC 4013) is obsolete; its standards-track successor is PRECIS (RFC 8265).
User names go through the ``UsernameCasePreserved`` profile (Unicode NFC, full-width
forms made narrow, case kept: ``Alice`` and ``alice`` stay two users, as in Dovecot's
passwd-file), passwords through ``OpaqueString`` (NFC, every non-ASCII space made an
ASCII space). Both refuse what cannot be a name or a password: control characters,
unassigned code points, an empty string, and for names spaces and symbols.

The work is done by ``precis-i18n`` (a maintained implementation of RFC 8264/8265),
imported at the first non-ASCII string: printable ASCII is left as it is by both
profiles, so the common case costs one ``isascii`` and no import.

The same preparation is applied to what the server compares against: passwd-file
user names when the file is read, PLAIN passwords when they are used (APOP, CRAM-MD5,
SCRAM), and passwords before ``pypop passwd`` hashes them. A name or password that
cannot be prepared never matches anything; the client gets the usual ``-ERR [AUTH]``.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Final

__all__ = [
    "PrepError",
    "prepare_password",
    "prepare_username",
    "try_password",
    "try_username",
]


class PrepError(ValueError):
    """The string cannot be a user name (or password) under RFC 8265."""


@functools.cache
def _profile(name: str) -> Any:
    import precis_i18n  # only for non-ASCII input

    return precis_i18n.get_profile(name)


def _enforce(profile: str, text: str) -> str:
    try:
        result: str = _profile(profile).enforce(text)
    except UnicodeError:
        raise PrepError(f"not a valid {profile} string") from None
    return result


_PRINTABLE: Final = re.compile("[!-~]*")
_PRINTABLE_OR_SPACE: Final = re.compile("[ -~]*")


def _printable_ascii(text: str, *, spaces: bool) -> bool:
    pattern = _PRINTABLE_OR_SPACE if spaces else _PRINTABLE
    return text.isascii() and pattern.fullmatch(text) is not None


def prepare_username(name: str) -> str:
    """RFC 8265 §3.3 UsernameCasePreserved; :class:`PrepError` if it cannot be one."""
    if name and _printable_ascii(name, spaces=False):
        return name
    return _enforce("UsernameCasePreserved", name)


def prepare_password(password: str) -> str:
    """RFC 8265 §4.2 OpaqueString; :class:`PrepError` if it cannot be one."""
    if password and _printable_ascii(password, spaces=True):
        return password
    return _enforce("OpaqueString", password)


def try_username(name: str) -> str | None:
    """:func:`prepare_username`, or None."""
    try:
        return prepare_username(name)
    except PrepError:
        return None


def try_password(password: str) -> str | None:
    """:func:`prepare_password`, or None."""
    try:
        return prepare_password(password)
    except PrepError:
        return None
