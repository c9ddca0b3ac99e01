"""The sans-I/O POP3 server connection (h11 style).

Bytes go in with :meth:`ServerConnection.receive_data`; :meth:`next_event` answers every
command it can answer alone (STAT, LIST, UIDL, DELE, RSET, NOOP, CAPA, errors) straight
into the output buffer, and stops at the first one that needs the outside world (a
login, a message body, STLS, UPDATE), which it returns as an event. The caller does the
I/O, completes the event with one of the completion methods, and asks again. Replies
therefore leave in command order whatever the pipelining (RFC 2449 §6.6).
:meth:`data_to_send` drains the output.

Nothing here imports trio, socket or ssl; a test proves it.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from pypop.backend import MessageInfo
from pypop.protocol.commands import (
    BAD_BASE64,
    Apop,
    Auth,
    Capa,
    Command,
    Dele,
    List,
    Noop,
    ParseError,
    Pass,
    Quit,
    Retr,
    Rset,
    Stat,
    Stls,
    Top,
    Uidl,
    User,
    decode_base64,
    parse_command,
)
from pypop.protocol.state import State, allowed
from pypop.wire import DEFAULT_MAX_LINE, LineFramer

__all__ = [
    "NEED_DATA",
    "ApopLogin",
    "Closing",
    "ConnectionClosed",
    "Event",
    "NeedData",
    "PasswordLogin",
    "ProtocolConfig",
    "ProtocolError",
    "Retrieve",
    "SaslAborted",
    "SaslResponse",
    "SaslStart",
    "ServerConnection",
    "StartTLS",
    "Update",
]

CRLF: Final = b"\r\n"
# RFC 2449 §4: the first line of a response is at most 512 octets with its CRLF.
MAX_RESPONSE_LINE: Final = 512
PLAINTEXT_REFUSED: Final = "Plaintext authentication disallowed on non-secure (SSL/TLS) connections"
RESP_CODES: Final = frozenset({"AUTH", "IN-USE", "LOGIN-DELAY", "SYS/TEMP", "SYS/PERM"})


class ProtocolError(RuntimeError):
    """The *caller* broke the event protocol (a bug in the session, not the peer)."""


# ---- events -------------------------------------------------------------------------


class NeedData:
    """Feed more bytes (after sending :meth:`ServerConnection.data_to_send`)."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class PasswordLogin:
    """USER + PASS (§7). Complete with login_succeeded / login_failed."""

    user: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ApopLogin:
    """APOP name digest (§7), with the greeting's timestamp."""

    user: str
    digest: bytes = field(repr=False)
    timestamp: bytes


@dataclass(frozen=True, slots=True)
class SaslStart:
    """AUTH mechanism [initial-response] (RFC 5034). Complete with sasl_challenge,
    login_succeeded or login_failed."""

    mechanism: str
    initial: bytes | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class SaslResponse:
    """A client line answering a SASL challenge, decoded."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class SaslAborted:
    """The client cancelled with "*" or sent bad base64; -ERR already queued."""


@dataclass(frozen=True, slots=True)
class StartTLS:
    """STLS accepted by the grammar and state. Complete with start_tls or reply_err."""


@dataclass(frozen=True, slots=True)
class Retrieve:
    """RETR (top_lines None) or TOP. Complete with message_header + send_raw +
    message_done, or message_failed before the header."""

    index: int
    size: int
    top_lines: int | None


@dataclass(frozen=True, slots=True)
class Update:
    """QUIT in TRANSACTION: remove ``deleted`` (indices), then update_finished."""

    deleted: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Closing:
    """Send what is queued, then close the connection."""

    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side; no UPDATE."""


Event = (
    NeedData
    | PasswordLogin
    | ApopLogin
    | SaslStart
    | SaslResponse
    | SaslAborted
    | StartTLS
    | Retrieve
    | Update
    | Closing
    | ConnectionClosed
)


@dataclass(frozen=True, slots=True)
class ProtocolConfig:
    """Per-server protocol settings."""

    max_bad_commands: int = 20
    max_auth_failures: int = 5
    implementation: str | None = "pypop"
    expire: str | None = "NEVER"
    login_delay: int | None = None
    sasl_mechanisms: tuple[str, ...] = ()
    plaintext_mechanisms: frozenset[str] = frozenset({"PLAIN", "LOGIN"})
    stls_available: bool = False
    # RFC 5034 §4 SASL continuation lines are not bound by the 255-octet command limit
    # (OAuth tokens run to kilobytes).
    sasl_max_line: int = 16384


# ---- the connection -----------------------------------------------------------------


class ServerConnection:
    """One POP3 server session's protocol state."""

    def __init__(
        self,
        config: ProtocolConfig | None = None,
        *,
        tls_active: bool = False,
        plaintext_allowed: bool = True,
        apop_timestamp: bytes | None = None,
    ) -> None:
        self.config = config if config is not None else ProtocolConfig()
        self.state = State.AUTHORIZATION
        self.tls_active = tls_active
        self.plaintext_allowed = plaintext_allowed
        self.apop_timestamp = apop_timestamp
        self.user: str | None = None
        self.bad_commands = 0
        self.auth_failures = 0
        self.commands = 0
        self._framer = LineFramer(DEFAULT_MAX_LINE)
        self._lines: deque[bytes | None] = deque()
        self._eof = False
        self._out: list[bytes] = []
        self._out_len = 0
        self._busy: Event | None = None
        self._pending_user: str | None = None
        self._sasl_waiting = False
        # Set by the session when it knows more than the config (store abilities, TLS
        # channel binding): mechanisms usable now, and those refused only for want of
        # TLS. None = derive both from the config and plaintext_allowed.
        self.sasl_usable: list[str] | None = None
        self.sasl_refused_plaintext: list[str] | None = None
        # maildrop snapshot (§4): numbers fixed for the session
        self._sizes: list[int] = []
        self._uids: list[str] = []
        self._deleted = bytearray()
        self._count = 0
        self._octets = 0

    # -- bytes in / out --

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means end of input."""
        if not data:
            self._eof = True
            return
        self._lines.extend(self._framer.feed(data))

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        self._out_len = 0
        return out

    def take_output(self) -> list[bytes]:
        """Like :meth:`data_to_send`, as the queued chunks (for gathered writes)."""
        out = self._out
        self._out = []
        self._out_len = 0
        return out

    @property
    def pending_output(self) -> int:
        return self._out_len

    @property
    def has_pending_input(self) -> bool:
        """Complete lines are waiting (pipelined commands)."""
        return bool(self._lines)

    def send_raw(self, data: bytes) -> None:
        """Queue message octets (already stuffed) after a message_header."""
        if data:
            self._out.append(data)
            self._out_len += len(data)

    def _line(self, text: str) -> None:
        line = text.encode("utf-8") + CRLF
        if len(line) > MAX_RESPONSE_LINE:
            raise ProtocolError("response line over 512 octets")
        self._out.append(line)
        self._out_len += len(line)

    def _ok(self, text: str = "") -> None:
        self._line(f"+OK {text}" if text else "+OK")

    def _err(self, text: str, code: str | None = None) -> None:
        # RFC 2449 §6.4: a response code is bracketed and starts the text.
        if code is not None:
            if code not in RESP_CODES:
                raise ProtocolError(f"unknown response code {code!r}")
            text = f"[{code}] {text}"
        self._line(f"-ERR {text}")

    def _multiline(self, first: str, lines: Sequence[str]) -> None:
        self._ok(first)
        body = "".join(f"{line}\r\n" for line in lines) + ".\r\n"
        data = body.encode("ascii")
        self._out.append(data)
        self._out_len += len(data)

    def greeting(self, text: str = "POP3 server ready") -> None:
        """§4: the one-line greeting, with the APOP timestamp when there is one."""
        if self.apop_timestamp is not None:
            text = f"{text} {self.apop_timestamp.decode('ascii')}"
        self._ok(text)

    # -- events --

    def next_event(self) -> Event:
        if self._busy is not None:
            raise ProtocolError(f"complete {self._busy!r} before asking for the next event")
        if self.state is State.CLOSED:
            return Closing("closed")
        while self._lines:
            line = self._lines.popleft()
            self.commands += 1
            event = self._handle_line(line)
            if event is not None:
                if not isinstance(event, Closing | SaslAborted):
                    self._busy = event
                return event
        return ConnectionClosed() if self._eof else NEED_DATA

    def _handle_line(self, line: bytes | None) -> Event | None:
        if self._sasl_waiting:
            return self._sasl_line(line)
        if line is None:
            return self._bad("Line too long")
        cmd = parse_command(line)
        if isinstance(cmd, ParseError):
            return self._bad(cmd.text)
        if not allowed(cmd, self.state):
            return self._bad("Command not valid in this state")
        return self._dispatch(cmd)

    def _bad(self, text: str) -> Closing | None:
        # §3: -ERR for unknown, invalid or wrong-state commands; then give up on a
        # peer that only sends garbage (Dovecot's limit is also 20).
        self.bad_commands += 1
        if self.bad_commands >= self.config.max_bad_commands:
            self._err("Too many invalid commands, closing connection")
            return self._close("too many invalid commands")
        self._err(text)
        return None

    def _close(self, reason: str) -> Closing:
        self.state = State.CLOSED
        self._lines.clear()
        return Closing(reason)

    def _dispatch(self, cmd: Command) -> Event | None:
        match cmd:
            case Capa():
                self._multiline("Capability list follows", self.capabilities())
            case Quit():
                if self.state is State.TRANSACTION:
                    self.state = State.UPDATE
                    return Update(tuple(i for i, d in enumerate(self._deleted) if d))
                self._ok("Logging out")
                return self._close("quit")
            case User(name=name):
                if not self.plaintext_allowed:
                    self._err(PLAINTEXT_REFUSED, "AUTH")
                else:
                    self._pending_user = name
                    self._ok()  # §13: never reveal whether the user exists
            case Pass(password=password):
                user, self._pending_user = self._pending_user, None
                if not self.plaintext_allowed:
                    self._err(PLAINTEXT_REFUSED, "AUTH")
                elif user is None:
                    self._err("No username given")
                else:
                    return PasswordLogin(user, password)
            case Apop(name=name, digest=digest):
                if self.apop_timestamp is None:
                    self._err("APOP not available")
                else:
                    return ApopLogin(name, digest, self.apop_timestamp)
            case Auth(mechanism=None):
                self._multiline("", self.usable_mechanisms())  # Outlook discovery
            case Auth(mechanism=str(mech), initial=initial):
                if mech in self.usable_mechanisms():
                    return SaslStart(mech, initial)
                if mech in self._refused_mechanisms():
                    self._err(PLAINTEXT_REFUSED, "AUTH")
                else:
                    self._err("Unsupported authentication mechanism")
            case Stls():
                if not self.config.stls_available:
                    self._err("STLS not available")
                elif self.tls_active:
                    self._err("TLS already active")
                else:
                    return StartTLS()
            case Noop():
                self._ok()
            case Stat():
                self._ok(f"{self._count} {self._octets}")
            case List(msg=None):
                lines = [f"{i + 1} {s}" for i, s in enumerate(self._sizes) if not self._deleted[i]]
                self._multiline(f"{self._count} messages ({self._octets} octets)", lines)
            case List(msg=int(msg)):
                if (i := self._index(msg)) is not None:
                    self._ok(f"{msg} {self._sizes[i]}")
            case Uidl(msg=None):
                lines = [f"{i + 1} {u}" for i, u in enumerate(self._uids) if not self._deleted[i]]
                self._multiline("", lines)
            case Uidl(msg=int(msg)):
                if (i := self._index(msg)) is not None:
                    self._ok(f"{msg} {self._uids[i]}")
            case Dele(msg=msg):
                if 1 <= msg <= len(self._deleted) and self._deleted[msg - 1]:
                    self._err("Message already deleted")
                elif (i := self._index(msg)) is not None:
                    self._deleted[i] = 1
                    self._count -= 1
                    self._octets -= self._sizes[i]
                    self._ok("Marked to be deleted")
            case Rset():
                self._deleted = bytearray(len(self._sizes))
                self._count, self._octets = len(self._sizes), sum(self._sizes)
                self._ok(f"maildrop has {self._count} messages ({self._octets} octets)")
            case Retr(msg=msg):
                if (i := self._index(msg)) is not None:
                    return Retrieve(i, self._sizes[i], None)
            case Top(msg=msg, lines=n):
                if (i := self._index(msg)) is not None:
                    return Retrieve(i, self._sizes[i], n)
        return None

    def _index(self, msg: int) -> int | None:
        """§4: message numbers 1..n; deleted ones may not be referred to."""
        if 1 <= msg <= len(self._sizes) and not self._deleted[msg - 1]:
            return msg - 1
        self._err("No such message")
        return None

    # -- SASL continuation (RFC 5034 §4) --

    def _sasl_line(self, line: bytes | None) -> Event:
        self._sasl_end()
        if line is None:
            self._err("Line too long")
            return SaslAborted()
        if line == b"*":
            self._err("Authentication cancelled")
            return SaslAborted()
        data = decode_base64(line)
        if data is None:
            self._err(BAD_BASE64)
            return SaslAborted()
        return SaslResponse(data)

    def _sasl_end(self) -> None:
        self._sasl_waiting = False
        if self._framer.max_line != DEFAULT_MAX_LINE and not self._framer.buffered:
            self._framer = LineFramer(DEFAULT_MAX_LINE)

    def sasl_challenge(self, data: bytes) -> None:
        """Send "+ base64" and take the next line as the client's response."""
        self._require(SaslStart, SaslResponse)
        self._line("+ " + base64.b64encode(data).decode("ascii"))
        self._sasl_waiting = True
        # Continuation lines may exceed 255 octets; a client only sends one after
        # reading the challenge, so nothing is buffered when the framer is swapped.
        if not self._framer.buffered:
            self._framer = LineFramer(self.config.sasl_max_line)
        self._busy = None

    # -- capabilities --

    def usable_mechanisms(self) -> list[str]:
        if self.sasl_usable is not None:
            return self.sasl_usable
        return [
            m
            for m in self.config.sasl_mechanisms
            if self.plaintext_allowed or m not in self.config.plaintext_mechanisms
        ]

    def _refused_mechanisms(self) -> list[str]:
        if self.sasl_refused_plaintext is not None:
            return self.sasl_refused_plaintext
        usable = self.usable_mechanisms()
        return [m for m in self.config.sasl_mechanisms if m not in usable]

    def capabilities(self) -> list[str]:
        """RFC 2449 §5-6. Capabilities of the AUTHORIZATION state are announced in
        both states; STLS only while it can be used (RFC 2595 §4)."""
        caps = ["CAPA", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.plaintext_allowed:
            caps.append("USER")
        mechs = self.usable_mechanisms()
        if mechs:
            caps.append("SASL " + " ".join(mechs))
        if self.config.stls_available and not self.tls_active and self.state is State.AUTHORIZATION:
            caps.append("STLS")
        if self.config.expire is not None:
            caps.append(f"EXPIRE {self.config.expire}")
        if self.config.login_delay is not None:
            caps.append(f"LOGIN-DELAY {self.config.login_delay}")
        if self.config.implementation:
            caps.append(f"IMPLEMENTATION {self.config.implementation}")
        return caps

    # -- completions --

    def _require(self, *kinds: type) -> None:
        if not isinstance(self._busy, kinds):
            raise ProtocolError(f"no {'/'.join(k.__name__ for k in kinds)} event is open")

    def login_succeeded(self, user: str, messages: Sequence[MessageInfo]) -> None:
        """§4: the maildrop is locked and snapshotted; enter TRANSACTION."""
        self._require(PasswordLogin, ApopLogin, SaslStart, SaslResponse)
        self._busy = None
        self._sasl_end()
        self.user = user
        self.state = State.TRANSACTION
        self._sizes = [m.size for m in messages]
        self._uids = [m.uid for m in messages]
        self._deleted = bytearray(len(messages))
        self._count, self._octets = len(messages), sum(self._sizes)
        self._ok(f"maildrop has {self._count} messages ({self._octets} octets)")

    def login_failed(
        self, code: str | None = "AUTH", text: str = "Authentication failed"
    ) -> Closing | None:
        """Stay in AUTHORIZATION; after too many failures the connection closes."""
        self._require(PasswordLogin, ApopLogin, SaslStart, SaslResponse)
        self._busy = None
        self._sasl_end()
        self._err(text, code)
        self.auth_failures += 1
        if self.auth_failures >= self.config.max_auth_failures:
            return self._close("too many authentication failures")
        return None

    def start_tls(self) -> None:
        """Queue "+OK", and drop everything received so far: plaintext pipelined
        behind STLS must never run inside TLS (CVE-2011-0411 class)."""
        self._require(StartTLS)
        self._busy = None
        self._ok("Begin TLS negotiation")
        self._lines.clear()
        self._framer.clear()
        self._pending_user = None
        self.tls_active = True

    def reply_err(self, text: str, code: str | None = None) -> None:
        """Refuse the open event (StartTLS, Retrieve) with -ERR."""
        self._require(StartTLS, Retrieve)
        self._busy = None
        self._err(text, code)

    def message_header(self) -> None:
        """The first line of a RETR/TOP reply (message octets follow with send_raw)."""
        self._require(Retrieve)
        assert isinstance(self._busy, Retrieve)
        if self._busy.top_lines is None:
            self._ok(f"{self._busy.size} octets")
        else:
            self._ok()

    def message_done(self) -> None:
        self._require(Retrieve)
        self._busy = None

    def update_finished(self, failed: bool) -> Closing:
        """§6: after UPDATE; ``failed`` if some marked messages were not removed."""
        self._require(Update)
        self._busy = None
        if failed:
            self._err("Some deleted messages not removed", "SYS/TEMP")
        else:
            self._ok("Logging out")
        return self._close("quit")
