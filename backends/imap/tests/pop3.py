"""POP3 helpers for the tests: a pypop server in front of the imap backend, and a raw
client that records exactly what a server sends (to compare two servers byte by
byte)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
from pypop.backend import Backend
from pypop.config import ServerConfig
from pypop.server import Server, serve


@asynccontextmanager
async def pypop(
    backend: Backend, certs: dict[str, Path] | None = None, **overrides: object
) -> AsyncIterator[Server]:
    """A pypop server on 127.0.0.1 (port 0; with ``certs`` also implicit TLS and STLS)."""
    config = ServerConfig(
        listen=[("127.0.0.1", 0)],
        auth_failure_delay=0.0,
        auth_penalty_max=0.0,
        shutdown_timeout=5.0,
        hostname="pop.test",
    )
    if certs is not None:
        config.tls_cert, config.tls_key = certs["cert"], certs["key"]
        config.listen_tls = [("127.0.0.1", 0)]
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise AttributeError(key)
        setattr(config, key, value)
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            lambda task_status: serve(config, backend=backend, task_status=task_status)
        )
        try:
            yield server
        finally:
            server.shutdown()


class Raw:
    """A blocking POP3 client that keeps every octet of each reply."""

    def __init__(
        self, port: int, *, tls: ssl.SSLContext | None = None, source: str | None = None
    ) -> None:
        where = (source, 0) if source else None
        sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=where)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.buf = b""
        self.greeting = self.line()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError(self.buf)
        self.buf += data

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def multiline(self) -> bytes:
        """The octets after the status line, up to and including the terminator."""
        while b"\r\n.\r\n" not in self.buf and not self.buf.startswith(b".\r\n"):
            self._fill()
        if self.buf.startswith(b".\r\n"):
            self.buf = self.buf[3:]
            return b".\r\n"
        end = self.buf.index(b"\r\n.\r\n") + 5
        body, self.buf = self.buf[:end], self.buf[end:]
        return body

    def cmd(self, command: str) -> bytes:
        self.sock.sendall(command.encode() + b"\r\n")
        return self.line()

    def login(self, user: str, password: str) -> bytes:
        self.cmd(f"USER {user}")
        return self.cmd(f"PASS {password}")

    def close(self) -> None:
        self.sock.close()


@dataclass
class Transcript:
    """Everything a mailbox shows over POP3."""

    stat: bytes = b""
    sizes: list[int] = field(default_factory=list)
    uidls: list[bytes] = field(default_factory=list)
    retr: list[bytes] = field(default_factory=list)
    top: dict[tuple[int, int], bytes] = field(default_factory=dict)


def transcript(
    port: int, user: str, password: str, tops: tuple[int, ...] = (0, 1, 3)
) -> Transcript:
    """STAT, LIST, UIDL, then RETR and TOP of every message, then QUIT (nothing marked)."""
    c = Raw(port)
    try:
        reply = c.login(user, password)
        assert reply.startswith(b"+OK"), reply
        t = Transcript()
        t.stat = c.cmd("STAT")
        assert c.cmd("LIST").startswith(b"+OK")
        t.sizes = [int(x.split()[1]) for x in c.multiline().split(b"\r\n")[:-2]]
        assert c.cmd("UIDL").startswith(b"+OK")
        t.uidls = [x.split()[1] for x in c.multiline().split(b"\r\n")[:-2]]
        for n in range(1, len(t.sizes) + 1):
            status = c.cmd(f"RETR {n}")
            assert status.startswith(b"+OK"), status
            t.retr.append(c.multiline())
            for lines in tops:
                status = c.cmd(f"TOP {n} {lines}")
                assert status.startswith(b"+OK"), status
                t.top[n, lines] = c.multiline()
        assert c.cmd("QUIT").startswith(b"+OK")
        return t
    finally:
        c.close()
