"""Faults upstream: Dovecot killed mid-RETR, down at login, restarted between
sessions; a wrong password upstream (with pypop's penalty); a message expunged by
another IMAP client during a POP3 session."""

from __future__ import annotations

import base64
import logging
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from pypop_imap import create
from tests.conftest import BackendMaker, backend_options, pool_users
from tests.dovecot import Dovecot
from tests.pop3 import Raw, pypop

NewUser = Callable[[], tuple[str, str]]


def _big(n: int, size: int) -> bytes:
    rng = random.Random(n)
    line = bytes(rng.choice(b"abcdefghij") for _ in range(70)) + b"\n"
    return f"Subject: big {n}\n\n".encode() + line * (size // len(line))


def _no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_upstream_killed_mid_retr(
    make_dovecot: Callable[..., Dovecot],
    certs: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = make_dovecot(users=pool_users())
    user, password = "user1", d.users["user1"]
    # Larger than the loopback socket buffers between Dovecot and pypop can hold, so
    # that the upstream dies with most of the message not yet sent.
    size = 32 * 1024 * 1024
    d.deliver(user, _big(1, size))
    d.deliver(user, b"Subject: small\r\n\r\nsmall\r\n")
    backend = create(backend_options(d, certs, tls="none"))
    async with pypop(backend) as server:
        port = server.addresses[0][1]

        def retr_then_kill() -> tuple[bytes, bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                f = sock.makefile("rb")
                f.readline()
                sock.sendall(f"USER {user}\r\nPASS {password}\r\n".encode())
                f.readline()
                assert f.readline().startswith(b"+OK")
                sock.sendall(b"RETR 1\r\n")
                status = f.readline()
                got = f.read(256 * 1024)  # the transfer is under way...
                d.kill()  # ...when the upstream dies
                rest = b""
                while chunk := f.read1(65536):
                    rest += chunk
                return status, got + rest

        status, data = await trio.to_thread.run_sync(retr_then_kill)
    assert status.startswith(b"+OK ")
    assert status.endswith(b" octets\r\n")
    # The session ended; the cut message has no terminator (never a short message).
    assert not data.endswith(b"\r\n.\r\n")
    assert len(data) < size
    assert "upstream" in caplog.text or "closed the connection" in caplog.text
    _no_traceback(caplog)
    await backend.aclose()


async def test_upstream_killed_between_login_and_retr(
    make_dovecot: Callable[..., Dovecot],
    certs: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = make_dovecot(users=pool_users())
    user, password = "user1", d.users["user1"]
    d.deliver(user, _big(2, 1024 * 1024))
    backend = create(backend_options(d, certs))
    async with pypop(backend) as server:
        c = await trio.to_thread.run_sync(Raw, server.addresses[0][1])
        try:
            assert (await trio.to_thread.run_sync(c.login, user, password)).startswith(b"+OK")
            await trio.to_thread.run_sync(d.kill)
            reply = await trio.to_thread.run_sync(c.cmd, "RETR 1")
            with pytest.raises(EOFError):
                await trio.to_thread.run_sync(c.line)
        finally:
            c.close()
    assert reply == b"-ERR [SYS/TEMP] Message temporarily unavailable"
    _no_traceback(caplog)
    await backend.aclose()


async def test_upstream_down_at_login_is_sys_temp(
    make_dovecot: Callable[..., Dovecot],
    certs: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = make_dovecot(users=pool_users())
    backend = create(backend_options(d, certs))
    d.stop()
    async with pypop(backend) as server:
        port = server.addresses[0][1]

        def both() -> tuple[bytes, bytes]:
            c = Raw(port)
            try:
                user = c.login("user1", d.users["user1"])
                plain = base64.b64encode(f"\0user1\0{d.users['user1']}".encode()).decode()
                sasl = c.cmd(f"AUTH PLAIN {plain}")
                return user, sasl
            finally:
                c.close()

        user_pass, sasl = await trio.to_thread.run_sync(both)
        penalty = server.context.penalty.delay("127.0.0.1")
    assert user_pass == sasl == b"-ERR [SYS/TEMP] Temporary authentication failure"
    assert penalty == 0  # the upstream being down is not the client's fault
    assert "upstream unavailable: cannot connect to 127.0.0.1" in caplog.text
    _no_traceback(caplog)
    await backend.aclose()


async def test_upstream_restarted_between_sessions(
    make_dovecot: Callable[..., Dovecot], certs: dict[str, Path]
) -> None:
    d = make_dovecot(users=pool_users())
    user, password = "user1", d.users["user1"]
    d.deliver(user, b"Subject: 1\r\n\r\none\r\n")
    backend = create(backend_options(d, certs))
    async with pypop(backend) as server:
        port = server.addresses[0][1]

        def session() -> bytes:
            c = Raw(port)
            try:
                assert c.login(user, password).startswith(b"+OK"), "login"
                assert c.cmd("RETR 1").startswith(b"+OK")
                body = c.multiline()
                assert c.cmd("QUIT").startswith(b"+OK")
                return body
            finally:
                c.close()

        first = await trio.to_thread.run_sync(session)
        assert backend.pooled == 1  # kept for reuse...
        await trio.to_thread.run_sync(d.restart)  # ...and now dead
        second = await trio.to_thread.run_sync(session)
    assert first == second == b"Subject: 1\r\n\r\none\r\n.\r\n"
    await backend.aclose()


async def test_wrong_password_upstream_is_auth_with_the_penalty(
    dovecot: Dovecot,
    new_user: NewUser,
    make_backend: BackendMaker,
) -> None:
    user, _password = new_user()
    backend = make_backend()
    async with pypop(backend, auth_failure_delay=0.3, auth_penalty_max=4.0) as server:
        port = server.addresses[0][1]

        def wrong_twice() -> tuple[list[bytes], float]:
            c = Raw(port)
            try:
                start = time.monotonic()
                replies = [c.login(user, "wrong-1"), c.login(user, "wrong-2")]
                return replies, time.monotonic() - start
            finally:
                c.close()

        replies, elapsed = await trio.to_thread.run_sync(wrong_twice)
        penalty = server.context.penalty.delay("127.0.0.1")
    assert replies == [b"-ERR [AUTH] Authentication failed"] * 2
    # the failure delay twice, and the growing per-client penalty before the second
    assert elapsed >= 0.3 + 0.3 + 2.0
    assert penalty >= 2.0
    await backend.aclose()


async def test_expunged_by_another_client_mid_session(
    dovecot: Dovecot,
    new_user: NewUser,
    make_backend: BackendMaker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    user, password = new_user()
    for n in range(1, 5):
        dovecot.deliver(user, f"Subject: {n}\r\n\r\nbody {n}\r\n".encode())
    backend = make_backend()
    async with pypop(backend) as server:
        port = server.addresses[0][1]

        def session() -> list[bytes]:
            c = Raw(port)
            try:
                out = [c.login(user, password)]
                dovecot.expunge(user, 2)  # gone while we hold the snapshot
                dovecot.expunge(user, 4)
                out.append(c.cmd("RETR 2"))
                out.append(c.cmd("TOP 4 0"))
                out.append(c.cmd("RETR 1"))
                out.append(c.multiline())
                out.append(c.cmd("RETR 3"))
                out.append(c.multiline())
                out.append(c.cmd("DELE 3"))
                out.append(c.cmd("QUIT"))
                return out
            finally:
                c.close()

        with caplog.at_level(logging.INFO):
            got = await trio.to_thread.run_sync(session)
    assert got == [
        b"+OK maildrop has 4 messages (88 octets)",
        b"-ERR No such message",
        b"-ERR No such message",
        b"+OK 22 octets",
        b"Subject: 1\r\n\r\nbody 1\r\n.\r\n",
        b"+OK 22 octets",
        b"Subject: 3\r\n\r\nbody 3\r\n.\r\n",
        b"+OK Marked to be deleted",
        b"+OK Logging out",
    ]
    assert dovecot.uids(user) == [1]
    _no_traceback(caplog)
    await backend.aclose()
