"""The Trio server over real TCP on 127.0.0.1, with stdlib poplib and curl."""

from __future__ import annotations

import os
import poplib
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from pypop.auth import AuthPenalty, MemoryCredentialStore
from pypop.backend import Backend, Mailbox, MessageInfo
from pypop.backends.memory import MemoryBackend, sample_message
from pypop.config import ConfigError, ServerConfig, load_config
from pypop.protocol import ProtocolConfig
from pypop.registry import BackendLoadError, create_backend
from pypop.server import Server
from pypop.server.listeners import JOIN_BELOW, Peer, SocketStream
from pypop.server.session import Session, SessionContext
from pypop.wire import stuff

from .conftest import PASSWORDS, ServerStarter

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None and not os.environ.get("CI"), reason="no curl")


async def talk(port: int, data: bytes, *, until_close: bool = True) -> bytes:
    """Send ``data`` in one write; read until the server closes (or a quiet 0.5 s)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        out = bytearray()
        while True:
            with trio.move_on_after(5 if until_close else 0.5) as cs:
                chunk = await stream.receive_some(65536)
            if cs.cancelled_caught or not chunk:
                break
            out += chunk
        return bytes(out)


async def read_lines(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    """Read until ``n`` CRLF-terminated lines have arrived (greeting included)."""
    got = b""
    while got.count(b"\r\n") < n:
        chunk = await stream.receive_some(4096)
        assert chunk, got
        got += chunk
    return got


def port_of(server: object) -> int:
    addresses: list[tuple[str, int]] = getattr(server, "addresses")  # noqa: B009
    return addresses[0][1]


# ---- real clients ------------------------------------------------------------------


async def test_poplib_session(start_server: ServerStarter, memory_backend: MemoryBackend) -> None:
    server = await start_server()

    def client() -> tuple[bytes, tuple[int, int], list[bytes], list[bytes], list[bytes]]:
        pop = poplib.POP3("127.0.0.1", port_of(server), timeout=10)
        welcome = pop.getwelcome()
        pop.user("alice")
        pop.pass_("wonderland")
        stat = pop.stat()
        listing = pop.list()[1]
        uidl = pop.uidl()[1]
        retr = pop.retr(2)[1]
        pop.dele(1)
        pop.quit()
        return welcome, stat, listing, uidl, retr

    welcome, stat, listing, uidl, retr = await trio.to_thread.run_sync(client)
    assert welcome == b"+OK POP3 server ready"
    size = len(sample_message("alice", 1))
    assert stat == (3, 3 * size)
    assert listing == [f"{n} {size}".encode() for n in (1, 2, 3)]
    assert uidl == [f"{n} alice-{n}".encode() for n in (1, 2, 3)]
    assert b"\r\n".join(retr) + b"\r\n" == sample_message("alice", 2)
    box = await memory_backend.open_mailbox("alice")
    assert [m.uid for m in box.messages] == ["alice-2", "alice-3"]
    await box.aclose()


async def test_apop_timestamp_unique_per_greeting(start_server: ServerStarter) -> None:
    server = await start_server(apop=True, hostname="pop.example")
    greetings = [await talk(port_of(server), b"QUIT\r\n") for _ in range(3)]
    stamps = [re.search(rb"<\d+\.\d+\.[0-9a-f]+@pop\.example>", g) for g in greetings]
    assert all(stamps)
    assert len({s.group(0) for s in stamps if s}) == 3


@needs_curl
async def test_curl_retr_uidl_top(start_server: ServerStarter) -> None:
    server = await start_server()
    url = f"pop3://alice:wonderland@127.0.0.1:{port_of(server)}"

    async def curl(*args: str) -> bytes:
        assert CURL is not None
        proc = await trio.run_process([CURL, "-sS", *args], capture_stdout=True)
        return proc.stdout

    assert await curl(f"{url}/1") == sample_message("alice", 1)
    assert await curl("-X", "UIDL", f"{url}/") == b"1 alice-1\r\n2 alice-2\r\n3 alice-3\r\n"
    top = await curl("-X", "TOP 1 0", f"{url}/")
    assert top == sample_message("alice", 1).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    size = len(sample_message("alice", 1))
    assert await curl(f"{url}/") == f"1 {size}\r\n2 {size}\r\n3 {size}\r\n".encode()


# ---- wire behaviour ----------------------------------------------------------------


async def test_pipelined_replies_in_order(start_server: ServerStarter) -> None:
    server = await start_server()
    msg1, msg2 = sample_message("alice", 1), sample_message("alice", 2)
    out = await talk(
        port_of(server),
        b"USER alice\r\nPASS wonderland\r\nSTAT\r\nRETR 1\r\nNOOP\r\nRETR 2\r\nTOP 3 0\r\n"
        b"DELE 9\r\nQUIT\r\n",
    )
    head3 = sample_message("alice", 3).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    n = len(msg1)
    assert out == (
        b"+OK POP3 server ready\r\n+OK\r\n"
        + f"+OK maildrop has 3 messages ({3 * n} octets)\r\n+OK 3 {3 * n}\r\n".encode()
        + f"+OK {n} octets\r\n".encode()
        + stuff(msg1)
        + b"+OK\r\n"
        + f"+OK {n} octets\r\n".encode()
        + stuff(msg2)
        + b"+OK\r\n"
        + head3
        + b".\r\n"
        + b"-ERR No such message\r\n+OK Logging out\r\n"
    )


async def test_garbage_gets_err_and_session_survives(start_server: ServerStarter) -> None:
    server = await start_server()
    out = await talk(
        port_of(server),
        b"HELO\r\n\x00\xff\r\nUSER\r\n"
        + b"A" * 1000
        + b"\r\nRETR 1\r\nUSER bob\r\nPASS builder\r\n"
        b"LIST 0\r\nLIST -1\r\nLIST 99999999999\r\nQUIT\r\n",
    )
    size = len(sample_message("bob", 1))
    assert out == (
        b"+OK POP3 server ready\r\n-ERR Unknown command\r\n-ERR Invalid characters in command\r\n"
        b"-ERR Invalid arguments\r\n-ERR Line too long\r\n-ERR Command not valid in this state\r\n"
        b"+OK\r\n"
        + f"+OK maildrop has 1 messages ({size} octets)\r\n".encode()
        + b"-ERR No such message\r\n-ERR Invalid arguments\r\n-ERR No such message\r\n"
        b"+OK Logging out\r\n"
    )


async def test_too_many_bad_commands(start_server: ServerStarter) -> None:
    server = await start_server(max_bad_commands=3)
    out = await talk(port_of(server), b"X\r\nY\r\nZ\r\nCAPA\r\n")
    assert out.endswith(b"-ERR Too many invalid commands, closing connection\r\n")
    assert b"Capability" not in out


async def test_wrong_password_and_unknown_user_look_the_same(
    start_server: ServerStarter,
) -> None:
    server = await start_server()
    a = await talk(port_of(server), b"USER alice\r\nPASS nope\r\nQUIT\r\n")
    b = await talk(port_of(server), b"USER nobody\r\nPASS nope\r\nQUIT\r\n")
    assert (
        a
        == b
        == (
            b"+OK POP3 server ready\r\n+OK\r\n"
            b"-ERR [AUTH] Authentication failed\r\n+OK Logging out\r\n"
        )
    )


async def test_in_use(start_server: ServerStarter) -> None:
    server = await start_server()
    first = await trio.open_tcp_stream("127.0.0.1", port_of(server))
    async with first:
        await first.send_all(b"USER alice\r\nPASS wonderland\r\n")
        await read_lines(first, 3)
        out = await talk(port_of(server), b"USER alice\r\nPASS wonderland\r\nQUIT\r\n")
        assert b"-ERR [IN-USE] Mailbox is locked by another session\r\n" in out


async def test_per_ip_connection_limit(start_server: ServerStarter) -> None:
    server = await start_server(max_connections_per_ip=2)
    port = port_of(server)
    a = await trio.open_tcp_stream("127.0.0.1", port)
    b = await trio.open_tcp_stream("127.0.0.1", port)
    async with a, b:
        assert (await a.receive_some(100)).startswith(b"+OK")
        assert (await b.receive_some(100)).startswith(b"+OK")
        third = await talk(port, b"")
        assert third == b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    # Slots come back when sessions end.
    for _ in range(50):
        if server.active == 0:
            break
        await trio.sleep(0.02)
    assert (await talk(port, b"QUIT\r\n")).startswith(b"+OK")


async def test_global_connection_limit(start_server: ServerStarter) -> None:
    server = await start_server(max_connections=1)
    a = await trio.open_tcp_stream("127.0.0.1", port_of(server))
    async with a:
        await a.receive_some(100)
        assert (await talk(port_of(server), b"")).startswith(b"-ERR [SYS/TEMP]")


async def test_passwd_file_store(start_server: ServerStarter, passwd_file: Path) -> None:
    server = await start_server(passwd_file=passwd_file)
    ok = await talk(port_of(server), b"USER bob\r\nPASS builder\r\nSTAT\r\nQUIT\r\n")
    assert b"+OK 1 " in ok
    bad = await talk(port_of(server), b"USER bob\r\nPASS Builder\r\nQUIT\r\n")
    assert b"-ERR [AUTH] Authentication failed\r\n" in bad


# ---- faults ------------------------------------------------------------------------


class BrokenBackend:
    """Fault injection: raises where told to."""

    def __init__(
        self,
        real: MemoryBackend,
        *,
        open_fails: bool = False,
        retrieve_fails_after: int | None = None,
    ) -> None:
        self.real = real
        self.open_fails = open_fails
        self.retrieve_fails_after = retrieve_fails_after

    async def open_mailbox(self, user: str) -> Mailbox:
        if self.open_fails:
            raise RuntimeError("secret internal detail")
        return BrokenMailbox(await self.real.open_mailbox(user), self.retrieve_fails_after)

    async def aclose(self) -> None:
        await self.real.aclose()


class BrokenMailbox:
    def __init__(self, real: Mailbox, fail_after: int | None) -> None:
        self.real = real
        self.fail_after = fail_after

    @property
    def messages(self) -> Sequence[MessageInfo]:
        return self.real.messages

    async def retrieve(self, index: int, *, top_lines: int | None = None) -> AsyncIterator[bytes]:
        if self.fail_after == 0:
            raise OSError("disk on fire: /secret/path")
        yield b"Subject: partial\r\n"
        raise OSError("disk on fire: /secret/path")

    async def commit(self, deleted: Sequence[int]) -> None:
        await self.real.commit(deleted)

    async def aclose(self) -> None:
        await self.real.aclose()


async def test_backend_failure_on_open_is_sys_temp(
    start_server: ServerStarter, memory_backend: MemoryBackend
) -> None:
    server = await start_server(backend=BrokenBackend(memory_backend, open_fails=True))
    out = await talk(port_of(server), b"USER alice\r\nPASS wonderland\r\nQUIT\r\n")
    assert out == (
        b"+OK POP3 server ready\r\n+OK\r\n"
        b"-ERR [SYS/TEMP] Mailbox temporarily unavailable\r\n+OK Logging out\r\n"
    )
    assert b"secret" not in out


async def test_backend_failure_on_retrieve(
    start_server: ServerStarter, memory_backend: MemoryBackend
) -> None:
    server = await start_server(backend=BrokenBackend(memory_backend, retrieve_fails_after=0))
    out = await talk(
        port_of(server), b"USER alice\r\nPASS wonderland\r\nDELE 1\r\nRETR 2\r\nNOOP\r\n"
    )
    assert out.endswith(b"-ERR [SYS/TEMP] Message temporarily unavailable\r\n")
    assert b"disk" not in out
    # The session ended without UPDATE: nothing deleted; the server still serves.
    again = await talk(port_of(server), b"USER alice\r\nPASS wonderland\r\nSTAT\r\nQUIT\r\n")
    assert b"+OK 3 " in again


async def test_backend_failure_mid_message_drops_session(
    start_server: ServerStarter, memory_backend: MemoryBackend
) -> None:
    server = await start_server(backend=BrokenBackend(memory_backend, retrieve_fails_after=1))
    # After UTF8 the header is not checked for 8-bit octets, so the first block goes
    # out at once and the failure comes after the +OK.
    login = b"UTF8\r\nUSER alice\r\nPASS wonderland\r\nDELE 1\r\n"
    out = await talk(port_of(server), login + b"RETR 2\r\n")
    assert out.endswith(b"+OK 416 octets\r\nSubject: partial\r\n")  # cut, no terminator
    # Without it the server reads up to the end of the header before the +OK: the
    # failure comes first, and the client gets -ERR [SYS/TEMP] instead.
    out = await talk(port_of(server), b"USER alice\r\nPASS wonderland\r\nRETR 2\r\n")
    assert out.endswith(b"-ERR [SYS/TEMP] Message temporarily unavailable\r\n")
    box = await memory_backend.open_mailbox("alice")
    assert len(box.messages) == 3
    await box.aclose()


# ---- shutdown, timeouts ------------------------------------------------------------


async def test_graceful_shutdown_never_commits_unfinished_sessions(
    start_server: ServerStarter, memory_backend: MemoryBackend
) -> None:
    server = await start_server(shutdown_timeout=0.5)
    port = port_of(server)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"USER alice\r\nPASS wonderland\r\nDELE 1\r\nDELE 2\r\n")
        await read_lines(stream, 5)
        server.shutdown()
        with trio.fail_after(5):
            while await stream.receive_some(4096):
                pass  # the server closes us once the deadline passes
    with pytest.raises(OSError, match=r"all attempts to connect"):
        await trio.open_tcp_stream("127.0.0.1", port)
    box = await memory_backend.open_mailbox("alice")
    assert len(box.messages) == 3
    await box.aclose()


async def test_session_finishing_during_shutdown_commits(
    start_server: ServerStarter, memory_backend: MemoryBackend
) -> None:
    server = await start_server(shutdown_timeout=5)
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(server))
    async with stream:
        await stream.send_all(b"USER alice\r\nPASS wonderland\r\n")
        await read_lines(stream, 3)
        server.shutdown()
        await stream.send_all(b"DELE 1\r\nQUIT\r\n")
        rest = b""
        while chunk := await stream.receive_some(4096):
            rest += chunk
        assert rest == b"+OK Marked to be deleted\r\n+OK Logging out\r\n"
    box = await memory_backend.open_mailbox("alice")
    assert [m.uid for m in box.messages] == ["alice-2", "alice-3"]
    await box.aclose()


async def run_and_close(session: Session) -> None:
    """What the server does around a session: run it, then close the stream."""
    try:
        await session.run()
    finally:
        await session.stream.aclose()


def _context(backend: Backend, **kw: object) -> SessionContext:
    return SessionContext(
        backend=backend,
        store=MemoryCredentialStore(PASSWORDS),
        protocol=ProtocolConfig(),
        hostname="test",
        penalty=AuthPenalty(initial_delay=0, max_delay=0, failure_delay=0),
        **kw,  # type: ignore[arg-type]
    )


class CountingStream(trio.abc.HalfCloseableStream):
    """A memory stream that counts send_all calls."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.sends = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sends += 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_idle_autologout_without_update(
    autojump_clock: trio.testing.MockClock, memory_backend: MemoryBackend
) -> None:
    server_side, client = trio.testing.memory_stream_pair()
    session = Session(_context(memory_backend), server_side, Peer("127.0.0.1"), loopback=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_and_close, session)
        await client.send_all(b"USER alice\r\nPASS wonderland\r\nDELE 1\r\n")
        start = trio.current_time()
        out = b""
        while chunk := await client.receive_some():
            out += chunk
        elapsed = trio.current_time() - start
    assert 600 <= elapsed <= 601  # RFC 1939 §3: at least 10 minutes (and at most 1 s more)
    assert out.endswith(b"+OK Marked to be deleted\r\n")  # and no farewell
    assert session.end == "autologout"
    box = await memory_backend.open_mailbox("alice")
    assert len(box.messages) == 3
    await box.aclose()


async def test_any_command_resets_the_timer(
    autojump_clock: trio.testing.MockClock, memory_backend: MemoryBackend
) -> None:
    server_side, client = trio.testing.memory_stream_pair()
    session = Session(_context(memory_backend), server_side, Peer("127.0.0.1"), loopback=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_and_close, session)
        await client.send_all(b"USER alice\r\nPASS wonderland\r\n")
        for _ in range(3):
            await trio.sleep(599)
            await client.send_all(b"NOOP\r\n")
        await client.send_all(b"QUIT\r\n")
        while await client.receive_some():
            pass
    assert session.end == "quit"
    assert trio.current_time() >= 3 * 599


async def test_pipelined_batch_is_one_write(memory_backend: MemoryBackend) -> None:
    server_side, client = trio.testing.memory_stream_pair()
    counting = CountingStream(server_side)
    session = Session(_context(memory_backend), counting, Peer("127.0.0.1"), loopback=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_and_close, session)
        await client.send_all(b"CAPA\r\n")
        await client.receive_some()
        await trio.testing.wait_all_tasks_blocked()
        before = counting.sends
        await client.send_all(
            b"USER alice\r\nPASS wonderland\r\nSTAT\r\nLIST\r\nUIDL\r\nRETR 1\r\n"
        )
        await trio.testing.wait_all_tasks_blocked()
        assert counting.sends == before + 1
        await client.send_all(b"QUIT\r\n")
        while await client.receive_some():
            pass


class RecordingStream(SocketStream):
    """pypop's socket stream, recording how each reply was written."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.writes: list[tuple[str, int]] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(("send_all", len(data)))
        await super().send_all(data)

    async def send_many(self, chunks: list[bytes]) -> None:
        self.writes.append(("send_many", sum(map(len, chunks))))
        await super().send_many(chunks)


@pytest.mark.parametrize("body", [300, JOIN_BELOW - 600, JOIN_BELOW, 200_000])
async def test_small_replies_are_joined_large_ones_gathered(body: int) -> None:
    """A reply under JOIN_BELOW octets leaves as one joined send_all, a longer one as
    a gathered send_many (no copy of the message); the client gets the same octets."""
    backend = MemoryBackend()
    message = sample_message("alice", 1, body_octets=body)
    backend.deliver("alice", message, uid="alice-1")
    server_sock, client = socket.socketpair()
    stream = RecordingStream(server_sock)
    session = Session(_context(backend), stream, Peer("127.0.0.1"), loopback=True)
    client.setblocking(False)
    buffer = b""

    async def until(end: bytes) -> bytes:
        nonlocal buffer
        while end not in buffer:
            await trio.lowlevel.wait_readable(client)
            buffer += client.recv(1 << 20)
        got, buffer = buffer.split(end, 1)
        return got + end

    reply = b"+OK %d octets\r\n" % len(message) + stuff(message)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_and_close, session)
        await until(b"\r\n")
        client.send(b"USER alice\r\nPASS wonderland\r\n")
        await until(b"\r\n")
        assert (await until(b"\r\n")).startswith(b"+OK")  # the maildrop is ours
        stream.writes.clear()
        client.send(b"RETR 1\r\n")
        assert await until(b"\r\n.\r\n") == reply
        assert stream.writes == [
            ("send_all" if len(reply) < JOIN_BELOW else "send_many", len(reply))
        ]
        client.send(b"QUIT\r\n")
        assert await until(b"\r\n") == b"+OK Logging out\r\n"
    client.close()


# ---- registry, config, CLI ---------------------------------------------------------


def test_unknown_backend_names_installed_and_hint() -> None:
    with pytest.raises(BackendLoadError) as info:
        create_backend("nosuch", {})
    text = str(info.value)
    assert "'nosuch'" in text
    assert "memory" in text
    assert "no first-party backend has that name" in text  # exact text: test_registry_hint.py


def test_memory_backend_options_validated() -> None:
    with pytest.raises(BackendLoadError) as info:
        create_backend("memory", {"colour": "blue", "sample_user": 3})
    assert str(info.value) == (
        "the pypop backend 'memory' cannot start: memory backend: unknown options "
        "'colour', 'sample_user' (did you mean 'sample_users'?); "
        "known: expire_days, sample_messages, sample_size, sample_users, seed"
    )
    with pytest.raises(BackendLoadError, match="option 'sample_users' must be an integer"):
        create_backend("memory", {"sample_users": "two"})
    backend = create_backend("memory", {"sample_users": "2", "sample_messages": 4})
    assert isinstance(backend, MemoryBackend)
    assert backend.users() == ["user1", "user2"]


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "pypop.toml"
    path.write_text(
        '[server]\nlisten = ["127.0.0.1:1234", "[::1]:1235"]\nimplementation = ""\n'
        "[limits]\nidle_timeout = 900\nmax_connections_per_ip = 7\n"
        '[auth]\npasswd_file = "passwd"\napop = true\n'
        '[backend]\nname = "memory"\nsample_users = 2\n'
    )
    cfg = load_config(path)
    assert cfg.listen == [("127.0.0.1", 1234), ("::1", 1235)]
    assert cfg.idle_timeout == 900
    assert cfg.max_connections_per_ip == 7
    assert cfg.passwd_file == tmp_path / "passwd"
    assert cfg.apop is True
    assert cfg.backend == "memory"
    assert cfg.backend_options == {"sample_users": 2}
    assert cfg.implementation == ""
    cfg.validate()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[limits]\nidle_timeout = 60\n", "limits.idle_timeout must be at least 600 seconds"),
        (
            "[limits]\nmax_connections = 'x'\n",
            "{path}: limits.max_connections must be an integer, got str 'x'",
        ),
        (
            "[server]\nlisten = '127.0.0.1:110'\n",
            "{path}: server.listen must be a list, got str '127.0.0.1:110'",
        ),
        ("[limits]\nidle_timeout = true\n", "limits.idle_timeout must be a number, got bool"),
        ("[nosuch]\n", "{path}: unknown section [nosuch]"),
        ("[limit]\n", "{path}: unknown section [limit] (did you mean [limits]?)"),
        (
            "[server]\nlisten_tsl = []\n",
            "{path}: unknown setting server.listen_tsl (did you mean server.listen_tls?)",
        ),
        ("[auth]\npasswdfile = 'p'\n", "(did you mean auth.passwd_file?)"),
        ("[tls]\ncrt = 'a'\n", "{path}: unknown setting tls.crt (did you mean tls.cert?)"),
        ("[server]\nlisten = ['host:port']\n", "bad port"),
        ("[tls]\ncert = 'a.pem'\n", "go together"),
        ("[credentials]\npath = 'p'\n", "[credentials] needs a name"),
        ("[server\n", "{path}: Expected ']'"),
    ],
)
def test_config_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path).validate()
    assert message.format(path=path) in str(info.value)


def test_tls_only_listeners(tmp_path: Path) -> None:
    path = tmp_path / "tls.toml"
    path.write_text('[server]\nlisten_tls = ["127.0.0.1", "[::1]:1995"]\n')
    cfg = load_config(path)
    assert cfg.listen_tls == [("127.0.0.1", 995), ("::1", 1995)]  # 995 by default
    assert cfg.listen == []  # only TLS listeners given: only TLS
    path.write_text('[server]\nlisten_tls = ["127.0.0.1"]\nlisten = ["127.0.0.1:1110"]\n')
    cfg = load_config(path)
    assert (cfg.listen, cfg.listen_tls) == ([("127.0.0.1", 1110)], [("127.0.0.1", 995)])
    assert ServerConfig().listen == [("127.0.0.1", 110)]


def test_credentials_section(tmp_path: Path) -> None:
    path = tmp_path / "pypop.toml"
    path.write_text('[credentials]\nname = "passwd-file"\npath = "users"\n')
    cfg = load_config(path)
    assert cfg.credentials == "passwd-file"
    assert cfg.credentials_options == {"path": str(tmp_path / "users")}
    with pytest.raises(BackendLoadError) as info:
        Server(cfg)
    assert str(info.value) == (
        "the pypop credential store 'passwd-file' cannot start: [Errno 2] cannot read "
        f"passwd-file {tmp_path / 'users'}: No such file or directory"
    )


def test_idle_timeout_default_is_rfc_minimum() -> None:
    assert ServerConfig().idle_timeout == 600


@needs_curl
async def test_cli_demo_serves_curl_and_stops_on_sigterm() -> None:
    assert CURL is not None
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "pypop", "serve", "--demo", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        buf = b""
        with trio.fail_after(30):
            while b"curl pop3://" not in buf or not buf.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, buf
                buf += chunk
        match = re.search(rb"curl (pop3://\S+)", buf)
        assert match is not None
        fetched = await trio.run_process(
            [CURL, "-sS", match.group(1).decode()], capture_stdout=True
        )
        assert fetched.stdout == sample_message("user1", 1)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_reports_unknown_backend() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pypop",
            "serve",
            "--backend",
            "nosuch",
            "--listen",
            "127.0.0.1:0",
            "--passwd-file",
            "/dev/null",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "no first-party backend has that name" in result.stderr
    assert "pypop-nosuch" not in result.stderr
    assert "Traceback" not in result.stderr


async def test_one_summary_line_per_session_without_secrets(
    start_server: ServerStarter, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server()
    with caplog.at_level("INFO", logger="pypop.session"):
        await talk(
            port_of(server), b"USER alice\r\nPASS wonderland\r\nRETR 1\r\nDELE 2\r\nQUIT\r\n"
        )
        await talk(port_of(server), b"USER alice\r\nPASS not-the-password\r\nQUIT\r\n")
        for _ in range(100):
            if len([r for r in caplog.records if r.name == "pypop.session"]) >= 2:
                break
            await trio.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if r.name == "pypop.session"]
    assert len(lines) == 2
    size = len(sample_message("alice", 1))
    assert re.fullmatch(
        rf"session peer=127\.0\.0\.1 user=alice commands=5 retrieved=1 octets={size} "
        r"deleted=1 duration=\d+\.\d{3} end=quit",
        lines[0],
    )
    assert re.fullmatch(
        r"session peer=127\.0\.0\.1 user=- commands=3 retrieved=0 octets=0 deleted=0 "
        r"duration=\d+\.\d{3} end=quit",
        lines[1],
    )
    assert not any(
        "wonderland" in r.getMessage() or "not-the-password" in r.getMessage()
        for r in caplog.records
    )


async def test_large_message_to_a_slow_reader(
    start_server: ServerStarter, memory_backend: MemoryBackend
) -> None:
    body = b"".join(b"%07d .line of a big message\r\n" % i for i in range(200_000))  # ~6 MB
    message = b"Subject: big\r\n\r\n" + body
    memory_backend.deliver("bob", message, uid="big")
    server = await start_server()
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(server))
    async with stream:
        await stream.send_all(b"USER bob\r\nPASS builder\r\nRETR 2\r\nQUIT\r\n")
        out = bytearray()
        while chunk := await stream.receive_some(8192):
            out += chunk
            await trio.lowlevel.checkpoint()
    head = f"+OK {len(message)} octets\r\n".encode()
    start = out.index(head) + len(head)
    assert out[start:].endswith(b".\r\n+OK Logging out\r\n")
    assert out[start : -len(b"+OK Logging out\r\n")] == stuff(message)


async def test_many_pipelined_replies_in_one_flush(start_server: ServerStarter) -> None:
    server = await start_server()
    out = await talk(
        port_of(server), b"USER bob\r\nPASS builder\r\n" + b"NOOP\r\n" * 3000 + b"QUIT\r\n"
    )
    assert out.count(b"+OK\r\n") == 3001  # USER and 3000 NOOPs
    assert out.endswith(b"+OK\r\n+OK Logging out\r\n")


def test_docs_config_example_loads(tmp_path: Path) -> None:
    text = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "pypop.toml"
    path.write_text(example)
    cfg = load_config(path)
    cfg.validate()
    assert cfg.listen == [("127.0.0.1", 110)]
    assert cfg.listen_tls == [("127.0.0.1", 995)]


def test_cli_port_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pypop",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--passwd-file",
                "/dev/null",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert "pypop: cannot start:" in result.stderr
    assert "Traceback" not in result.stderr
