"""TLS on the session's own socket: OpenSSL reads and writes the descriptor itself.

``trio.SSLStream`` runs OpenSSL over memory BIOs: every record it writes is copied
into a BIO, out of it into a ``bytes``, and then into the kernel, each step a Python
call. Here the descriptor is handed to an ``ssl.SSLSocket`` in non-blocking mode:
``write`` encrypts a whole reply straight into the socket (one C call, the GIL let
go), ``read`` decrypts what the kernel holds, and the stream waits for readiness with
``trio.lowlevel`` as :class:`~pypop.server.listeners.SocketStream` does. A large
reply is written corked (``TCP_CORK``), so that its 16 KiB records leave in full
segments.

The stream contract is trio's: ``BrokenResourceError`` for a failed connection or a
TLS error, ``ClosedResourceError`` for a stream we closed, ``b""`` at the end of
input. One task uses a stream at a time (the session's), as with SocketStream.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Final

import trio
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint,
    checkpoint_if_cancelled,
    wait_readable,
    wait_writable,
)

from pypop.server.listeners import RECV_SIZE, YIELD_EVERY, Fair, SocketStream, close_socket

__all__ = ["TLSStream"]

# A chunk at least this long is written without being joined to its neighbours: a
# copy of it costs more than the extra record and system call.
WRITE_ALONE: Final = 64 * 1024
_CORK: Final[int | None] = getattr(socket, "TCP_CORK", None)  # Linux


class TLSStream(Fair, trio.abc.Stream):
    """The server side of TLS over a connected :class:`SocketStream`.

    ``do_handshake`` takes the socket over (the plain stream is left detached, and
    closing it does nothing); nothing can be sent or read before it succeeds, so no
    octet of the session ever travels in clear by mistake.
    """

    __slots__ = ("_broken", "_context", "_plain", "_sock")

    def __init__(self, stream: SocketStream, context: ssl.SSLContext) -> None:
        self._plain: SocketStream | None = stream
        self._context = context
        self._sock: ssl.SSLSocket | None = None
        self._broken = False
        self._budget = YIELD_EVERY

    def _ready(self) -> ssl.SSLSocket:
        sock = self._sock
        if sock is None or sock.fileno() == -1:
            raise trio.ClosedResourceError("TLS stream is closed or not yet set up")
        if self._broken:
            raise trio.BrokenResourceError("TLS stream is broken")
        return sock

    async def do_handshake(self) -> None:
        """The TLS handshake; ``BrokenResourceError`` if it fails."""
        await checkpoint_if_cancelled()
        if self._sock is None:
            plain = self._plain
            if plain is None or plain.socket.fileno() == -1:
                raise trio.ClosedResourceError("socket was closed")
            try:
                self._sock = self._context.wrap_socket(
                    plain.socket,
                    server_side=True,
                    do_handshake_on_connect=False,
                    suppress_ragged_eofs=False,
                )
            except (OSError, ValueError) as exc:
                self._broken = True
                raise trio.BrokenResourceError(f"TLS set-up failed: {_why(exc)}") from exc
            self._plain = None
        sock = self._sock
        while True:
            try:
                sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                wait = wait_readable
            except ssl.SSLWantWriteError:
                wait = wait_writable
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                self._broken = True
                raise trio.BrokenResourceError(f"TLS handshake failed: {_why(exc)}") from exc
            try:
                await wait(sock)
            except BaseException:
                self._broken = True  # a handshake left half done cannot go on
                raise

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await checkpoint_if_cancelled()
        sock = self._ready()
        size = RECV_SIZE if max_bytes is None else max_bytes
        while True:
            # Always read before waiting: OpenSSL may hold decrypted data already.
            try:
                data = sock.read(size)
            except ssl.SSLWantReadError:
                wait = wait_readable
            except ssl.SSLWantWriteError:
                wait = wait_writable
            except ssl.SSLZeroReturnError:
                return b""  # the peer's close_notify
            except (OSError, ValueError) as exc:
                raise self._failed(sock, exc) from exc
            else:
                if self._due():
                    await cancel_shielded_checkpoint()
                return data
            await wait(sock)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await checkpoint_if_cancelled()
        sock = self._ready()
        if not data:
            return
        while True:
            try:
                # Without partial writes: a write that must wait is retried with the
                # same buffer, and OpenSSL goes on where it stopped.
                sock.write(data)
            except ssl.SSLWantWriteError:
                wait = wait_writable
            except ssl.SSLWantReadError:
                wait = wait_readable
            except (OSError, ValueError) as exc:
                raise self._failed(sock, exc) from exc
            else:
                if self._due():
                    await cancel_shielded_checkpoint()
                return
            try:
                await wait(sock)
            except BaseException:
                self._broken = True  # a record may be half sent: nothing can follow it
                raise

    async def send_many(self, chunks: list[bytes]) -> None:
        """``send_all(b"".join(chunks))`` without copying the large chunks: runs of
        small ones are joined (one record, one system call), a large one is written
        on its own (OpenSSL cuts it into records anyway)."""
        small: list[bytes] = []
        corked = False
        try:
            for chunk in chunks:
                if len(chunk) < WRITE_ALONE:
                    small.append(chunk)
                    continue
                if not corked:
                    # OpenSSL writes each 16 KiB record on its own and TCP_NODELAY
                    # sends each at once, ending in a short segment: corked, the
                    # records leave in full segments (and wake the peer less often).
                    corked = self._cork(1)
                await self._send_joined(small)
                await self.send_all(chunk)
            await self._send_joined(small)
        finally:
            if corked:
                self._cork(0)

    async def _send_joined(self, small: list[bytes]) -> None:
        """Send the small chunks gathered so far as one write, and forget them."""
        if small:
            await self.send_all(small[0] if len(small) == 1 else b"".join(small))
            small.clear()

    def _cork(self, on: int) -> bool:
        sock = self._sock
        if sock is None or _CORK is None:
            return False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _CORK, on)
        except OSError:
            return False  # closed, or not TCP
        return True

    def _failed(
        self, sock: ssl.SSLSocket, exc: Exception
    ) -> trio.BrokenResourceError | trio.ClosedResourceError:
        if sock.fileno() == -1:
            return trio.ClosedResourceError("TLS stream was closed")
        self._broken = True
        return trio.BrokenResourceError(f"TLS stream failed: {_why(exc)}")

    async def wait_send_all_might_not_block(self) -> None:
        await wait_writable(self._ready())

    def version(self) -> str | None:
        return None if self._sock is None else self._sock.version()

    def get_channel_binding(self, cb_type: str = "tls-unique") -> bytes | None:
        return None if self._sock is None else self._sock.get_channel_binding(cb_type)

    async def aclose(self) -> None:
        """Send close_notify (RFC 8314 §3.2) without waiting for the peer's, then
        close the socket; the socket is closed however this ends."""
        sock = self._sock
        if sock is None:
            if self._plain is not None:
                self._plain.close()
            await checkpoint()
            return
        try:
            if sock.fileno() != -1 and not self._broken:
                while True:
                    try:
                        sock.unwrap()
                        break
                    except ssl.SSLWantWriteError:
                        await wait_writable(sock)
                    except ssl.SSLWantReadError:
                        break  # ours is sent; the peer's is not awaited
        except (OSError, ValueError):
            pass
        finally:
            if self._broken and sock.fileno() != -1:
                # Octets left unread turn the close into a reset, which may reach the
                # peer before our alert does (a plaintext client on the TLS port, say):
                # take what has arrived, unencrypted, once.
                with contextlib.suppress(OSError):
                    socket.socket.recv(sock, RECV_SIZE)
            self._broken = True
            close_socket(sock)
        await checkpoint()


def _why(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.__class__.__name__
    if isinstance(exc, OSError):
        return exc.strerror or exc.__class__.__name__
    return exc.__class__.__name__
