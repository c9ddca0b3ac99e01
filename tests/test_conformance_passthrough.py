"""A backend that authenticates itself (pypop.backend.SelfAuthenticating): the
conformance kit, and the session's login paths with it (penalty, [AUTH], SASL, bearer
tokens, what CAPA offers, LOGIN-DELAY)."""

from __future__ import annotations

import base64
import logging
from collections.abc import Collection

import pytest
import trio

from pypop.backend import (
    AuthFailed,
    Backend,
    CredentialKind,
    Credentials,
    MailboxLocked,
    TemporaryFailure,
)
from pypop.backends.memory import MemoryBackend, MemoryMailbox
from pypop.config import ServerConfig
from pypop.server import Server, serve
from pypop.testing import BackendConformance
from tests.conftest import ServerStarter

PASSWORDS = {"alice": "wonderland", "bob": "builder"}
TOKENS = {"alice": "token-of-alice"}


class PasswordBackend(MemoryBackend):
    """The memory backend, checking passwords (and tokens) itself, as an IMAP
    passthrough would upstream. ``down`` makes every check a TemporaryFailure."""

    credential_kinds: Collection[CredentialKind] = ("password", "bearer")

    def __init__(self, passwords: dict[str, str] | None = None) -> None:
        super().__init__()
        self.passwords = dict(PASSWORDS if passwords is None else passwords)
        self.seen: list[Credentials] = []
        self.down = False

    async def authenticate(self, credentials: Credentials) -> MemoryMailbox:
        self.seen.append(credentials)
        await trio.lowlevel.checkpoint()
        if self.down:
            raise TemporaryFailure("upstream down")
        table = TOKENS if credentials.kind == "bearer" else self.passwords
        if table.get(credentials.user) != credentials.secret:
            raise AuthFailed("wrong")
        box = await self.open_mailbox(credentials.user)
        assert isinstance(box, MemoryMailbox)
        return box


class PasswordHarness:
    def make_backend(self) -> Backend:
        return PasswordBackend(dict.fromkeys(("alice", "bob"), "conformance-password"))

    async def deliver(self, backend: Backend, user: str, message: bytes) -> None:
        assert isinstance(backend, MemoryBackend)
        backend.deliver(user, message)


class TestPasswordBackend(BackendConformance):
    @pytest.fixture
    def harness(self) -> PasswordHarness:
        return PasswordHarness()


@pytest.fixture
def backend() -> PasswordBackend:
    b = PasswordBackend()
    b.deliver("alice", b"Subject: 1\r\n\r\none\r\n", uid="a1")
    b.deliver("bob", b"Subject: 2\r\n\r\ntwo\r\n", uid="b1")
    return b


async def _read(stream: trio.abc.ReceiveStream, buf: bytearray, n: int) -> list[bytes]:
    out: list[bytes] = []
    while len(out) < n:
        end = buf.find(b"\r\n")
        if end >= 0:
            out.append(bytes(buf[:end]))
            del buf[: end + 2]
            continue
        chunk = await stream.receive_some(4096)
        assert chunk, out
        buf += chunk
    return out


async def _talk(port: int, lines: list[bytes], replies: int) -> list[bytes]:
    """The greeting, then ``replies`` reply lines to ``lines`` sent one by one."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        buf = bytearray()
        out = await _read(stream, buf, 1)
        for line in lines:
            await stream.send_all(line + b"\r\n")
        return out + await _read(stream, buf, replies)


async def _capa(port: int) -> list[bytes]:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        buf = bytearray()
        await _read(stream, buf, 1)
        await stream.send_all(b"CAPA\r\n")
        lines: list[bytes] = []
        while (line := (await _read(stream, buf, 1))[0]) != b".":
            lines.append(line)
        return lines


async def test_user_pass_goes_to_the_backend(
    start_server: ServerStarter, backend: PasswordBackend
) -> None:
    server = await start_server(backend=backend)
    port = server.addresses[0][1]
    got = await _talk(port, [b"USER alice", b"PASS wonderland", b"STAT", b"QUIT"], 4)
    assert got[1:] == [
        b"+OK",
        b"+OK maildrop has 1 messages (19 octets)",
        b"+OK 1 19",
        b"+OK Logging out",
    ]
    [creds] = backend.seen
    assert (creds.user, creds.secret, creds.kind, creds.mechanism) == (
        "alice",
        "wonderland",
        "password",
        "USER",
    )
    assert creds.client == "127.0.0.1"


async def test_no_store_needed_and_apop_off(
    nursery: trio.Nursery, backend: PasswordBackend, caplog: pytest.LogCaptureFixture
) -> None:
    # No passwd-file, no credential store: the backend is the only judge.
    from pypop.server.passthrough import NO_STORE

    config = ServerConfig(listen=[("127.0.0.1", 0)], apop=True, auth_failure_delay=0.0)
    with caplog.at_level(logging.WARNING, logger="pypop.server"):
        server: Server = await nursery.start(
            lambda task_status: serve(config, backend=backend, task_status=task_status)
        )
    assert server.store is NO_STORE
    assert "APOP cannot pass a password on" in caplog.text
    port = server.addresses[0][1]
    got = await _talk(port, [b"APOP alice " + b"0" * 32], 1)
    assert b"<" not in got[0]
    assert got[1] == b"-ERR APOP not available"


async def test_wrong_password_gets_auth_and_the_penalty(
    start_server: ServerStarter, backend: PasswordBackend
) -> None:
    server = await start_server(backend=backend, auth_failure_delay=0.5, auth_penalty_max=4.0)
    port = server.addresses[0][1]
    start = trio.current_time()
    got = await _talk(port, [b"USER alice", b"PASS nope"], 2)
    assert got[2] == b"-ERR [AUTH] Authentication failed"
    assert trio.current_time() - start >= 0.5  # the failure delay was served
    penalty = server.context.penalty
    assert penalty.delay("127.0.0.1") > 0  # and the per-client penalty grew


async def test_upstream_down_is_sys_temp(
    start_server: ServerStarter, backend: PasswordBackend
) -> None:
    backend.down = True
    server = await start_server(backend=backend)
    port = server.addresses[0][1]
    got = await _talk(
        port,
        [
            b"USER alice",
            b"PASS wonderland",
            b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wonderland"),
        ],
        3,
    )
    assert got[2].startswith(b"-ERR [SYS/TEMP]")
    assert got[3].startswith(b"-ERR [SYS/TEMP]")
    assert server.context.penalty.delay("127.0.0.1") == 0  # not the client's fault


async def test_in_use_after_the_password(
    start_server: ServerStarter, backend: PasswordBackend
) -> None:
    server = await start_server(backend=backend)
    port = server.addresses[0][1]
    held = await backend.authenticate(Credentials("alice", "wonderland"))
    try:
        got = await _talk(port, [b"USER alice", b"PASS nope", b"USER alice", b"PASS wonderland"], 4)
    finally:
        await held.aclose()
    assert got[2] == b"-ERR [AUTH] Authentication failed"
    assert got[4] == b"-ERR [IN-USE] Mailbox is locked by another session"
    held = await backend.authenticate(Credentials("alice", "wonderland"))  # released
    with pytest.raises(MailboxLocked):
        await backend.authenticate(Credentials("alice", "wonderland"))
    await held.aclose()


async def test_sasl_plain_login_and_tokens_pass_through(
    start_server: ServerStarter, backend: PasswordBackend
) -> None:
    server = await start_server(backend=backend)
    port = server.addresses[0][1]
    b64 = base64.b64encode
    plain = b"AUTH PLAIN " + b64(b"\0alice\0wonderland")
    lines = await _capa(port)
    assert b"SASL PLAIN LOGIN OAUTHBEARER XOAUTH2" in lines  # no SCRAM, no CRAM-MD5
    got = await _talk(port, [plain, b"QUIT"], 2)
    assert got[1:] == [b"+OK maildrop has 1 messages (19 octets)", b"+OK Logging out"]
    got = await _talk(port, [b"AUTH LOGIN", b64(b"bob"), b64(b"builder"), b"QUIT"], 4)
    assert got[1:] == [
        b"+ VXNlcm5hbWU6",
        b"+ UGFzc3dvcmQ6",
        b"+OK maildrop has 1 messages (19 octets)",
        b"+OK Logging out",
    ]
    xoauth = b64(b"user=alice\x01auth=Bearer token-of-alice\x01\x01")
    got = await _talk(port, [b"AUTH XOAUTH2 " + xoauth, b"QUIT"], 2)
    assert got[1:] == [b"+OK maildrop has 1 messages (19 octets)", b"+OK Logging out"]
    kinds = [(c.user, c.kind, c.mechanism) for c in backend.seen]
    assert kinds == [
        ("alice", "password", "PLAIN"),
        ("bob", "password", "LOGIN"),
        ("alice", "bearer", "XOAUTH2"),
    ]
    got = await _talk(port, [b"AUTH CRAM-MD5", b"AUTH SCRAM-SHA-256"], 2)
    assert got[1:] == [b"-ERR Unsupported authentication mechanism"] * 2


async def test_login_delay_releases_the_opened_mailbox(
    start_server: ServerStarter, backend: PasswordBackend
) -> None:
    server = await start_server(backend=backend, login_delay=60)
    port = server.addresses[0][1]
    got = await _talk(port, [b"USER alice", b"PASS wonderland", b"QUIT"], 3)
    assert got[2] == b"+OK maildrop has 1 messages (19 octets)"
    got = await _talk(port, [b"USER alice", b"PASS wonderland"], 2)
    assert got[2].startswith(b"-ERR [LOGIN-DELAY]")
    # The mailbox the check opened was closed: the lock is free.
    box = await backend.authenticate(Credentials("alice", "wonderland"))
    await box.aclose()
