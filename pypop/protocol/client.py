"""The sans-I/O POP3 client connection: commands out, replies in (h11 style).

:meth:`ClientConnection.send` queues a command; :meth:`data_to_send` hands out the
octets that may go on the wire now; :meth:`receive_data` takes what the server sent
(``b""`` at end of input); :meth:`next_event` returns the next complete reply as an
event, or :data:`NEED_DATA`.

- Without PIPELINING one command is on the wire at a time; with it (set
  :attr:`pipelining` after CAPA) up to ``window`` commands are, so a writer never
  blocks on a full socket while the server blocks writing replies to us (RFC 2449 §6.6).
  AUTH and STLS are barriers: nothing is sent behind them.
- Reading is strict (DESIGN rule 4): a status line is at most 512 octets with its CRLF
  (RFC 2449 §4) and ends with CRLF, never a bare CR or LF; a multi-line body goes
  through the strict :class:`pypop.wire.Unstuffer` and must end with the ``.`` line.
  Anything else is a :class:`pypop.errors.ProtocolError`, after which the connection
  is dead.
- SASL (RFC 5034): a ``+ base64`` line answering AUTH is a :class:`Challenge`; answer
  with :meth:`send_sasl`. More than :data:`MAX_CHALLENGES` in one AUTH is a
  ProtocolError.
- STLS (RFC 2595): octets that follow the ``+OK`` before the handshake are an attack
  (response injection) and a ProtocolError; call :meth:`tls_started` after it.

Nothing here imports trio, anyio, socket or ssl.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from dataclasses import dataclass, field
from typing import NoReturn

from pypop.errors import ProtocolError
from pypop.protocol.commands import (
    Auth,
    Capa,
    Command,
    Lang,
    List,
    Quit,
    Retr,
    Stls,
    Top,
    Uidl,
    decode_base64,
    encode_command,
)
from pypop.protocol.events import NEED_DATA, ConnectionClosed, NeedData
from pypop.protocol.replies import CRLF, MAX_STATUS_LINE, ReplyLineError, StatusLine, parse_status
from pypop.wire import Unstuffer

__all__ = [
    "DEFAULT_MAX_BODY",
    "Challenge",
    "ClientConnection",
    "ClientEvent",
    "Greeting",
    "Reply",
    "is_multiline",
]

DEFAULT_MAX_BODY = 256 * 1024 * 1024
"""Largest multi-line body taken in one reply (a message); a bigger one is refused."""

MAX_CHALLENGE = 16384
"""Longest ``+ base64`` SASL challenge line (RFC 5034 does not bound it by 512)."""

MAX_CHALLENGES = 16
"""Most challenges in one AUTH exchange (GSSAPI, the longest we speak, needs a few):
each is answered within the timeout, so nothing else stops a server that never ends."""

_MIN_STEP = 4096
_MAX_STEP = 256 * 1024

_TIMESTAMP = re.compile(rb"<[^<>\s]*@[^<>\s]*>")


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's first line; ``timestamp`` is the APOP msg-id (RFC 1939 §7)."""

    status: StatusLine
    timestamp: bytes | None


@dataclass(frozen=True, slots=True)
class Reply:
    """The reply to ``command``: its status line, and the unstuffed body for a
    multi-line ``+OK`` (RETR, TOP, CAPA, LIST, UIDL, bare AUTH)."""

    command: Command
    status: StatusLine
    body: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Challenge:
    """A SASL continuation (``+ base64``), decoded."""

    data: bytes = field(repr=False)


ClientEvent = NeedData | Greeting | Reply | Challenge | ConnectionClosed


def is_multiline(command: Command) -> bool:
    """Whether ``+OK`` to this command starts a multi-line body (RFC 1939, 2449, 5034)."""
    match command:
        case Retr() | Top() | Capa():
            return True
        case List(msg=None) | Uidl(msg=None) | Auth(mechanism=None) | Lang(language_range=None):
            return True
    return False


class _Greeting:
    """Placeholder for the reply nobody asked for: the greeting."""


_GREETING = _Greeting()


class ClientConnection:
    """One POP3 client session's protocol state."""

    def __init__(
        self,
        *,
        pipelining: bool = False,
        window: int = 64,
        max_body: int = DEFAULT_MAX_BODY,
        expect_greeting: bool = True,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.pipelining = pipelining
        self.window = window
        self.max_body = max_body
        # Unread input is self._buf[self._pos:]; an offset instead of slicing keeps a
        # chunk holding many pipelined replies from being copied once per reply.
        self._buf = b""
        self._pos = 0
        self._step = _MIN_STEP
        self._eof = False
        self._out: list[bytes] = []
        self._queue: deque[Command] = deque()
        self._in_flight: deque[Command | _Greeting] = deque()
        if expect_greeting:
            self._in_flight.append(_GREETING)
        self._body: Unstuffer | None = None
        self._body_parts: list[bytes] = []
        self._body_len = 0
        self._body_status: StatusLine | None = None
        self._challenge_open = False
        self._challenges = 0
        self._stls_ok = False
        self._error: ProtocolError | None = None
        self._quit_sent = False

    # -- commands out --

    def send(self, command: Command) -> None:
        """Queue a command; it goes out when the pipelining rules allow."""
        if self._quit_sent:
            raise ProtocolError("no command can follow QUIT")
        encode_command(command)  # ValueError now, not when it would be sent
        self._queue.append(command)
        if isinstance(command, Quit):
            self._quit_sent = True
        self._release()

    def send_sasl(self, data: bytes | None) -> None:
        """Answer the open SASL challenge: base64 of ``data`` (an empty line for
        ``b""``), or ``*`` to cancel (``None``)."""
        if not self._challenge_open:
            raise ProtocolError("no SASL challenge to answer")
        self._challenge_open = False
        self._out.append(b"*\r\n" if data is None else base64.b64encode(data) + CRLF)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def in_flight(self) -> int:
        """Commands sent and not yet answered (the greeting counts as one)."""
        return len(self._in_flight)

    @property
    def queued(self) -> int:
        """Commands waiting to be sent."""
        return len(self._queue)

    def _release(self) -> None:
        while self._queue:
            head = self._in_flight[-1] if self._in_flight else None
            if isinstance(head, Auth | Stls | _Greeting):
                return  # barriers: wait for their reply
            if self._in_flight and not self.pipelining:
                return
            nxt = self._queue[0]
            if isinstance(nxt, Auth | Stls) and self._in_flight:
                return  # a barrier goes out alone
            if len(self._in_flight) >= self.window:
                return
            self._queue.popleft()
            self._in_flight.append(nxt)
            self._out.append(encode_command(nxt))

    # -- replies in --

    def receive_data(self, data: bytes) -> None:
        """Feed octets from the server; ``b""`` means it closed the connection."""
        if not data:
            self._eof = True
            return
        if self._stls_ok:
            self._fail("data after the STLS +OK, before the TLS handshake (injection)")
        if self._pos < len(self._buf):
            self._buf = self._buf[self._pos :] + data
        else:
            self._buf = data
        self._pos = 0

    def tls_started(self) -> None:
        """The TLS handshake after STLS is done: read the server through it now."""
        if not self._stls_ok:
            raise ProtocolError("tls_started without an accepted STLS")
        self._stls_ok = False

    def _fail(self, message: str) -> NoReturn:
        self._error = ProtocolError(message)
        raise self._error

    def next_event(self) -> ClientEvent:
        if self._error is not None:
            raise self._error
        try:
            event = self._next()
        except ReplyLineError as exc:
            self._fail(str(exc))
        if isinstance(event, Greeting | Reply):
            self._release()
        return event

    def _next(self) -> ClientEvent:
        if self._body is not None:
            return self._read_body()
        if not self._in_flight:
            if self._pending():
                self._fail("data from the server that answers no command")
            return ConnectionClosed() if self._eof else NEED_DATA
        head = self._in_flight[0]
        is_auth = isinstance(head, Auth) and head.mechanism is not None
        line = self._line(MAX_CHALLENGE if is_auth else MAX_STATUS_LINE)
        if line is None:
            if self._eof:
                if self._pending():
                    self._fail("connection closed in the middle of a reply line")
                return ConnectionClosed()
            return NEED_DATA
        if is_auth and (line == b"+" or line.startswith(b"+ ")):
            if self._challenge_open:
                self._fail("a second SASL challenge before the client answered")
            self._challenges += 1
            if self._challenges > MAX_CHALLENGES:
                self._fail(f"more than {MAX_CHALLENGES} SASL challenges")
            data = decode_base64(line[2:]) if len(line) > 2 else b""
            if data is None:
                self._fail("SASL challenge is not valid base64")
            self._challenge_open = True
            return Challenge(data)
        if len(line) + 2 > MAX_STATUS_LINE:
            self._fail("status line over 512 octets")
        status = parse_status(line)
        self._in_flight.popleft()
        self._challenge_open = False
        self._challenges = 0
        if isinstance(head, _Greeting):
            match = _TIMESTAMP.search(line)
            return Greeting(status, match.group(0) if match else None)
        if isinstance(head, Stls) and status.ok:
            if self._pending():
                self._fail("data after the STLS +OK, before the TLS handshake (injection)")
            self._stls_ok = True
        if status.ok and is_multiline(head):
            self._body = Unstuffer()
            self._body_parts = []
            self._body_len = 0
            self._body_status = status
            self._step = _MIN_STEP
            self._in_flight.appendleft(head)  # still answering until the "." line
            return self._read_body()
        return Reply(head, status)

    def _pending(self) -> int:
        return len(self._buf) - self._pos

    def _line(self, limit: int) -> bytes | None:
        """The next CRLF line (without it), strictly framed."""
        buf, pos = self._buf, self._pos
        end = buf.find(b"\n", pos, pos + limit)
        if end < 0:
            rest = len(buf) - pos
            if rest >= limit:
                self._fail(f"reply line over {limit} octets")
            cr = buf.find(b"\r", pos)
            if 0 <= cr < len(buf) - 1 or (self._eof and rest and buf.endswith(b"\r")):
                self._fail("bare CR in a reply line")
            return None
        if end == pos or buf[end - 1] != 0x0D:
            self._fail("bare LF in a reply line (CRLF required)")
        line = buf[pos : end - 1]
        if 13 in line:  # CR; an int needle is a plain memchr (see parse_command)
            self._fail("bare CR in a reply line")
        self._pos = end + 1
        return line

    def _read_body(self) -> ClientEvent:
        body = self._body
        assert body is not None
        while self._pos < len(self._buf):
            # Feed in growing steps: a small message costs a small copy of what
            # follows it, a big one few calls.
            piece = self._buf[self._pos : self._pos + self._step]
            self._pos += len(piece)
            self._step = min(self._step * 2, _MAX_STEP)
            payload, rest = body.feed(piece)
            if payload:
                self._body_len += len(payload)
                if self._body_len > self.max_body:
                    self._fail(f"multi-line reply over {self.max_body} octets")
                self._body_parts.append(payload)
            if rest is not None:
                self._pos -= len(rest)
                status = self._body_status
                assert status is not None
                head = self._in_flight.popleft()
                assert not isinstance(head, _Greeting)
                parts = self._body_parts
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                self._body, self._body_parts, self._body_status = None, [], None
                return Reply(head, status, data)
        if self._eof:
            self._fail("multi-line reply ended without the '.' line")
        return NEED_DATA
