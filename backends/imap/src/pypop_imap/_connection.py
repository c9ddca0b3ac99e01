"""One upstream IMAP connection on Trio: connect, TLS, log in, and the few commands the
backend sends. The parsing is :mod:`pypop_imap._protocol`'s (strict, sans-I/O).

Failures are reported with two exception types only:

- :class:`UpstreamError`: the connection cannot be used (down, refused, timed out,
  broken TLS, nonsense on the wire); the backend turns it into ``[SYS/TEMP]``.
- :class:`CommandFailed`: the server answered NO or BAD; the connection is still fine.

The server's text is kept for the log only; it never reaches a POP3 client.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import ssl
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Final

import trio

from pypop_imap._protocol import (
    NEED_DATA,
    Continuation,
    Data,
    Event,
    Fetch,
    ImapProtocolError,
    LiteralChunk,
    LiteralStart,
    ResponseParser,
    Status,
    encode_astring,
    quote,
)

__all__ = [
    "CommandFailed",
    "Endpoint",
    "ImapConnection",
    "Selected",
    "UpstreamError",
    "uid_set",
]

log = logging.getLogger("pypop.imap")

RECV_SIZE: Final = 65536


class UpstreamError(Exception):
    """The upstream connection failed; the message is for the log."""


class CommandFailed(Exception):
    """The server answered NO or BAD."""

    def __init__(self, command: str, status: Status) -> None:
        text = status.text.decode("utf-8", "replace")[:200]
        code = f" [{status.code.decode('ascii', 'replace')}]" if status.code else ""
        super().__init__(f"{command}: {status.condition.decode()}{code} {text}")
        self.status = status

    @property
    def code(self) -> bytes | None:
        return self.status.code


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to reach the upstream."""

    host: str
    port: int
    tls: str  # "implicit", "starttls" or "none"
    ssl_context: ssl.SSLContext | None
    timeout: float


@dataclass(slots=True)
class Selected:
    """The state of the selected mailbox after SELECT/EXAMINE."""

    uidvalidity: int = 0
    exists: int = 0
    read_only: bool = True


@dataclass(slots=True)
class _Collected:
    """What a command's untagged responses said, kept only as far as it asked: a
    server may send any number of them before the tagged reply."""

    want: bytes | None = None
    """The FETCH item the command asked for (``RFC822.SIZE``, ``BODY[]``); None:
    FETCH responses are not kept."""
    uids: frozenset[int] | None = None
    """The UIDs asked for (None: any)."""
    fetches: dict[int, Fetch] = field(default_factory=dict)
    """By UID: a repeated response replaces the one before."""
    expunged: int = 0
    exists: int | None = None
    uidvalidity: int | None = None
    read_only: bool | None = None
    searching: bool = False
    search: set[int] = field(default_factory=set)
    selecting: bool = False
    """A SELECT/EXAMINE: a new UIDVALIDITY is expected here, and only here."""


def uid_set(uids: Sequence[int]) -> list[bytes]:
    """Sorted UIDs as IMAP sequence sets (``1:3,7``), each at most ~8000 octets."""
    parts: list[bytes] = []
    sets: list[bytes] = []
    length = 0
    ordered = sorted(set(uids))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        part = b"%d" % ordered[i] if i == j else b"%d:%d" % (ordered[i], ordered[j])
        if length + len(part) > 8000 and parts:
            sets.append(b",".join(parts))
            parts, length = [], 0
        parts.append(part)
        length += len(part) + 1
        i = j + 1
    if parts:
        sets.append(b",".join(parts))
    return sets


class ImapConnection:
    """A connected, greeted IMAP client connection (see :meth:`open`)."""

    def __init__(self, stream: trio.abc.Stream, endpoint: Endpoint) -> None:
        self._stream = stream
        self.endpoint = endpoint
        self._parser = ResponseParser()
        self._tag = 0
        self.capabilities: frozenset[bytes] = frozenset()
        self.broken = False
        self.busy = False
        self.selected: Selected | None = None

    # -- set-up --

    @classmethod
    async def open(cls, endpoint: Endpoint) -> ImapConnection:
        """TCP, TLS as configured, the greeting, and the capabilities."""
        try:
            with trio.fail_after(endpoint.timeout):
                tcp = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        except (OSError, trio.TooSlowError) as exc:
            raise UpstreamError(f"cannot connect to {_where(endpoint)}: {_why(exc)}") from None
        stream: trio.abc.Stream = tcp
        conn: ImapConnection | None = None
        try:
            if endpoint.tls == "implicit":
                stream = await _tls(tcp, endpoint)
            conn = cls(stream, endpoint)
            await conn._greeting()
            if endpoint.tls == "starttls":
                await conn._starttls()
            if not conn.capabilities:
                await conn.capability()
        except CommandFailed as exc:
            # A refused STARTTLS or CAPABILITY leaves nothing to log in over.
            await trio.aclose_forcefully(stream)
            raise UpstreamError(f"{_where(endpoint)} refused the set-up: {exc}") from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return conn

    async def _greeting(self) -> None:
        event = await self._event()
        if not isinstance(event, Status) or event.tag is not None:
            raise UpstreamError("no IMAP greeting")
        if event.condition == b"BYE":
            raise UpstreamError(f"the server refused the connection: {_text(event)}")
        if event.condition != b"OK":
            # PREAUTH would skip the user's own login: never accept it.
            raise UpstreamError(f"unexpected greeting {event.condition.decode()}")
        self._take_capabilities(event)

    async def _starttls(self) -> None:
        if b"STARTTLS" not in self.capabilities and self.capabilities:
            raise UpstreamError("the server does not offer STARTTLS")
        await self.command(b"STARTTLS", "STARTTLS")
        if self._parser.buffered:
            # Anything after the OK was sent before TLS: an injection attempt.
            raise UpstreamError("data after the STARTTLS reply")
        assert isinstance(self._stream, trio.SocketStream)
        self._stream = await _tls(self._stream, self.endpoint)
        self.capabilities = frozenset()  # RFC 3501 §6.2.1: forget what was said before TLS
        await self.capability()

    def _take_capabilities(self, status: Status) -> None:
        if status.code == b"CAPABILITY":
            self.capabilities = frozenset(c.upper() for c in status.code_args.split())

    async def capability(self) -> None:
        _, collected = await self._run(b"CAPABILITY", "CAPABILITY")
        del collected

    # -- I/O --

    async def _send(self, data: bytes) -> None:
        try:
            with trio.fail_after(self.endpoint.timeout):
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            self.broken = True
            raise UpstreamError(f"sending to {_where(self.endpoint)} failed: {_why(exc)}") from None

    async def _event(self) -> Event:
        parser = self._parser
        while True:
            try:
                event = parser.next_event()
            except ImapProtocolError as exc:
                self.broken = True
                raise UpstreamError(f"{_where(self.endpoint)} broke the protocol: {exc}") from None
            if event is not NEED_DATA:
                return event
            try:
                with trio.fail_after(self.endpoint.timeout):
                    data = await self._stream.receive_some(RECV_SIZE)
            except (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                trio.TooSlowError,
                OSError,
            ) as exc:
                self.broken = True
                raise UpstreamError(
                    f"reading from {_where(self.endpoint)} failed: {_why(exc)}"
                ) from None
            if not data:
                self.broken = True
                raise UpstreamError(f"{_where(self.endpoint)} closed the connection")
            parser.feed(data)

    def _next_tag(self) -> bytes:
        self._tag += 1
        return b"p%d" % self._tag

    async def command(self, text: bytes, what: str) -> Status:
        """Send one command, wait for its tagged OK; NO/BAD raise :class:`CommandFailed`."""
        status, _ = await self._run(text, what)
        return status

    async def _run(
        self, text: bytes, what: str, collected: _Collected | None = None
    ) -> tuple[Status, _Collected]:
        if self.broken:
            raise UpstreamError("the connection is broken")
        tag = self._next_tag()
        replied = False
        try:
            await self._send(tag + b" " + text + b"\r\n")
            result = await self._until_tagged(tag, what, collected)
            replied = True
            return result
        except CommandFailed:
            replied = True  # its tagged NO or BAD was read: the wire is in step
            raise
        finally:
            if not replied:
                # Cut off before its tagged reply (a cancel, a timeout): that reply is
                # still to come, so the next command, or the next login given this
                # connection from the pool, would read it as its own.
                self.broken = True

    async def _until_tagged(
        self, tag: bytes, what: str, collected: _Collected | None = None
    ) -> tuple[Status, _Collected]:
        if collected is None:
            collected = _Collected()
        while True:
            event = await self._event()
            if isinstance(event, Status):
                if event.tag == tag:
                    self._take_capabilities(event)
                    if event.condition != b"OK":
                        raise CommandFailed(what, event)
                    if event.code == b"READ-ONLY":
                        collected.read_only = True
                    elif event.code == b"READ-WRITE":
                        collected.read_only = False
                    return event, collected
                self._untagged_status(event, collected)
            elif isinstance(event, Data):
                self._untagged_data(event, collected)
            elif isinstance(event, Fetch):
                self._keep(event, collected)
            elif isinstance(event, LiteralStart | LiteralChunk):
                # A large literal nobody asked to stream: not something we request.
                self.broken = True
                raise UpstreamError(f"{_where(self.endpoint)} sent an unrequested large literal")
            elif isinstance(event, Continuation):
                self.broken = True
                raise UpstreamError(f"{_where(self.endpoint)} sent an unexpected continuation")

    def _keep(self, event: Fetch, collected: _Collected) -> None:
        if collected.want is None or collected.want not in event.items:
            return  # e.g. an unsolicited flag update
        uid = event.items.get(b"UID")
        if not isinstance(uid, int):
            self.broken = True
            raise UpstreamError(f"{_where(self.endpoint)} sent a FETCH without its UID")
        if collected.uids is None or uid in collected.uids:
            collected.fetches[uid] = event

    def _untagged_status(self, event: Status, collected: _Collected) -> None:
        if event.condition == b"BYE":
            # The server is closing; the tagged reply may never come.
            self.broken = True
            log.info("%s said BYE: %s", _where(self.endpoint), _text(event))
            return
        if event.code == b"UIDVALIDITY":
            collected.uidvalidity = _number(event.code_args, "UIDVALIDITY")
            selected = self.selected
            if (
                not collected.selecting
                and selected is not None
                and collected.uidvalidity != selected.uidvalidity
            ):
                # The mailbox was recreated under us: every UID we hold may now name
                # another message, so no further UID command may go out on it.
                self.broken = True
                raise UpstreamError(
                    f"{_where(self.endpoint)} changed UIDVALIDITY from "
                    f"{selected.uidvalidity} to {collected.uidvalidity} mid-session"
                )
        else:
            self._take_capabilities(event)

    def _untagged_data(self, event: Data, collected: _Collected) -> None:
        if event.name == b"EXISTS" and event.number is not None:
            collected.exists = event.number
        elif event.name == b"EXPUNGE":
            collected.expunged += 1
        elif event.name == b"SEARCH" and collected.searching:
            collected.search.update(v for v in event.values if isinstance(v, int))
        elif event.name == b"CAPABILITY":
            self.capabilities = frozenset(
                bytes(v).upper() for v in event.values if isinstance(v, bytes)
            )

    # -- authentication --

    async def send_id(self, client: str) -> None:
        """RFC 2971 ID with the client's address (Dovecot takes ``x-originating-ip``
        from hosts in its login_trusted_networks: its logs and login penalty then see
        the real client). Not waited for: the next command follows in the same flight,
        and its reply is read with the next command's."""
        address = quote(client.encode("ascii", "replace"))
        if b"ID" not in self.capabilities or address is None or self.broken:
            return
        await self._send(self._next_tag() + b' ID ("x-originating-ip" ' + address + b")\r\n")

    async def authenticate_plain(self, authcid: str, password: str, authzid: str = "") -> None:
        """Log in with SASL PLAIN (RFC 4616), or LOGIN where PLAIN is not offered.
        :class:`CommandFailed` if refused."""
        caps = self.capabilities
        if b"AUTH=PLAIN" in caps:
            message = b"\0".join(s.encode("utf-8") for s in (authzid, authcid, password))
            await self._authenticate(b"PLAIN", message)
            return
        if authzid or b"LOGINDISABLED" in caps:
            raise UpstreamError(f"{_where(self.endpoint)} offers no usable login method")
        await self._login(authcid.encode("utf-8"), password.encode("utf-8"))

    async def authenticate_bearer(self, mechanism: str, user: str, token: str) -> None:
        """XOAUTH2 or OAUTHBEARER (RFC 7628) with a bearer token."""
        if mechanism == "XOAUTH2":
            message = f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
        else:
            name = user.replace("=", "=3D").replace(",", "=2C")
            message = f"n,a={name},\x01auth=Bearer {token}\x01\x01".encode()
        await self._authenticate(mechanism.encode("ascii"), message)

    async def _authenticate(self, mechanism: bytes, message: bytes) -> None:
        encoded = base64.b64encode(message) or b"="
        tag = self._next_tag()
        if b"SASL-IR" in self.capabilities:
            await self._send(tag + b" AUTHENTICATE " + mechanism + b" " + encoded + b"\r\n")
        else:
            await self._send(tag + b" AUTHENTICATE " + mechanism + b"\r\n")
            event = await self._event()
            if isinstance(event, Continuation):
                await self._send(encoded + b"\r\n")
            else:
                self.broken = True
                raise UpstreamError("no continuation for AUTHENTICATE")
        answered = False
        while True:
            event = await self._event()
            if isinstance(event, Continuation):
                if answered:
                    # None of our mechanisms has a second challenge: a server asking
                    # again and again would hold the login for ever.
                    self.broken = True
                    raise UpstreamError("endless challenges to AUTHENTICATE")
                answered = True
                # An error challenge (OAuth's JSON): answer it so the NO comes.
                reply = b"AQ==" if mechanism == b"OAUTHBEARER" else b""
                await self._send(reply + b"\r\n")
                continue
            if isinstance(event, Status) and event.tag == tag:
                self._take_capabilities(event)
                if event.condition != b"OK":
                    raise CommandFailed("AUTHENTICATE", event)
                return
            if isinstance(event, Status):
                self._untagged_status(event, _Collected())
            elif isinstance(event, Data):
                self._untagged_data(event, _Collected())
            else:
                self.broken = True
                raise UpstreamError("unexpected response to AUTHENTICATE")

    async def _login(self, user: bytes, password: bytes) -> None:
        tag = self._next_tag()
        args: list[bytes] = []
        for value in (user, password):
            encoded = encode_astring(value)
            args.append(encoded if encoded is not None else b"{%d}" % len(value))
        # Values that need a literal are sent as synchronizing literals: each waits for
        # the server's "+" (LITERAL+ would save the wait, but this path is rare).
        line = tag + b" LOGIN "
        for i, (value, arg) in enumerate(zip((user, password), args, strict=True)):
            sep = b" " if i else b""
            if arg.startswith(b"{"):
                await self._send(line + sep + arg + b"\r\n")
                event = await self._event()
                if not isinstance(event, Continuation):
                    if isinstance(event, Status) and event.tag == tag:
                        raise CommandFailed("LOGIN", event)
                    self.broken = True
                    raise UpstreamError("no continuation for a LOGIN literal")
                line = value
            else:
                line += sep + arg
        await self._send(line + b"\r\n")
        await self._until_tagged(tag, "LOGIN")

    # -- the mailbox --

    async def select(self, mailbox: bytes, *, read_only: bool) -> Selected:
        """EXAMINE (read-only: nothing changes upstream) or SELECT."""
        verb = b"EXAMINE " if read_only else b"SELECT "
        _, got = await self._run(verb + mailbox, verb.decode().strip(), _Collected(selecting=True))
        return self._selected(got, read_only)

    async def open_snapshot(
        self, mailbox: bytes, *, read_only: bool, guid: bool = False
    ) -> tuple[Selected, list[tuple[int, int, str]], int]:
        """EXAMINE/SELECT and the sizes, both commands in one write (one round trip)."""
        if self.broken:
            raise UpstreamError("the connection is broken")
        verb = b"EXAMINE " if read_only else b"SELECT "
        select_tag, fetch_tag = self._next_tag(), self._next_tag()
        await self._send(
            select_tag + b" " + verb + mailbox + b"\r\n" + fetch_tag + b" " + _sizes(guid) + b"\r\n"
        )
        try:
            _, got = await self._until_tagged(
                select_tag, verb.decode().strip(), _Collected(selecting=True)
            )
        except CommandFailed:
            # The FETCH fails too (no mailbox selected): read its reply, then report.
            with contextlib.suppress(CommandFailed):
                await self._until_tagged(fetch_tag, "UID FETCH")
            raise
        selected = self._selected(got, read_only)
        _, fetched = await self._until_tagged(fetch_tag, "UID FETCH", _Collected(_SIZE))
        rows = self._rows(fetched, guid)
        return selected, rows, fetched.expunged

    def _selected(self, got: _Collected, read_only: bool) -> Selected:
        if got.uidvalidity is None:
            raise UpstreamError(f"{_where(self.endpoint)} gave no UIDVALIDITY")
        selected = Selected(got.uidvalidity, got.exists or 0, read_only)
        if got.read_only is not None:
            selected.read_only = got.read_only
        self.selected = selected
        return selected

    async def sizes(self, *, guid: bool = False) -> tuple[list[tuple[int, int, str]], int]:
        """``(uid, RFC822.SIZE, guid)`` of every message in mailbox order (``guid`` is
        Dovecot's ``X-GUID`` if asked for, else ""), and the number of EXPUNGE
        responses seen meanwhile (the caller asks again if it is not 0)."""
        _, got = await self._run(_sizes(guid), "UID FETCH", _Collected(_SIZE))
        return self._rows(got, guid), got.expunged

    def _rows(self, got: _Collected, guid: bool) -> list[tuple[int, int, str]]:
        out: list[tuple[int, int, str]] = []
        for f in got.fetches.values():
            uid, size = f.items.get(b"UID"), f.items.get(b"RFC822.SIZE")
            if isinstance(uid, int) and isinstance(size, int):
                value = f.items.get(b"X-GUID", b"") if guid else b""
                if not isinstance(value, bytes) or not value.isascii():
                    raise UpstreamError(f"{_where(self.endpoint)} sent no usable X-GUID")
                out.append((uid, size, value.decode("ascii")))
            elif b"RFC822.SIZE" in f.items or (uid is not None and not isinstance(uid, int)):
                raise UpstreamError(f"{_where(self.endpoint)} sent a malformed FETCH")
        out.sort()  # UIDs ascend with sequence numbers (RFC 3501 §2.3.1.1)
        return out

    async def bodies(self, uids: Sequence[int], section: bytes) -> dict[int, bytes]:
        """Small messages' ``section`` (e.g. ``BODY.PEEK[]``) in one command."""
        out: dict[int, bytes] = {}
        name = _response_name(section)
        asked = frozenset(uids)
        for uidset in uid_set(uids):
            _, got = await self._run(
                b"UID FETCH " + uidset + b" (" + section + b")",
                "UID FETCH",
                _Collected(name, asked),
            )
            for uid, f in got.fetches.items():
                body = f.items.get(name)
                if isinstance(body, bytes):
                    out[uid] = body
        return out

    async def stream(
        self, uid: int, sections: Sequence[bytes]
    ) -> AsyncGenerator[tuple[bytes, bytes | None], None]:
        """``UID FETCH uid (sections)``: yields ``(item, data)`` pieces in order.

        A piece's ``data`` is bytes; a section the server sent as NIL yields
        ``(item, None)``. Yields nothing if the message is gone. Large literals arrive
        in chunks, small ones whole. Closing the iterator early reads the rest of the
        response (bounded) or, if too much is left, marks the connection broken.
        """
        if self.broken:
            raise UpstreamError("the connection is broken")
        tag = self._next_tag()
        await self._send(b"%s UID FETCH %d (%s)\r\n" % (tag, uid, b" ".join(sections)))
        names = [_response_name(s) for s in sections]
        done = False
        left = 0
        unchecked = False  # a streamed literal came before its response's UID
        self.busy = True
        try:
            while True:
                event = await self._event()
                if isinstance(event, LiteralStart):
                    if event.item not in names:
                        raise UpstreamError(f"{_where(self.endpoint)} streamed an unrequested item")
                    got_uid = event.before.get(b"UID")
                    if got_uid is not None and got_uid != uid:
                        raise UpstreamError(f"{_where(self.endpoint)} sent another message")
                    unchecked = unchecked or got_uid is None
                    left = event.size
                    while left:
                        chunk = await self._event()
                        if not isinstance(chunk, LiteralChunk):
                            raise UpstreamError("literal interrupted")
                        left -= len(chunk.data)
                        yield event.item, chunk.data
                elif isinstance(event, Fetch):
                    # A body is ours only if its response says so (RFC 3501 §6.4.8):
                    # never another message's octets, and for a streamed one an error
                    # before its end, so that the POP3 client sees a cut transfer.
                    got_uid = event.items.get(b"UID")
                    if unchecked:
                        if got_uid != uid:
                            raise UpstreamError(f"{_where(self.endpoint)} sent another message")
                        unchecked = False
                    elif got_uid != uid:
                        if got_uid is None and any(name in event.items for name in names):
                            raise UpstreamError(f"{_where(self.endpoint)} sent a body without UID")
                        continue  # an unsolicited update about another message
                    for name in names:
                        if name in event.items:
                            value = event.items[name]
                            if isinstance(value, bytes) or value is None:
                                yield name, value
                elif isinstance(event, Status):
                    if event.tag == tag:
                        done = True
                        if event.condition != b"OK" and event.code != b"EXPUNGEISSUED":
                            raise CommandFailed("UID FETCH", event)
                        return
                    self._untagged_status(event, _Collected())
                elif isinstance(event, Data):
                    self._untagged_data(event, _Collected())
                else:
                    raise UpstreamError(f"{_where(self.endpoint)} sent an unexpected response")
        except UpstreamError:
            self.broken = True
            raise
        finally:
            self.busy = False
            if not done and not self.broken:
                await self._drain(tag, left)

    async def _drain(self, tag: bytes, left: int) -> None:
        """Read up to the tagged reply of an abandoned FETCH, or give the connection up."""
        if left > 4 * 1024 * 1024:
            self.broken = True
            return
        self.broken = True  # until the reply is read
        with trio.move_on_after(min(5.0, self.endpoint.timeout)):
            while True:
                try:
                    event = await self._event()
                except UpstreamError:
                    return
                if isinstance(event, Status) and event.tag == tag:
                    self.broken = False
                    return

    async def store_deleted(self, uids: Sequence[int], add: bool = True) -> None:
        verb = b"+FLAGS.SILENT" if add else b"-FLAGS.SILENT"
        for uidset in uid_set(uids):
            await self.command(b"UID STORE " + uidset + b" " + verb + b" (\\Deleted)", "UID STORE")

    async def uid_expunge(self, uids: Sequence[int]) -> None:
        for uidset in uid_set(uids):
            await self.command(b"UID EXPUNGE " + uidset, "UID EXPUNGE")

    async def expunge(self) -> None:
        await self.command(b"EXPUNGE", "EXPUNGE")

    async def search_uids(self, criteria: bytes) -> list[int]:
        _, got = await self._run(
            b"UID SEARCH " + criteria, "UID SEARCH", _Collected(searching=True)
        )
        return sorted(got.search)

    async def noop(self) -> None:
        await self.command(b"NOOP", "NOOP")

    # -- the end --

    async def logout(self) -> None:
        """LOGOUT (never CLOSE: CLOSE expunges), then close; never raises."""
        if not self.broken:
            with trio.move_on_after(min(2.0, self.endpoint.timeout)):
                with contextlib.suppress(UpstreamError, CommandFailed):
                    await self.command(b"LOGOUT", "LOGOUT")
        await self.aclose()

    async def aclose(self) -> None:
        self.broken = True
        await trio.aclose_forcefully(self._stream)


async def _tls(tcp: trio.SocketStream, endpoint: Endpoint) -> trio.SSLStream[trio.SocketStream]:
    assert endpoint.ssl_context is not None
    stream = trio.SSLStream(tcp, endpoint.ssl_context, server_hostname=endpoint.host)
    try:
        with trio.fail_after(endpoint.timeout):
            await stream.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
        raise UpstreamError(f"TLS with {_where(endpoint)} failed: {_why(cause)}") from None
    return stream


_SIZE: Final = b"RFC822.SIZE"


def _sizes(guid: bool) -> bytes:
    return b"UID FETCH 1:* (UID RFC822.SIZE X-GUID)" if guid else b"UID FETCH 1:* (UID RFC822.SIZE)"


def _response_name(section: bytes) -> bytes:
    """``BODY.PEEK[HEADER]`` -> ``BODY[HEADER]``; ``BODY.PEEK[TEXT]<0.100>`` ->
    ``BODY[TEXT]<0>`` (the names the server answers with)."""
    name = section.upper().replace(b".PEEK", b"")
    lt = name.find(b"<")
    if lt >= 0:
        dot = name.find(b".", lt)
        if dot >= 0:
            name = name[:dot] + b">"
    return name


def _number(text: bytes, what: str) -> int:
    word = text.split(b" ", 1)[0]
    if not word.isdigit() or len(word) > 10:
        raise UpstreamError(f"bad {what} {word!r}")
    return int(word)


def _text(status: Status) -> str:
    return status.text.decode("utf-8", "replace")[:200]


def _where(endpoint: Endpoint) -> str:
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return f"{host}:{endpoint.port}"


def _why(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted ({exc.verify_message})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
