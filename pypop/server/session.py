"""One connection: a :class:`ServerConnection` driven over a Trio stream.

The protocol object decides; this module only does the I/O it asks for: reading,
writing (one ``send_all`` per batch of replies), authenticating, opening the maildrop,
streaming message bodies through the dot-stuffer, STLS and UPDATE.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio

from pypop.auth import (
    AuthPenalty,
    CredentialStore,
    LoginDelay,
    PerClientLimiter,
    SaslChallenge,
    SaslContext,
    SaslMechanism,
    SaslSuccess,
    TokenVerifier,
    available_mechanisms,
    create_mechanism,
    verify_apop,
)
from pypop.auth.kerberos import GssapiSettings
from pypop.auth.prep import try_password, try_username
from pypop.auth.userdb import DEFAULT as DEFAULT_POLICY
from pypop.auth.userdb import UserPolicy, allowed_from
from pypop.backend import Account, Backend, Mailbox, SelfAuthenticating
from pypop.errors import (
    AuthFailed,
    MailboxLocked,
    NoSuchMessage,
    PermanentFailure,
    TemporaryFailure,
    UpdateFailed,
)
from pypop.protocol import (
    NEED_DATA,
    SEND_DATA,
    ApopLogin,
    Closing,
    ConnectionClosed,
    LocalProtocolError,
    PasswordLogin,
    ProtocolConfig,
    Retrieve,
    SaslAborted,
    SaslResponse,
    SaslStart,
    ServerConnection,
    StartTLS,
    Text,
    Update,
)
from pypop.protocol.server import NO_CAPABILITIES
from pypop.server import metrics, sessionlog
from pypop.server.anvil import Limits, LocalLimits
from pypop.server.intl import HeaderCheck, wire_header_is_ascii
from pypop.server.limits import ConnectionLimits
from pypop.server.listeners import JOIN_BELOW, Peer, SocketStream
from pypop.server.logins import Hold, MaildropHolders, describe, log_failed_login
from pypop.server.passthrough import Passthrough
from pypop.server.sessionlog import session_line
from pypop.server.tls import TLSStream
from pypop.wire import DotStuffer, make_challenge

if TYPE_CHECKING:
    from pypop.protocol import Event

__all__ = ["Session", "SessionContext"]

log = logging.getLogger("pypop.session")
_SIZE: Final = operator.attrgetter("size")
_UID: Final = operator.attrgetter("uid")
expire_log = logging.getLogger("pypop.expire")

RECV_SIZE: Final = 65536
# A message being streamed is sent once this much of it is queued: bounds memory per
# session (pipelined replies: the engine's SEND_DATA). As large as Maildir's 1 MiB
# blocks, so that a backend's smaller blocks (SQLite's 256 KiB chunks) leave in one
# gathered write, not one each: 7-19% more MB/s for SQLite's 1 MiB RETR.
FLUSH_AT: Final = 1 << 20


class _AtOnce:
    """Stands for UPDATE's cancel scope where nothing in UPDATE waits."""

    __slots__ = ("deadline",)
    cancel_called: Final = False
    cancelled_caught: Final = False

    def __init__(self) -> None:
        self.deadline = math.inf

    def __enter__(self) -> _AtOnce:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _SessionEnd(Exception):
    """Leave the session now (peer gone, stream broken, body cut off)."""


@dataclass
class SessionContext:
    """What every session of one server shares."""

    backend: Backend
    store: CredentialStore
    protocol: ProtocolConfig
    hostname: str
    greeting: str | None = None
    idle_timeout: float = 600.0
    # A command line must arrive complete within this many seconds of its first octet
    # (a drip-fed line would otherwise hold its slot: every octet resets idle_timeout).
    line_timeout: float = 60.0
    maildrops: MaildropHolders = field(default_factory=lambda: MaildropHolders(1.0))
    apop: bool = False
    allow_plaintext: bool = False
    ssl_context: ssl.SSLContext | None = None
    mechanisms: tuple[str, ...] = ()
    token_verifier: TokenVerifier | None = None
    penalty: AuthPenalty = field(default_factory=AuthPenalty)
    per_client: PerClientLimiter = field(default_factory=PerClientLimiter)
    login_delay: LoginDelay | None = None
    hash_limiter: trio.CapacityLimiter | None = None
    salt_key: bytes | None = None  # the server secret (pypop.auth.secret)
    gssapi: GssapiSettings | None = None  # auth.gssapi_keytab (pypop.auth.kerberos)
    # UPDATE (EXPIRE and the commit) must end within this many seconds: a backend that
    # hangs there cannot keep the session, shielded from shutdown, for ever.
    update_timeout: float = 60.0
    # The run's clock (trio.current_time is three Python calls): the server sets its
    # clock's own method when it starts serving.
    now: Callable[[], float] = trio.current_time
    mechanism_cache: dict[tuple[object, ...], tuple[list[str], list[str]]] = field(
        default_factory=dict
    )
    # RFC 6856: what a client that never sent UTF8 gets for a message with 8-bit
    # header octets: "refuse" (-ERR [UTF8]) or "send" (as stored; the operator's call).
    utf8_headers: str = "refuse"
    # EXPIRE enforced at UPDATE, days (None: never; 0: what was retrieved); a
    # passwd-file "expire=" overrides it per user. From the backend's expire_days.
    expire_days: int | None = None
    # The backend itself when it checks credentials (pypop.server.passthrough).
    passthrough: SelfAuthenticating | None = None
    # Connection caps, penalty and auth slots as the whole server sees them: the
    # anvil's (pypop.server.anvil) with several workers; else ``penalty`` and
    # ``per_client`` above, with ``connections``.
    limits: Limits | None = None
    connections: ConnectionLimits | None = None

    def __post_init__(self) -> None:
        if self.connections is None:
            self.connections = ConnectionLimits(1000, 50)
        if self.limits is None:
            self.limits = LocalLimits(self.connections, self.penalty, self.per_client)

    @property
    def guard(self) -> Limits:
        assert self.limits is not None
        return self.limits


class Session:
    def __init__(
        self,
        ctx: SessionContext,
        stream: trio.abc.Stream,
        peer: Peer,
        *,
        tls: bool = False,
        loopback: bool = False,
    ) -> None:
        self.ctx = ctx
        self.stream = stream
        self.peer = peer
        self.tls = tls
        self.loopback = loopback
        timestamp = make_challenge(ctx.hostname).encode("ascii") if ctx.apop else None
        self.conn = ServerConnection(
            ctx.protocol,
            tls_active=tls,
            plaintext_allowed=self._plaintext_allowed(tls),
            apop_timestamp=timestamp,
        )
        self.mailbox: Mailbox | None = None
        self.user: str | None = None
        self.policy: UserPolicy | None = None
        self.deleted = 0
        self.end = "?"
        self._sasl: SaslMechanism | None = None
        self._sasl_user: str | None = None  # success data sent as a final challenge
        self._sasl_paid = 0.0  # penalty seconds this SASL exchange has waited
        self._released: Hold | None = None  # let go when our maildrop lock is gone
        self._login_started: float | None = None  # for the login latency histogram
        self._retr_seconds = metrics.HistogramBatch(metrics.RETR_SECONDS)
        self._idle = trio.CancelScope()
        self._idle_until = math.inf  # its deadline, set by run()
        self._line_deadline = math.inf  # for the partial command line, if any
        self._line_mark = -1
        # Plain TCP gets the wait-first read; plain TCP and TLS the gathered write.
        # (The streams themselves, not their bound methods: fewer objects per session.)
        self._plain: SocketStream | None = stream if isinstance(stream, SocketStream) else None
        self._gathered: SocketStream | TLSStream | None = (
            stream if isinstance(stream, (SocketStream, TLSStream)) else None
        )
        self._wire: Callable[[int, int | None], bytes | None] | None = None
        # A self-authenticating backend checks logins (pypop.server.passthrough).
        self._passthrough: Passthrough | None = None
        if ctx.passthrough is not None:
            self._passthrough = Passthrough(ctx.passthrough, peer.host)
        self._update_mechanisms()
        self.conn.per_user = getattr(ctx.store, "per_user_capabilities", NO_CAPABILITIES)

    def _plaintext_allowed(self, tls: bool) -> bool:
        # RFC 2595 §3 / RFC 8314: no cleartext passwords outside TLS unless the admin
        # says so; loopback never leaves the host.
        return tls or self.loopback or self.ctx.allow_plaintext

    def _channel_binding(self) -> bytes | None:
        if (
            self.tls
            and isinstance(self.stream, TLSStream)
            and self.stream.version() in ("TLSv1.2", "TLSv1.1", "TLSv1")
        ):
            # tls-unique is defined up to TLS 1.2 only (RFC 9266 §3: MUST NOT be used
            # with TLS 1.3, whose tls-exporter the ssl module cannot produce): TLS 1.3
            # gets no -PLUS. (Python returns a Finished message for 1.3 as well.)
            binding: bytes | None = self.stream.get_channel_binding("tls-unique")
            return binding
        return None

    def _sasl_store(self) -> CredentialStore:
        return self.ctx.store if self._passthrough is None else self._passthrough

    def _sasl_context(self) -> SaslContext:
        store = self._sasl_store()
        verifier = self.ctx.token_verifier
        if self._passthrough is not None:
            verifier = self._passthrough if self._passthrough.bearer else None
        return SaslContext(
            store=store,
            hostname=self.ctx.hostname,
            tls_active=self.tls,
            token_verifier=verifier,
            channel_binding=self._channel_binding(),
            hash_limiter=self.ctx.hash_limiter,
            salt_key=self.ctx.salt_key,
            gssapi=self.ctx.gssapi,
        )

    def _update_mechanisms(self) -> None:
        """Tell the protocol which SASL mechanisms CAPA and AUTH may offer now."""
        plain = self.conn.plaintext_allowed
        binding = self._channel_binding()
        # The answer depends on nothing per-connection but these three facts and
        # what the store holds (a reload may change it), so sessions share it (it is
        # computed on every accept otherwise, and the context only when it is).
        schemes = getattr(self._sasl_store(), "stored_schemes", None)
        key = (self.tls, plain, binding is not None, schemes)
        cached = self.ctx.mechanism_cache.get(key)
        if cached is None:
            ctx = self._sasl_context()
            enabled = self.ctx.mechanisms
            usable = available_mechanisms(ctx, enabled, allow_plaintext=plain)
            everything = available_mechanisms(
                dataclasses.replace(ctx, tls_active=True), enabled, allow_plaintext=True
            )
            cached = (usable, [m for m in everything if m not in usable])
            self.ctx.mechanism_cache[key] = cached
        self.conn.sasl_usable, self.conn.sasl_refused_plaintext = cached

    # -- I/O --

    def _touch(self) -> None:
        """Push the inactivity deadline forward (RFC 1939 §3: any command resets it).

        One cancel scope per session instead of one per read and write; the deadline
        moves at most once a second and lands 0-1 s past the configured time, never
        before it."""
        ctx = self.ctx
        deadline = ctx.now() + ctx.idle_timeout
        if deadline > self._idle_until:  # (the scope's deadline is a Python property)
            self._idle_until = deadline + 1.0
            self._idle.deadline = self._idle_until

    async def _flush(self) -> bool:
        """Send what is queued; False if there was nothing."""
        conn = self.conn
        if not conn.pending_output:
            return False
        self._touch()
        try:
            if self._gathered is not None and conn.pending_output >= JOIN_BELOW:
                # A large reply leaves without being joined to its +OK line (a copy).
                await self._gathered.send_many(conn.take_output())
            else:
                await self.stream.send_all(conn.data_to_send())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _SessionEnd("send failed") from exc
        return True

    def _watch_line(self) -> None:
        """Start the clock for a command line that has begun but not ended; a line
        that ended since (the engine counted it) restarts it."""
        conn = self.conn
        if not conn.partial_line:
            self._line_deadline = math.inf
        elif self._line_deadline == math.inf or conn.commands != self._line_mark:
            self._line_deadline = self.ctx.now() + self.ctx.line_timeout
            self._line_mark = conn.commands

    # -- the loop --

    async def run(self) -> None:
        started = time.monotonic()
        self.conn.greeting(self.ctx.greeting)
        self._idle_until = self.ctx.now() + self.ctx.idle_timeout + 1.0
        self._idle.deadline = self._idle_until
        try:
            with self._idle:
                await self._loop()
            if self._idle.cancelled_caught:
                # §3: autologout without UPDATE and without a response.
                self.end = "autologout"
        except _SessionEnd as exc:
            self.end = str(exc)
        except trio.Cancelled:
            self.end = "shutdown"  # the server is stopping at once
            raise
        except BaseException:
            self.end = "error"
            raise
        finally:
            if self._passthrough is not None:
                await self._passthrough.discard()
            if self.mailbox is not None:
                # Never UPDATE here: only a QUIT in TRANSACTION commits (RFC 1939 §6).
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    try:
                        await self.mailbox.aclose()
                    except Exception:
                        log.exception("backend failed to release %s's maildrop", self.user)
            self._let_go()
            conn = self.conn
            metrics.session_done(conn.verbs, conn.commands, conn.sent_octets)
            # RETRs the engine answered from the wire source took no measurable time.
            self._retr_seconds.observe_many(0.0, conn.quick_retrievals)
            self._retr_seconds.flush(sessionlog.batch())
            # The line, and the amounts above: under load, in batches
            # (pypop.server.sessionlog says why).
            session_line(
                (
                    self.peer,
                    self.user or "-",
                    conn.commands,
                    conn.retrieved,
                    conn.retrieved_octets,
                    self.deleted,
                    time.monotonic() - started,
                    self.end,
                )
            )

    async def _loop(self) -> None:
        conn = self.conn
        while True:
            event: Event = conn.next_event()
            if event is NEED_DATA:
                replied = await self._flush()
                if self._line_deadline != math.inf or conn.partial_line:
                    self._watch_line()
                if not replied:
                    # (A reply touched it before its send, after the command: §3's
                    # timer runs from the last command, so that suffices.)
                    self._touch()
                # Read here, not in a helper coroutine: one frame less per idle
                # session, one coroutine less per command.
                data: bytes | bytearray = b""  # b"": end of input
                try:
                    if self._line_deadline != math.inf:
                        with trio.move_on_at(self._line_deadline) as cs:
                            data = await self.stream.receive_some(RECV_SIZE)
                        if cs.cancelled_caught:
                            # Like the §3 autologout: no UPDATE, no response.
                            raise _SessionEnd("line timeout")
                    elif replied and self._plain is not None:
                        # We just replied: the next command is most likely not
                        # there yet, so wait for readiness before reading.
                        data = await self._plain.receive_after_reply(RECV_SIZE)
                    else:
                        data = await self.stream.receive_some(RECV_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                conn.receive_data(data)  # (it takes a bytearray too)
                continue
            if event is SEND_DATA:
                # Backpressure: nothing more is read or answered until the peer has
                # taken these replies. Then let the other sessions run: a send that
                # completes at once does not yield, and a peer that pipelines
                # without end would otherwise hold the event loop.
                await self._flush()
                await trio.lowlevel.cancel_shielded_checkpoint()
                continue
            if isinstance(event, ConnectionClosed):
                self.end = "disconnected"
                return
            if isinstance(event, Closing):
                await self._flush()
                self.end = event.reason
                return
            closing = await self._dispatch(event)
            if closing is not None:
                await self._flush()
                self.end = closing.reason
                return

    async def _dispatch(self, event: Event) -> Closing | None:
        match event:
            case Retrieve():
                # Timed here, not in a wrapper coroutine: RETR is the hot path.
                started = time.monotonic()
                try:
                    await self._retrieve_message(event)
                finally:
                    if event.top_lines is None:
                        self._retr_seconds.observe(time.monotonic() - started)
            case PasswordLogin(user=raw_user, password=raw_password):
                # RFC 6856 §2 / RFC 8265: UTF-8 names and passwords are prepared
                # first (as SASL PLAIN's are, RFC 4616), for the store and for a
                # passthrough's upstream alike; one PRECIS refuses fails like a wrong
                # password, at the same cost (the verification still runs).
                store = self.ctx.store if self._passthrough is None else self._passthrough
                prepared_user = try_username(raw_user)
                password = try_password(raw_password)
                user = prepared_user or raw_user
                usable = prepared_user is not None and password is not None

                async def verify() -> bool:
                    ok = await store.verify_password(user, password or raw_password)
                    return ok and usable

                return await self._login("USER", user, verify, raw_password)
            case ApopLogin(user=raw_user, digest=digest, timestamp=timestamp):
                store = self.ctx.store
                user = try_username(raw_user) or raw_user
                return await self._login(
                    "APOP", user, lambda: verify_apop(store, user, timestamp, digest), digest
                )
            case StartTLS():
                await self._start_tls()
            case Update(deleted=deleted):
                return await self._update(deleted)
            case SaslStart() | SaslResponse() | SaslAborted():
                return await self._sasl_event(event)
        return None

    # -- login --

    async def _login(
        self, method: str, user: str, verify: Callable[[], Awaitable[bool]], secret: str | bytes
    ) -> Closing | None:
        """USER/PASS and APOP: penalty, verification, then the maildrop."""
        self._login_started = time.monotonic()
        async with self.ctx.guard.auth(self.peer.host) as wait:
            # The penalty is served before verifying, so parallel connections from
            # one client learn nothing sooner (Dovecot's anvil does the same).
            await self._penalty(wait)
            try:
                ok = await verify()
            except Exception as exc:
                return self._server_failure(method, user, exc, "SYS/TEMP", Text.AUTH_TEMPORARY)
        if not ok:
            return await self._auth_failed(method, user, secret)
        self.ctx.guard.success(self.peer.host)
        return await self._open(method, user)

    async def _penalty(self, wait: float) -> None:
        # No penalty, no checkpoint: a login yields where it waits (a busy client's
        # slot, the store, the backend), and a schedule point more costs a scheduler
        # round trip per login.
        if wait > 0:
            metrics.PENALTIES.inc()
            metrics.PENALTY_SECONDS.inc(wait)
            await trio.sleep(wait)

    def _login_done(self, method: str, result: str) -> None:
        started, self._login_started = self._login_started, None
        metrics.login(method, result, None if started is None else time.monotonic() - started)

    async def _auth_failed(
        self,
        method: str,
        user: str | None,
        secret: str | bytes | None,
        reason: str = "credentials",
        text: Text = Text.AUTH_FAILED,
    ) -> Closing | None:
        """A failure the client caused: logged, penalised per client, counted."""
        log_failed_login(user, method, self.peer.host, reason)
        self._login_done(method, reason)
        await trio.sleep(await self.ctx.guard.failure(self.peer.host, user, secret))
        code = "AUTH" if reason in ("credentials", "network") else None
        return self.conn.login_failed(code, text)

    def _server_failure(
        self, method: str, user: str | None, exc: BaseException, code: str, text: Text
    ) -> Closing | None:
        """A store or backend failure: the cause goes to the log, the client gets only
        the response code; an unexpected exception type is a bug (traceback)."""
        if not isinstance(exc, TemporaryFailure | PermanentFailure):
            log.error("unexpected %s (a bug)", type(exc).__name__, exc_info=exc)
        reason = "permanent" if code == "SYS/PERM" else "temporary"
        log_failed_login(user, method, self.peer.host, reason, describe(exc))
        metrics.BACKEND_ERRORS.labels(type(exc).__name__).inc()
        self._login_done(method, reason)
        return self.conn.login_failed(code, text)

    async def _user_policy(self, method: str, user: str) -> UserPolicy | Closing | None:
        """The user database's policy for ``user`` (None: the defaults), or the
        failure that ends this login (a store error)."""
        lookup = getattr(self.ctx.store, "user_policy", None)
        if lookup is None:
            return None
        try:
            policy: UserPolicy | None = await lookup(user)
        except Exception as exc:
            return self._server_failure(method, user, exc, "SYS/TEMP", Text.AUTH_TEMPORARY)
        return policy

    async def _open(self, method: str, user: str) -> Closing | None:
        """§4: per-user policies, then lock and snapshot the maildrop, then
        TRANSACTION. Every way of logging in ends here, after the credentials (or
        the Kerberos ticket) were verified."""
        conn = self.conn
        found = await self._user_policy(method, user)
        if isinstance(found, Closing):
            return found
        policy = found if found is not None else DEFAULT_POLICY
        if not allowed_from(policy, self.peer.host):
            # Dovecot's allow_nets: fails the way a wrong password does.
            if self._passthrough is not None:
                await self._passthrough.discard()
            return await self._auth_failed(method, user, None, "network")
        if policy.nologin:
            # Only now, with the password verified, does the client learn why.
            if self._passthrough is not None:
                await self._passthrough.discard()
            log_failed_login(user, method, self.peer.host, "disabled")
            return conn.login_failed("SYS/PERM", policy.reason or Text.ACCOUNT_DISABLED)
        if self.ctx.login_delay is not None and (
            self.ctx.login_delay.try_login(user, policy.login_delay) > 0
        ):
            # RFC 2449 §8.1.1
            if self._passthrough is not None:
                await self._passthrough.discard()
            log_failed_login(user, method, self.peer.host, "login-delay")
            self._login_done(method, "login-delay")
            return conn.login_failed("LOGIN-DELAY", Text.LOGIN_DELAY)
        account = Account(user, policy.home, policy.mail, policy.uid)
        try:
            if self._passthrough is None:
                mailbox = await self.ctx.maildrops.open(self.ctx.backend, user, account)
            else:
                # A passthrough's check has opened the maildrop already (it opens
                # again only while waiting for a lock); the upstream decides where.
                mailbox = await self.ctx.maildrops.open(self._passthrough, user)
        except MailboxLocked:
            log_failed_login(user, method, self.peer.host, "in-use")
            self._login_done(method, "in-use")
            return conn.login_failed("IN-USE", Text.IN_USE)
        except AuthFailed:
            return await self._auth_failed(method, user, None)
        except PermanentFailure as exc:
            return self._server_failure(method, user, exc, "SYS/PERM", Text.MAILBOX_PERMANENT)
        except Exception as exc:
            return self._server_failure(method, user, exc, "SYS/TEMP", Text.MAILBOX_TEMPORARY)
        self._released = self.ctx.maildrops.hold(user)
        self.mailbox, self.user, self.policy = mailbox, user, policy
        # getattr, not isinstance: a runtime Protocol check costs more than the login.
        wire: Callable[[int, int | None], bytes | None] | None = getattr(
            mailbox, "wire_message", None
        )
        self._wire = wire
        # RETR and TOP of what it holds are answered by the engine, without an event.
        conn.serve_from(wire, refuse_8bit=self.ctx.utf8_headers == "refuse")
        messages = mailbox.messages
        conn.login_succeeded(
            user,
            # map with attrgetter: a C loop (a comprehension was 50 ns a message each).
            list(map(_SIZE, messages)),
            list(map(_UID, messages)),
            expire=policy.expire_capa,
            login_delay=policy.login_delay,
        )
        self._login_done(method, "ok")
        return None

    # -- SASL (RFC 5034) --

    async def _sasl_event(self, event: SaslStart | SaslResponse | SaslAborted) -> Closing | None:
        mech = self._sasl
        method = (
            event.mechanism if isinstance(event, SaslStart) else (mech.name if mech else "SASL")
        )
        if isinstance(event, SaslAborted):
            # "*", bad base64, an overlong line: a failed attempt like any other (it
            # must cost what a wrong password costs, or SCRAM salts are free to probe).
            user = self._sasl_user or (mech.attempted_user if mech else None)
            self._sasl = None
            self._sasl_user = None
            reason = "cancelled" if event.text is Text.AUTH_CANCELLED else "malformed"
            return await self._auth_failed(method, user, None, reason, event.text)
        if self._sasl_user is not None:
            # RFC 5034 §4: "POP3 does not allow for additional data to be sent with a
            # message indicating a successful outcome" (RFC 4422 §3.6). So the
            # mechanism's success data (SCRAM's v=) went out as a final "+ " challenge,
            # and the client answers it with an empty line before the +OK (the
            # DIGEST-MD5 rspauth example in RFC 5034 §6). Anything else fails.
            user, self._sasl_user, self._sasl = self._sasl_user, None, None
            if not isinstance(event, SaslResponse) or event.data:
                return await self._auth_failed(method, user, None)
            self.ctx.guard.success(self.peer.host)
            return await self._open(method, user)
        if isinstance(event, SaslStart):
            self._login_started = time.monotonic()
            if self._passthrough is not None:
                self._passthrough.mechanism = event.mechanism
            mech = create_mechanism(
                event.mechanism,
                self._sasl_context(),
                self.ctx.mechanisms,
                allow_plaintext=self.conn.plaintext_allowed,
            )
            if mech is None:
                return await self._auth_failed(method, None, None)
            self._sasl = mech
            async with self.ctx.guard.auth(self.peer.host) as wait:
                await self._penalty(wait)
                self._sasl_paid = wait
                result = await mech.step(event.initial)
        else:
            if mech is None:
                return await self._auth_failed(method, None, None)
            async with self.ctx.guard.auth(self.peer.host) as wait:
                # An exchange pays its IP's penalty once, but as it stands when the
                # secret comes: one opened while the record was clean, and answered
                # after failures elsewhere, waits the difference (as a late PASS does).
                if wait > self._sasl_paid:
                    await self._penalty(wait - self._sasl_paid)
                    self._sasl_paid = wait
                result = await mech.step(event.data)
        if isinstance(result, SaslChallenge):
            return await self._challenge(mech, result.data)
        if isinstance(result, SaslSuccess):
            if result.data:
                self._sasl_user = result.user
                return await self._challenge(mech, result.data)
            self._sasl = None
            self.ctx.guard.success(self.peer.host)
            return await self._open(method, result.user)
        self._sasl = None
        if result.code == "AUTH":
            return await self._auth_failed(method, mech.attempted_user, mech.attempted_secret)
        cause = result.error or TemporaryFailure("credential store unavailable")
        return self._server_failure(method, mech.attempted_user, cause, result.code, result.text)

    async def _challenge(self, mech: SaslMechanism, data: bytes) -> Closing | None:
        try:
            self.conn.sasl_challenge(data)
        except LocalProtocolError:
            # Mechanisms bound what a peer can make them echo; should one still
            # produce an oversized challenge, the exchange fails, without a traceback.
            log.error("SASL %s produced a challenge over 512 octets", mech.name)
            self._sasl = self._sasl_user = None
            return await self._auth_failed(mech.name, mech.attempted_user, None)
        return None

    # -- STLS (RFC 2595 §4) --

    async def _start_tls(self) -> None:
        ctx = self.ctx.ssl_context
        plain = self._plain
        # The grammar only lets STLS through when it is configured; TLS takes over a
        # socket (a session on another kind of stream cannot start it).
        if ctx is None or plain is None:
            self.conn.reply_err(Text.STLS_UNAVAILABLE)
            return
        self.conn.start_tls()
        await self._flush()
        tls_stream = TLSStream(plain, ctx)
        # The TLS stream owns the socket from here on: it is the one to close.
        self.stream = self._gathered = tls_stream
        self._plain = None
        try:
            with trio.fail_after(60):
                await tls_stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            metrics.TLS_FAILURES.labels("stls").inc()
            raise _SessionEnd("TLS handshake failed") from exc
        self.tls = True
        self.conn.plaintext_allowed = self._plaintext_allowed(True)
        self._update_mechanisms()

    # -- RETR / TOP --

    def _refuse_8bit(self) -> bool:
        """RFC 6856: must an 8-bit header be kept from this client? (pypop.server.intl)"""
        return not self.conn.utf8 and self.ctx.utf8_headers == "refuse"

    async def _retrieve_message(self, event: Retrieve) -> None:
        assert self.mailbox is not None
        conn = self.conn
        # Both ways out (the wire cache and the stream) pass the RFC 6856 check.
        if self._wire is not None:
            try:
                wire = self._wire(event.index, event.top_lines)
            except Exception:
                wire = None  # retrieve() answers, and reports any failure
            if wire is not None:
                # One pass over the header only (never the body of a large message).
                if self._refuse_8bit() and not wire_header_is_ascii(wire):
                    conn.reply_err(Text.UTF8_NEEDED, "UTF8")
                    return
                conn.message_header()
                conn.send_raw(wire)
                conn.message_done()  # counts a RETR (TOP is not a retrieval)
                return
        stuffer = DotStuffer(event.top_lines)
        blocks: AsyncIterator[bytes] = self.mailbox.retrieve(event.index, top_lines=event.top_lines)
        held: list[bytes] = []
        try:
            # The first block decides between +OK and -ERR (with the 8-bit check, the
            # blocks up to the end of the header do); after +OK there is no way
            # back, so a later failure can only end the session.
            try:
                block: bytes | None = await anext(blocks, None)
                if self._refuse_8bit():
                    check = HeaderCheck()
                    while block is not None:
                        held.append(block)
                        check.feed(block)
                        if check.decided:
                            break
                        block = await anext(blocks, None)
                    check.finish()
                    if not check.ascii:
                        conn.reply_err(Text.UTF8_NEEDED, "UTF8")
                        return
                    block = held.pop(0) if held else None
            except NoSuchMessage:
                conn.reply_err(Text.NO_SUCH_MESSAGE)
                return
            except Exception as exc:
                metrics.BACKEND_ERRORS.labels(type(exc).__name__).inc()
                _backend_failed(exc, "backend failed to read message %d of %s", event, self.user)
                conn.reply_err(Text.MESSAGE_TEMPORARY, "SYS/TEMP")
                await self._flush()
                raise _SessionEnd("backend failure") from None
            conn.message_header()
            try:
                while block is not None:
                    conn.send_raw(stuffer.feed(block))
                    if stuffer.done:
                        break
                    # The next block before the flush, so that the last block's output
                    # leaves with the terminator (one send and one wake-up of the client
                    # less per large message). The raw block is let go first: at most
                    # the queued output and one raw block are held, as before.
                    block = None
                    block = held.pop(0) if held else await anext(blocks, None)
                    if block is not None and conn.pending_output >= FLUSH_AT:
                        await self._flush()
            except _SessionEnd:
                raise
            except Exception as exc:
                metrics.BACKEND_ERRORS.labels(type(exc).__name__).inc()
                _backend_failed(
                    exc, "backend failed while streaming message %d of %s", event, self.user
                )
                # Earlier replies still go out; the cut message has no terminator, so the
                # client sees a broken transfer, never a short message.
                await self._flush()
                raise _SessionEnd("backend failure mid-message") from None
            conn.send_raw(stuffer.finish())
            conn.message_done()  # counts a RETR (TOP is not a retrieval)
        finally:
            aclose = getattr(blocks, "aclose", None)
            if aclose is not None:
                await aclose()

    # -- UPDATE (RFC 1939 §6) --

    def _expire_days(self) -> int | None:
        """This user's enforced EXPIRE in days (None: never)."""
        if self.policy is not None and self.policy.expire is not None:
            return None if self.policy.expire < 0 else self.policy.expire
        return self.ctx.expire_days

    async def _expired(self, mailbox: Mailbox, deleted: tuple[int, ...]) -> list[int]:
        """EXPIRE enforced (RFC 2449 §6.7): the messages UPDATE removes besides those
        marked. 0 days: what this session retrieved; N: what arrived more than N days
        ago (backends with ``received_times``, pypop.backend.MessageTimes)."""
        days = self._expire_days()
        if days is None:
            return []
        marked = set(deleted)
        if days == 0:
            return sorted((self.conn.retrieved_indexes or set()) - marked)
        received_times = getattr(mailbox, "received_times", None)
        if received_times is None:
            return []
        times: Sequence[float | None] | None = None
        problem = "timed out"
        try:
            with trio.move_on_after(30):
                times = await received_times()
        except Exception as exc:
            problem = describe(exc)
        if times is None:
            # The marked messages still go; the expiry waits for a later UPDATE.
            expire_log.warning(
                "expire: user=<%s> skipped: arrival times unreadable (%s)", self.user, problem
            )
            return []
        cutoff = time.time() - days * 86400
        return [
            i
            for i, when in enumerate(times[: len(mailbox.messages)])
            if when is not None and when < cutoff and i not in marked
        ]

    async def _update(self, deleted: tuple[int, ...]) -> Closing:
        assert self.mailbox is not None
        mailbox, self.mailbox = self.mailbox, None
        failed = False
        # One scope: shielded, since once UPDATE starts it finishes, even during
        # shutdown; and UPDATE's own time limit. None where nothing in UPDATE can wait
        # (the backend says so; no EXPIRE to read): nothing could interrupt or outlast
        # it, and entering a Trio cancel scope costs about 45,000 instructions.
        at_once = getattr(mailbox, "commits_at_once", None)
        quick = False
        if at_once is not None and self._expire_days() is None:
            try:
                quick = bool(at_once(deleted))
            except Exception:  # a backend's bug: commit() under the scope reports it
                log.exception("backend failed in commits_at_once for %s", self.user)
        limit: trio.CancelScope | _AtOnce
        if quick:
            limit = _AtOnce()
        else:
            limit = trio.CancelScope(shield=True, deadline=self.ctx.now() + self.ctx.update_timeout)
        with limit:
            try:
                expired = await self._expired(mailbox, deleted)
                await mailbox.commit(tuple(sorted((*deleted, *expired))))
                self.deleted = len(deleted)
                if expired:
                    expire_log.info(
                        "expire: user=<%s> removed=%d days=%s",
                        self.user,
                        len(expired),
                        self._expire_days(),
                    )
            except Exception as exc:
                failed = True
                self._update_failed(exc)
            finally:
                limit.deadline = math.inf  # the limit bounds UPDATE, not the release
                await self._release(mailbox, past_limit=limit.cancel_called)
        if limit.cancelled_caught:
            failed = True
            self._update_failed(trio.TooSlowError())
        return self.conn.update_finished(failed)

    def _update_failed(self, exc: Exception) -> None:
        metrics.BACKEND_ERRORS.labels(type(exc).__name__).inc()
        # The backend's own report is one line with its cause (the client gets only
        # [SYS/TEMP]); anything else is a bug, with its traceback.
        if isinstance(exc, UpdateFailed | TemporaryFailure | PermanentFailure):
            log.warning("UPDATE for %s failed: %s", self.user, describe(exc))
        elif isinstance(exc, trio.TooSlowError):
            log.error(
                "backend failed in UPDATE for %s: no end within %g s",
                self.user,
                self.ctx.update_timeout,
            )
        else:
            log.error("backend failed in UPDATE for %s", self.user, exc_info=exc)

    async def _release(self, mailbox: Mailbox, *, past_limit: bool) -> None:
        """The maildrop lock goes, after UPDATE's time limit too."""
        try:
            if past_limit:  # our scope is cancelled: the release needs its own
                with trio.CancelScope(shield=True):
                    await mailbox.aclose()
            else:
                await mailbox.aclose()
        except Exception:
            log.exception("backend failed to release %s's maildrop", self.user)
        self._let_go()

    def _let_go(self) -> None:
        """Our maildrop lock is released: wake a login waiting for it."""
        if self._released is not None and self.user is not None:
            self.ctx.maildrops.let_go(self.user, self._released)
            self._released = None


def _backend_failed(exc: Exception, what: str, event: Retrieve, user: str | None) -> None:
    """A TemporaryFailure is the backend's own report (an upstream is down): one line.
    Anything else is a bug: with its traceback."""
    if isinstance(exc, TemporaryFailure | PermanentFailure):
        log.warning(what + ": %s", event.index + 1, user, describe(exc))
    else:
        log.exception(what, event.index + 1, user)
