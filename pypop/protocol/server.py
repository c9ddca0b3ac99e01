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
from dataclasses import dataclass

from pypop.protocol.commands import (
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
from pypop.protocol.events import (
    NEED_DATA,
    ApopLogin,
    Closing,
    ConnectionClosed,
    Event,
    LocalProtocolError,
    PasswordLogin,
    Retrieve,
    SaslAborted,
    SaslResponse,
    SaslStart,
    StartTLS,
    Update,
)
from pypop.protocol.replies import (
    RESP_CODES,
    TEXTS,
    ReplyLineError,
    Text,
    encode_multiline,
    encode_status,
)
from pypop.protocol.state import State, allowed
from pypop.wire import DEFAULT_MAX_LINE, LineFramer

__all__ = ["ProtocolConfig", "ServerConnection"]


@dataclass(frozen=True, slots=True)
class ProtocolConfig:
    """Per-server protocol settings."""

    max_bad_commands: int = 20
    max_auth_failures: int = 5
    implementation: str | None = "pypop"
    expire: str | None = "NEVER"
    login_delay: int | None = None
    stls_available: bool = False
    # RFC 5034 §4 SASL continuation lines are not bound by the 255-octet command limit
    # (OAuth tokens run to kilobytes).
    sasl_max_line: int = 16384


class ServerConnection:
    """One POP3 server session's protocol state."""

    def __init__(
        self,
        config: ProtocolConfig | None = None,
        *,
        tls_active: bool = False,
        plaintext_allowed: bool = True,
        apop_timestamp: bytes | None = None,
        texts: dict[Text, str] | None = None,
    ) -> None:
        self.config = config if config is not None else ProtocolConfig()
        self.state = State.AUTHORIZATION
        self.tls_active = tls_active
        self.plaintext_allowed = plaintext_allowed
        self.apop_timestamp = apop_timestamp
        self.texts = texts if texts is not None else TEXTS
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
        # Set by the session, which knows the store's abilities and the TLS channel
        # binding: SASL mechanisms usable now, and those refused only for want of TLS.
        self.sasl_usable: list[str] = []
        self.sasl_refused_plaintext: list[str] = []
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

    def send_raw(self, data: bytes) -> None:
        """Queue message octets (already stuffed) after a message_header."""
        if data:
            self._out.append(data)
            self._out_len += len(data)

    def _text(self, text: Text, **fields: object) -> str:
        template = self.texts.get(text, text.value)
        return template.format(**fields) if fields else template

    def _status(self, ok: bool, text: str, code: str | None = None) -> None:
        if code is not None and code not in RESP_CODES:
            raise LocalProtocolError(f"unknown response code {code!r}")
        try:
            line = encode_status(ok, text, code)
        except ReplyLineError as exc:
            raise LocalProtocolError(str(exc)) from None
        self._out.append(line)
        self._out_len += len(line)

    def _ok(self, text: Text | str = "", **fields: object) -> None:
        self._status(True, self._text(text, **fields) if isinstance(text, Text) else text)

    def _err(self, text: Text, code: str | None = None) -> None:
        self._status(False, self._text(text), code)

    def _multiline(self, first: Text | str, lines: Sequence[str], **fields: object) -> None:
        self._ok(first, **fields)
        data = encode_multiline(lines)
        self._out.append(data)
        self._out_len += len(data)

    def greeting(self, text: str | None = None) -> None:
        """§4: the one-line greeting, with the APOP timestamp when there is one."""
        if text is None:
            text = self._text(Text.GREETING)
        if self.apop_timestamp is not None:
            text = f"{text} {self.apop_timestamp.decode('ascii')}"
        self._ok(text)

    # -- events --

    def next_event(self) -> Event:
        if self._busy is not None:
            raise LocalProtocolError(f"complete {self._busy!r} before asking for the next event")
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
            return self._bad(Text.LINE_TOO_LONG)
        cmd = parse_command(line)
        if isinstance(cmd, ParseError):
            return self._bad(cmd.text)
        if not allowed(cmd, self.state):
            return self._bad(Text.WRONG_STATE)
        return self._dispatch(cmd)

    def _bad(self, text: Text) -> Closing | None:
        # §3: -ERR for unknown, invalid or wrong-state commands; then give up on a
        # peer that only sends garbage.
        self.bad_commands += 1
        if self.bad_commands >= self.config.max_bad_commands:
            self._err(Text.TOO_MANY_BAD)
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
                self._multiline(Text.CAPA, self.capabilities())
            case Quit():
                if self.state is State.TRANSACTION:
                    self.state = State.UPDATE
                    return Update(tuple(i for i, d in enumerate(self._deleted) if d))
                self._ok(Text.LOGGING_OUT)
                return self._close("quit")
            case User(name=name):
                if not self.plaintext_allowed:
                    self._err(Text.PLAINTEXT_REFUSED, "AUTH")
                else:
                    self._pending_user = name
                    self._ok()  # §13: never reveal whether the user exists
            case Pass(password=password):
                user, self._pending_user = self._pending_user, None
                if not self.plaintext_allowed:
                    self._err(Text.PLAINTEXT_REFUSED, "AUTH")
                elif user is None:
                    self._err(Text.NO_USERNAME)
                else:
                    return PasswordLogin(user, password)
            case Apop(name=name, digest=digest):
                if self.apop_timestamp is None:
                    self._err(Text.APOP_UNAVAILABLE)
                else:
                    return ApopLogin(name, digest, self.apop_timestamp)
            case Auth(mechanism=None):
                self._multiline("", self.sasl_usable)  # Outlook discovery
            case Auth(mechanism=str(mech), initial=initial):
                if mech in self.sasl_usable:
                    return SaslStart(mech, initial)
                if mech in self.sasl_refused_plaintext:
                    self._err(Text.PLAINTEXT_REFUSED, "AUTH")
                else:
                    self._err(Text.UNSUPPORTED_MECHANISM)
            case Stls():
                if not self.config.stls_available:
                    self._err(Text.STLS_UNAVAILABLE)
                elif self.tls_active:
                    self._err(Text.TLS_ACTIVE)
                else:
                    return StartTLS()
            case Noop():
                self._ok()
            case Stat():
                self._ok(f"{self._count} {self._octets}")
            case List(msg=None):
                lines = [f"{i + 1} {s}" for i, s in enumerate(self._sizes) if not self._deleted[i]]
                self._multiline(Text.SCAN_LISTING, lines, count=self._count, octets=self._octets)
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
                    self._err(Text.ALREADY_DELETED)
                elif (i := self._index(msg)) is not None:
                    self._deleted[i] = 1
                    self._count -= 1
                    self._octets -= self._sizes[i]
                    self._ok(Text.MARKED)
            case Rset():
                self._deleted = bytearray(len(self._sizes))
                self._count, self._octets = len(self._sizes), sum(self._sizes)
                self._ok(Text.MAILDROP, count=self._count, octets=self._octets)
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
        self._err(Text.NO_SUCH_MESSAGE)
        return None

    # -- SASL continuation (RFC 5034 §4) --

    def _sasl_line(self, line: bytes | None) -> Event:
        self._sasl_end()
        if line is None:
            self._err(Text.LINE_TOO_LONG)
            return SaslAborted()
        if line == b"*":
            self._err(Text.AUTH_CANCELLED)
            return SaslAborted()
        data = decode_base64(line)
        if data is None:
            self._err(Text.BAD_BASE64)
            return SaslAborted()
        return SaslResponse(data)

    def _sasl_end(self) -> None:
        self._sasl_waiting = False
        if self._framer.max_line != DEFAULT_MAX_LINE and not self._framer.buffered:
            self._framer = LineFramer(DEFAULT_MAX_LINE)

    def sasl_challenge(self, data: bytes) -> None:
        """Send "+ base64" and take the next line as the client's response."""
        self._require(SaslStart, SaslResponse)
        line = b"+ " + base64.b64encode(data) + b"\r\n"
        self._out.append(line)
        self._out_len += len(line)
        self._sasl_waiting = True
        # Continuation lines may exceed 255 octets; a client only sends one after
        # reading the challenge, so nothing is buffered when the framer is swapped.
        if not self._framer.buffered:
            self._framer = LineFramer(self.config.sasl_max_line)
        self._busy = None

    # -- capabilities --

    def capabilities(self) -> list[str]:
        """RFC 2449 §5-6. Capabilities of the AUTHORIZATION state are announced in
        both states; STLS only while it can be used (RFC 2595 §4)."""
        caps = ["CAPA", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.plaintext_allowed:
            caps.append("USER")
        if self.sasl_usable:
            caps.append("SASL " + " ".join(self.sasl_usable))
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
            raise LocalProtocolError(f"no {'/'.join(k.__name__ for k in kinds)} event is open")

    def login_succeeded(self, user: str, sizes: Sequence[int], uids: Sequence[str]) -> None:
        """§4: the maildrop is locked and snapshotted (message n has ``sizes[n - 1]``
        and ``uids[n - 1]``); enter TRANSACTION."""
        self._require(PasswordLogin, ApopLogin, SaslStart, SaslResponse)
        if len(sizes) != len(uids):
            raise LocalProtocolError("sizes and uids differ in length")
        self._busy = None
        self._sasl_end()
        self.user = user
        self.state = State.TRANSACTION
        self._sizes = list(sizes)
        self._uids = list(uids)
        self._deleted = bytearray(len(self._sizes))
        self._count, self._octets = len(self._sizes), sum(self._sizes)
        self._ok(Text.MAILDROP, count=self._count, octets=self._octets)

    def login_failed(
        self, code: str | None = "AUTH", text: Text = Text.AUTH_FAILED
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
        self._ok(Text.BEGIN_TLS)
        self._lines.clear()
        self._framer.clear()
        self._pending_user = None
        self.tls_active = True

    def reply_err(self, text: Text, code: str | None = None) -> None:
        """Refuse the open event (StartTLS, Retrieve) with -ERR."""
        self._require(StartTLS, Retrieve)
        self._busy = None
        self._err(text, code)

    def message_header(self) -> None:
        """The first line of a RETR/TOP reply (message octets follow with send_raw)."""
        busy = self._busy
        if not isinstance(busy, Retrieve):
            raise LocalProtocolError("no Retrieve event is open")
        if busy.top_lines is None:
            self._ok(Text.OCTETS, size=busy.size)
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
            self._err(Text.NOT_REMOVED, "SYS/TEMP")
        else:
            self._ok(Text.LOGGING_OUT)
        return self._close("quit")
