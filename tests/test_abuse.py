"""Abuse control in real sessions, on trio's autojump clock: the per-IP penalty
(2, 4, 8, 15 s), identical retries, unknown users, the per-connection failure cap,
LOGIN-DELAY, and one abusive IP never slowing another.

Sessions run over memory streams with the context a real :class:`Server` builds from a
:class:`ServerConfig` (so the config-to-penalty wiring is under test too). The peers
are documentation addresses (RFC 5737), so ``auth.allow_plaintext`` is on.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from pypop.auth import MemoryCredentialStore, StoredCredential
from pypop.backends.memory import MemoryBackend, sample_message
from pypop.config import ServerConfig
from pypop.server import Server
from pypop.server.listeners import Peer
from pypop.server.session import Session, SessionContext

from .conftest import PASSWORDS
from .test_server import run_and_close
from .test_tls import Client as _Client

AUTH_FAILED = b"-ERR [AUTH] Authentication failed\r\n"
SIZE = len(sample_message("alice", 1))
ALICE_OK = f"+OK maildrop has 3 messages ({3 * SIZE} octets)\r\n".encode()
ABUSER, OTHER = "192.0.2.66", "198.51.100.7"


class Client(_Client):
    LIMIT = 3600.0  # virtual seconds: penalties run to 17 s per attempt


def context(backend: MemoryBackend, **settings: Any) -> SessionContext:
    cfg = ServerConfig(listen=[("127.0.0.1", 0)], allow_plaintext=True, **settings)
    server = Server(cfg, backend=backend, store=MemoryCredentialStore(PASSWORDS))
    return server.context


@asynccontextmanager
async def session(ctx: SessionContext, peer: str) -> AsyncIterator[tuple[Client, Session]]:
    """A session with ``peer`` over a memory stream; yields (client, session)."""
    server_side, client_side = trio.testing.memory_stream_pair()
    s = Session(ctx, server_side, Peer(peer))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_and_close, s)
        c = Client(client_side)
        assert await c.line() == b"+OK POP3 server ready\r\n"
        yield c, s
        await client_side.aclose()


async def timed(c: Client, data: bytes) -> tuple[bytes, float]:
    start = trio.current_time()
    reply = await c.cmd(data)
    return reply, trio.current_time() - start


async def pass_attempt(c: Client, user: str, password: str) -> tuple[bytes, float]:
    assert await c.cmd(f"USER {user}\r\n".encode()) == b"+OK\r\n"  # never delayed
    return await timed(c, f"PASS {password}\r\n".encode())


# ---- the per-IP penalty ------------------------------------------------------------------


@pytest.mark.parametrize("user", ["alice", "nobody"])
async def test_penalty_grows_2_4_8_15_per_ip(
    autojump_clock: trio.testing.MockClock, memory_backend: MemoryBackend, user: str
) -> None:
    ctx = context(memory_backend, max_auth_failures=20)
    async with session(ctx, ABUSER) as (c, _):
        results = [await pass_attempt(c, user, f"guess-{n}") for n in range(7)]
    assert [r for r, _ in results] == [AUTH_FAILED] * 7
    # Before verifying: 0, then 2 .. 15 s by level; before every -ERR: 2 s more.
    assert [t for _, t in results] == pytest.approx([2, 4, 6, 10, 17, 17, 17])
    # A new connection from the same IP starts where the last one left off ...
    async with session(ctx, ABUSER) as (c, _):
        assert await pass_attempt(c, "alice", "wonderland") == (ALICE_OK, 15.0)
    # ... and a success clears the record.
    async with session(ctx, ABUSER) as (c, _):
        assert await pass_attempt(c, "bob", "wrong") == (AUTH_FAILED, 2.0)


async def test_same_wrong_password_does_not_raise_the_penalty(
    autojump_clock: trio.testing.MockClock, memory_backend: MemoryBackend
) -> None:
    ctx = context(memory_backend, max_auth_failures=20)
    async with session(ctx, ABUSER) as (c, _):
        same = [await pass_attempt(c, "alice", "stale-password") for _ in range(4)]
        # A mail client retrying a stale password stays at level 1 ...
        assert [t for _, t in same] == pytest.approx([2, 4, 4, 4])
        # ... a different guess raises it again.
        assert (await pass_attempt(c, "alice", "other"))[1] == pytest.approx(4)
        assert (await pass_attempt(c, "alice", "third"))[1] == pytest.approx(6)
        # The identical retry rule holds for SASL PLAIN too (user + secret fingerprint).
        plain = b"AUTH PLAIN AGFsaWNlAHRoaXJk\r\n"  # \0alice\0third
        assert await timed(c, plain) == (AUTH_FAILED, 10.0)
        assert await timed(c, plain) == (AUTH_FAILED, 10.0)


async def test_unknown_users_get_a_dummy_verification(
    autojump_clock: trio.testing.MockClock,
    memory_backend: MemoryBackend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checked: list[str] = []
    real_verify: Callable[[StoredCredential, str], bool] = StoredCredential.verify

    def spy(self: StoredCredential, password: str) -> bool:
        checked.append(self.user)
        return real_verify(self, password)

    monkeypatch.setattr(StoredCredential, "verify", spy)
    ctx = context(memory_backend)
    replies = {}
    for user in ("alice", "nobody"):
        async with session(ctx, OTHER) as (c, _):
            replies[user] = [
                await pass_attempt(c, user, "guess"),
                await timed(c, b"AUTH PLAIN " + _plain(user, "guess") + b"\r\n"),
            ]
        # The PLAIN attempt repeated the PASS guess (same user and secret), so the
        # level stayed at 1: 2 s before the next check, which succeeds and clears it.
        async with session(ctx, OTHER) as (c, _):
            assert await pass_attempt(c, "alice", "wonderland") == (ALICE_OK, 2.0)
    assert replies["alice"] == replies["nobody"]
    # Each failed attempt ran one real check: alice's entry, or the dummy (user "").
    assert checked == ["alice", "alice", "alice", "", "", "alice"]


def _plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


async def test_sasl_exchanges_staged_early_still_pay_the_penalty(
    autojump_clock: trio.testing.MockClock, memory_backend: MemoryBackend
) -> None:
    # An attacker opens exchanges while its record is clean ("AUTH PLAIN", "AUTH
    # LOGIN" get their "+ " at once), fails elsewhere, then sends the passwords: each
    # must wait the penalty its IP has when the password is checked, as PASS does.
    ctx = context(memory_backend, max_auth_failures=20)
    async with (
        session(ctx, ABUSER) as (plain, _),
        session(ctx, ABUSER) as (login, _),
        session(ctx, ABUSER) as (staged_user, _),
        session(ctx, ABUSER) as (other, _),
    ):
        assert await timed(plain, b"AUTH PLAIN\r\n") == (b"+ \r\n", 0)
        assert await timed(login, b"AUTH LOGIN YWxpY2U=\r\n") == (b"+ UGFzc3dvcmQ6\r\n", 0)
        assert await staged_user.cmd(b"USER alice\r\n") == b"+OK\r\n"
        for n in range(3):  # level 3: 8 s before the next check, then 2 s before -ERR
            assert (await pass_attempt(other, "bob", f"guess-{n}"))[0] == AUTH_FAILED
        assert await timed(staged_user, b"PASS guess-a\r\n") == (AUTH_FAILED, 10)
        assert await timed(plain, _plain("alice", "guess-b") + b"\r\n") == (AUTH_FAILED, 17)
        assert await timed(login, base64.b64encode(b"guess-c") + b"\r\n") == (AUTH_FAILED, 17)
    # An honest exchange whose IP's record did not change pays once, at its start.
    async with session(ctx, OTHER) as (c, _):
        assert await timed(c, b"AUTH PLAIN\r\n") == (b"+ \r\n", 0)
        assert await timed(c, _plain("alice", "wrong") + b"\r\n") == (AUTH_FAILED, 2)
        assert await timed(c, b"AUTH LOGIN YWxpY2U=\r\n") == (b"+ UGFzc3dvcmQ6\r\n", 2)
        reply = await timed(c, base64.b64encode(b"wonderland") + b"\r\n")
        assert reply == (ALICE_OK, 0)


# ---- per-connection cap ------------------------------------------------------------------


async def test_auth_failure_cap_disconnects(
    autojump_clock: trio.testing.MockClock, memory_backend: MemoryBackend
) -> None:
    ctx = context(memory_backend, max_auth_failures=4, auth_penalty_max=0, auth_failure_delay=0)
    async with session(ctx, OTHER) as (c, s):
        assert await pass_attempt(c, "alice", "a") == (AUTH_FAILED, 0)
        assert await c.cmd(b"AUTH PLAIN " + _plain("alice", "b") + b"\r\n") == AUTH_FAILED
        assert await c.cmd(b"AUTH LOGIN YWxpY2U=\r\n") == b"+ UGFzc3dvcmQ6\r\n"
        assert await c.cmd(b"Yw==\r\n") == AUTH_FAILED
        await c.send(b"USER alice\r\nPASS d\r\nNOOP\r\n")
        assert await c.line() == b"+OK\r\n"
        assert await c.line() == AUTH_FAILED  # the 4th: reply, then hang up
        assert await c.eof()
        assert c.buf == b""  # the NOOP behind it was never answered
    assert s.end == "too many authentication failures"


# ---- LOGIN-DELAY (RFC 2449 §6.5, §8.1.1) -------------------------------------------------


async def test_login_delay_enforced_and_advertised(
    autojump_clock: trio.testing.MockClock, memory_backend: MemoryBackend
) -> None:
    ctx = context(memory_backend, login_delay=60)
    async with session(ctx, OTHER) as (c, _):
        caps = await c.multiline(b"CAPA\r\n")
        assert b"\r\nLOGIN-DELAY 60\r\n" in caps
        assert (await pass_attempt(c, "alice", "wonderland"))[0] == ALICE_OK
        assert b"\r\nLOGIN-DELAY 60\r\n" in await c.multiline(b"CAPA\r\n")  # both states
        assert await c.cmd(b"QUIT\r\n") == b"+OK Logging out\r\n"
    first_login = trio.current_time()
    await trio.sleep(30)
    refused = b"-ERR [LOGIN-DELAY] Minimum time between logins not reached\r\n"
    async with session(ctx, OTHER) as (c, _):
        assert (await pass_attempt(c, "alice", "wonderland"))[0] == refused
        assert await c.cmd(b"AUTH PLAIN " + _plain("alice", "wonderland") + b"\r\n") == refused
        # Another user is not held back, and a wrong password is still [AUTH].
        assert (await pass_attempt(c, "alice", "wrong"))[0] == AUTH_FAILED
    async with session(ctx, OTHER) as (c, _):
        assert (await pass_attempt(c, "bob", "builder"))[0].startswith(b"+OK maildrop has 1 ")
    await trio.sleep_until(first_login + 60)
    async with session(ctx, OTHER) as (c, _):
        assert (await pass_attempt(c, "alice", "wonderland"))[0] == ALICE_OK


# ---- isolation between clients ---------------------------------------------------------------


async def test_abusive_ip_does_not_delay_another(
    autojump_clock: trio.testing.MockClock, memory_backend: MemoryBackend
) -> None:
    ctx = context(memory_backend, max_auth_failures=20)
    async with session(ctx, ABUSER) as (c, _):
        for n in range(4):
            await pass_attempt(c, "alice", f"guess-{n}")
    assert ctx.penalty.delay(ABUSER) == 15
    assert ctx.penalty.delay(OTHER) == 0

    done: dict[str, float] = {}
    start = trio.current_time()

    async def abuser(n: int) -> None:
        async with session(ctx, ABUSER) as (c, _):
            assert (await pass_attempt(c, "bob", f"more-{n}"))[0] == AUTH_FAILED
            done[f"abuser-{n}"] = trio.current_time() - start

    async def other() -> None:
        async with session(ctx, OTHER) as (c, _):
            assert (await pass_attempt(c, "alice", "wonderland"))[0] == ALICE_OK
            done["other-login"] = trio.current_time() - start
        async with session(ctx, OTHER) as (c, _):
            assert (await pass_attempt(c, "bob", "typo"))[0] == AUTH_FAILED
            done["other-typo"] = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        for n in range(4):  # more parallel attempts than max_auth_per_client (2)
            nursery.start_soon(abuser, n)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(other)
    assert done["other-login"] == pytest.approx(0)
    assert done["other-typo"] == pytest.approx(2)  # its own first failure: 0 + 2 s
    # The abuser's attempts run two at a time (max_auth_per_client), each pair after
    # the 15 s penalty, with the 2 s failure delay outside the slot: 17, 17, 32, 32.
    abuser_times = sorted(t for k, t in done.items() if k.startswith("abuser"))
    assert abuser_times == pytest.approx([17, 17, 32, 32])
