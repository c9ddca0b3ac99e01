"""The async client on AnyIO: the same session logic as :class:`pypop.client.Client`,
under asyncio or Trio."""

from __future__ import annotations

import builtins
import contextlib
import functools
import ssl
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
from anyio.streams.tls import TLSAttribute, TLSStream

from pypop.client import _core
from pypop.client._config import resolve
from pypop.client._core import Op, Recv, Result, Send, Session, StartTLS, make_ssl_context
from pypop.errors import ClientError, NetworkError, OperationTimeout, TLSError
from pypop.protocol.client import Reply

__all__ = ["AsyncClient"]

RECV_SIZE = 256 * 1024


class AsyncClient:
    """``async with AsyncClient(host_or_url, ...) as pop:`` — arguments and behaviour
    as :class:`pypop.client.Client`; every method is a coroutine."""

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
        self._stream: anyio.abc.ByteStream | None = None
        self._session: Session | None = None

    @property
    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = make_ssl_context(self._cafile)
        return self._ssl_context

    @property
    def session(self) -> Session:
        if self._session is None:
            raise ClientError("not connected (use 'async with AsyncClient(...)')")
        return self._session

    @property
    def capabilities(self) -> dict[str, list[str]] | None:
        return self.session.capabilities

    @property
    def tls_active(self) -> bool:
        return self.session.tls_active

    @property
    def mechanism(self) -> str | None:
        return self.session.mechanism_used

    @property
    def utf8(self) -> bool:
        """True once the server took UTF8 (RFC 6856)."""
        return self.session.utf8

    async def connect(self) -> Self:
        opts = self.options
        try:
            with anyio.fail_after(self.timeout):
                self._stream = await anyio.connect_tcp(opts.host, opts.port)
        except TimeoutError:
            raise OperationTimeout(f"connecting to {opts.host}:{opts.port} timed out") from None
        except OSError as exc:
            raise NetworkError(f"cannot connect to {opts.host}:{opts.port}: {exc}") from None
        try:
            implicit = opts.tls == "implicit"
            if implicit:
                await self._start_tls()
            self._session = Session(opts, tls_active=implicit)
            if implicit:
                self._session.channel_binding = self._binding()
            await self._run(self._session.start())
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _start_tls(self) -> None:
        assert self._stream is not None
        try:
            with anyio.fail_after(self.timeout):
                self._stream = await TLSStream.wrap(
                    self._stream,
                    server_side=False,
                    hostname=self.options.host,
                    ssl_context=self.ssl_context,
                    standard_compatible=False,
                )
        except TimeoutError:
            raise OperationTimeout("TLS handshake timed out") from None
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise TLSError(f"TLS with {self.options.host} failed: {exc}") from None
        except (OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            raise NetworkError(f"TLS handshake failed: {exc!r}") from None

    def _binding(self) -> bytes | None:
        stream = self._stream
        if not isinstance(stream, TLSStream):
            return None
        obj = stream.extra(TLSAttribute.ssl_object)  # noqa: S610 - anyio, not Django
        if obj.version() != "TLSv1.2":
            return None
        binding: bytes | None = stream.extra(  # noqa: S610
            TLSAttribute.channel_binding_tls_unique, None
        )
        return binding

    async def aclose(self) -> None:
        """Close without QUIT (nothing marked is deleted)."""
        stream, self._stream = self._stream, None
        if self._session is not None:
            self._session.closed = True
        if stream is not None:
            with (
                anyio.move_on_after(1, shield=True),
                contextlib.suppress(OSError, anyio.BrokenResourceError, ssl.SSLError),
            ):
                await stream.aclose()

    async def __aenter__(self) -> Self:
        if self._session is None:
            await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None and self._session is not None and not self._session.closed:
                await self.quit()
        finally:
            await self.aclose()

    async def _do(self, request: Send | Recv | StartTLS) -> Any:
        stream = self._stream
        if stream is None:
            raise NetworkError("connection closed")
        try:
            with anyio.fail_after(self.timeout):
                if isinstance(request, Send):
                    await stream.send(request.data)
                    return None
                if isinstance(request, Recv):
                    try:
                        return await stream.receive(RECV_SIZE)
                    except anyio.EndOfStream:
                        return b""
        except TimeoutError:
            await self.aclose()
            raise OperationTimeout(f"no answer from the server within {self.timeout} s") from None
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, ssl.SSLError) as exc:
            await self.aclose()
            raise NetworkError(f"connection to {self.options.host} failed: {exc!r}") from None
        await self._start_tls()
        return self._binding()

    async def _run(self, op: Op) -> Any:
        try:
            request = next(op)
            while True:
                request = op.send(await self._do(request))
        except StopIteration as stop:
            return stop.value

    async def _iterate(self, op: Any) -> AsyncIterator[Reply]:
        try:
            request = next(op)
            while True:
                if isinstance(request, Reply):
                    yield request
                    request = next(op)
                else:
                    request = op.send(await self._do(request))
        except StopIteration:
            return

    async def stat(self) -> tuple[int, int]:
        result: tuple[int, int] = await self._run(self.session.stat())
        return result

    async def list(self, msg: int | None = None) -> dict[int, int]:
        result: dict[int, int] = await self._run(self.session.list(msg))
        return result

    async def uidl(self, msg: int | None = None) -> dict[int, str]:
        result: dict[int, str] = await self._run(self.session.uidl(msg))
        return result

    async def retr(self, msg: int) -> bytes:
        result: bytes = await self._run(self.session.retr(msg))
        return result

    async def top(self, msg: int, lines: int = 0) -> bytes:
        result: bytes = await self._run(self.session.top(msg, lines))
        return result

    async def dele(self, msg: int) -> None:
        await self._run(self.session.dele(msg))

    async def dele_many(self, numbers: Sequence[int]) -> builtins.list[int]:
        """DELE each number, pipelined; the numbers the server refused."""
        from pypop.protocol.commands import Dele

        replies = await self._run(self.session.pipeline([Dele(n) for n in numbers]))
        return [n for n, r in zip(numbers, replies, strict=True) if not r.status.ok]

    async def noop(self) -> None:
        await self._run(self.session.noop())

    async def rset(self) -> None:
        await self._run(self.session.rset())

    async def quit(self) -> None:
        try:
            await self._run(self.session.quit())
        finally:
            await self.aclose()

    async def retrieve(self, numbers: Sequence[int]) -> AsyncIterator[tuple[int, bytes]]:
        """RETR every number, pipelined; yields (number, message) as each arrives."""
        from pypop.protocol.commands import Retr

        numbers = list(numbers)
        index = 0
        async for reply in self._iterate(self.session.stream(Retr(n) for n in numbers)):
            number = numbers[index]
            index += 1
            if not reply.status.ok:
                raise _core.no_such(number, reply)
            yield number, reply.body or b""

    async def get_header_only(
        self,
        messages: Sequence[int] | None = None,
        uids: Sequence[str] | None = None,
        *,
        start_row: int = 1,
        max_rows: int | None = None,
    ) -> Result:
        return await self._rows(messages, uids, start_row, max_rows, headers_only=True)

    async def get_all(
        self,
        messages: Sequence[int] | None = None,
        uids: Sequence[str] | None = None,
        *,
        start_row: int = 1,
        max_rows: int | None = None,
        attachment_path: str | Path | None = None,
        generate_unique_filenames: bool = False,
    ) -> Result:
        return await self._rows(
            messages,
            uids,
            start_row,
            max_rows,
            headers_only=False,
            attachment_path=attachment_path,
            unique_filenames=generate_unique_filenames,
        )

    async def _rows(
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
        targets, result = await self._run(
            _core.select(self.session, messages, uids, start_row, max_rows)
        )
        fetched = await self._run(_core.fetch(self.session, targets, headers_only=headers_only))
        # MIME parsing and attachment files are blocking work: not on the event loop.
        out: Result = await anyio.to_thread.run_sync(
            functools.partial(
                _core.make_rows,
                fetched,
                result,
                headers_only=headers_only,
                attachment_path=attachment_path,
                unique_filenames=unique_filenames,
            )
        )
        return out

    async def delete(
        self,
        messages: Sequence[int] | None = None,
        uids: Sequence[str] | None = None,
        *,
        start_row: int = 1,
        max_rows: int | None = None,
    ) -> Result:
        if messages is None and uids is None:
            raise ValueError("delete needs messages=[...] or uids=[...]")
        targets, result = await self._run(
            _core.select(self.session, messages, uids, start_row, max_rows)
        )
        try:
            out: Result = await self._run(_core.delete(self.session, targets, result))
        finally:
            await self.aclose()
        return out
