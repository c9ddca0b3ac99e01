"""Every POP3 reply, for both roles: the text table, status lines, multi-line bodies.

The server formats its replies here and the client parses them here, so the two
cannot drift. The human-readable texts live in one table, :data:`TEXTS`, keyed by
:class:`Text`; a translation (RFC 6856 LANG) is another table with the same keys.
Response codes (RFC 2449 §8, RFC 3206) and the machine-readable parts of a reply
(STAT's counts, LIST and UIDL lines) never come from the table.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CRLF",
    "MAX_STATUS_LINE",
    "RESP_CODES",
    "TEXTS",
    "ReplyLineError",
    "StatusLine",
    "Text",
    "encode_multiline",
    "encode_status",
    "parse_capabilities",
    "parse_listing",
    "parse_scan",
    "parse_stat",
    "parse_status",
    "parse_uid",
    "split_lines",
]

CRLF: Final = b"\r\n"
# RFC 2449 §4: the first line of a response is at most 512 octets with its CRLF.
MAX_STATUS_LINE: Final = 512
# The response codes this server sends (RFC 2449 §8.1, RFC 3206 §4).
RESP_CODES: Final = frozenset({"AUTH", "IN-USE", "LOGIN-DELAY", "SYS/TEMP", "SYS/PERM"})


class Text(enum.Enum):
    """The reply texts; each value is the English text (``str.format`` fields in braces)."""

    GREETING = "POP3 server ready"
    CAPA = "Capability list follows"
    LOGGING_OUT = "Logging out"
    MAILDROP = "maildrop has {count} messages ({octets} octets)"
    SCAN_LISTING = "{count} messages ({octets} octets)"
    OCTETS = "{size} octets"
    MARKED = "Marked to be deleted"
    BEGIN_TLS = "Begin TLS negotiation"
    # command errors (RFC 1939 §3)
    UNKNOWN_COMMAND = "Unknown command"
    BAD_ARGUMENTS = "Invalid arguments"
    BAD_CHARACTERS = "Invalid characters in command"
    BAD_BASE64 = "Invalid base64 data"
    LINE_TOO_LONG = "Line too long"
    WRONG_STATE = "Command not valid in this state"
    TOO_MANY_BAD = "Too many invalid commands, closing connection"
    NO_SUCH_MESSAGE = "No such message"
    ALREADY_DELETED = "Message already deleted"
    # authentication
    NO_USERNAME = "No username given"
    APOP_UNAVAILABLE = "APOP not available"
    UNSUPPORTED_MECHANISM = "Unsupported authentication mechanism"
    PLAINTEXT_REFUSED = "Plaintext authentication disallowed on non-secure (SSL/TLS) connections"
    AUTH_FAILED = "Authentication failed"
    AUTH_CANCELLED = "Authentication cancelled"
    AUTH_TEMPORARY = "Temporary authentication failure"
    LOGIN_DELAY = "Minimum time between logins not reached"
    # TLS
    STLS_UNAVAILABLE = "STLS not available"
    TLS_ACTIVE = "TLS already active"
    # the maildrop
    IN_USE = "Mailbox is locked by another session"
    MAILBOX_PERMANENT = "Mailbox cannot be opened"
    MAILBOX_TEMPORARY = "Mailbox temporarily unavailable"
    MESSAGE_TEMPORARY = "Message temporarily unavailable"
    NOT_REMOVED = "Some deleted messages not removed"
    TOO_MANY_CONNECTIONS = "Too many connections, try again later"


TEXTS: Final[Mapping[Text, str]] = {t: t.value for t in Text}
"""English, the default language."""


class ReplyLineError(ValueError):
    """A status line that breaks RFC 1939 §3 / RFC 2449 §4 (too long, no status)."""


@dataclass(frozen=True, slots=True)
class StatusLine:
    """The first line of a reply: ``+OK``/``-ERR``, an optional response code, text."""

    ok: bool
    text: str = ""
    code: str | None = None

    def encode(self) -> bytes:
        return encode_status(self.ok, self.text, self.code)


def encode_status(ok: bool, text: str = "", code: str | None = None) -> bytes:
    """``+OK text`` / ``-ERR [CODE] text`` with CRLF; at most 512 octets (RFC 2449 §4)."""
    if code is not None:
        # RFC 2449 §6.4: a response code is bracketed and starts the text.
        text = f"[{code}] {text}" if text else f"[{code}]"
    status = "+OK" if ok else "-ERR"
    line = (f"{status} {text}" if text else status).encode("utf-8") + CRLF
    if len(line) > MAX_STATUS_LINE:
        raise ReplyLineError("status line over 512 octets")
    return line


def encode_multiline(lines: Iterable[str]) -> bytes:
    """The body of a multi-line reply built from ASCII lines (CAPA, LIST, UIDL),
    dot-stuffed (RFC 1939 §3) and terminated by ``.``."""
    out = []
    for line in lines:
        out.append(f".{line}\r\n" if line.startswith(".") else f"{line}\r\n")
    out.append(".\r\n")
    return "".join(out).encode("utf-8")


def _resp_code(text: str) -> tuple[str | None, str]:
    """RFC 2449 §8: ``[resp-level *("/" resp-level)]`` at the start of the text."""
    if not text.startswith("["):
        return None, text
    end = text.find("]")
    if end < 2:
        return None, text
    code = text[1:end]
    # rchar is %x21-7F without "/" and "]"; levels are separated by "/".
    levels = code.split("/")
    if not all(level and all("\x21" <= c <= "\x7f" for c in level) for level in levels):
        return None, text
    return code, text[end + 1 :].lstrip(" ")


def parse_status(line: bytes) -> StatusLine:
    """Parse a status line without its CRLF (the caller framed it strictly).

    Raises :class:`ReplyLineError` unless it starts with ``+OK`` or ``-ERR`` (upper
    case, RFC 1939 §3) followed by the end or a space, or if it is over 510 octets.
    The text is decoded as UTF-8, with replacement: a server's text is for people.
    """
    if len(line) + 2 > MAX_STATUS_LINE:
        raise ReplyLineError("status line over 512 octets")
    if line.startswith(b"+OK"):
        ok, rest = True, line[3:]
    elif line.startswith(b"-ERR"):
        ok, rest = False, line[4:]
    else:
        raise ReplyLineError("reply does not start with +OK or -ERR")
    if rest and not rest.startswith(b" "):
        raise ReplyLineError("status indicator not followed by a space")
    text = rest[1:].decode("utf-8", "replace")
    code, text = _resp_code(text)
    return StatusLine(ok, text, code)


# --------------------------------------------------------------------------------------
# The machine-readable parts of replies, for the client role. The server writes these
# with the f-strings in ``pypop.protocol.server``; the round trip is tested.
# --------------------------------------------------------------------------------------

MAX_UID: Final = 255
"""Longest unique-id we accept. RFC 1939 §7 says 70; some servers send more, and the
length does not matter to the framing."""


def split_lines(body: bytes) -> list[bytes]:
    """The lines of an unstuffed multi-line body that must be CRLF lines (CAPA, LIST,
    UIDL, AUTH): ``ReplyLineError`` on a bare CR or LF or a missing final CRLF."""
    if not body:
        return []
    if not body.endswith(CRLF):
        raise ReplyLineError("multi-line reply does not end with CRLF")
    lines = body[:-2].split(CRLF)
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise ReplyLineError("bare CR or LF in a multi-line reply")
    return lines


def _decimal(word: bytes | str) -> int:
    if isinstance(word, str):
        word = word.encode("ascii", "replace")
    if not word or not word.isdigit() or len(word) > 20:
        raise ReplyLineError(f"expected a number, got {word[:40]!r}")
    return int(word)


def parse_stat(text: str) -> tuple[int, int]:
    """RFC 1939 §5 STAT: ``count octets`` at the start of the ``+OK`` text."""
    words = text.split(" ")
    if len(words) < 2:
        raise ReplyLineError("STAT reply without count and size")
    return _decimal(words[0]), _decimal(words[1])


def parse_scan(line: bytes | str) -> tuple[int, int]:
    """A scan listing (LIST): ``msg octets`` [ignored rest] (RFC 1939 §5)."""
    raw = line.encode("utf-8") if isinstance(line, str) else line
    words = raw.split(b" ")
    if len(words) < 2:
        raise ReplyLineError("scan listing without message number and size")
    return _decimal(words[0]), _decimal(words[1])


def parse_uid(line: bytes | str) -> tuple[int, str]:
    """A unique-id listing (UIDL): ``msg unique-id``, the id 0x21-0x7E (RFC 1939 §7)."""
    raw = line.encode("utf-8") if isinstance(line, str) else line
    words = raw.split(b" ")
    if len(words) < 2:
        raise ReplyLineError("unique-id listing without message number and id")
    uid = words[1]
    if not 1 <= len(uid) <= MAX_UID or any(c < 0x21 or c > 0x7E for c in uid):
        raise ReplyLineError("unique-id outside 0x21-0x7E or too long")
    return _decimal(words[0]), uid.decode("ascii")


def parse_listing(body: bytes, uid: bool) -> list[tuple[int, int]] | list[tuple[int, str]]:
    """A whole LIST (``uid=False``) or UIDL body."""
    lines = split_lines(body)
    if uid:
        return [parse_uid(line) for line in lines]
    return [parse_scan(line) for line in lines]


def parse_capabilities(body: bytes) -> dict[str, list[str]]:
    """RFC 2449 §5: one capability per line, ``TAG [args]``; tags upper-cased."""
    caps: dict[str, list[str]] = {}
    for line in split_lines(body):
        words = line.decode("utf-8", "replace").split()
        if words:
            caps[words[0].upper()] = words[1:]
    return caps
