"""The POP3 command grammar: one line in, one frozen command (or a parse error) out.

Commands are parsed by a grammar, never mapped onto Python call signatures, so no
argument count ever turns into a ``TypeError`` (DESIGN rule 3). Sections cited are
RFC 1939 unless said otherwise.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Final

__all__ = [
    "Apop",
    "Auth",
    "Capa",
    "Command",
    "Dele",
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
    "decode_base64",
    "parse_command",
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
)


@dataclass(frozen=True, slots=True)
class ParseError:
    """A line that is not a valid command. ``known`` is the keyword when it was one."""

    text: str
    known: str | None = None


UNKNOWN: Final = "Unknown command"
SYNTAX: Final = "Invalid arguments"
BAD_CHARS: Final = "Invalid characters in command"
BAD_BASE64: Final = "Invalid base64 data"

# A TOP line count beyond this is the same as "the whole message".
MAX_TOP_LINES: Final = 1 << 32


def _number(arg: bytes) -> int | None:
    """§3 message numbers and counts: 1*DIGIT, nothing else (no sign, no spaces)."""
    if not arg or len(arg) > 20 or not arg.isdigit():
        return None
    return int(arg)


def _msg(arg: bytes) -> int | None:
    # "0" is a number but never a message; the connection answers "No such message"
    # for every other out-of-range value.
    return _number(arg)


def decode_base64(data: bytes) -> bytes | None:
    """RFC 5034 §4: strict base64; ``None`` if malformed."""
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def _text(arg: bytes) -> str | None:
    """A name or password: UTF-8 (RFC 6856), no control characters."""
    try:
        text = arg.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(c < " " or c == "\x7f" for c in text):
        return None
    return text


def _split(rest: bytes) -> list[bytes]:
    # §3: arguments are separated by a single space; tolerate a trailing space
    # (seen from real clients) but not empty arguments in between.
    return rest.rstrip(b" ").split(b" ") if rest.strip(b" ") else []


def _no_args(cmd: Command, args: list[bytes], keyword: str) -> Command | ParseError:
    return cmd if not args else ParseError(SYNTAX, keyword)


def _optional_msg(keyword: str, args: list[bytes]) -> int | ParseError | None:
    if not args:
        return None
    if len(args) != 1:
        return ParseError(SYNTAX, keyword)
    n = _msg(args[0])
    return ParseError(SYNTAX, keyword) if n is None else n


def parse_command(line: bytes) -> Command | ParseError:
    """Parse one command line (without its line end)."""
    if b"\r" in line or b"\0" in line:
        return ParseError(BAD_CHARS)
    keyword_b, sep, rest = line.partition(b" ")
    if not 3 <= len(keyword_b) <= 4 or not keyword_b.isalnum() or not keyword_b.isascii():
        return ParseError(UNKNOWN)
    keyword = keyword_b.decode("ascii").upper()

    if keyword == "PASS":
        # §7: the password may contain spaces; the whole rest of the line is it.
        pw = _text(rest) if sep else None
        return Pass(pw) if pw else ParseError(SYNTAX, keyword)

    args = _split(rest)
    if b"" in args:
        return ParseError(SYNTAX, keyword)

    match keyword:
        case "USER":
            name = _text(args[0]) if len(args) == 1 else None
            return User(name) if name else ParseError(SYNTAX, keyword)
        case "APOP":
            if len(args) != 2:
                return ParseError(SYNTAX, keyword)
            name = _text(args[0])
            if not name or len(args[1]) != 32:
                return ParseError(SYNTAX, keyword)
            return Apop(name, args[1])
        case "AUTH":
            if not args:
                return Auth(None, None)
            if len(args) > 2:
                return ParseError(SYNTAX, keyword)
            mech = args[0].decode("ascii", "replace").upper()
            if not all(c.isalnum() or c in "-_" for c in mech) or len(mech) > 20:
                return ParseError(SYNTAX, keyword)
            if len(args) == 1:
                return Auth(mech, None)
            if args[1] == b"=":
                return Auth(mech, b"")
            initial = decode_base64(args[1])
            return Auth(mech, initial) if initial is not None else ParseError(BAD_BASE64, keyword)
        case "STLS":
            return _no_args(Stls(), args, keyword)
        case "CAPA":
            return _no_args(Capa(), args, keyword)
        case "QUIT":
            return _no_args(Quit(), args, keyword)
        case "NOOP":
            return _no_args(Noop(), args, keyword)
        case "STAT":
            return _no_args(Stat(), args, keyword)
        case "RSET":
            return _no_args(Rset(), args, keyword)
        case "LIST" | "UIDL":
            n = _optional_msg(keyword, args)
            if isinstance(n, ParseError):
                return n
            return List(n) if keyword == "LIST" else Uidl(n)
        case "RETR" | "DELE":
            m = _msg(args[0]) if len(args) == 1 else None
            if m is None:
                return ParseError(SYNTAX, keyword)
            return Retr(m) if keyword == "RETR" else Dele(m)
        case "TOP":
            if len(args) != 2:
                return ParseError(SYNTAX, keyword)
            m, n = _msg(args[0]), _number(args[1])
            if m is None or n is None:
                return ParseError(SYNTAX, keyword)
            return Top(m, min(n, MAX_TOP_LINES))
        case _:
            return ParseError(UNKNOWN)
