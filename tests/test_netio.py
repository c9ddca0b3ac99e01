"""pypop.netio: the lean socket streams, on real sockets."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from pypop.server.listeners import IOV_MAX, SocketStream, open_listeners


async def _pair() -> tuple[SocketStream, socket.socket]:
    a, b = socket.socketpair()
    b.setblocking(False)
    return SocketStream(a), b


async def _drain(sock: socket.socket, n: int, *, slowly: bool = False) -> bytes:
    out = bytearray()
    while len(out) < n:
        try:
            out += sock.recv(4096 if slowly else 1 << 20)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
        if slowly:
            await trio.lowlevel.checkpoint()
    return bytes(out)


async def _ticks_during(work: Callable[[], Awaitable[None]]) -> int:
    """How often another task ran while ``work`` ran."""
    ticks = 0

    async def other() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await work()
        nursery.cancel_scope.cancel()
    return ticks


async def test_send_many_survives_partial_writes_and_many_chunks() -> None:
    stream, peer = await _pair()
    big = bytes(range(256)) * 40_000  # ~10 MB: far beyond the socket buffer
    small = [b"+OK %d\r\n" % i for i in range(IOV_MAX * 2 + 7)]
    chunks = [b"head\r\n", big, *small, b"tail"]
    expected = b"".join(chunks)
    async with trio.open_nursery() as nursery:
        result: list[bytes] = []

        async def reader() -> None:
            result.append(await _drain(peer, len(expected), slowly=True))

        nursery.start_soon(reader)
        await stream.send_many(chunks)
    assert result[0] == expected
    await stream.aclose()
    peer.close()


async def test_send_many_skips_empty_chunks() -> None:
    """An empty chunk anywhere (after a send that took everything before it, or
    first) is passed over, not offered to sendmsg again and again."""
    stream, peer = await _pair()
    chunks = [b"", b"+OK\r\n", b"", b"", b"x" * 10_000, b"", b"y", b""]
    with trio.fail_after(5):
        await stream.send_many(chunks)
        assert await _drain(peer, 10_006) == b"".join(chunks)
        await stream.send_many([b"+OK\r\n", b"", b""])
        await stream.send_many([b"", b""])
        assert await _drain(peer, 5) == b"+OK\r\n"
    await stream.aclose()
    peer.close()


async def test_sends_that_never_wait_still_let_others_run() -> None:
    stream, peer = await _pair()

    async def work() -> None:
        for _ in range(32):  # the socket buffer takes each at once
            await stream.send_all(b"+OK\r\n")
            await stream.send_many([b"+OK 2 octets\r\n", b"xx\r\n.\r\n"])

    assert await _ticks_during(work) >= 64 // 16 - 1  # a yield per 16 that did not wait
    await stream.aclose()
    peer.close()


async def test_receive_eof_and_closed() -> None:
    stream, peer = await _pair()
    peer.sendall(b"hello")
    assert await stream.receive_some() == b"hello"
    peer.close()
    assert await stream.receive_some() == b""
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")


async def test_send_to_reset_peer_is_broken() -> None:
    stream, peer = await _pair()
    peer.close()

    async def send_until_it_fails() -> None:
        for _ in range(100):  # the first sends may still be accepted
            await stream.send_all(b"x" * 65536)

    with pytest.raises(trio.BrokenResourceError):
        await send_until_it_fails()
    await stream.aclose()


async def test_closing_wakes_a_blocked_reader() -> None:
    stream, peer = await _pair()
    caught: list[BaseException] = []

    async def reader() -> None:
        try:
            await stream.receive_some()
        except trio.ClosedResourceError as exc:
            caught.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        await stream.aclose()
    assert len(caught) == 1
    peer.close()


async def test_a_busy_peer_does_not_starve_others() -> None:
    stream, peer = await _pair()
    peer.send(b"x" * 6400)

    async def work() -> None:
        for _ in range(64):  # data is always ready: the reader never has to wait
            assert await stream.receive_some(100)

    assert await _ticks_during(work) >= 64 // 16 - 1  # a yield per 16 that did not wait
    await stream.aclose()
    peer.close()


async def test_listener_port_zero_and_accept() -> None:
    listeners = await open_listeners("127.0.0.1", 0)
    assert len(listeners) == 1
    host, port = listeners[0].address
    assert host == "127.0.0.1"
    assert port > 0
    client = await trio.open_tcp_stream(host, port)
    stream, peer = await listeners[0].accept()
    assert peer.host == "127.0.0.1"
    assert peer.port == client.socket.getsockname()[1]
    assert peer.loopback
    assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    await client.send_all(b"ping")
    assert await stream.receive_some() == b"ping"
    await client.aclose()
    await stream.aclose()
    await listeners[0].aclose()


async def test_receive_after_reply_waits_then_reads() -> None:
    stream, peer = await _pair()

    async def later() -> None:
        await trio.testing.wait_all_tasks_blocked()
        peer.send(b"NOOP\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        assert await stream.receive_after_reply() == b"NOOP\r\n"
    peer.close()
    assert await stream.receive_after_reply() == b""
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_after_reply()
