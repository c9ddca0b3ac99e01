"""The sans-I/O POP3 server connection (h11 style).

Bytes go in with :meth:`ServerConnection.receive_data`; :meth:`next_event` answers every
command it can answer alone (STAT, LIST, UIDL, DELE, RSET, NOOP, CAPA, errors) straight
into the output buffer, and stops at the first one that needs the outside world (a
login, a message body, STLS, UPDATE), which it returns as an event. The caller does the
I/O, completes the event with one of the completion methods, and asks again. Replies
therefore leave in command order whatever the pipelining (RFC 2449 §6.6). A caller
that holds messages ready for the wire (pypop.backend.WireCache) hands that source to
:meth:`ServerConnection.serve_from`: RETR and TOP of those are then answered here too,
without an event.
:meth:`data_to_send` drains the output.

Memory and time stay bounded whatever the peer pipelines: once ``output_limit``
octets wait to be sent, or after ``COMMAND_SLICE`` commands, :meth:`next_event`
answers no further command and returns :data:`SEND_DATA` (send, let others run, ask
again, do not read); LIST and UIDL listings are produced in slices as the output
drains; input is framed a window at a time, so the queue of framed lines is small,
and the caller reads again only after :data:`NEED_DATA`.

Nothing here imports trio, socket or ssl; a test proves it.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

from pypop.protocol.commands import (
    Apop,
    Auth,
    Capa,
    Command,
    Dele,
    Lang,
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
    Utf8,
    decode_base64,
    parse_command,
)
from pypop.protocol.events import (
    NEED_DATA,
    SEND_DATA,
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
    DEFAULT_LANGUAGE,
    LANGUAGES,
    MAX_STATUS_LINE,
    RESP_CODES,
    Language,
    ReplyLineError,
    Text,
    ascii_fold,
    encode_multiline,
    encode_status,
    match_language,
)
from pypop.protocol.state import State, allowed
from pypop.wire import DEFAULT_MAX_LINE, LineFramer, answer_fetches, wire_header_is_ascii

__all__ = ["NO_CAPABILITIES", "ProtocolConfig", "ServerConnection"]

# Input is framed at most this many octets at a time (whole lines), so one large read
# never becomes tens of thousands of queued line objects.
FRAME_WINDOW = 4096
# LIST/UIDL listings are formatted this many messages at a time, between checks of
# the output bound: a huge maildrop never means one long synchronous loop.
LISTING_SLICE = 512
# At most this many pipelined commands are answered per next_event call before it
# returns SEND_DATA, so that the caller can let other connections run (64 KiB of
# one-line commands is ~10,000 of them, tens of milliseconds of work).
COMMAND_SLICE = 128


def _marked(deleted: bytearray) -> tuple[int, ...]:
    """The indexes marked in ``deleted``, found by C scans (a Python loop over every
    message cost about 90 ns a message at each QUIT: 0.9 ms for 10,000)."""
    out = []
    i = deleted.find(1)
    while i >= 0:
        out.append(i)
        i = deleted.find(1, i + 1)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ProtocolConfig:
    """Per-server protocol settings."""

    max_bad_commands: int = 20
    max_auth_failures: int = 5
    implementation: str | None = "pypop"
    # RFC 2449 §6.7 / §6.5: the server-wide values; per-user ones come with
    # login_succeeded, and ServerConnection.per_user adds "USER" before login.
    expire: str | None = "NEVER"
    login_delay: int | None = None
    stls_available: bool = False
    # RFC 5034 §4 SASL continuation lines are not bound by the 255-octet command limit
    # (OAuth tokens run to kilobytes).
    sasl_max_line: int = 16384
    # Backpressure: answer no further pipelined command while this many octets of
    # replies wait to be sent (RFC 2449 §6.6).
    output_limit: int = 65536
    # server.proxy_from is set and this peer is not in it: a PROXY header (v1 line,
    # or the v2 signature, whose first line is empty) as the first line closes the
    # connection without a reply: someone is trying to choose the address we log.
    refuse_proxy_header: bool = False


_NO_LINES: list[bytes | None] = []  # shared, never appended to
# Shared: each frozenset() call makes a new 216-octet set (idle memory per session).
NO_CAPABILITIES: frozenset[str] = frozenset()
OCTETS_TEXT: Final = Text.OCTETS.value
_OCTETS_LINE: Final = b"+OK %d octets\r\n"
_MARKED_LINES: dict[str, bytes] = {}  # DELE's reply by its text (_marked_line)


def _ok_line(text: str) -> bytes:
    """``encode_status(True, text)`` for the replies that are most of them: without
    its response-code handling, with its bound (RFC 2449 §4)."""
    line = (f"+OK {text}" if text else "+OK").encode() + b"\r\n"
    if len(line) > MAX_STATUS_LINE:
        raise LocalProtocolError("status line over 512 octets")
    return line


class ServerConnection:
    """One POP3 server session's protocol state."""

    # The quick path of RETR, TOP and DELE (answer_fetches) is on; a test's subclass
    # turns it off to compare it with the general path.
    _fast: ClassVar[bool] = True

    # Slots: a session holds one of these for its whole life (idle memory).
    __slots__ = (
        "_busy",
        "_count",
        "_custom_texts",
        "_dele_ok",
        "_deleted",
        "_eof",
        "_framer",
        "_line_at",
        "_lines",
        "_listing",
        "_next_max_line",
        "_octets",
        "_octets_for",
        "_out",
        "_pending_user",
        "_quick",
        "_raw",
        "_raw_pos",
        "_sasl_waiting",
        "_sizes",
        "_skipping",
        "_uids",
        "apop_timestamp",
        "auth_failures",
        "bad_commands",
        "commands",
        "config",
        "language",
        "pending_output",
        "per_user",
        "plaintext_allowed",
        "quick_retrievals",
        "refuse_8bit_headers",
        "retrieved",
        "retrieved_indexes",
        "retrieved_octets",
        "sasl_refused_plaintext",
        "sasl_usable",
        "sent_octets",
        "state",
        "texts",
        "tls_active",
        "user",
        "user_expire",
        "user_login_delay",
        "utf8",
        "verbs",
    )

    def __init__(
        self,
        config: ProtocolConfig | None = None,
        *,
        tls_active: bool = False,
        plaintext_allowed: bool = True,
        apop_timestamp: bytes | None = None,
        texts: Mapping[Text, str] | None = None,
    ) -> None:
        self.config = config if config is not None else ProtocolConfig()
        self.state = State.AUTHORIZATION
        self.tls_active = tls_active
        self.plaintext_allowed = plaintext_allowed
        self.apop_timestamp = apop_timestamp
        # RFC 6856: UTF-8 mode (after UTF8) and the language of the reply texts.
        # ``texts`` replaces the default language's table (an operator's wording);
        # LANG switches to a table of replies.LANGUAGES.
        self.utf8 = False
        self.language: Language = LANGUAGES[DEFAULT_LANGUAGE]
        self._custom_texts = texts
        self.texts: Mapping[Text, str] = self.language.ascii_texts
        self._select_texts()
        # RFC 2449 §6.5/§6.7: capabilities whose value varies per user ("EXPIRE",
        # "LOGIN-DELAY"; set by the session from the store), and this user's values
        # once logged in.
        self.per_user: frozenset[str] = NO_CAPABILITIES
        self.user_expire: str | None = None
        self.user_login_delay: int | None = None
        self.user: str | None = None
        self.bad_commands = 0
        self.auth_failures = 0
        self.commands = 0
        # Commands by type (metrics: commands by verb) and octets handed out to send.
        self.verbs: dict[type, int] = {}
        self.sent_octets = 0
        # RETRs answered (count, message octets, indexes: EXPIRE 0), and how many of
        # them came from the wire source without a Retrieve event (serve_from).
        self.retrieved = 0
        self.retrieved_octets = 0
        self.retrieved_indexes: set[int] | None = None  # made at the first RETR
        self.quick_retrievals = 0
        self._quick: Callable[[int, int | None], bytes | None] | None = None
        self.refuse_8bit_headers = False
        self._framer = LineFramer(DEFAULT_MAX_LINE)
        # Framed lines not handled yet: _lines[_line_at:] (None: an overlong line). A
        # framer's list, not a deque: an empty deque keeps a 500-octet block per session.
        self._lines: list[bytes | None] = _NO_LINES
        self._line_at = 0
        # Input not framed yet (never more than one read plus a partial line), where
        # _raw_pos starts; _skipping: the framer is inside an overlong line.
        self._raw = b""
        self._raw_pos = 0
        self._skipping = False
        self._next_max_line: int | None = None  # a framer swap waiting for a line end
        self._eof = False
        self._out: list[bytes] = []
        # Octets queued and not yet taken (a plain attribute: read on every flush).
        self.pending_output = 0
        self._listing: tuple[Sequence[object], int] | None = None
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

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes from the peer; ``b""`` means end of input.

        Call it after :data:`NEED_DATA`: what is fed is framed lazily, a window at a
        time, and held until then."""
        if not data:
            self._eof = True
            return
        if type(data) is not bytes:
            data = bytes(data)
        if self._raw_pos < len(self._raw):
            self._raw = self._raw[self._raw_pos :] + data
        else:
            self._raw = data
        self._raw_pos = 0

    @property
    def partial_line(self) -> bool:
        """True while a command line has begun and not ended (the session bounds the
        time a line may take to arrive)."""
        return self._skipping or self._raw_pos < len(self._raw)

    def _frame(self) -> None:
        """Frame the next window of input into whole lines (an incomplete line shorter
        than the limit stays unframed, so a framer swap applies to it)."""
        raw, pos, n = self._raw, self._raw_pos, len(self._raw)
        if pos == 0 and n <= FRAME_WINDOW and raw[-1] == 10 and not self._skipping:
            # Whole lines, one window (a command, or a short pipelined burst): what
            # the loop below does with them, without its arithmetic.
            lines = self._framer.feed(raw)
            if lines:
                self._lines, self._line_at = lines, 0
            self._raw = b""
            return
        while pos < n and self._line_at >= len(self._lines):
            framer = self._framer
            if self._skipping:
                # Inside an overlong line: everything up to its LF is dropped.
                lf = raw.find(b"\n", pos)
                end = n if lf < 0 else lf + 1
                framer.feed(raw[pos:end])
                pos = end
                if lf >= 0:
                    self._skipping = False
                    if self._next_max_line is not None:
                        self._framer = LineFramer(self._next_max_line)
                        self._next_max_line = None
                continue
            limit = framer.max_line
            end = min(pos + FRAME_WINDOW, n)
            lf = raw.rfind(b"\n", pos, end)
            if lf < 0:  # a line longer than the window
                lf = raw.find(b"\n", end, pos + limit)
            if lf >= 0:
                end = lf + 1
            elif n - pos >= limit:
                end = pos + limit  # overlong without its LF yet: reported, then skipped
                self._skipping = True
            else:
                break  # an incomplete line: wait for the rest
            lines = framer.feed(raw if pos == 0 and end == n else raw[pos:end])
            if lines:
                self._lines, self._line_at = lines, 0
            pos = end
        if pos >= n:
            self._raw, self._raw_pos = b"", 0
        else:
            self._raw_pos = pos

    def _set_max_line(self, max_line: int) -> None:
        """Frame lines from the next one on with this limit. Inside an overlong line
        the swap waits for its LF, so the rest of it is never taken for a new line."""
        if max_line == self._framer.max_line:
            self._next_max_line = None
        elif self._skipping:
            self._next_max_line = max_line
        else:
            self._framer = LineFramer(max_line)
            self._next_max_line = None

    def data_to_send(self) -> bytes:
        self.sent_octets += self.pending_output
        out = b"".join(self._out)
        self._out.clear()
        self.pending_output = 0
        return out

    def take_output(self) -> list[bytes]:
        """Like :meth:`data_to_send`, as the queued chunks (for gathered writes)."""
        out = self._out
        self.sent_octets += self.pending_output
        self._out = []
        self.pending_output = 0
        return out

    def send_raw(self, data: bytes) -> None:
        """Queue message octets (already stuffed) after a message_header."""
        if data:
            self._out.append(data)
            self.pending_output += len(data)

    def _text(self, text: Text, **fields: object) -> str:
        template = self.texts.get(text, text.value)
        return template.format(**fields) if fields else template

    def _select_texts(self) -> None:
        """The table for the language and mode: US-ASCII until UTF8 (RFC 6856)."""
        lang = self.language
        if self._custom_texts is not None and lang.tag == DEFAULT_LANGUAGE:
            custom = self._custom_texts
            self.texts = custom if self.utf8 else {k: ascii_fold(v) for k, v in custom.items()}
        else:
            self.texts = lang.texts if self.utf8 else lang.ascii_texts
        # DELE's reply for answer_fetches, made when first needed (None: not yet).
        self._dele_ok: bytes | None = None
        # RETR's "+OK <size> octets" as a bytes format, while the table's text is the
        # built-in one (a custom text goes the checked way).
        self._octets_for: Mapping[Text, str] | None = (
            self.texts if self.texts.get(Text.OCTETS) == OCTETS_TEXT else None
        )

    def human(self, text: str) -> str:
        """Free text for a reply (an operator's reason): as it is in UTF-8 mode,
        folded to US-ASCII before it."""
        return text if self.utf8 else ascii_fold(text)

    def _status(self, ok: bool, text: str, code: str | None = None) -> None:
        if code is not None and code not in RESP_CODES:
            raise LocalProtocolError(f"unknown response code {code!r}")
        try:
            line = encode_status(ok, text, code)
        except ReplyLineError as exc:
            raise LocalProtocolError(str(exc)) from None
        self._out.append(line)
        self.pending_output += len(line)

    def _ok(self, text: Text | str = "", **fields: object) -> None:
        if isinstance(text, Text):
            template = self.texts.get(text, text.value)
            text = template.format(**fields) if fields else template
        line = _ok_line(text)
        self._out.append(line)
        self.pending_output += len(line)

    def _err(self, text: Text, code: str | None = None) -> None:
        self._status(False, self._text(text), code)

    def _multiline(self, first: Text | str, lines: Sequence[str], **fields: object) -> None:
        self._ok(first, **fields)
        data = encode_multiline(lines)
        self._out.append(data)
        self.pending_output += len(data)

    def greeting(self, text: str | None = None) -> None:
        """§4: the one-line greeting, with the APOP timestamp when there is one."""
        text = self._text(Text.GREETING) if text is None else self.human(text)
        if self.apop_timestamp is not None:
            text = f"{text} {self.apop_timestamp.decode('ascii')}"
        self._ok(text)

    # -- events --

    def next_event(self) -> Event:
        if self._busy is not None:
            raise LocalProtocolError(f"complete {self._busy!r} before asking for the next event")
        if self.state is State.CLOSED:
            return Closing("closed")
        limit = self.config.output_limit
        budget = COMMAND_SLICE
        # (No command in the loop leaves TRANSACTION without returning.)
        source = self._quick if self.state is State.TRANSACTION and self._fast else None
        while True:
            if self.pending_output >= limit:
                return SEND_DATA
            if self._listing is not None:
                self._listing_slice()
                continue
            lines, at = self._lines, self._line_at
            if at >= len(lines):
                self._lines, self._line_at = _NO_LINES, 0  # the framer's list goes
                if self._raw_pos < len(self._raw):
                    self._frame()
                lines, at = self._lines, 0
                if not lines:
                    break
            if budget == 0:
                return SEND_DATA
            if source is not None:
                # The quick path (pypop.wire.answer_fetches): the RETRs, TOPs and
                # DELEs of a download in one call, what parse_command, _dispatch and
                # _answer_quick do for each; the line it stops at without taking goes
                # the general way (which answers those lines the same:
                # tests/test_protocol_fuzz.py).
                dele_ok = self._dele_ok
                if dele_ok is None:
                    dele_ok = self._dele_ok = self._marked_line()
                n, retrs, octets, queued, indexes, miss, deletes, gone = answer_fetches(
                    lines,
                    at,
                    budget,
                    self._sizes,
                    self._deleted,
                    source,
                    self._out,
                    limit - self.pending_output,
                    self.texts is self._octets_for,
                    self.refuse_8bit_headers and not self.utf8,
                    self.retrieved_indexes,
                    dele_ok,
                )
                if n or miss is not None:
                    budget -= n
                    self._line_at = at + n
                    self.commands += n
                    self.bad_commands = 0
                    self.pending_output += queued
                    verbs = self.verbs
                    if retrs:
                        verbs[Retr] = verbs.get(Retr, 0) + retrs
                        self.retrieved += retrs
                        self.retrieved_octets += octets
                        self.quick_retrievals += retrs
                        self.retrieved_indexes = indexes
                    if deletes:
                        verbs[Dele] = verbs.get(Dele, 0) + deletes
                        self._count -= deletes
                        self._octets -= gone
                    if n > retrs + deletes:
                        verbs[Top] = verbs.get(Top, 0) + n - retrs - deletes
                    if miss is None:
                        continue
                    # Taken, not answered: the source lacks it, or it needs the check.
                    self._line_at += 1
                    self.commands += 1
                    i, top_lines = miss
                    kind = Retr if top_lines is None else Top
                    verbs[kind] = verbs.get(kind, 0) + 1
                    busy = Retrieve(i, self._sizes[i], top_lines)
                    self._busy = busy
                    return busy
            budget -= 1
            line = lines[at]
            self._line_at = at + 1
            self.commands += 1
            event = self._handle_line(line)
            if event is not None:
                if not isinstance(event, Closing):
                    self._busy = event
                return event
        return ConnectionClosed() if self._eof else NEED_DATA

    def _marked_line(self) -> bytes:
        """DELE's reply in the current texts, or b"" (answer_fetches then leaves DELE
        to the general path) when an operator's text is too long for a status line.
        One object for every session with the same text (idle memory)."""
        text = self._text(Text.MARKED)
        line = _MARKED_LINES.get(text)
        if line is None:
            try:
                line = _ok_line(text)
            except LocalProtocolError:
                line = b""
            if len(_MARKED_LINES) < 64:  # the tables' texts and an operator's few
                _MARKED_LINES[text] = line
        return line

    def _handle_line(self, line: bytes | None) -> Event | None:
        if self._sasl_waiting:
            return self._sasl_line(line)
        if (
            self.commands == 1
            and self.config.refuse_proxy_header
            and line is not None
            and (line == b"" or line.startswith(b"PROXY "))
        ):
            return self._close("PROXY header from an untrusted peer")
        if line is None:
            return self._bad(Text.LINE_TOO_LONG)
        cmd = parse_command(line)
        if isinstance(cmd, ParseError):
            return self._bad(cmd.text)
        if not allowed(cmd, self.state):
            return self._bad(Text.WRONG_STATE)
        self.bad_commands = 0
        verbs = self.verbs
        kind = cmd.__class__
        verbs[kind] = verbs.get(kind, 0) + 1
        return self._dispatch(cmd)

    def _bad(self, text: Text) -> Closing | None:
        # §3: -ERR for unknown, invalid or wrong-state commands. A peer that sends
        # nothing else is cut off after max_bad_commands of them in a row; a valid
        # command resets the count, as Dovecot's bad-command counter does, so a client
        # probing for extensions now and then is never disconnected for it.
        self.bad_commands += 1
        if self.bad_commands >= self.config.max_bad_commands:
            self._err(Text.TOO_MANY_BAD)
            return self._close("too many invalid commands")
        self._err(text)
        return None

    def _close(self, reason: str) -> Closing:
        self.state = State.CLOSED
        self._lines, self._line_at = _NO_LINES, 0
        self._raw, self._raw_pos = b"", 0
        return Closing(reason)

    def _dispatch(self, cmd: Command) -> Event | None:
        match cmd:
            # Class patterns are tried in order, one isinstance each: the commands of
            # a mail download first (a RETR was the twentieth).
            case Retr(msg=msg):
                if (i := self._index(msg)) is not None:
                    if self._quick is not None and self._answer_quick(i, None):
                        return None
                    return Retrieve(i, self._sizes[i], None)
            case Top(msg=msg, lines=n):
                if (i := self._index(msg)) is not None:
                    if self._quick is not None and self._answer_quick(i, n):
                        return None
                    return Retrieve(i, self._sizes[i], n)
            case Stat():
                self._ok(f"{self._count} {self._octets}")
            case List(msg=None):
                self._ok(Text.SCAN_LISTING, count=self._count, octets=self._octets)
                self._listing = (self._sizes, 0)
            case List(msg=int(msg)):
                if (i := self._index(msg)) is not None:
                    self._ok(f"{msg} {self._sizes[i]}")
            case Uidl(msg=None):
                self._ok()
                self._listing = (self._uids, 0)
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
            case Noop():
                self._ok()
            case Rset():
                self._deleted = bytearray(len(self._sizes))
                self._count, self._octets = len(self._sizes), sum(self._sizes)
                self._ok(Text.MAILDROP, count=self._count, octets=self._octets)
            case Quit():
                if self.state is State.TRANSACTION:
                    self.state = State.UPDATE
                    return Update(_marked(self._deleted))
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
            case Capa():
                self._multiline(Text.CAPA, self.capabilities())
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
                elif self.utf8:
                    # RFC 6856 §2.1: clients MUST NOT send STLS after UTF8; servers
                    # MAY refuse it.
                    self._err(Text.STLS_AFTER_UTF8)
                else:
                    return StartTLS()
            case Utf8():
                self.utf8 = True
                self._select_texts()
                self._ok(Text.UTF8_ENABLED)
            case Lang(language_range=None):
                lines = [f"{lang.tag} {self.human(lang.name)}" for lang in LANGUAGES.values()]
                self._multiline(Text.LANG_LIST, lines)
            case Lang(language_range=str(wanted)):
                chosen = match_language(wanted)
                if chosen is None:
                    # RFC 6856 §3.1: the language stays; the reply starts with its tag.
                    text = self._text(Text.LANG_UNKNOWN, lang=wanted)
                    self._status(False, f"{self.language.tag} {text}")
                else:
                    self.language = chosen
                    self._select_texts()
                    self._ok(f"{chosen.tag} {self._text(Text.LANG_CHANGED)}")
        return None

    def _answer_quick(self, i: int, top_lines: int | None) -> bool:
        """RETR/TOP from the wire source, if it has the message: the reply is queued
        here, no event (a pipelined RETR costs a third less). Anything else, an error
        or an 8-bit header that must be refused included, takes the event path."""
        assert self._quick is not None
        try:
            wire = self._quick(i, top_lines)
        except Exception:
            return False
        if type(wire) is not bytes or (
            self.refuse_8bit_headers and not self.utf8 and not wire_header_is_ascii(wire)
        ):
            return False
        line = self._header_line(self._sizes[i], top_lines)
        self._out.append(line)
        self._out.append(wire)
        self.pending_output += len(line) + len(wire)
        if top_lines is None:
            self.quick_retrievals += 1
            self._count_retrieval(i)
        return True

    def _count_retrieval(self, i: int) -> None:
        self.retrieved += 1
        self.retrieved_octets += self._sizes[i]
        if self.retrieved_indexes is None:
            self.retrieved_indexes = set()
        self.retrieved_indexes.add(i)

    def _listing_slice(self) -> None:
        """The next slice of a LIST/UIDL listing (lines start with a digit: no
        stuffing), and its terminator after the last one."""
        assert self._listing is not None
        values, start = self._listing
        stop = min(start + LISTING_SLICE, len(values))
        deleted = self._deleted
        parts = [f"{i + 1} {values[i]}\r\n" for i in range(start, stop) if not deleted[i]]
        if stop >= len(values):
            parts.append(".\r\n")
            self._listing = None
        else:
            self._listing = (values, stop)
        data = "".join(parts).encode("ascii")
        self._out.append(data)
        self.pending_output += len(data)

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
            return SaslAborted(Text.LINE_TOO_LONG)
        if line == b"*":
            return SaslAborted(Text.AUTH_CANCELLED)  # RFC 5034 §4: -ERR
        data = decode_base64(line)
        if data is None:
            return SaslAborted(Text.BAD_BASE64)
        return SaslResponse(data)

    def _sasl_end(self) -> None:
        self._sasl_waiting = False
        self._set_max_line(DEFAULT_MAX_LINE)

    def sasl_challenge(self, data: bytes) -> None:
        """Send "+ base64" and take the next line as the client's response.

        A challenge line is bounded like any first reply line (512 octets with its
        CRLF, RFC 2449 §4); a longer one is the caller's bug (LocalProtocolError):
        mechanisms bound what the peer can make them echo."""
        self._require(SaslStart, SaslResponse)
        line = b"+ " + base64.b64encode(data) + b"\r\n"
        if len(line) > MAX_STATUS_LINE:
            raise LocalProtocolError("SASL challenge over 512 octets")
        self._out.append(line)
        self.pending_output += len(line)
        self._sasl_waiting = True
        # Continuation lines may exceed 255 octets (RFC 5034 §4).
        self._set_max_line(self.config.sasl_max_line)
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
        expire, delay = self.config.expire, self.config.login_delay
        if self.state is State.AUTHORIZATION:
            # RFC 2449 §6.5/§6.7: "USER" says the value varies per user; the user's
            # own value is announced after login.
            if "EXPIRE" in self.per_user:
                caps.append(f"EXPIRE {expire or 'NEVER'} USER")
            elif expire is not None:
                caps.append(f"EXPIRE {expire}")
            if "LOGIN-DELAY" in self.per_user:
                caps.append(f"LOGIN-DELAY {delay or 0} USER")
            elif delay is not None:
                caps.append(f"LOGIN-DELAY {delay}")
        else:
            # The user's values; one that was announced "USER" is announced now
            # whatever it is (the server's, or none: NEVER / 0).
            expire = self.user_expire if self.user_expire is not None else expire
            delay = self.user_login_delay if self.user_login_delay is not None else delay
            if expire is None and "EXPIRE" in self.per_user:
                expire = "NEVER"
            if delay is None and "LOGIN-DELAY" in self.per_user:
                delay = 0
            if expire is not None:
                caps.append(f"EXPIRE {expire}")
            if delay is not None:
                caps.append(f"LOGIN-DELAY {delay}")
        # RFC 6856: "UTF8 USER" when USER/PASS (or APOP) take UTF-8 names.
        usable = self.plaintext_allowed or self.apop_timestamp is not None
        caps.append("UTF8 USER" if usable else "UTF8")
        caps.append("LANG")
        if self.config.implementation:
            caps.append(f"IMPLEMENTATION {self.config.implementation}")
        return caps

    # -- completions --

    def _require(self, *kinds: type) -> None:
        if not isinstance(self._busy, kinds):
            raise LocalProtocolError(f"no {'/'.join(k.__name__ for k in kinds)} event is open")

    def login_succeeded(
        self,
        user: str,
        sizes: Sequence[int],
        uids: Sequence[str],
        *,
        expire: str | None = None,
        login_delay: int | None = None,
    ) -> None:
        """§4: the maildrop is locked and snapshotted (message n has ``sizes[n - 1]``
        and ``uids[n - 1]``); enter TRANSACTION. ``expire``/``login_delay``: this
        user's values for CAPA (RFC 2449 §6.5, §6.7), None for the server's."""
        self._require(PasswordLogin, ApopLogin, SaslStart, SaslResponse)
        if len(sizes) != len(uids):
            raise LocalProtocolError("sizes and uids differ in length")
        self._busy = None
        self._sasl_end()
        self.user = user
        self.user_expire = expire
        self.user_login_delay = login_delay
        self.state = State.TRANSACTION
        self._sizes = list(sizes)
        self._uids = list(uids)
        self._deleted = bytearray(len(self._sizes))
        self._count, self._octets = len(self._sizes), sum(self._sizes)
        self._ok(Text.MAILDROP, count=self._count, octets=self._octets)

    def login_failed(
        self, code: str | None = "AUTH", text: Text | str = Text.AUTH_FAILED
    ) -> Closing | None:
        """Stay in AUTHORIZATION; after ``max_auth_failures`` the connection closes.

        Only what the client could have got right counts: credential failures
        (``[AUTH]``) and aborted SASL exchanges (``*``, bad base64, an overlong
        line). ``[IN-USE]``, ``[SYS/TEMP]``, ``[SYS/PERM]`` and ``[LOGIN-DELAY]``
        do not: retrying a locked maildrop is not guessing passwords."""
        self._require(PasswordLogin, ApopLogin, SaslStart, SaslResponse, SaslAborted)
        counts = code == "AUTH" or isinstance(self._busy, SaslAborted)
        self._busy = None
        self._sasl_end()
        if isinstance(text, Text):
            self._err(text, code)
        else:  # free text (an account's nologin reason): one line, at most 512 octets
            line = " ".join(self.human(text).split())
            while len(line.encode("utf-8")) > 400:
                line = line[:-1]
            self._status(False, line, code)
        if counts:
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
        self._lines, self._line_at = _NO_LINES, 0
        self._raw, self._raw_pos = b"", 0
        self._skipping = False
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
        line = self._header_line(busy.size, busy.top_lines)
        self._out.append(line)
        self.pending_output += len(line)

    def _header_line(self, size: int, top_lines: int | None) -> bytes:
        if top_lines is not None:
            return b"+OK\r\n"
        if self.texts is self._octets_for:
            return _OCTETS_LINE % size
        return _ok_line(self.texts.get(Text.OCTETS, OCTETS_TEXT).format(size=size))

    def message_done(self) -> None:
        busy = self._busy
        if not isinstance(busy, Retrieve):
            raise LocalProtocolError("no Retrieve event is open")
        self._busy = None
        if busy.top_lines is None:  # TOP is not a retrieval (EXPIRE 0, the summary)
            self._count_retrieval(busy.index)

    def serve_from(
        self, source: Callable[[int, int | None], bytes | None] | None, *, refuse_8bit: bool
    ) -> None:
        """Answer RETR and TOP from ``source(index, top_lines)`` where it has the
        message (pypop.backend.WireCache: the stuffed, terminated body; it must not
        block), without a Retrieve event; None from it means the event as before.
        ``refuse_8bit``: before UTF8, a message that is not all ASCII goes through the
        event, whose caller applies the RFC 6856 header check."""
        self._quick = source
        self.refuse_8bit_headers = refuse_8bit

    def update_finished(self, failed: bool) -> Closing:
        """§6: after UPDATE; ``failed`` if some marked messages were not removed."""
        self._require(Update)
        self._busy = None
        if failed:
            self._err(Text.NOT_REMOVED, "SYS/TEMP")
        else:
            self._ok(Text.LOGGING_OUT)
        return self._close("quit")
