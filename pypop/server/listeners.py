"""Listeners, connected streams and the :class:`Peer` on the other end.

Everything between ``accept()`` and a session lives here: the listening sockets
(plain or implicit TLS), the client's address as a :class:`Peer`, and lean TCP
streams on trio's low-level I/O.

``trio.SocketStream`` pays for generality on every call: a conflict detector, a
memoryview per send, and a schedule point after every successful ``send``/``recv``.
A POP3 session makes several tiny reads and writes per command, so those costs
dominate a login. This module does the same job with stdlib sockets and
``trio.lowlevel.wait_readable``/``wait_writable``:

- an operation that can complete at once completes without yielding to the scheduler;
  every ``YIELD_EVERY``-th one yields anyway, so a client that keeps its socket busy
  cannot starve the other sessions, and cancellation is always noticed at the start
  of an operation (``checkpoint_if_cancelled``);
- a stream is a slotted object over one socket; TLS takes the socket over
  (:mod:`pypop.server.tls`).

Errors follow trio's stream contract: ``BrokenResourceError`` for a failed socket,
``ClosedResourceError`` for one we closed.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import select
import socket
from dataclasses import dataclass
from typing import Final

import trio
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint,
    checkpoint_if_cancelled,
    notify_closing,
    wait_readable,
    wait_writable,
)

from pypop.auth.penalty import client_key

__all__ = [
    "Fair",
    "Listener",
    "Peer",
    "SocketStream",
    "close_socket",
    "is_transient",
    "open_listeners",
]

RECV_SIZE: Final = 65536
YIELD_EVERY: Final = 16
BACKLOG: Final = 4096
IOV_MAX: Final = 1024
# Replies shorter than this are joined and sent with one send_all, longer ones gathered
# with send_many (pypop.server.session): a copy of a few KiB costs less than sendmsg's
# iovec and buffer exports, a copy of a large message more (on loopback, even at 4-8 KiB).
JOIN_BELOW: Final = 8192
# accept() errors that concern one connection or a passing shortage, not the listener
# (the list trio.serve_listeners uses, plus the per-connection ones).
_ACCEPT_TRANSIENT: Final = frozenset(
    {
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOMEM,
        errno.ENOBUFS,
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,
    }
)


@functools.lru_cache(maxsize=4096)
def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Peer:
    """The client of a connection: its address and port as the socket reports them,
    or as a trusted proxy's PROXY header names them (``proxy`` is then the proxy)."""

    host: str
    port: int = 0
    # The trusted proxy that named this client in a PROXY header (None: direct).
    proxy: str | None = None

    @property
    def key(self) -> str:
        """The unit of per-client limits and penalties: the IPv4 address, or the /64
        of an IPv6 address (:func:`pypop.auth.penalty.client_key`)."""
        return client_key(self.host)

    @property
    def loopback(self) -> bool:
        return _is_loopback(self.host)

    def __str__(self) -> str:
        return self.host


class Fair:
    """For a stream whose operations complete without waiting when they can: every
    ``YIELD_EVERY``-th such one yields, so one busy peer cannot monopolise the event
    loop (SocketStream, and pypop.server.tls.TLSStream). The stream's ``__init__``
    sets ``_budget = YIELD_EVERY`` (no extra call per connection)."""

    __slots__ = ("_budget",)
    _budget: int

    def _due(self) -> bool:
        """Count an operation that completed at once: True on every ``YIELD_EVERY``-th,
        when the caller yields (``if self._due(): await cancel_shielded_checkpoint()``;
        a plain call, where a coroutine per operation cost about 1,000 instructions)."""
        self._budget -= 1
        if self._budget > 0:
            return False
        self._budget = YIELD_EVERY
        return True


class SocketStream(Fair, trio.abc.HalfCloseableStream):
    """A connected TCP socket as a trio stream."""

    __slots__ = ("socket",)

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._budget = YIELD_EVERY

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await checkpoint_if_cancelled()
        sock = self.socket
        size = RECV_SIZE if max_bytes is None else max_bytes
        while True:
            try:
                data = sock.recv(size)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise _error(sock, exc) from exc
            else:
                if self._due():
                    await cancel_shielded_checkpoint()
                return data
            await wait_readable(sock)

    async def receive_after_reply(self, max_bytes: int = RECV_SIZE) -> bytes:
        """receive_some for a peer that is most likely still reading our reply: wait
        for readiness first instead of paying for a recv that fails with EAGAIN.
        (No checkpoint_if_cancelled first: the wait below is a full checkpoint, and a
        cancel already pending is delivered as soon as it blocks.)"""
        sock = self.socket
        if sock.fileno() == -1:
            raise trio.ClosedResourceError("socket was closed")
        while True:
            await wait_readable(sock)
            try:
                return sock.recv(max_bytes)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise _error(sock, exc) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await checkpoint_if_cancelled()
        sock = self.socket
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise _error(sock, exc) from exc
        if sent == len(data):
            if self._due():
                await cancel_shielded_checkpoint()
            return
        with memoryview(data) as view:
            remaining = view[sent:]
            while remaining:
                await wait_writable(sock)
                try:
                    sent = sock.send(remaining)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise _error(sock, exc) from exc
                remaining = remaining[sent:]

    async def send_many(self, chunks: list[bytes]) -> None:
        """``send_all(b"".join(chunks))`` without the join: one gathered write."""
        if len(chunks) == 1:
            await self.send_all(chunks[0])
            return
        await checkpoint_if_cancelled()
        sock = self.socket
        bufs: list[bytes | memoryview] = list(chunks)
        first = 0
        while first < len(bufs):
            try:
                sent = sock.sendmsg(bufs[first : first + IOV_MAX])
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise _error(sock, exc) from exc
            # Past what was sent, and past empty chunks even when nothing was (an
            # empty chunk would otherwise be offered again and again, a busy loop).
            while first < len(bufs):
                size = len(bufs[first])
                if sent >= size:
                    sent -= size
                    first += 1
                else:
                    if sent:
                        bufs[first] = memoryview(bufs[first])[sent:]
                    break
            if first < len(bufs):
                await wait_writable(sock)
        if self._due():
            await cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        if self.socket.fileno() == -1:
            raise trio.ClosedResourceError
        await wait_writable(self.socket)

    async def send_eof(self) -> None:
        await checkpoint()
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _error(self.socket, exc) from exc

    async def aclose(self) -> None:
        self.close()
        await checkpoint()

    def close(self) -> None:
        """:meth:`aclose` without its checkpoint, for a task that ends right after
        (a scheduler round trip less per session)."""
        close_socket(self.socket)


def close_socket(sock: socket.socket) -> None:
    # Wake any task waiting on the descriptor before it can be reused.
    if sock.fileno() != -1:
        notify_closing(sock)
        sock.close()


def _error(
    sock: socket.socket, exc: OSError
) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if sock.fileno() == -1 or exc.errno == errno.EBADF:
        return trio.ClosedResourceError("socket was closed")
    return trio.BrokenResourceError(f"socket error: {exc.strerror or exc}")


class Listener(trio.abc.AsyncResource):
    """A listening socket; ``accept`` returns (stream, peer). ``implicit_tls``: the
    connections start with a TLS handshake (RFC 8314 §3.3)."""

    __slots__ = ("_epoll", "_kind", "implicit_tls", "socket")

    def __init__(
        self, sock: socket.socket, *, implicit_tls: bool = False, shared: bool = False
    ) -> None:
        """``shared``: other processes accept from this socket too (workers). Then
        a new connection wakes one of them, not all (``EPOLLEXCLUSIVE`` on a private
        epoll that trio waits on: trio's own registrations are one-shot, which the
        kernel does not combine with exclusive wake-ups)."""
        sock.setblocking(False)
        self.socket = sock
        self.implicit_tls = implicit_tls
        # socket.accept() converts family and type to enums on every call (Python
        # code); the numbers are the listener's, read once.
        self._kind = (int(sock.family), int(sock.type), sock.proto)
        self._epoll: select.epoll | None = None
        exclusive = getattr(select, "EPOLLEXCLUSIVE", 0)
        if shared and exclusive and hasattr(select, "epoll"):
            self._epoll = select.epoll()
            self._epoll.register(sock.fileno(), select.EPOLLIN | exclusive)

    @property
    def address(self) -> tuple[str, int]:
        name = self.socket.getsockname()
        return str(name[0]), int(name[1])

    async def accept(self) -> tuple[SocketStream, Peer]:
        """The next connection, with TCP_NODELAY set (each reply is one write)."""
        await checkpoint_if_cancelled()
        sock = self.socket
        while True:
            try:
                fd, addr = sock._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                if self._epoll is None:
                    await wait_readable(sock)
                else:
                    await wait_readable(self._epoll)
                    self._epoll.poll(0)  # level-triggered: nothing to clear, but cheap
                continue
            except OSError as exc:
                if exc.errno in _ACCEPT_TRANSIENT:
                    raise
                raise _error(sock, exc) from exc
            family, kind, proto = self._kind
            conn = socket.socket(family, kind, proto, fileno=fd)
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                conn.close()
                continue
            return SocketStream(conn), Peer(str(addr[0]), int(addr[1]))

    def refuse_one(self, message: bytes | None) -> bool:
        """Take one waiting connection, send it ``message`` if the socket takes it at
        once, and close it. False if none was waiting (or accept failed again)."""
        try:
            conn, _ = self.socket.accept()
        except OSError:
            return False
        try:
            if message:
                conn.setblocking(False)
                conn.send(message)
        except OSError:
            pass
        finally:
            conn.close()
        return True

    async def aclose(self) -> None:
        if self._epoll is not None:
            notify_closing(self._epoll)
            self._epoll.close()
            self._epoll = None
        close_socket(self.socket)
        await checkpoint()


def is_transient(exc: OSError) -> bool:
    return exc.errno in _ACCEPT_TRANSIENT


async def open_listeners(host: str, port: int, *, implicit_tls: bool = False) -> list[Listener]:
    """Bind every address ``host`` resolves to (both families for a name), like
    ``trio.open_tcp_listeners``; IPv6 sockets are v6-only so both can share a port.

    An ``OSError`` names the address: "cannot listen on 127.0.0.1:110: ...".
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = await trio.socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise OSError(exc.errno, f"cannot resolve {where}: {exc.strerror or exc}") from None
    listeners: list[Listener] = []
    try:
        for family, type_, proto, _, sockaddr in infos:
            if port:
                sockaddr = (sockaddr[0], port, *sockaddr[2:])
            sock = socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                sock.listen(BACKLOG)
            except OSError as exc:
                sock.close()
                raise OSError(
                    exc.errno, f"cannot listen on {where}: {exc.strerror or exc}"
                ) from None
            listeners.append(Listener(sock, implicit_tls=implicit_tls))
            if port == 0:
                # An ephemeral port: bind the other families to the same one.
                port = listeners[0].address[1]
    except OSError:
        for lst in listeners:
            lst.socket.close()
        raise
    return listeners
