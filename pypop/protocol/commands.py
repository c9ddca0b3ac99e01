"""The POP3 command grammar: one line in, one frozen command (or a parse error) out.

Commands are parsed by a grammar, never mapped onto Python call signatures, so no
argument count ever turns into a ``TypeError`` (DESIGN rule 3). Sections cited are
RFC 1939 unless said otherwise.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Final

from pypop import wire
from pypop.protocol.replies import Text

__all__ = [
    "Apop",
    "Auth",
    "Capa",
    "Command",
    "Dele",
    "Lang",
    "List",
    "Noop",
    "ParseError",
    "Pass",
    "Quit",
    "Retr",
    "Rset",
    "Stat",
    "Stls",
    "Top",
    "Uidl",
    "User",
    "Utf8",
    "decode_base64",
    "encode_command",
    "parse_command",
    "plain_fetch",
]


@dataclass(frozen=True, slots=True)
class User:
    """§7 USER name."""

    name: str


@dataclass(frozen=True, slots=True)
class Pass:
    """§7 PASS string: the rest of the line, spaces included."""

    password: str


@dataclass(frozen=True, slots=True)
class Apop:
    """§7 APOP name digest."""

    name: str
    digest: bytes


@dataclass(frozen=True, slots=True)
class Auth:
    """RFC 5034 AUTH [mechanism [initial-response]]; a bare AUTH lists mechanisms."""

    mechanism: str | None
    initial: bytes | None  # decoded; b"" for "=", None when absent


@dataclass(frozen=True, slots=True)
class Stls:
    """RFC 2595 §4 STLS."""


@dataclass(frozen=True, slots=True)
class Capa:
    """RFC 2449 §5 CAPA."""


@dataclass(frozen=True, slots=True)
class Quit:
    """§4/§6 QUIT."""


@dataclass(frozen=True, slots=True)
class Noop:
    """§5 NOOP."""


@dataclass(frozen=True, slots=True)
class Stat:
    """§5 STAT."""


@dataclass(frozen=True, slots=True)
class List:
    """§5 LIST [msg]."""

    msg: int | None


@dataclass(frozen=True, slots=True)
class Retr:
    """§5 RETR msg."""

    msg: int


@dataclass(frozen=True, slots=True)
class Dele:
    """§5 DELE msg."""

    msg: int


@dataclass(frozen=True, slots=True)
class Rset:
    """§5 RSET."""


@dataclass(frozen=True, slots=True)
class Top:
    """§7 TOP msg n."""

    msg: int
    lines: int


@dataclass(frozen=True, slots=True)
class Uidl:
    """§7 UIDL [msg]."""

    msg: int | None


@dataclass(frozen=True, slots=True)
class Utf8:
    """RFC 6856 §2.1 UTF8: switch the session to UTF-8 mode."""


@dataclass(frozen=True, slots=True)
class Lang:
    """RFC 6856 §3.1 LANG [language-range]: list the languages, or choose one."""

    language_range: str | None


Command = (
    User
    | Pass
    | Apop
    | Auth
    | Stls
    | Capa
    | Quit
    | Noop
    | Stat
    | List
    | Retr
    | Dele
    | Rset
    | Top
    | Uidl
    | Utf8
    | Lang
)


@dataclass(frozen=True, slots=True)
class ParseError:
    """A line that is not a valid command, and the reply text saying why."""

    text: Text


UNKNOWN: Final = ParseError(Text.UNKNOWN_COMMAND)
SYNTAX: Final = ParseError(Text.BAD_ARGUMENTS)
BAD_CHARS: Final = ParseError(Text.BAD_CHARACTERS)
BAD_BASE64: Final = ParseError(Text.BAD_BASE64)

# A TOP line count beyond this is the same as "the whole message" (§7); defined with
# the wire codec, whose quick path (answer_fetches) caps it too.
MAX_TOP_LINES: Final = wire.MAX_TOP_LINES

# RFC 4647 §2.1 language-range: (1*8ALPHA *("-" 1*8alphanum)) / "*". Bounded to the
# RFC 5646 §4.4.1 length a tag needs to be supported.
MAX_LANGUAGE_RANGE: Final = 35


def _language_range(arg: bytes) -> str | None:
    if arg == b"*":
        return "*"
    if len(arg) > MAX_LANGUAGE_RANGE or not arg.isascii():
        return None
    parts = arg.decode("ascii").split("-")
    first, rest = parts[0], parts[1:]
    if not (1 <= len(first) <= 8 and first.isalpha()):
        return None
    if not all(1 <= len(p) <= 8 and p.isalnum() for p in rest):
        return None
    return arg.decode("ascii")


def _number(arg: bytes) -> int | None:
    """§3 message numbers and counts: 1*DIGIT, nothing else (no sign, no spaces).

    The value counts, not the length: "0000000000000000000001" is 1. The 255-octet
    line limit bounds the digits. "0" is a number but never a message, and the
    connection answers "No such message" for out-of-range values.
    """
    if not arg or not arg.isdigit():
        return None
    return int(arg)


def decode_base64(data: bytes) -> bytes | None:
    """RFC 5034 §4: strict base64; ``None`` if malformed."""
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


_CONTROL: Final = re.compile("[\x00-\x1f\x7f]")  # (one C scan, not a loop per character)


def _text(arg: bytes) -> str | None:
    """A name or password: UTF-8 (RFC 6856), no control characters."""
    try:
        text = arg.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if _CONTROL.search(text) is not None:
        return None
    return text


def _split(rest: bytes) -> list[bytes]:
    # §3: arguments are separated by a single space; tolerate a trailing space
    # (seen from real clients) but not empty arguments in between.
    return rest.rstrip(b" ").split(b" ") if rest.strip(b" ") else []


def _no_args(cmd: Command, args: list[bytes]) -> Command | ParseError:
    return cmd if not args else SYNTAX


def _optional_msg(args: list[bytes]) -> int | ParseError | None:
    if not args:
        return None
    if len(args) != 1:
        return SYNTAX
    n = _number(args[0])
    return SYNTAX if n is None else n


def plain_fetch(line: bytes) -> tuple[int, int | None] | None:
    """``RETR n`` as (n, None) and ``TOP n m`` as (n, m) in their plain shape (one
    space, digits only; m capped as the general parser caps it); None for any other
    line, which the general parser answers (the same for these lines:
    tests/test_protocol_fuzz.py checks)."""
    head = line[:5].upper()
    if head == b"RETR ":
        arg = line[5:]
        return (int(arg), None) if arg.isdigit() else None
    if head[:4] == b"TOP ":
        msg, sep, lines = line[4:].partition(b" ")
        if sep and msg.isdigit() and lines.isdigit():
            return int(msg), min(int(lines), MAX_TOP_LINES)
    return None


def parse_command(line: bytes) -> Command | ParseError:
    """Parse one command line (without its line end)."""
    # The commands of a mail download in their plain shape first: a few C calls where
    # the general path below makes a dozen and two Python calls.
    fetch = plain_fetch(line)
    if fetch is not None:
        msg, top_lines = fetch
        return Retr(msg) if top_lines is None else Top(msg, top_lines)
    if line[:5].upper() == b"DELE " and line[5:].isdigit():
        return Dele(int(line[5:]))
    return _parse(line)


def _parse(line: bytes) -> Command | ParseError:
    # An int needle: `b"\r" in line` raises and clears a TypeError inside CPython
    # (it tries the needle as an integer first), about 2,000 instructions each.
    if 13 in line or 0 in line:
        return BAD_CHARS
    keyword_b, sep, rest = line.partition(b" ")
    if not 3 <= len(keyword_b) <= 4 or not keyword_b.isalnum() or not keyword_b.isascii():
        return UNKNOWN
    keyword = keyword_b.decode("ascii").upper()

    if keyword == "PASS":
        # §7: the password may contain spaces; the whole rest of the line is it.
        pw = _text(rest) if sep else None
        return Pass(pw) if pw else SYNTAX

    args = _split(rest)
    if b"" in args:
        return SYNTAX

    # The cases are tried in order: the commands of a mail download first.
    match keyword:
        case "RETR" | "DELE":
            m = _number(args[0]) if len(args) == 1 else None
            if m is None:
                return SYNTAX
            return Retr(m) if keyword == "RETR" else Dele(m)
        case "TOP":
            if len(args) != 2:
                return SYNTAX
            m, n = _number(args[0]), _number(args[1])
            if m is None or n is None:
                return SYNTAX
            return Top(m, min(n, MAX_TOP_LINES))
        case "USER":
            name = _text(args[0]) if len(args) == 1 else None
            return User(name) if name else SYNTAX
        case "APOP":
            if len(args) != 2:
                return SYNTAX
            name = _text(args[0])
            if not name or len(args[1]) != 32:
                return SYNTAX
            return Apop(name, args[1])
        case "AUTH":
            if not args:
                return Auth(None, None)
            if len(args) > 2:
                return SYNTAX
            mech = args[0].decode("ascii", "replace").upper()
            if not all(c.isalnum() or c in "-_" for c in mech) or len(mech) > 20:
                return SYNTAX
            if len(args) == 1:
                return Auth(mech, None)
            if args[1] == b"=":
                return Auth(mech, b"")
            initial = decode_base64(args[1])
            return Auth(mech, initial) if initial is not None else BAD_BASE64
        case "STLS":
            return _no_args(Stls(), args)
        case "CAPA":
            return _no_args(Capa(), args)
        case "QUIT":
            return _no_args(Quit(), args)
        case "NOOP":
            return _no_args(Noop(), args)
        case "STAT":
            return _no_args(Stat(), args)
        case "RSET":
            return _no_args(Rset(), args)
        case "LIST" | "UIDL":
            which = _optional_msg(args)
            if isinstance(which, ParseError):
                return which
            return List(which) if keyword == "LIST" else Uidl(which)
        case "UTF8":
            return _no_args(Utf8(), args)
        case "LANG":
            if not args:
                return Lang(None)
            tag = _language_range(args[0]) if len(args) == 1 else None
            return Lang(tag) if tag is not None else SYNTAX
        case _:
            return UNKNOWN


def encode_command(cmd: Command) -> bytes:
    """The command line a client sends, with CRLF (the inverse of :func:`parse_command`).

    Raises ``ValueError`` for what the grammar would refuse: CR, LF or NUL in an
    argument, or a line over 255 octets (RFC 2449 §4).
    """
    line: str
    match cmd:
        case User(name=name):
            line = f"USER {name}"
        case Pass(password=password):
            line = f"PASS {password}"
        case Apop(name=name, digest=digest):
            line = f"APOP {name} {digest.decode('ascii')}"
        case Auth(mechanism=None):
            line = "AUTH"
        case Auth(mechanism=str(mech), initial=None):
            line = f"AUTH {mech}"
        case Auth(mechanism=str(mech), initial=bytes(initial)):
            b64 = base64.b64encode(initial).decode("ascii") if initial else "="
            line = f"AUTH {mech} {b64}"
        case List(msg=int(msg)) | Uidl(msg=int(msg)):
            line = f"{type(cmd).__name__.upper()} {msg}"
        case Retr(msg=msg) | Dele(msg=msg):
            line = f"{type(cmd).__name__.upper()} {msg}"
        case Top(msg=msg, lines=lines):
            line = f"TOP {msg} {lines}"
        case Lang(language_range=str(language_range)):
            line = f"LANG {language_range}"
        case _:
            line = type(cmd).__name__.upper()
    encoded = line.encode("utf-8")
    if any(c in b"\r\n\0" for c in encoded):
        raise ValueError("CR, LF and NUL cannot be sent in a command")
    if len(encoded) + 2 > 255:
        raise ValueError("command line over 255 octets (RFC 2449 §4)")
    return encoded + b"\r\n"
