"""Server CPU per MiB written over TLS, two ways: ``python benches/tls_write.py``.

- ``socket``: OpenSSL writes the descriptor itself (``ssl.SSLSocket``, non-blocking),
  as pypop.server.tls does; optionally corked (``TCP_CORK``) around each MiB.
- ``bio``: OpenSSL writes into a memory BIO, the ciphertext is read out into a
  ``bytes`` and sent, as ``trio.SSLStream`` does (without trio's own Python).

The writer is pinned to core 0, a reader process on core 1 decrypts and discards.
Over loopback TCP with TCP_NODELAY, as the server's sessions run. Prints CPU
microseconds per MiB (user and system) for each way, ``--rounds`` times alternately.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import socket
import ssl
import sys
from collections.abc import Callable

import trustme

MIB = 1 << 20


def _contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def _connected() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    b.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def _reader(sock: socket.socket, ctx: ssl.SSLContext) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {1})
    tls = ctx.wrap_socket(sock, server_hostname="localhost")
    buf = bytearray(MIB)
    while tls.recv_into(buf):
        pass
    os._exit(0)


def _writer(
    way: str, sock: socket.socket, ctx: ssl.SSLContext
) -> tuple[Callable[[bytes], None], socket.socket]:
    """(send one buffer, the socket to close at the end)."""
    if way == "bio":
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_side=True)
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        if outgoing.pending:
            sock.sendall(outgoing.read())

        def send_bio(data: bytes) -> None:
            obj.write(data)
            sock.sendall(outgoing.read())

        return send_bio, sock
    tls = ctx.wrap_socket(sock, server_side=True)
    tls.setblocking(False)
    cork = way == "socket-cork"

    def send_socket(data: bytes) -> None:
        if cork:
            tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        while True:
            try:
                tls.write(data)
                break
            except ssl.SSLWantWriteError:
                select.select([], [tls], [])
        if cork:
            tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)

    return send_socket, tls


def measure(way: str, mibs: int) -> tuple[float, float]:
    server_ctx, client_ctx = _contexts()
    client, server = _connected()
    pid = os.fork()
    if pid == 0:
        server.close()
        _reader(client, client_ctx)
    client.close()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    send, sock = _writer(way, server, server_ctx)
    payload = os.urandom(MIB)
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(mibs):
        send(payload)
    after = resource.getrusage(resource.RUSAGE_SELF)
    sock.close()
    os.waitpid(pid, 0)
    return (
        1e6 * (after.ru_utime - before.ru_utime) / mibs,
        1e6 * (after.ru_stime - before.ru_stime) / mibs,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mibs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"server CPU per MiB over TLS ({ssl.OPENSSL_VERSION}); user + system, in µs")
    for _ in range(args.rounds):
        for way in ("bio", "socket", "socket-cork"):
            user, system = measure(way, args.mibs)
            print(f"{way:12} {user + system:6.0f}  ({user:.0f} + {system:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
