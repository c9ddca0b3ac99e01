"""What the sync and async clients share: the session logic, written once.

Every operation is a generator over the sans-I/O :class:`ClientConnection` that yields
I/O requests (:class:`Send`, :class:`Recv`, :class:`StartTLS`) and returns its result;
``pypop.client.Client`` drives it over a blocking socket and ``AsyncClient`` over an
AnyIO stream. So login, the TLS policy, mechanism choice, pipelining and the CFPOP
actions exist once, and both clients behave the same byte for byte.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pypop.auth.client import (
    CLIENT_MECHANISMS,
    ClientGssapi,
    ClientMechanism,
    ClientScramSha256,
    apop_digest,
    choose_mechanism,
)
from pypop.auth.kerberos import available as kerberos_available
from pypop.auth.prep import try_password, try_username
from pypop.errors import (
    AuthError,
    ClientError,
    CommandError,
    InUseError,
    LoginDelayError,
    NetworkError,
    NoSuchMessageError,
    ProtocolError,
    ServerTemporaryError,
    TLSRequiredError,
    UpdateError,
)
from pypop.protocol.client import Challenge, ClientConnection, Greeting, Reply
from pypop.protocol.commands import (
    Apop,
    Auth,
    Capa,
    Command,
    Dele,
    List,
    Noop,
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
)
from pypop.protocol.events import ConnectionClosed, NeedData
from pypop.protocol.replies import (
    ReplyLineError,
    StatusLine,
    parse_capabilities,
    parse_listing,
    parse_scan,
    parse_stat,
    parse_uid,
)

__all__ = [
    "Options",
    "Recv",
    "Send",
    "Session",
    "StartTLS",
    "TLSMode",
    "is_loopback",
    "make_ssl_context",
]

TLSMode = Literal["implicit", "require", "auto", "off"]

Op = Generator["Send | Recv | StartTLS", Any, Any]


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class Recv:
    pass


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Wrap the connection in TLS now; the driver returns the channel binding
    (``tls-unique`` on TLS 1.2) or None."""


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def make_ssl_context(cafile: str | Path | None = None, *, verify: bool = True) -> ssl.SSLContext:
    """A client context that verifies certificates and host names (TLS 1.2 at least)."""
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile is not None else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass(slots=True)
class Options:
    host: str
    port: int
    user: str | None
    password: str | None = field(repr=False)
    token: str | None = field(repr=False)
    auth: str
    tls: TLSMode
    pipelining: bool
    window: int
    utf8: bool = True
    """RFC 6856: send UTF8 when the server offers it (8-bit headers as stored)."""


def error_for(
    status: StatusLine, what: str, *, login: bool = False, message: bool = False
) -> ClientError:
    """The one exception type for a ``-ERR`` reply, by its response code."""
    kind: type[ClientError]
    match status.code:
        case "AUTH":
            kind = AuthError
        case "IN-USE":
            kind = InUseError
        case "LOGIN-DELAY":
            kind = LoginDelayError
        case "SYS/TEMP":
            kind = ServerTemporaryError
        case "UTF8":  # RFC 6856: the message needs UTF8 (it exists; .code says why)
            kind = CommandError
        case _ if login:
            kind = AuthError
        case _ if message:
            kind = NoSuchMessageError
        case _:
            kind = CommandError
    return kind(what, reply=status.text, code=status.code)


class Session:
    """One client session's logic over a :class:`ClientConnection`."""

    def __init__(self, opts: Options, *, tls_active: bool) -> None:
        self.opts = opts
        self.conn = ClientConnection(window=opts.window)
        self.tls_active = tls_active
        self.channel_binding: bytes | None = None
        self.greeting: Greeting | None = None
        self.capabilities: dict[str, list[str]] | None = None
        self.mechanism_used: str | None = None
        self.utf8 = False  # RFC 6856 UTF-8 mode is on
        self.logged_in = False
        self.closed = False

    # -- plumbing --

    def _next(self) -> Op:
        """The next event, flushing output only when we must wait for input (so a
        pipelined batch leaves in few writes)."""
        while True:
            try:
                event = self.conn.next_event()
            except ProtocolError:
                self.closed = True
                raise
            if isinstance(event, NeedData):
                out = self.conn.data_to_send()
                if out:
                    yield Send(out)
                data = yield Recv()
                self.conn.receive_data(data)
                continue
            if isinstance(event, ConnectionClosed):
                self.closed = True
                raise NetworkError("the server closed the connection")
            return event

    def _flush(self) -> Op:
        out = self.conn.data_to_send()
        if out:
            yield Send(out)

    def _reply(self) -> Op:
        event = yield from self._next()
        if not isinstance(event, Reply):
            raise ProtocolError(f"unexpected {type(event).__name__} from the server")
        return event

    def command(self, cmd: Command, what: str | None = None) -> Op:
        """Send one command and return its +OK :class:`Reply` (raise on -ERR)."""
        self.conn.send(cmd)
        reply: Reply = yield from self._reply()
        if not reply.status.ok:
            about_message = isinstance(cmd, Retr | Top | Dele) or (
                isinstance(cmd, List | Uidl) and cmd.msg is not None
            )
            what = what or f"{type(cmd).__name__.upper()} failed"
            raise error_for(reply.status, what, message=about_message)
        return reply

    def pipeline(self, cmds: Sequence[Command]) -> Op:
        """Send every command (pipelined when the server allows) and return the
        replies in order, -ERR ones included."""
        replies: list[Reply] = []
        for cmd in cmds:
            self.conn.send(cmd)
        while len(replies) < len(cmds):
            reply = yield from self._reply()
            replies.append(reply)
        return replies

    def stream(
        self, cmds: Iterable[Command]
    ) -> Generator[Send | Recv | StartTLS | Reply, Any, None]:
        """Like :meth:`pipeline`, but yields each :class:`Reply` as it completes
        (drivers hand those to the caller), keeping the window full."""
        pending = iter(cmds)
        outstanding = 0
        exhausted = False
        while True:
            while not exhausted and outstanding < self.opts.window * 2:
                cmd = next(pending, None)
                if cmd is None:
                    exhausted = True
                    break
                self.conn.send(cmd)
                outstanding += 1
            if outstanding == 0:
                return
            reply = yield from self._reply()
            outstanding -= 1
            yield reply

    # -- session start --

    def start(self) -> Op:
        """Greeting, CAPA, STLS by policy, login."""
        event = yield from self._next()
        if not isinstance(event, Greeting):
            raise ProtocolError("no greeting")
        self.greeting = event
        if not event.status.ok:
            raise error_for(event.status, "the server refused the connection")
        yield from self._capa()
        mode = self.opts.tls
        if not self.tls_active and mode in ("require", "auto"):
            offered = self.capabilities is not None and "STLS" in self.capabilities
            if offered or (mode == "require" and self.capabilities is None):
                self.conn.send(Stls())
                reply = yield from self._reply()
                if reply.status.ok:
                    self.channel_binding = yield StartTLS()
                    self.conn.tls_started()
                    self.tls_active = True
                    yield from self._capa()  # RFC 2595 §4: capabilities may change
            if mode == "require" and not self.tls_active:
                raise TLSRequiredError(
                    f"{self.opts.host} offers no TLS (no STLS): refusing to log in in the "
                    "clear; use pops:// (implicit TLS), or tls='off' to accept the risk"
                )
        if self.capabilities is not None and "PIPELINING" in self.capabilities:
            self.conn.pipelining = self.opts.pipelining
        if self.opts.utf8 and self.capabilities is not None and "UTF8" in self.capabilities:
            # RFC 6856: after STLS (never before it), before logging in.
            self.conn.send(Utf8())
            reply = yield from self._reply()
            self.utf8 = reply.status.ok
        yield from self._login()

    def _capa(self) -> Op:
        self.conn.send(Capa())
        reply = yield from self._reply()
        if reply.status.ok and reply.body is not None:
            try:
                self.capabilities = parse_capabilities(reply.body)
            except ReplyLineError as exc:
                raise ProtocolError(f"CAPA: {exc}") from None
        else:
            self.capabilities = None  # an RFC 1939-only server

    def _plaintext_ok(self) -> bool:
        return self.tls_active or self.opts.tls == "off" or is_loopback(self.opts.host)

    def _choose(self) -> str:
        caps = self.capabilities
        sasl = caps.get("SASL", []) if caps is not None else []
        timestamp = self.greeting.timestamp if self.greeting is not None else None
        want = self.opts.auth
        if want not in ("auto", "*"):
            return want
        if (
            self.opts.password is None
            and self.opts.token is None
            and "GSSAPI" in (m.upper() for m in sasl)
            and kerberos_available()
        ):
            return "GSSAPI"  # no secret given: the caller's Kerberos tickets
        secure = self._plaintext_ok()
        order = None
        if not secure:  # cleartext to a remote host, allowed by tls="auto": no secrets
            order = ("SCRAM-SHA-256", "CRAM-MD5", "+APOP")
        choice = choose_mechanism(
            sasl,
            apop=timestamp is not None,
            user_command=caps is None or "USER" in caps,
            channel_binding=self.channel_binding is not None,
            token=self.opts.token is not None,
            preference=order,
        )
        if choice is None:
            offered = " ".join(sasl) or "none"
            raise AuthError(f"no authentication method in common with the server (SASL: {offered})")
        return choice

    def _login(self) -> Op:
        opts = self.opts
        method = self._choose()
        self.mechanism_used = method
        if method == "GSSAPI":
            # The principal comes from the credential cache; a user name, if given,
            # is the authorization identity.
            yield from self._sasl(method, opts.user or "", "")
            self.logged_in = True
            return
        if opts.user is None:
            raise AuthError("no user name given (in the URL, the arguments or ~/.netrc)")
        secret = opts.token if opts.token is not None else opts.password
        if secret is None:
            raise AuthError(
                f"no {'token' if method in ('OAUTHBEARER', 'XOAUTH2') else 'password'} given"
            )
        plaintext = method in ("USER",) or (
            method in CLIENT_MECHANISMS and CLIENT_MECHANISMS[method].plaintext
        )
        if plaintext and not self._plaintext_ok():
            raise TLSRequiredError(
                f"{method} would send the secret in the clear to {opts.host}; "
                "use TLS, or tls='off' to accept the risk"
            )
        # RFC 6856 / RFC 8265: UTF-8 names and passwords prepared as the server does.
        user = try_username(opts.user) or opts.user
        if opts.token is None:
            secret = try_password(secret) or secret
        if method == "USER":
            replies = yield from self.pipeline([User(user), Pass(secret)])
            for reply in replies:
                if not reply.status.ok:
                    raise error_for(reply.status, "login failed", login=True)
        elif method == "+APOP":
            timestamp = self.greeting.timestamp if self.greeting else None
            if timestamp is None:
                raise AuthError("the server's greeting has no APOP timestamp")
            digest = apop_digest(timestamp, secret)
            yield from self.command(Apop(user, digest), "APOP login failed")
        else:
            yield from self._sasl(method, user, secret)
        self.logged_in = True

    def _sasl(self, name: str, user: str, secret: str) -> Op:
        cls = CLIENT_MECHANISMS.get(name)
        if cls is None:
            raise AuthError(f"unsupported authentication mechanism {name!r}")
        mech: ClientMechanism
        if issubclass(cls, ClientScramSha256):
            if name.endswith("-PLUS") and self.channel_binding is None:
                raise AuthError(f"{name} needs TLS 1.2 channel binding, not available here")
            mech = cls(user, secret, channel_binding=self.channel_binding)
        elif cls is ClientGssapi:
            mech = ClientGssapi(user, host=self.opts.host)
        else:
            mech = cls(user, secret)
        initial = mech.initial()
        cmd = Auth(name, initial)
        pending_initial = None
        try:
            self.conn.send(cmd)
        except ValueError:  # the initial response does not fit the 255-octet line
            pending_initial = initial
            self.conn.send(Auth(name, None))
        while True:
            event = yield from self._next()
            if isinstance(event, Challenge):
                if pending_initial is not None and not event.data:
                    answer, pending_initial = pending_initial, None
                else:
                    try:
                        answer = mech.step(event.data)
                    except ClientError:
                        self.conn.send_sasl(None)  # cancel, then read the -ERR
                        yield from self._flush()
                        yield from self._next()
                        raise
                self.conn.send_sasl(answer)
                continue
            if not isinstance(event, Reply):
                raise ProtocolError("unexpected event during AUTH")
            if not event.status.ok:
                err = error_for(event.status, f"{name} login failed", login=True)
                detail = mech.failure_detail()
                if detail:
                    err.args = (f"{name} login failed ({detail})",)
                raise err
            mech.finish()
            return

    # -- transaction --

    def stat(self) -> Op:
        reply = yield from self.command(Stat())
        try:
            return parse_stat(reply.status.text)
        except ReplyLineError as exc:
            raise ProtocolError(f"STAT: {exc}") from None

    def list(self, msg: int | None = None) -> Op:
        reply = yield from self.command(List(msg), f"LIST {msg or ''}".strip() + " failed")
        try:
            if msg is not None:
                return dict([parse_scan(reply.status.text)])
            return dict(parse_listing(reply.body or b"", uid=False))
        except ReplyLineError as exc:
            raise ProtocolError(f"LIST: {exc}") from None

    def uidl(self, msg: int | None = None) -> Op:
        reply = yield from self.command(Uidl(msg), f"UIDL {msg or ''}".strip() + " failed")
        try:
            if msg is not None:
                return dict([parse_uid(reply.status.text)])
            return dict(parse_listing(reply.body or b"", uid=True))
        except ReplyLineError as exc:
            raise ProtocolError(f"UIDL: {exc}") from None

    def retr(self, msg: int) -> Op:
        reply = yield from self.command(Retr(msg), f"RETR {msg} failed")
        return reply.body or b""

    def top(self, msg: int, lines: int) -> Op:
        reply = yield from self.command(Top(msg, lines), f"TOP {msg} {lines} failed")
        return reply.body or b""

    def dele(self, msg: int) -> Op:
        yield from self.command(Dele(msg), f"DELE {msg} failed")

    def noop(self) -> Op:
        yield from self.command(Noop())

    def rset(self) -> Op:
        yield from self.command(Rset())

    def quit(self) -> Op:
        """QUIT; raise :class:`UpdateError` unless the server answers +OK (RFC 1939 §6)."""
        if self.closed:
            return
        self.conn.send(Quit())
        try:
            reply = yield from self._reply()
        except NetworkError as exc:
            raise UpdateError(f"no reply to QUIT ({exc}): deletions are not confirmed") from None
        finally:
            self.closed = True
        if not reply.status.ok:
            raise UpdateError(
                "QUIT failed: deleted messages may not have been removed",
                reply=reply.status.text,
                code=reply.status.code,
            )

    def has_top(self) -> bool:
        return self.capabilities is None or "TOP" in self.capabilities


def no_such(msg: int, reply: Reply) -> NoSuchMessageError:
    return NoSuchMessageError(f"message {msg}", reply=reply.status.text, code=reply.status.code)


# --------------------------------------------------------------------------- CFPOP


@dataclass(slots=True)
class Result:
    """Rows of a CFPOP action, and what could not be found. Iterates over the rows."""

    rows: list[Any] = field(default_factory=list)
    unknown_messages: list[int] = field(default_factory=list)
    unknown_uids: list[str] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)
    needs_utf8: list[int] = field(default_factory=list)
    """Messages the server keeps from a session without UTF8 (RFC 6856 ``-ERR
    [UTF8]``: 8-bit headers); they exist, unlike ``unknown_messages``."""

    def __iter__(self) -> Any:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        return self.rows[index]


@dataclass(frozen=True, slots=True)
class Target:
    number: int
    uid: str | None
    size: int | None


def _dedupe(items: Iterable[Any]) -> list[Any]:
    seen: set[Any] = set()
    out = []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def select(
    session: Session,
    messages: Sequence[int] | None,
    uids: Sequence[str] | None,
    start_row: int = 1,
    max_rows: int | None = None,
) -> Op:
    """Resolve a CFPOP selection with one LIST and one UIDL (pipelined): the targets,
    unknown numbers and unknown UIDs. ``uids`` win over ``messages``, as in CFPOP."""
    if start_row < 1:
        raise ValueError("start_row counts from 1")
    if max_rows is not None and max_rows < 0:
        raise ValueError("max_rows must not be negative")
    listing, uidl = yield from session.pipeline([List(None), Uidl(None)])
    if not listing.status.ok:
        raise error_for(listing.status, "LIST failed")
    try:
        sizes: dict[int, int] = dict(parse_listing(listing.body or b"", uid=False))  # type: ignore[arg-type]
        by_number: dict[int, str] = (
            dict(parse_listing(uidl.body or b"", uid=True))  # type: ignore[arg-type]
            if uidl.status.ok
            else {}
        )
    except ReplyLineError as exc:
        raise ProtocolError(f"LIST/UIDL: {exc}") from None
    result = Result()
    numbers: list[int]
    if uids is not None:
        if not uidl.status.ok:
            raise error_for(uidl.status, "the server has no UIDL; select by message number")
        by_uid = {uid: num for num, uid in by_number.items()}
        numbers = []
        for uid in _dedupe(uids):
            if uid in by_uid:
                numbers.append(by_uid[uid])
            else:
                result.unknown_uids.append(uid)
    elif messages is not None:
        numbers = []
        for num in _dedupe(messages):
            if num in sizes:
                numbers.append(num)
            else:
                result.unknown_messages.append(num)
    else:
        numbers = sorted(sizes)
    numbers = numbers[start_row - 1 :]
    if max_rows is not None:
        numbers = numbers[:max_rows]
    targets = [Target(n, by_number.get(n), sizes.get(n)) for n in numbers]
    return targets, result


def fetch(session: Session, targets: Sequence[Target], *, headers_only: bool) -> Op:
    """The messages of ``targets``: pipelined ``TOP n 0`` (RETR when there is no TOP),
    or RETR. Returns ``[(target, octets or None for -ERR, the -ERR's response code)]``;
    headers only when asked."""
    from pypop.client.rows import header_block

    use_top = headers_only and session.has_top()
    cmds: list[Command] = [Top(t.number, 0) if use_top else Retr(t.number) for t in targets]
    replies = yield from session.pipeline(cmds)
    if use_top and session.capabilities is None and replies and not replies[0].status.ok:
        replies = yield from session.pipeline([Retr(t.number) for t in targets])
        use_top = False
    fetched: list[tuple[Target, bytes | None, str | None]] = []
    for target, reply in zip(targets, replies, strict=True):
        raw = reply.body or b"" if reply.status.ok else None
        if raw is not None and headers_only and not use_top:
            raw = header_block(raw)
        fetched.append((target, raw, reply.status.code))
    return fetched


def make_rows(
    fetched: Sequence[tuple[Target, bytes | None, str | None]],
    result: Result,
    *,
    headers_only: bool,
    attachment_path: str | Path | None,
    unique_filenames: bool,
) -> Result:
    """Parse fetched messages into CFPOP rows, saving attachments. CPU and file work,
    no network: the async client runs it in a worker thread."""
    from pypop.client.rows import build_row

    for target, raw, code in fetched:
        if raw is None:
            if code == "UTF8":
                result.needs_utf8.append(target.number)
            else:
                result.unknown_messages.append(target.number)
            continue
        result.rows.append(
            build_row(
                target.number,
                target.uid,
                raw,
                size=target.size,
                headers_only=headers_only,
                attachment_path=attachment_path,
                unique_filenames=unique_filenames,
            )
        )
    return result


def delete(session: Session, targets: Sequence[Target], result: Result) -> Op:
    """DELE every target (pipelined), then QUIT; :class:`UpdateError` unless +OK."""
    replies = yield from session.pipeline([Dele(t.number) for t in targets])
    for target, reply in zip(targets, replies, strict=True):
        if reply.status.ok:
            result.deleted.append(target.number)
        else:
            result.unknown_messages.append(target.number)
    yield from session.quit()
    return result
