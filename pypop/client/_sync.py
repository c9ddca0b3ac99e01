"""The blocking client: :class:`Client`, a context manager in the spirit of poplib."""

from __future__ import annotations

import builtins
import socket
import ssl
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pypop.client import _core
from pypop.client._config import resolve
from pypop.client._core import Op, Recv, Result, Send, Session, StartTLS, make_ssl_context
from pypop.errors import ClientError, NetworkError, OperationTimeout, TLSError
from pypop.protocol.client import Reply

__all__ = ["Client"]

RECV_SIZE = 256 * 1024


class Client:
    """A POP3 client over a blocking socket.

    ``Client(host_or_url, ...)`` does no I/O; ``with Client(...) as pop:`` (or
    :meth:`connect`) connects, applies the TLS policy, logs in, and on leaving the block
    sends QUIT, which commits deletions. If the block raises, the connection is closed
    *without* QUIT, so nothing is deleted.

    - ``host``: a host name or address, or a ``pop://``/``pops://`` URL (RFC 2384).
    - ``tls``: ``"implicit"`` (pops://, port 995), ``"require"`` (STLS must succeed;
      the default for any host that is not loopback), ``"auto"`` (STLS when offered;
      the loopback default), ``"off"``.
    - ``auth``: ``"auto"`` (the strongest method the server offers), ``"USER"``,
      ``"+APOP"``, or a SASL name (PLAIN, LOGIN, CRAM-MD5, SCRAM-SHA-256[-PLUS],
      OAUTHBEARER, XOAUTH2 with ``token``, GSSAPI with the caller's Kerberos
      tickets: ``KRB5CCNAME``, the ``gssapi`` extra). With ``"auto"``, no password
      and no token, GSSAPI is used when the server offers it; ``user`` is then the
      authorization identity (may be None).
    - Without ``password`` or ``token``, ``~/.netrc`` is read (``netrc=False`` not to).
    - ``timeout`` (seconds) bounds connecting, the TLS handshake and every wait for the
      server.
    - ``utf8``: send UTF8 (RFC 6856) when the server offers it, so UTF-8 user names
      work everywhere and messages with 8-bit headers arrive as stored (:attr:`utf8`
      says whether it is on). User names and passwords are prepared with PRECIS
      (RFC 8265) either way.
    """

    def __init__(
        self,
        host: str,
        port: int | None = None,
        user: str | None = None,
        password: str | None = None,
        *,
        token: str | None = None,
        auth: str = "auto",
        tls: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        cafile: str | Path | None = None,
        timeout: float = 60.0,
        pipelining: bool = True,
        window: int = 64,
        netrc: bool | str | Path = True,
        utf8: bool = True,
    ) -> None:
        self.options = resolve(
            host, port, user, password, token, auth, tls, netrc, pipelining, window
        )
        self.options.utf8 = utf8
        self.timeout = timeout
        self._ssl_context = ssl_context
        self._cafile = cafile
        self._sock: socket.socket | None = None
        self._session: Session | None = None

    # -- connection --

    @property
    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = make_ssl_context(self._cafile)
        return self._ssl_context

    @property
    def session(self) -> Session:
        if self._session is None:
            raise ClientError("not connected (use 'with Client(...)' or connect())")
        return self._session

    @property
    def capabilities(self) -> dict[str, list[str]] | None:
        return self.session.capabilities

    @property
    def tls_active(self) -> bool:
        return self.session.tls_active

    @property
    def mechanism(self) -> str | None:
        """The login method used (``USER``, ``+APOP`` or a SASL name)."""
        return self.session.mechanism_used

    @property
    def utf8(self) -> bool:
        """True once the server took UTF8 (RFC 6856): names, passwords and message
        headers may be UTF-8, and 8-bit headers arrive as stored."""
        return self.session.utf8

    def connect(self) -> Self:
        opts = self.options
        try:
            sock = socket.create_connection((opts.host, opts.port), timeout=self.timeout)
        except TimeoutError:
            raise OperationTimeout(f"connecting to {opts.host}:{opts.port} timed out") from None
        except OSError as exc:
            raise NetworkError(f"cannot connect to {opts.host}:{opts.port}: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        try:
            implicit = opts.tls == "implicit"
            if implicit:
                self._start_tls()
            self._session = Session(opts, tls_active=implicit)
            if implicit:
                self._session.channel_binding = self._binding()
            self._run(self._session.start())
        except BaseException:
            self.close()
            raise
        return self

    def _start_tls(self) -> None:
        assert self._sock is not None
        try:
            self._sock = self.ssl_context.wrap_socket(self._sock, server_hostname=self.options.host)
        except ssl.SSLError as exc:
            raise TLSError(f"TLS with {self.options.host} failed: {exc.reason or exc}") from None
        except ssl.CertificateError as exc:
            raise TLSError(f"TLS with {self.options.host} failed: {exc}") from None
        except TimeoutError:
            raise OperationTimeout("TLS handshake timed out") from None
        except OSError as exc:
            raise NetworkError(f"TLS handshake failed: {exc}") from None

    def _binding(self) -> bytes | None:
        sock = self._sock
        if isinstance(sock, ssl.SSLSocket) and sock.version() == "TLSv1.2":
            return sock.get_channel_binding("tls-unique")
        return None

    def close(self) -> None:
        """Close the connection without QUIT (nothing marked is deleted)."""
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
        if self._session is not None:
            self._session.closed = True

    def __enter__(self) -> Self:
        if self._session is None:
            self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None and self._session is not None and not self._session.closed:
                self.quit()
        finally:
            self.close()

    # -- the driver --

    def _do(self, request: Send | Recv | StartTLS) -> Any:
        sock = self._sock
        if sock is None:
            raise NetworkError("connection closed")
        try:
            if isinstance(request, Send):
                sock.sendall(request.data)
                return None
            if isinstance(request, Recv):
                return sock.recv(RECV_SIZE)
        except TimeoutError:
            self.close()
            raise OperationTimeout(f"no answer from the server within {self.timeout} s") from None
        except OSError as exc:
            self.close()
            raise NetworkError(f"connection to {self.options.host} failed: {exc}") from None
        self._start_tls()
        return self._binding()

    def _run(self, op: Op) -> Any:
        try:
            request = next(op)
            while True:
                request = op.send(self._do(request))
        except StopIteration as stop:
            return stop.value

    def _iterate(self, op: Any) -> Iterator[Reply]:
        try:
            request = next(op)
            while True:
                if isinstance(request, Reply):
                    yield request
                    request = next(op)
                else:
                    request = op.send(self._do(request))
        except StopIteration:
            return

    # -- poplib-style commands --

    def stat(self) -> tuple[int, int]:
        """(message count, octets)."""
        result: tuple[int, int] = self._run(self.session.stat())
        return result

    def list(self, msg: int | None = None) -> dict[int, int]:
        """{number: size} for every message (or the one given)."""
        result: dict[int, int] = self._run(self.session.list(msg))
        return result

    def uidl(self, msg: int | None = None) -> dict[int, str]:
        """{number: unique-id}."""
        result: dict[int, str] = self._run(self.session.uidl(msg))
        return result

    def retr(self, msg: int) -> bytes:
        """The message, unstuffed, with CRLF line ends."""
        result: bytes = self._run(self.session.retr(msg))
        return result

    def top(self, msg: int, lines: int = 0) -> bytes:
        result: bytes = self._run(self.session.top(msg, lines))
        return result

    def dele(self, msg: int) -> None:
        self._run(self.session.dele(msg))

    def dele_many(self, numbers: Sequence[int]) -> builtins.list[int]:
        """DELE each number, pipelined; the numbers the server refused."""
        from pypop.protocol.commands import Dele

        replies = self._run(self.session.pipeline([Dele(n) for n in numbers]))
        return [n for n, r in zip(numbers, replies, strict=True) if not r.status.ok]

    def noop(self) -> None:
        self._run(self.session.noop())

    def rset(self) -> None:
        self._run(self.session.rset())

    def quit(self) -> None:
        """QUIT: commits deletions; :class:`pypop.errors.UpdateError` unless ``+OK``."""
        try:
            self._run(self.session.quit())
        finally:
            self.close()

    def retrieve(self, numbers: Sequence[int]) -> Iterator[tuple[int, bytes]]:
        """RETR every number, pipelined; yields (number, message) as each arrives.
        A number the server refuses raises :class:`pypop.errors.NoSuchMessageError`."""
        from pypop.protocol.commands import Retr

        it = iter(numbers)
        order: list[int] = []

        def commands() -> Iterator[Retr]:
            for n in it:
                order.append(n)
                yield Retr(n)

        for index, reply in enumerate(self._iterate(self.session.stream(commands()))):
            number = order[index]
            if not reply.status.ok:
                raise _core.no_such(number, reply)
            yield number, reply.body or b""

    # -- CFPOP actions --

    def get_header_only(
        self,
        messages: Sequence[int] | None = None,
        uids: Sequence[str] | None = None,
        *,
        start_row: int = 1,
        max_rows: int | None = None,
    ) -> Result:
        """Rows with the header columns, by pipelined ``TOP n 0``."""
        return self._rows(messages, uids, start_row, max_rows, headers_only=True)

    def get_all(
        self,
        messages: Sequence[int] | None = None,
        uids: Sequence[str] | None = None,
        *,
        start_row: int = 1,
        max_rows: int | None = None,
        attachment_path: str | Path | None = None,
        generate_unique_filenames: bool = False,
    ) -> Result:
        """Whole rows (bodies, attachments saved under ``attachment_path``)."""
        return self._rows(
            messages,
            uids,
            start_row,
            max_rows,
            headers_only=False,
            attachment_path=attachment_path,
            unique_filenames=generate_unique_filenames,
        )

    def _rows(
        self,
        messages: Sequence[int] | None,
        uids: Sequence[str] | None,
        start_row: int,
        max_rows: int | None,
        *,
        headers_only: bool,
        attachment_path: str | Path | None = None,
        unique_filenames: bool = False,
    ) -> Result:
        """The selection fetched (pipelined TOP n 0 or RETR), then made into rows."""
        targets, result = self._run(_core.select(self.session, messages, uids, start_row, max_rows))
        fetched = self._run(_core.fetch(self.session, targets, headers_only=headers_only))
        return _core.make_rows(
            fetched,
            result,
            headers_only=headers_only,
            attachment_path=attachment_path,
            unique_filenames=unique_filenames,
        )

    def delete(
        self,
        messages: Sequence[int] | None = None,
        uids: Sequence[str] | None = None,
        *,
        start_row: int = 1,
        max_rows: int | None = None,
    ) -> Result:
        """DELE the selection and QUIT (this ends the session); ``result.deleted`` lists
        what the server removed. :class:`pypop.errors.UpdateError` if QUIT fails."""
        if messages is None and uids is None:
            raise ValueError("delete needs messages=[...] or uids=[...]")
        targets, result = self._run(_core.select(self.session, messages, uids, start_row, max_rows))
        try:
            out: Result = self._run(_core.delete(self.session, targets, result))
        finally:
            self.close()
        return out
