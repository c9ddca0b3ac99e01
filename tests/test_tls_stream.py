"""pypop.server.tls.TLSStream on real loopback TCP with trustme certificates: the
bytes of large writes that must wait for the reader, which chunks are joined, the
three ways a peer can end (close_notify, a cut, garbage), and that nothing is read
or written in clear before the handshake."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trustme

from pypop.server.listeners import SocketStream
from pypop.server.tls import WRITE_ALONE, TLSStream


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    return ctx


@pytest.fixture
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@dataclass(frozen=True)
class Pair:
    """A connected loopback TCP pair: our side as a SocketStream, the peer's as a
    trio stream."""

    ours: SocketStream
    peer: trio.SocketStream


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        peer = await trio.open_tcp_stream("127.0.0.1", lsock.getsockname()[1])
        await trio.lowlevel.wait_readable(lsock)
        conn, _ = lsock.accept()
    ours = SocketStream(conn)
    try:
        yield Pair(ours, peer)
    finally:
        ours.close()
        await trio.aclose_forcefully(peer)


async def handshake(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[TLSStream, trio.SSLStream[trio.SocketStream]]:
    tls = TLSStream(pair.ours, server_ctx)
    client = trio.SSLStream(pair.peer, client_ctx, server_hostname="localhost")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tls.do_handshake)
            nursery.start_soon(client.do_handshake)
    return tls, client


async def read_exactly(stream: trio.abc.Stream, n: int, *, slowly: bool = False) -> bytes:
    got = bytearray()
    with trio.fail_after(30):
        while len(got) < n:
            chunk = await stream.receive_some(65536)
            assert chunk, f"EOF after {len(got)} of {n} octets"
            got += chunk
            if slowly:
                await trio.sleep(0.001)  # the server's writes must wait for us
    return bytes(got)


async def test_large_writes_that_must_wait_arrive_whole(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    # Small send buffers: every large write stops on SSLWantWriteError many times.
    pair.ours.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    tls, client = await handshake(pair, server_ctx, client_ctx)
    chunks = [b"+OK 3 MiB\r\n", os.urandom(3 << 20), b"\r\n", b".\r\n", os.urandom(WRITE_ALONE)]
    expected = b"".join(chunks)
    got = b""

    async def reader() -> None:
        nonlocal got
        got = await read_exactly(client, len(expected), slowly=True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await tls.send_many(chunks)
    assert got == expected
    # Both ways still work afterwards.
    await client.send_all(b"QUIT\r\n")
    assert await tls.receive_some() == b"QUIT\r\n"
    await tls.send_all(b"+OK bye\r\n")
    assert await read_exactly(client, 9) == b"+OK bye\r\n"
    await tls.aclose()


async def test_send_many_joins_small_chunks_and_writes_large_ones_alone(
    pair: Pair,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tls, client = await handshake(pair, server_ctx, client_ctx)
    writes: list[bytes] = []
    corked: list[int] = []  # TCP_CORK at each write
    real_write = ssl.SSLSocket.write

    def spy(self: ssl.SSLSocket, data: Any) -> int:
        writes.append(data)
        corked.append(self.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK))
        return real_write(self, data)

    monkeypatch.setattr(ssl.SSLSocket, "write", spy)
    big, edge = b"x" * (200 * 1024), b"y" * WRITE_ALONE
    chunks = [b"+OK\r\n", big, b"\r\n", b".\r\n", b"+OK 2\r\n", edge, b"z" * (WRITE_ALONE - 1)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tls.send_many, chunks)
        got = await read_exactly(client, sum(map(len, chunks)))
    assert got == b"".join(chunks)
    assert writes == [b"+OK\r\n", big, b"\r\n.\r\n+OK 2\r\n", edge, b"z" * (WRITE_ALONE - 1)]
    assert writes[1] is big  # written as given, not copied
    assert writes[3] is edge
    # The records of a large reply leave corked (full segments); the socket is
    # uncorked after it, and small replies are never corked.
    assert corked == [1, 1, 1, 1, 1]
    assert tls_cork(tls) == 0
    small = [b"+OK 1 2\r\n", b"+OK\r\n"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tls.send_many, small)
        assert await read_exactly(client, 14) == b"+OK 1 2\r\n+OK\r\n"
    assert writes[-1] == b"+OK 1 2\r\n+OK\r\n"
    assert corked[-1] == 0
    await tls.aclose()


def tls_cork(tls: TLSStream) -> int:
    sock = tls._sock  # (the socket the stream took over)
    assert sock is not None
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)


async def test_close_notify_reads_as_the_end(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    tls, client = await handshake(pair, server_ctx, client_ctx)
    await client.send_all(b"QUIT\r\n")
    await client.aclose()  # sends close_notify
    assert await tls.receive_some() == b"QUIT\r\n"
    assert await tls.receive_some() == b""
    await tls.aclose()


async def test_a_cut_without_close_notify_is_a_broken_stream(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    tls, _ = await handshake(pair, server_ctx, client_ctx)
    pair.peer.socket.close()  # TCP FIN, no close_notify (a truncation attack looks so)
    with pytest.raises(trio.BrokenResourceError):
        await tls.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await tls.send_all(b"+OK\r\n")
    await tls.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await tls.receive_some()


async def test_garbage_instead_of_a_client_hello(pair: Pair, server_ctx: ssl.SSLContext) -> None:
    tls = TLSStream(pair.ours, server_ctx)
    await pair.peer.send_all(b"USER alice\r\n" * 4)
    with pytest.raises(trio.BrokenResourceError):
        with trio.fail_after(10):
            await tls.do_handshake()
    await tls.aclose()
    # The socket is closed, after our octets were taken: the peer reads the end, not
    # a reset (OpenSSL sends no alert for a record that is not TLS at all).
    got = b""
    with trio.fail_after(10):
        while chunk := await pair.peer.receive_some(65536):
            got += chunk
    assert got == b""


async def test_nothing_travels_in_clear_before_the_handshake(
    pair: Pair, server_ctx: ssl.SSLContext
) -> None:
    tls = TLSStream(pair.ours, server_ctx)
    await pair.peer.send_all(b"PASS secret\r\n")
    with pytest.raises(trio.ClosedResourceError):
        await tls.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await tls.send_all(b"+OK maildrop locked\r\n")
    # The peer's octets were not taken, and nothing was sent to it.
    await trio.lowlevel.wait_readable(pair.ours.socket)
    assert pair.ours.socket.recv(100, socket.MSG_PEEK) == b"PASS secret\r\n"
    with trio.move_on_after(0.2):
        assert await pair.peer.receive_some(100) == b"<nothing>"
    await tls.aclose()


async def test_a_send_cancelled_midway_breaks_the_stream(
    pair: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    pair.ours.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    tls, client = await handshake(pair, server_ctx, client_ctx)
    with trio.move_on_after(0.5) as cs:
        await tls.send_many([b"+OK\r\n", b"x" * (16 << 20)])  # the client reads nothing
    assert cs.cancelled_caught
    assert tls_cork(tls) == 0  # uncorked however the write ended
    # Part of the write may have gone out: nothing may follow it (OpenSSL would carry
    # on with a new buffer as long as the first from where the first stopped).
    with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
        await tls.send_all(b"y" * (16 << 20))
    with trio.fail_after(5):
        await tls.aclose()  # without waiting for the peer to read
    await client.aclose()
