"""The Trio server: listeners, limits, one task per connection, graceful shutdown.

``serve(config, task_status=...)`` works with ``nursery.start`` and port 0, and hands
back the running :class:`Server` (its ``addresses`` are the bound ones).

Shutdown (hypercorn's two-nursery recipe): :meth:`Server.shutdown` stops the accept
loops and closes the listeners at once; sessions get ``shutdown_timeout`` seconds to
finish on their own, then they are cancelled. A cancelled session never runs UPDATE,
so nothing it marked is removed; a session already in UPDATE finishes it (shielded).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import ssl

import trio

from pypop.auth import (
    DEFAULT_MECHANISMS,
    AuthPenalty,
    CredentialStore,
    LoginDelay,
    PerClientLimiter,
    StaticTokenVerifier,
    TokenVerifier,
)
from pypop.auth.kerberos import GssapiSettings, check_settings
from pypop.auth.secret import load_or_create
from pypop.backend import Backend, SelfAuthenticating
from pypop.config import ConfigError, ServerConfig
from pypop.protocol import ProtocolConfig
from pypop.protocol.replies import Text, encode_status
from pypop.registry import create_backend, create_credential_store
from pypop.server import metrics, sessionlog
from pypop.server.anvil import Limits
from pypop.server.limits import ConnectionLimits, ensure_open_files
from pypop.server.listeners import Listener, Peer, SocketStream, is_transient, open_listeners
from pypop.server.logins import MaildropHolders
from pypop.server.passthrough import NO_STORE
from pypop.server.proxy import ProxyHeaderError, TrustedProxies, read_header
from pypop.server.session import Session, SessionContext
from pypop.server.tls import TLSStream

__all__ = ["Server", "TLSConfigError", "make_ssl_context", "serve"]

log = logging.getLogger("pypop.server")

TOO_MANY: bytes = encode_status(False, Text.TOO_MANY_CONNECTIONS.value, "SYS/TEMP")
# accept() errors that mean "no descriptors or memory now": back off, log rarely.
_SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF_MAX = 1.0
ACCEPT_LOG_EVERY = 60.0
SESSION_TASK = "pypop.server.core.Server._connection"


class TLSConfigError(ValueError):
    """The certificate or key cannot be used; the message names the files."""


def make_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS 1.2 or later (RFC 8314 §4.1). Raises :class:`TLSConfigError` naming the
    file and the problem (``load_cert_chain`` alone says "[SSL] PEM lib")."""
    for what, path in (("tls.cert", cert), ("tls.key", key)):
        try:
            with open(path, "rb") as f:
                head = f.read(65536)
        except OSError as exc:
            raise TLSConfigError(f"{what} {path}: {exc.strerror or exc}") from None
        if b"-----BEGIN " not in head:
            raise TLSConfigError(f"{what} {path}: not a PEM file")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"cannot use tls.cert {cert} with tls.key {key}: the key does not match the "
            f"certificate, or the files are swapped or not a certificate and a key "
            f"({exc.reason or exc})"
        ) from None
    return ctx


class Server:
    """A running POP3 server; build with :func:`serve`."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        backend: Backend | None = None,
        store: CredentialStore | None = None,
        ssl_context: ssl.SSLContext | None = None,
        token_verifier: TokenVerifier | None = None,
        limits: Limits | None = None,
        listeners: list[Listener] | None = None,
    ) -> None:
        """``limits``: the whole server's (a worker's anvil client); ``listeners``:
        sockets already bound (a worker's, inherited from the supervisor)."""
        config.validate()
        self.config = config
        self.backend = (
            backend
            if backend is not None
            else create_backend(config.backend, config.backend_options)
        )
        if ssl_context is None and config.tls_cert is not None and config.tls_key is not None:
            ssl_context = make_ssl_context(str(config.tls_cert), str(config.tls_key))
        self.ssl_context = ssl_context
        passthrough = self.backend if isinstance(self.backend, SelfAuthenticating) else None
        own_store = store is None
        if store is None:
            store = _default_store(config, passthrough is not None)
        self.store = store
        self._own_store = own_store
        apop = config.apop
        if passthrough is not None:
            _warn_passthrough(config, token_verifier is not None)
            apop = False  # APOP never reveals the password: it cannot be passed on
        expire_days = _expire_days(config, self.backend)
        protocol = ProtocolConfig(
            max_bad_commands=config.max_bad_commands,
            max_auth_failures=config.max_auth_failures,
            implementation=config.implementation or None,
            expire=(config.expire or None) if expire_days is None else str(expire_days),
            login_delay=config.login_delay or None,
            stls_available=ssl_context is not None,
            refuse_proxy_header=bool(config.proxy_from),
        )
        self.proxies = TrustedProxies(config.proxy_from)
        self._given = listeners
        gssapi = _gssapi_settings(config)
        if token_verifier is None and config.tokens_file is not None:
            token_verifier = StaticTokenVerifier.from_file(config.tokens_file)
        penalty_max = config.auth_penalty_max
        self.limits = ConnectionLimits(config.max_connections, config.max_connections_per_ip)
        self.context = SessionContext(
            backend=self.backend,
            store=self.store,
            protocol=protocol,
            hostname=config.hostname,
            greeting=config.greeting,
            idle_timeout=config.idle_timeout,
            line_timeout=config.line_timeout,
            maildrops=MaildropHolders(config.lock_wait),
            salt_key=_server_secret(config),
            apop=apop,
            allow_plaintext=config.allow_plaintext,
            ssl_context=ssl_context,
            mechanisms=tuple(m.upper() for m in config.mechanisms),
            token_verifier=token_verifier,
            penalty=AuthPenalty(
                initial_delay=min(config.auth_penalty_initial, penalty_max),
                max_delay=penalty_max,
                failure_delay=config.auth_failure_delay,
                clock=trio.current_time,
            ),
            per_client=PerClientLimiter(config.max_auth_per_client),
            # Always there: a user database may give some users a delay of their own.
            login_delay=LoginDelay(config.login_delay, clock=trio.current_time),
            utf8_headers=config.utf8_headers,
            expire_days=expire_days,
            gssapi=gssapi,
            passthrough=passthrough,
            limits=limits,
            connections=self.limits,
        )
        self.guard = self.context.guard
        self.addresses: list[tuple[str, int]] = []
        self.tls_addresses: list[tuple[str, int]] = []
        self.total_sessions = 0
        self._open_sessions = 0
        self._shutdown = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._spare_fd: int | None = None

    def reload_tls(self) -> bool:
        """Read ``tls.cert`` and ``tls.key`` again (the CLI calls this on SIGHUP).

        The new context serves every handshake from now on (implicit TLS and STLS);
        sessions already in TLS keep theirs. If the new pair cannot be loaded (missing
        file, bad PEM, key not matching the certificate) the old context stays in use,
        the error is logged, and the result is False.
        """
        cert, key = self.config.tls_cert, self.config.tls_key
        if cert is None or key is None:
            log.warning("TLS reload: no tls.cert/tls.key configured, nothing to reload")
            return False
        try:
            ctx = make_ssl_context(str(cert), str(key))
        except (OSError, ValueError) as exc:
            log.error("TLS reload failed, keeping the current certificate: %s", exc)
            return False
        self.ssl_context = ctx
        self.context.ssl_context = ctx
        log.info("TLS certificate and key reloaded from %s and %s", cert, key)
        return True

    async def reload(self) -> None:
        """SIGHUP: the TLS certificate and key (if configured) and the credential
        store (a passwd-file is read again if it changed)."""
        if self.config.tls_cert is not None:
            self.reload_tls()
        refresh = getattr(self.store, "reload_if_changed", None)
        if refresh is not None:
            changed = await trio.to_thread.run_sync(refresh)
            log.info("passwd-file %s", "reloaded" if changed else "unchanged")

    @property
    def shutting_down(self) -> bool:
        return self._shutdown.is_set()

    def shutdown(self) -> None:
        """Begin a graceful shutdown (safe to call more than once)."""
        self._shutdown.set()

    @property
    def active(self) -> int:
        """Sessions open now (in this process)."""
        return self._open_sessions

    async def _open(self, addrs: list[tuple[str, int]], implicit_tls: bool) -> list[Listener]:
        listeners: list[Listener] = []
        try:
            for host, port in addrs:
                listeners.extend(await open_listeners(host, port, implicit_tls=implicit_tls))
        except BaseException:
            for lst in listeners:
                await trio.aclose_forcefully(lst)
            raise
        return listeners

    async def run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            ensure_open_files(self.config.max_connections)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        # One descriptor kept in reserve: when accept() runs out, it is given up to
        # take the waiting connection and refuse it cleanly (see _accept_loop).
        self._spare_fd = _open_spare()
        try:
            await self._serve(task_status)
        finally:
            if self._spare_fd is not None:
                os.close(self._spare_fd)
                self._spare_fd = None

    async def _serve(self, task_status: trio.TaskStatus[Server]) -> None:
        self.context.now = trio.lowlevel.current_clock().current_time
        if self._given is not None:
            plain = [lst for lst in self._given if not lst.implicit_tls]
            tls = [lst for lst in self._given if lst.implicit_tls]
        else:
            plain = await self._open(self.config.listen, False)
            tls = await self._open(self.config.listen_tls, True)
        self.addresses = [lst.address for lst in plain]
        self.tls_addresses = [lst.address for lst in tls]
        try:
            async with trio.open_nursery() as sessions:
                async with trio.open_nursery() as acceptors:
                    for lst in plain + tls:
                        acceptors.start_soon(self._accept_loop, lst, sessions)
                    log.info("listening on %s", _describe_listeners(plain, tls))
                    task_status.started(self)
                    await self._shutdown.wait()
                    acceptors.cancel_scope.cancel()
                for lst in plain + tls:
                    await lst.aclose()
                log.info(
                    "shutting down: %s open, waiting up to %gs",
                    _plural(self.active, "session"),
                    self.config.shutdown_timeout,
                )
                with trio.move_on_after(self.config.shutdown_timeout):
                    await self._idle.wait()
                sessions.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for lst in plain + tls:
                    await trio.aclose_forcefully(lst)
                try:
                    await self.backend.aclose()
                except Exception:
                    log.exception("backend failed to close")
                # A store made from the config may hold connections (optional aclose).
                store_aclose = getattr(self.store, "aclose", None) if self._own_store else None
                if store_aclose is not None:
                    try:
                        await store_aclose()
                    except Exception:
                        log.exception("credential store failed to close")
            sessionlog.flush()  # the sessions' last lines before the server's
            log.info("stopped after %s", _plural(self.total_sessions, "session"))

    async def _accept_loop(self, listener: Listener, nursery: trio.Nursery) -> None:
        backoff = 0.0
        failures = 0
        last_logged = -math.inf
        while True:
            try:
                stream, peer = await listener.accept()
            except OSError as exc:
                if not is_transient(exc):
                    raise
                if exc.errno not in _SHORTAGE:
                    continue  # ECONNABORTED and the like: that connection is gone
                # Out of descriptors (or memory): refuse the waiting client with the
                # spare descriptor instead of leaving it hanging, then back off; log
                # once a minute, not once per attempt.
                failures += 1
                refused = self._refuse_with_spare(listener)
                if refused:
                    metrics.REFUSED.labels("open_files").inc()
                now = trio.current_time()
                if now - last_logged >= ACCEPT_LOG_EVERY:
                    last_logged = now
                    log.error(
                        "accept failed: %s (%d open sessions); %s; raise the open-file "
                        "limit or lower limits.max_connections",
                        exc.strerror or exc,
                        self.active,
                        "refusing new connections" if refused else "backing off",
                    )
                backoff = min(ACCEPT_BACKOFF_MAX, max(0.01, backoff * 2))
                await trio.sleep(backoff)
                continue
            if failures:
                log.warning("accept works again after %d failed attempts", failures)
                failures, backoff = 0, 0.0
            # A constant name: trio would format one string per task otherwise.
            nursery.start_soon(
                self._connection, stream, peer, listener.implicit_tls, name=SESSION_TASK
            )

    def _refuse_with_spare(self, listener: Listener) -> bool:
        """Free the spare descriptor, accept one waiting connection, tell it
        ``-ERR [SYS/TEMP]`` (plain listeners) and close it, take the spare back."""
        if self._spare_fd is None:
            return False
        os.close(self._spare_fd)
        self._spare_fd = None
        try:
            return listener.refuse_one(None if listener.implicit_tls else TOO_MANY)
        finally:
            self._spare_fd = _open_spare()

    async def _connection(self, stream: SocketStream, peer: Peer, implicit_tls: bool) -> None:
        secure = False
        if self.proxies and self.proxies.trusts(peer.host):
            # A trusted proxy speaks first: the client's address decides every limit,
            # so nothing is counted before the header.
            try:
                header = await read_header(stream.socket)
            except ProxyHeaderError as exc:
                log.warning("refused %s: %s", peer, exc)
                metrics.REFUSED.labels("proxy_header").inc()
                await trio.aclose_forcefully(stream)
                return
            if header.host is not None:
                peer = Peer(header.host, header.port, proxy=peer.host)
            secure = header.ssl
        guard = self.guard
        refused = await guard.open(peer)
        if refused is not None:
            log.warning("refused %s: %s", peer, refused.replace("_", " "))
            metrics.REFUSED.labels(refused).inc()
            await self._refuse(stream, implicit_tls)
            return
        self.total_sessions += 1
        self._open_sessions += 1
        if self._open_sessions == 1:
            self._idle = trio.Event()
        metrics.session_started()
        # The session runs in this coroutine, not in one it awaits: one frame less
        # for every idle session.
        s: trio.abc.Stream = stream
        try:
            try:
                if implicit_tls:
                    # Read once per connection: reload_tls() may swap it.
                    assert self.ssl_context is not None
                    tls = TLSStream(stream, self.ssl_context)
                    s = tls
                    # RFC 8314 §3.3: the handshake comes first, then the greeting.
                    try:
                        with trio.move_on_after(60) as cs:
                            await tls.do_handshake()
                    except trio.BrokenResourceError:
                        metrics.TLS_FAILURES.labels("implicit").inc()
                        raise
                    if cs.cancelled_caught:
                        metrics.TLS_FAILURES.labels("implicit").inc()
                        return
                # auth.loopback_is_secure: a loopback peer may use cleartext logins.
                secure_loopback = self.config.loopback_is_secure and peer.loopback
                # TLS terminated at a trusted proxy (its v2 SSL TLV) is TLS to the client.
                session = Session(
                    self.context, s, peer, tls=implicit_tls or secure, loopback=secure_loopback
                )
                try:
                    await session.run()
                finally:
                    s = session.stream  # the TLS stream after STLS: close it with close_notify
            except trio.BrokenResourceError:
                pass
            finally:
                await _close(s)
        except Exception:
            # One session's bug never ends the server (DESIGN rule 5).
            log.exception("session with %s crashed", peer)
        finally:
            metrics.session_closed()
            guard.close(peer)
            self._open_sessions -= 1
            if self._open_sessions == 0:
                self._idle.set()

    async def _refuse(self, stream: SocketStream, implicit_tls: bool) -> None:
        if not implicit_tls:
            with trio.move_on_after(1):
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(TOO_MANY)
        await trio.aclose_forcefully(stream)


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _server_secret(config: ServerConfig) -> bytes | None:
    """The persistent key of fake SCRAM salts (pypop.auth.secret): auth.secret_file,
    or <passwd_file>.secret. None (a per-process key, with a warning) when neither
    can be used; an explicitly configured file that cannot be used stops start-up."""
    path = config.secret_file
    explicit = path is not None
    if path is None and config.passwd_file is not None:
        path = config.passwd_file.with_name(config.passwd_file.name + ".secret")
    if path is not None:
        try:
            return load_or_create(path)
        except (OSError, ValueError) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if explicit:
                raise ConfigError(f"auth.secret_file {path}: {text}") from None
            log.warning("cannot use the server secret %s (%s)", path, text)
    if any(m.upper().startswith("SCRAM") for m in config.mechanisms):
        log.warning(
            "no server secret (set auth.secret_file): SCRAM salts of unknown users "
            "will change when the server restarts, which tells them from real users"
        )
    return None


def _gssapi_settings(config: ServerConfig) -> GssapiSettings | None:
    """Kerberos for SASL GSSAPI, checked at start-up (package, keytab, service key)."""
    if config.gssapi_keytab is None:
        if "GSSAPI" in (m.upper() for m in config.mechanisms) and config.mechanisms != list(
            DEFAULT_MECHANISMS
        ):
            log.warning("auth.mechanisms lists GSSAPI, but no auth.gssapi_keytab is set")
        return None
    hostname = config.gssapi_hostname or config.hostname
    settings = GssapiSettings(
        keytab=str(config.gssapi_keytab), hostname=None if hostname == "*" else hostname
    )
    try:
        check_settings(settings)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return settings


def _expire_days(config: ServerConfig, backend: Backend) -> int | None:
    """The EXPIRE the backend enforces (its ``expire_days`` option), which CAPA then
    announces; a different explicit ``policy.expire`` is a configuration error."""
    days = getattr(backend, "expire_days", None)
    if days is None:
        return None
    if not isinstance(days, int) or isinstance(days, bool) or days < 0:
        raise ConfigError(f"backend expire_days must be a whole number of days, got {days!r}")
    if config.expire not in ("NEVER", "", str(days)):
        raise ConfigError(
            f"policy.expire = {config.expire!r} but the backend removes mail after "
            f"{days} days (expire_days): leave policy.expire out, or make them agree"
        )
    return days


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _describe_listeners(plain: list[Listener], tls: list[Listener]) -> str:
    """``127.0.0.1:110 (plain), [::1]:995 (implicit TLS)`` for the log."""

    def where(lst: Listener) -> str:
        host, port = lst.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    parts = [f"{where(lst)} (plain)" for lst in plain]
    parts += [f"{where(lst)} (implicit TLS)" for lst in tls]
    return ", ".join(parts)


async def _close(stream: trio.abc.Stream) -> None:
    if isinstance(stream, SocketStream):
        stream.close()  # plain TCP: closing cannot block (and the session task ends)
        return
    # RFC 8314 §3.2: TLS ends with close_notify; give it a moment, then cut.
    with trio.move_on_after(2) as cs:
        cs.shield = True
        try:
            await stream.aclose()
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)


def _default_store(config: ServerConfig, passthrough: bool = False) -> CredentialStore:
    """The configured credential store: a [credentials] plugin, or the passwd-file.
    A backend that authenticates itself needs none."""
    if config.credentials is not None:
        return create_credential_store(config.credentials, config.credentials_options)
    if config.passwd_file is None:
        if passthrough:
            return NO_STORE
        raise ValueError(
            "no credential store: set auth.passwd_file (or --passwd-file), or a [credentials] store"
        )
    return create_credential_store("passwd-file", {"path": str(config.passwd_file)})


def _warn_passthrough(config: ServerConfig, tokens: bool) -> None:
    """Say at start-up what a self-authenticating backend leaves out."""
    # SCRAM is in the defaults: name only what the admin chose by hand.
    chosen = [] if list(config.mechanisms) == list(DEFAULT_MECHANISMS) else config.mechanisms
    unusable = [m for m in chosen if m.upper() in _NEEDS_SECRET]
    if config.apop:
        unusable.insert(0, "APOP")
    if unusable:
        log.warning(
            "the backend checks passwords itself (passthrough): %s cannot pass a "
            "password on and will not be offered",
            ", ".join(unusable),
        )
    if config.passwd_file is not None or config.credentials is not None:
        log.warning("the backend checks passwords itself: the credential store is not used")
    if tokens:
        log.warning("the backend checks bearer tokens itself: auth.tokens_file is not used")


_NEEDS_SECRET = frozenset({"CRAM-MD5", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"})


async def serve(
    config: ServerConfig,
    *,
    backend: Backend | None = None,
    store: CredentialStore | None = None,
    ssl_context: ssl.SSLContext | None = None,
    token_verifier: TokenVerifier | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a POP3 server until cancelled or until ``Server.shutdown()``."""
    server = Server(
        config,
        backend=backend,
        store=store,
        ssl_context=ssl_context,
        token_verifier=token_verifier,
    )
    await server.run(task_status=task_status)
