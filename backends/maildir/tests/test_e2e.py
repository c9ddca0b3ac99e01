"""End to end: the pypop conformance kit, poplib against real maildirs, kill -9."""

from __future__ import annotations

import itertools
import os
import poplib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from pypop.auth import MemoryCredentialStore
from pypop.backend import Backend
from pypop.config import ServerConfig
from pypop.server import Server, serve
from pypop.server.listeners import SocketStream
from pypop.testing import BackendConformance, expected_retr, expected_size
from pypop.wire import stuff

from pypop_maildir import create
from pypop_maildir._backend import LARGE_BLOCK

from .conftest import HARD_CASES, deliver, make_maildir

PASSWORD = "maildir-e2e-password"
_counter = itertools.count(1)


def unique_name() -> str:
    n = next(_counter)
    return f"{1700000000 + n}.M{n}P{os.getpid()}.e2e"


class MaildirHarness:
    def __init__(self, root: Path) -> None:
        self.root = root

    def make_backend(self) -> Backend:
        return create({"root": str(self.root)})

    async def deliver(self, backend: Backend, user: str, message: bytes) -> None:
        md = make_maildir(self.root / user)
        deliver(md, unique_name(), message)


class TestMaildirConformance(BackendConformance):
    @pytest.fixture
    def harness(self, tmp_path: Path) -> MaildirHarness:
        root = tmp_path / "conformance"
        root.mkdir()
        return MaildirHarness(root)


@asynccontextmanager
async def running(backend: Backend) -> AsyncIterator[Server]:
    config = ServerConfig(
        listen=[("127.0.0.1", 0)],
        auth_failure_delay=0.0,
        auth_penalty_max=0.0,
        shutdown_timeout=5.0,
    )
    store = MemoryCredentialStore({"alice": PASSWORD})
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            lambda task_status: serve(config, backend=backend, store=store, task_status=task_status)
        )
        try:
            yield server
        finally:
            server.shutdown()


async def test_poplib_hard_cases_and_5mib(alice: Path, root: Path) -> None:
    messages = dict(HARD_CASES)
    messages["five-mib"] = b"Subject: big\n\n" + (b"." * 70 + b"\n") * (5 * 1024 * 1024 // 71)
    for key, data in messages.items():
        deliver(alice, unique_name() + "." + key, data)
    async with running(create({"root": str(root)})) as server:
        host, port = server.addresses[0]

        def session() -> tuple[list[int], list[bytes], list[bytes]]:
            pop = poplib.POP3(host, port, timeout=60)
            try:
                pop.user("alice")
                pop.pass_(PASSWORD)
                sizes = [int(x.split()[1]) for x in pop.list()[1]]
                bodies = [
                    b"".join(line + b"\r\n" for line in pop.retr(i + 1)[1])
                    for i in range(len(sizes))
                ]
                uidls = pop.uidl()[1]
                pop.quit()
                return sizes, bodies, uidls
            finally:
                pop.close()

        sizes, bodies, uidls = await trio.to_thread.run_sync(session)
    for i, (key, data) in enumerate(messages.items()):
        want = expected_retr(data)
        assert bodies[i] == want, key
        assert sizes[i] == expected_size(data), key
        # RETR delivers the size, plus the CRLF added to a last line without one
        assert len(want) - sizes[i] == (2 if key in ("just-dot", "no-final-newline") else 0), key
    assert len({u.split()[1] for u in uidls}) == len(messages)


async def test_large_message_leaves_with_its_terminator(
    alice: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message is sent in one write per block read, the last of them with the
    terminator: no write of the terminator alone after a large message."""
    lines = b"".join(b"%06d a line of a large message, LF line ends\n" % i for i in range(40_000))
    one_block = (b"Subject: one block\n\n" + lines)[:LARGE_BLOCK]
    three_blocks = b"Subject: three blocks\n\n" + lines + lines[: LARGE_BLOCK // 2]
    assert LARGE_BLOCK * 2 < len(three_blocks) < LARGE_BLOCK * 3
    deliver(alice, unique_name() + ".one", one_block)
    deliver(alice, unique_name() + ".three", three_blocks)
    writes: list[bytes] = []
    send_many, send_all = SocketStream.send_many, SocketStream.send_all
    gathering = False

    async def recording(stream: SocketStream, chunks: list[bytes]) -> None:
        nonlocal gathering
        writes.append(b"".join(chunks))
        gathering = True
        try:
            await send_many(stream, chunks)
        finally:
            gathering = False

    async def recording_one(stream: SocketStream, data: bytes | bytearray | memoryview) -> None:
        if not gathering:  # a short reply, joined by the session
            writes.append(bytes(data))
        await send_all(stream, data)

    monkeypatch.setattr(SocketStream, "send_many", recording)
    monkeypatch.setattr(SocketStream, "send_all", recording_one)
    async with running(create({"root": str(root)})) as server:
        host, port = server.addresses[0]

        def session() -> None:
            pop = poplib.POP3(host, port, timeout=60)
            try:
                pop.user("alice")
                pop.pass_(PASSWORD)
                pop.retr(1)
                pop.retr(2)
                pop.quit()
            finally:
                pop.close()

        await trio.to_thread.run_sync(session)

    def head(message: bytes) -> bytes:
        return b"+OK %d octets\r\n" % expected_size(message)

    first = next(i for i, w in enumerate(writes) if w.startswith(head(one_block)))
    for message, count in ((one_block, 1), (three_blocks, 3)):
        sent = writes[first : first + count]
        assert b"".join(sent) == head(message) + stuff(message)
        assert all(len(w) > len(b".\r\n") for w in sent)
        first += count
    assert writes[first:] == [b"+OK Logging out\r\n"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_server(root: Path, passwd: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "pypop", "serve", "--backend", "maildir",
            "-o", f"root={root}", "--passwd-file", str(passwd),
            "--listen", f"127.0.0.1:{port}", "--allow-plaintext", "--log-level", "ERROR",
            "--workers", "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise AssertionError("server did not start")


def _recv_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\r\n"):
        chunk = sock.recv(1)
        assert chunk, "connection closed"
        buf += chunk
    return buf


def test_kill_9_mid_retr_deletes_nothing(alice: Path, root: Path, tmp_path: Path) -> None:
    big = b"Subject: big\r\n\r\n" + b"y" * 78 + b"\r\n"
    big = big + b"z" * 78 * 1024 * 80 + b"\r\n"  # ~6 MiB
    names = []
    for i in range(3):
        names.append(unique_name())
        deliver(alice, names[-1], big if i == 1 else b"Subject: small\r\n\r\nhi\r\n")
    passwd = tmp_path / "passwd"
    passwd.write_text(f"alice:{{PLAIN}}{PASSWORD}\n")
    port = _free_port()
    proc = _start_server(root, passwd, port)
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        with sock:
            assert _recv_line(sock).startswith(b"+OK")
            for cmd in (b"USER alice", f"PASS {PASSWORD}".encode(), b"DELE 1", b"DELE 3"):
                sock.sendall(cmd + b"\r\n")
                assert _recv_line(sock).startswith(b"+OK"), cmd
            sock.sendall(b"RETR 2\r\n")
            assert _recv_line(sock).startswith(b"+OK")
            assert len(sock.recv(65536)) > 0  # mid-RETR
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Nothing removed (DELE 1 and DELE 3 never reached UPDATE).
    files = sorted(os.listdir(alice / "cur")) + sorted(os.listdir(alice / "new"))
    assert [f.split(":")[0] for f in files] == names
    # The next server recovers the lock left by the killed one and sees all mail.
    port = _free_port()
    proc = _start_server(root, passwd, port)
    try:
        pop = poplib.POP3("127.0.0.1", port, timeout=30)
        try:
            pop.user("alice")
            pop.pass_(PASSWORD)
            assert pop.stat()[0] == 3
            assert [u.split()[1].decode() for u in pop.uidl()[1]] == names
            pop.quit()
        finally:
            pop.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_refused_8bit_message_is_not_flagged_seen(alice: Path, root: Path) -> None:
    """RFC 6856: a message refused to a client without UTF8 was not retrieved, so
    UPDATE must not mark it Seen, even when it was read ahead; sent to a UTF8 client,
    it is."""
    names = [unique_name() + tag for tag in (".ascii", ".8bit", ".last")]
    deliver(alice, names[0], b"Subject: one\n\nbody\n")
    deliver(alice, names[1], "Subject: Grüße\n\nbody\n".encode())
    deliver(alice, names[2], b"Subject: three\n\nbody\n")
    async with running(create({"root": str(root)})) as server:
        host, port = server.addresses[0]

        def session(utf8: bool) -> list[bytes]:
            pop = poplib.POP3(host, port, timeout=60)
            replies = []
            try:
                if utf8:
                    replies.append(pop.utf8())
                pop.user("alice")
                pop.pass_(PASSWORD)
                for i in (1, 2, 3):
                    try:
                        replies.append(pop.retr(i)[0])
                    except poplib.error_proto as exc:
                        replies.append(exc.args[0])
                pop.quit()
            finally:
                pop.close()
            return replies

        replies = await trio.to_thread.run_sync(session, False)
        assert [r.split(b" ", 2)[:2] for r in replies] == [
            [b"+OK", b"22"],
            [b"-ERR", b"[UTF8]"],
            [b"+OK", b"24"],
        ]
        assert sorted(os.listdir(alice / "cur")) == sorted(
            [names[0] + ":2,S", names[1] + ":2,", names[2] + ":2,S"]
        )
        replies = await trio.to_thread.run_sync(session, True)
        assert [r.split(b" ", 1)[0] for r in replies] == [b"+OK"] * 4
        assert sorted(os.listdir(alice / "cur")) == sorted(n + ":2,S" for n in names)


async def test_large_messages_from_memory_are_exact_flagged_seen_and_8bit_refused(
    alice: Path, root: Path
) -> None:
    """Large messages the kernel has in memory go out through the engine's quick path
    (wire_message): the same bytes, Seen at UPDATE, and one with an 8-bit header still
    refused to a client without UTF8 (and not marked), as the streamed path does."""
    body = b"".join(b"%05d .a line\n" % i for i in range(8_000))  # 112 KiB, dotted lines
    names = [unique_name() + tag for tag in (".ascii", ".8bit", ".last")]
    messages = [
        b"Subject: one\n\n" + body,
        "Subject: Grüße\n\n".encode() + body,
        b"Subject: three\n\n.\n" + body,
    ]
    for name, message in zip(names, messages, strict=True):
        deliver(alice, name, message)
    async with running(create({"root": str(root)})) as server:
        host, port = server.addresses[0]

        def session() -> list[list[bytes] | bytes]:
            pop = poplib.POP3(host, port, timeout=60)
            got: list[list[bytes] | bytes] = []
            try:
                pop.user("alice")
                pop.pass_(PASSWORD)
                for i in (1, 2, 3):
                    try:
                        got.append(pop.retr(i)[1])
                    except poplib.error_proto as exc:
                        got.append(exc.args[0])
                pop.quit()
            finally:
                pop.close()
            return got

        got = await trio.to_thread.run_sync(session)
    assert got[0] == messages[0].split(b"\n")[:-1]  # poplib unstuffs, splits lines
    assert isinstance(got[1], bytes)
    assert got[1].startswith(b"-ERR [UTF8]")
    assert got[2] == messages[2].split(b"\n")[:-1]
    assert sorted(os.listdir(alice / "cur")) == sorted(
        [names[0] + ":2,S", names[1] + ":2,", names[2] + ":2,S"]
    )
