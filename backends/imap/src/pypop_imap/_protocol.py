"""IMAP client protocol, sans-I/O: encode commands, parse server responses strictly.

Only the client side of the IMAP4rev1 subset the backend uses (RFC 3501, RFC 9051),
but every response the server may send is framed correctly, so that an unexpected one
never desynchronises the stream:

- A response line ends at CRLF and nowhere else: a bare CR or LF, or a NUL, in a line
  is a :class:`ImapProtocolError` (DESIGN rule 4: content we pass on is read strictly;
  lenient line ends caused request smuggling elsewhere).
- A literal ``{n}`` is taken only where the grammar allows a string (inside response
  data, never in response text), is exactly ``n`` octets, and is bounded.
- Literals inside FETCH responses larger than ``inline_literal`` are handed out in
  chunks as they arrive (:class:`LiteralStart`, :class:`LiteralChunk`), so a large
  message is streamed, never held whole.

:class:`ResponseParser` takes bytes with ``feed`` and hands out events with
``next_event`` (``NEED_DATA`` when it needs more), as :mod:`pypop.protocol` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "NEED_DATA",
    "Atom",
    "Continuation",
    "Data",
    "Event",
    "Fetch",
    "ImapProtocolError",
    "LiteralChunk",
    "LiteralStart",
    "ResponseParser",
    "Status",
    "Streamed",
    "Value",
    "encode_astring",
    "quote",
]


class ImapProtocolError(Exception):
    """The server sent something that is not IMAP; the connection cannot go on."""


class Atom(bytes):
    """An atom (``OK``, ``\\Seen``, ``BODY[]``), as opposed to a string value."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Streamed:
    """Stands for a literal that was handed out in chunks."""

    size: int


Value = int | bytes | None | list["Value"] | Streamed
"""A parsed value: number, atom (:class:`Atom`) or string (bytes), NIL, list."""


@dataclass(frozen=True, slots=True)
class Status:
    """A status response: tagged, or untagged OK/NO/BAD/BYE/PREAUTH (RFC 3501 §7.1)."""

    tag: bytes | None
    condition: bytes
    code: bytes | None = None
    code_args: bytes = b""
    text: bytes = b""


@dataclass(frozen=True, slots=True)
class Data:
    """Other untagged data: ``* CAPABILITY ..``, ``* 3 EXISTS``, ``* FLAGS (..)``."""

    name: bytes
    number: int | None = None
    values: list[Value] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Fetch:
    """``* seq FETCH (name value ...)``; names upper-cased (``UID``, ``BODY[]``)."""

    seq: int
    items: dict[bytes, Value]


@dataclass(frozen=True, slots=True)
class Continuation:
    """``+ text``: the server waits for more of the command."""

    text: bytes


@dataclass(frozen=True, slots=True)
class LiteralStart:
    """A large literal of a FETCH response begins; :class:`LiteralChunk` events follow,
    ``size`` octets in all, then the rest of the response as a :class:`Fetch`."""

    seq: int
    item: bytes
    size: int
    before: dict[bytes, Value]
    """The items that came before it in the same response (usually UID)."""


@dataclass(frozen=True, slots=True)
class LiteralChunk:
    data: bytes


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

Event = Status | Data | Fetch | Continuation | LiteralStart | LiteralChunk | _NeedData

_STATUS: Final = frozenset({b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"})
_TAGGED_STATUS: Final = frozenset({b"OK", b"NO", b"BAD"})
# Atom characters as far as response data goes: printable ASCII except the specials
# that delimit tokens. "]" ends a section, "[" opens one (handled in _atom).
_ATOM_END: Final = frozenset(b' ()"{[]')
_DIGITS: Final = frozenset(b"0123456789")
_LITERAL_AT_END: Final = re.compile(rb"(?:^|[ (])~?\{([0-9]{1,10})\}$")
# The two responses that carry almost all the traffic, parsed without the tokenizer.
_FAST_SIZE: Final = re.compile(
    rb"\* ([0-9]{1,10}) FETCH \(UID ([0-9]{1,10}) RFC822\.SIZE ([0-9]{1,20})\)"
)
_FAST_BODY: Final = re.compile(
    rb"\* ([0-9]{1,10}) FETCH \(UID ([0-9]{1,10}) "
    rb"(BODY\[[A-Z.]*\](?:<[0-9]{1,20}>)?) \{([0-9]{1,10})\}"
)


class ResponseParser:
    """Strict, incremental parser of an IMAP server's byte stream.

    ``max_line`` bounds one line (a literal splits a response into lines);
    ``inline_literal`` is the largest literal held in memory (larger ones in FETCH
    responses are streamed, elsewhere they are an error); ``max_literal`` bounds a
    streamed one; ``max_response`` bounds what one response holds in memory, its
    lines and inline literals together (default: four of each at their bound).
    """

    def __init__(
        self,
        *,
        max_line: int = 65536,
        inline_literal: int = 256 * 1024,
        max_literal: int = 1 << 40,
        max_response: int | None = None,
    ) -> None:
        self.max_line = max_line
        self.inline_literal = inline_literal
        self.max_literal = max_literal
        self.max_response = (
            max_response if max_response is not None else 4 * (inline_literal + max_line)
        )
        self._held = 0  # octets the response in progress holds
        self._buf = bytearray()
        self._pos = 0
        self._broken: ImapProtocolError | None = None
        # A response in progress (split by literals)
        self._stack: list[list[Value]] | None = None
        self._kind: tuple[bytes, int | None] | None = None  # (name, number) of data
        self._literal_left = -1  # octets still to come of the current literal
        self._literal_stream = False
        self._literal_parts: list[bytes] = []
        self._literal_size = 0
        self._started: LiteralStart | None = None
        # Streaming a large literal, data that arrives while nothing else is buffered
        # is handed out as it is (no copy into the buffer and out again).
        self._direct: bytes | None = None

    # -- input --

    def feed(self, data: bytes | bytearray) -> None:
        if not data:
            return
        if self._direct is not None:
            self._buf += self._direct
            self._direct = None
        if (
            self._literal_stream
            and self._started is None
            and self._pos == len(self._buf)
            and isinstance(data, bytes)
        ):
            self._direct = data
            return
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos + (len(self._direct) if self._direct else 0)

    def next_event(self) -> Event:
        if self._broken is not None:
            raise self._broken
        try:
            return self._next()
        except ImapProtocolError as exc:
            self._broken = exc
            raise

    # -- framing --

    def _line(self) -> bytes | None:
        buf, pos = self._buf, self._pos
        end = buf.find(b"\n", pos)
        if end < 0:
            if len(buf) - pos > self.max_line:
                raise ImapProtocolError("response line too long")
            return None
        if end == pos or buf[end - 1] != 0x0D:
            raise ImapProtocolError("line ended by a bare LF")
        if end - pos > self.max_line:
            raise ImapProtocolError("response line too long")
        line = bytes(buf[pos : end - 1])
        if b"\r" in line or b"\0" in line:
            raise ImapProtocolError("bare CR or NUL in a response line")
        self._pos = end + 1
        return line

    def _next(self) -> Event:
        if self._literal_left >= 0:
            event = self._literal()
            if event is not None:
                return event
        while True:
            line = self._line()
            if line is None:
                return NEED_DATA
            self._hold(len(line), first=self._stack is None)
            event = self._first_line(line) if self._stack is None else self._continue(line, 0)
            if event is not None:
                return event
            if self._literal_left >= 0:
                event = self._literal()
                if event is not None:
                    return event

    def _hold(self, octets: int, *, first: bool = False) -> None:
        # Each literal is bounded, but a response may chain any number of them.
        self._held = octets if first else self._held + octets
        if self._held > self.max_response:
            raise ImapProtocolError("response too large")

    def _literal(self) -> Event | None:
        """Consume literal octets; an event, or None when the literal is complete and
        the line after it may be read."""
        available = len(self._buf) - self._pos
        take = min(available, self._literal_left)
        if self._literal_stream:
            if self._started is not None:
                started, self._started = self._started, None
                return started
            direct = self._direct
            if direct is not None:
                self._direct = None
                if len(direct) <= self._literal_left:
                    self._literal_left -= len(direct)
                    return LiteralChunk(direct)
                # The literal ends inside: the rest is the next line.
                chunk, rest = direct[: self._literal_left], direct[self._literal_left :]
                self._literal_left = 0
                del self._buf[: self._pos]
                self._pos = 0
                self._buf += rest
                return LiteralChunk(chunk)
            if take == 0 and self._literal_left > 0:
                return NEED_DATA
            if take:
                chunk = bytes(self._buf[self._pos : self._pos + take])
                self._pos += take
                self._literal_left -= take
                return LiteralChunk(chunk)
        elif take:
            self._literal_parts.append(bytes(self._buf[self._pos : self._pos + take]))
            self._pos += take
            self._literal_left -= take
        if self._literal_left > 0:
            return NEED_DATA
        # Complete: its value joins the response; the response goes on on the next line.
        assert self._stack is not None
        if self._literal_stream:
            self._stack[-1].append(Streamed(self._literal_size))
        else:
            self._stack[-1].append(b"".join(self._literal_parts))
        self._literal_parts = []
        self._literal_left = -1
        self._literal_stream = False
        return None

    # -- responses --

    def _first_line(self, line: bytes) -> Event | None:
        if line.startswith(b"* "):
            return self._untagged(line)
        if line == b"+" or line.startswith(b"+ "):
            return Continuation(line[2:])
        tag, sep, rest = line.partition(b" ")
        if not sep or not tag or any(c in _ATOM_END or c < 0x21 or c > 0x7E for c in tag):
            raise ImapProtocolError("malformed tagged response")
        if tag == b"+" or tag == b"*":
            raise ImapProtocolError("malformed response")
        cond, _, text = rest.partition(b" ")
        cond = cond.upper()
        if cond not in _TAGGED_STATUS:
            raise ImapProtocolError("tagged response without OK, NO or BAD")
        return _status(tag, cond, text)

    def _untagged(self, line: bytes) -> Event | None:
        fast = _FAST_SIZE.fullmatch(line)
        if fast is not None:
            seq, uid, size = fast.groups()
            return Fetch(int(seq), {b"UID": int(uid), b"RFC822.SIZE": int(size)})
        fast = _FAST_BODY.fullmatch(line)
        if fast is not None:
            seq, uid, item, size = fast.groups()
            self._kind = (b"FETCH", int(seq))
            inner: list[Value] = [Atom(b"UID"), int(uid), Atom(item)]
            self._stack = [[inner], inner]
            return self._start_literal(int(size))
        word, _, rest = line[2:].partition(b" ")
        upper = word.upper()
        if upper in _STATUS:
            return _status(None, upper, rest)
        number: int | None = None
        if word and all(c in _DIGITS for c in word):
            number = int(word)
            word, _, rest = rest.partition(b" ")
            upper = word.upper()
        if not word or any(c in _ATOM_END or c < 0x21 or c > 0x7E for c in word):
            raise ImapProtocolError("malformed untagged response")
        self._kind = (upper, number)
        self._stack = [[]]
        return self._continue(rest, 0)

    def _continue(self, line: bytes, pos: int) -> Event | None:
        """Tokenize ``line[pos:]`` into the open response; finish it if it is complete."""
        assert self._stack is not None
        literal = _LITERAL_AT_END.search(line, pos)
        end = literal.start(1) - 1 if literal is not None else len(line)
        if literal is not None and line[end - 1 : end] == b"~":
            end -= 1  # literal8 (RFC 3516)
        self._tokens(line, pos, end)
        if literal is not None:
            return self._start_literal(int(literal.group(1)))
        if len(self._stack) != 1:
            raise ImapProtocolError("unbalanced parentheses in a response")
        values = self._stack[0]
        name, number = self._kind or (b"", None)
        self._stack = None
        self._kind = None
        if name == b"FETCH" and number is not None:
            return Fetch(number, _fetch_items(values))
        return Data(name, number, values)

    def _start_literal(self, size: int) -> Event | None:
        assert self._stack is not None
        assert self._kind is not None
        if size > self.max_literal:
            raise ImapProtocolError("literal too large")
        self._literal_left = size
        self._literal_size = size
        self._literal_parts = []
        in_fetch = self._kind[0] == b"FETCH" and self._kind[1] is not None and len(self._stack) == 2
        if size > self.inline_literal:
            if not in_fetch:
                raise ImapProtocolError("literal too large")
            self._literal_stream = True
            items = self._stack[1]
            if len(items) % 2 != 1 or not isinstance(items[-1], Atom):
                raise ImapProtocolError("literal without a FETCH item name")
            number = self._kind[1]
            assert number is not None
            self._started = LiteralStart(number, items[-1].upper(), size, _pairs(items[:-1]))
        else:
            self._hold(size)
        return None

    def _tokens(self, line: bytes, pos: int, end: int) -> None:
        stack = self._stack
        assert stack is not None
        while pos < end:
            c = line[pos]
            if c == 0x20:  # SP
                pos += 1
                continue
            if c == 0x28:  # (
                new: list[Value] = []
                stack[-1].append(new)
                stack.append(new)
                pos += 1
            elif c == 0x29:  # )
                if len(stack) < 2:
                    raise ImapProtocolError("unbalanced parentheses in a response")
                stack.pop()
                pos += 1
            elif c == 0x22:  # "
                value, pos = _quoted(line, pos)
                stack[-1].append(value)
            elif c == 0x7B:  # { not at the end of the line
                raise ImapProtocolError("misplaced literal")
            else:
                token, pos = _atom(line, pos, end)
                stack[-1].append(token)


def _quoted(line: bytes, pos: int) -> tuple[bytes, int]:
    """A quoted string at ``line[pos] == '"'``: only \\\\ and \\" may be escaped."""
    out = bytearray()
    i = pos + 1
    while True:
        j = line.find(b'"', i)
        k = line.find(b"\\", i)
        if j < 0:
            raise ImapProtocolError("unterminated quoted string")
        if 0 <= k < j:
            out += line[i:k]
            escaped = line[k + 1 : k + 2]
            if escaped not in (b"\\", b'"'):
                raise ImapProtocolError("bad escape in a quoted string")
            out += escaped
            i = k + 2
            continue
        out += line[i:j]
        return bytes(out), j + 1


def _atom(line: bytes, pos: int, end: int) -> tuple[Value, int]:
    """An atom, a number or NIL; ``BODY[HEADER.FIELDS (A B)]<0>`` is one atom."""
    i = pos
    while i < end and line[i] not in _ATOM_END:
        c = line[i]
        if c < 0x21 or c > 0x7E:
            raise ImapProtocolError("control or 8-bit octet in an atom")
        i += 1
    if i < end and line[i] == 0x5B:  # [ section ]
        close = line.find(b"]", i, end)
        if close < 0:
            raise ImapProtocolError("unterminated section")
        i = close + 1
        if i < end and line[i] == 0x3C:  # <origin>
            gt = line.find(b">", i, end)
            if gt < 0 or not line[i + 1 : gt].isdigit():
                raise ImapProtocolError("bad partial origin")
            i = gt + 1
    if i == pos:
        raise ImapProtocolError("unexpected character in a response")
    if i < end and line[i] not in b" ()":
        raise ImapProtocolError("unexpected character after an atom")
    token = line[pos:i]
    if token.isdigit():
        if len(token) > 20:
            raise ImapProtocolError("number too large")
        return int(token), i
    if token.upper() == b"NIL":
        return None, i
    return Atom(token), i


def _status(tag: bytes | None, cond: bytes, text: bytes) -> Status:
    """``[CODE args] text`` after the condition (RFC 3501 resp-text)."""
    if text.startswith(b"["):
        close = text.find(b"]")
        if close < 0:
            raise ImapProtocolError("unterminated response code")
        inner = text[1:close]
        code, _, args = inner.partition(b" ")
        if not code:
            raise ImapProtocolError("empty response code")
        return Status(tag, cond, code.upper(), args, text[close + 1 :].lstrip(b" "))
    return Status(tag, cond, None, b"", text)


def _fetch_items(values: list[Value]) -> dict[bytes, Value]:
    """The msg-att list of a FETCH response as a dict of upper-cased names."""
    if len(values) != 1 or not isinstance(values[0], list):
        raise ImapProtocolError("malformed FETCH response")
    return _pairs(values[0])


def _pairs(items: list[Value]) -> dict[bytes, Value]:
    if len(items) % 2:
        raise ImapProtocolError("malformed FETCH response")
    out: dict[bytes, Value] = {}
    for i in range(0, len(items), 2):
        name = items[i]
        if not isinstance(name, Atom):
            raise ImapProtocolError("malformed FETCH item name")
        out[bytes(name.upper())] = items[i + 1]
    return out


# ----------------------------------------------------------------------- commands

_QUOTABLE: Final = re.compile(rb"[\x01-\x09\x0b\x0c\x0e-\x7f]*")
_ATOM_SAFE: Final = re.compile(rb"[A-Za-z0-9!#$&'+,\-./:;<=>?@^_`|~]+")


def quote(value: bytes) -> bytes | None:
    """``value`` as a quoted string, or None if it needs a literal (CR, LF, NUL, 8-bit)."""
    if not _QUOTABLE.fullmatch(value):
        return None
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def encode_astring(value: bytes) -> bytes | None:
    """An atom if safe, else a quoted string, else None (the caller sends a literal)."""
    if _ATOM_SAFE.fullmatch(value) and value.upper() != b"NIL":
        return value
    return quote(value)
