"""A conformance kit any backend runs under pytest (``pip install 'pypop3[testing]'``:
pytest and pytest-trio).

Subclass :class:`BackendConformance` in a test module and give it a ``harness``
fixture that returns a :class:`Harness` for your backend::

    import pytest
    from pypop.testing import BackendConformance

    class MyHarness:
        def __init__(self, tmp_path): ...
        def make_backend(self): return MyBackend(...)
        async def deliver(self, backend, user, message): ...

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def harness(self, tmp_path):
            return MyHarness(tmp_path)

The kit checks the contract in ``pypop.backend`` directly and through a real pypop
server on 127.0.0.1 with the standard library's ``poplib`` as the client: UIDLs stable
across sessions, exact LIST and STAT sizes (:data:`HARD_SIZES`; RETR delivers them, plus
the CRLF added to a last line that has none), RSET, a dropped connection
deleting nothing, QUIT deleting exactly the marked messages, the exclusive lock
([IN-USE]), snapshots, concurrent sessions of different users, and user names that
try to reach another maildrop (``../bob``, ``a/b``, NUL, very long).

A backend that authenticates itself (:class:`pypop.backend.SelfAuthenticating`, e.g.
a passthrough to another server) runs the same tests, opened with
``authenticate`` instead of ``open_mailbox``, plus its own: a wrong password is
``AuthFailed`` and ``-ERR [AUTH]``, ``[IN-USE]`` only after the right credentials,
SASL PLAIN and LOGIN pass the password through, CAPA and the greeting offer nothing
that would need the stored secret (APOP, CRAM-MD5, SCRAM). Its harness may give:

- ``users``: the two user names to use (default ``("alice", "bob")``);
- ``password(user)``: their password upstream (default the kit's ``PASSWORD``).
"""

from __future__ import annotations

import base64
import importlib.util
import poplib
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Protocol, TypeVar

import pytest
import trio

# Without pytest-trio every kit test would fail with pytest's advice to install some
# other async plugin; say what is missing instead.
if importlib.util.find_spec("pytest_trio") is None:  # pragma: no cover
    raise ImportError(
        "pypop.testing runs its tests with pytest-trio, which is not installed: "
        "pip install 'pypop3[testing]' (or pytest-trio)"
    )

from pypop.auth import MemoryCredentialStore
from pypop.backend import (
    AuthFailed,
    Backend,
    Credentials,
    Mailbox,
    MailboxLocked,
    SelfAuthenticating,
    is_valid_uid,
)
from pypop.config import ServerConfig
from pypop.errors import PermanentFailure, TemporaryFailure
from pypop.server import Server, serve
from pypop.wire import wire_size

__all__ = [
    "HARD_MESSAGES",
    "HARD_SIZES",
    "HOSTILE_USERS",
    "PASSWORD",
    "BackendConformance",
    "Harness",
    "expected_retr",
    "expected_size",
]

T = TypeVar("T")

PASSWORD = "conformance-password"  # noqa: S105 (test credential)


class Harness(Protocol):
    """What a backend's test suite provides to the kit."""

    def make_backend(self) -> Backend:
        """A new backend over an empty store (called once per test)."""
        ...

    async def deliver(self, backend: Backend, user: str, message: bytes) -> None:
        """Add a message to ``user``'s maildrop, as a delivery agent would."""
        ...


# Stored messages that real clients trip over, and what RETR must deliver for each
# (CRLF line ends, a final CRLF added, dot-stuffing undone by the client).
HARD_MESSAGES: dict[str, bytes] = {
    "lf-only": b"Subject: lf\n\nline one\nline two\n",
    "leading-dots": b"Subject: dots\r\n\r\n.one dot\r\n..two dots\r\n.\r\nafter\r\n",
    "just-dot": b".",
    "no-final-newline": b"Subject: nofinal\r\n\r\nlast line",
    "lf-no-final-newline": b"Subject: lf nofinal\n\nline one\nlast line",
    "eight-bit": "Subject: caf\u00e9\r\n\r\nna\u00efve \u00fcber\r\n".encode(),
    "folded-header": b"Subject: a\r\n folded\r\n\tsubject\r\nTo: x\r\n\r\nbody\r\n",
    # A "." line that starts exactly at the 64 KiB block boundary.
    "dot-at-64k": b"Subject: big\r\n\r\n"
    + (b"x" * 1022 + b"\r\n") * 63
    + b"y" * 1006
    + b"\r\n"
    + b".dot\r\n",
}


# Their POP3 sizes (LIST, STAT), written out: line ends counted as CRLF, and nothing for
# the CRLF the server adds before the terminator to a message without a final line end
# (as Dovecot and IMAP's RFC822.SIZE count). RETR then delivers 2 octets more.
HARD_SIZES: dict[str, int] = {
    "lf-only": 35,
    "leading-dots": 49,
    "just-dot": 1,
    "no-final-newline": 29,
    "lf-no-final-newline": 42,
    "eight-bit": 32,
    "folded-header": 46,
    "dot-at-64k": 65542,
}


def expected_size(message: bytes) -> int:
    """The POP3 size of a stored message: line ends made CRLF, no final CRLF added."""
    return len(message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n"))


# User names that try to reach another user's maildrop or the file system. The
# protocol refuses control characters in USER, but SASL and a backend's own callers
# can pass anything, so the backend must hold on its own.
HOSTILE_USERS: tuple[str, ...] = (
    "../bob",
    "../../bob",
    "bob/..",
    "./bob",
    "a/../bob",
    "/bob",
    "bob/",
    "a/b",
    "a\\..\\bob",
    ".",
    "..",
    "",
    "bob\0",
    "bob\x00../x",
    "bob\n",
    "bob\r",
    "%2e%2e/bob",
    "\u2025/bob",  # a one-character ".." look-alike
    "x" * 10_000,
)


def expected_retr(message: bytes) -> bytes:
    """What a client reassembles from RETR: CRLF line ends and a final CRLF."""
    out = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def _raw(host: str, port: int, commands: list[bytes], replies: int) -> list[bytes]:
    """The greeting and ``replies`` reply lines to ``commands`` (sent one by one)."""
    with socket.create_connection((host, port), timeout=30) as sock:
        f = sock.makefile("rb")
        out = [f.readline().rstrip(b"\r\n")]
        for command in commands:
            sock.sendall(command + b"\r\n")
        while len(out) < replies + 1:
            line = f.readline()
            if not line:
                break
            out.append(line.rstrip(b"\r\n"))
        return out


def _retr_bytes(lines: list[bytes]) -> bytes:
    # poplib splits on CRLF and undoes the stuffing; join back what was sent.
    return b"".join(line + b"\r\n" for line in lines)


class BackendConformance:
    """Mix-in test class; see the module docstring."""

    pytestmark = [pytest.mark.trio]  # noqa: RUF012 (pytest reads it as is)
    users: tuple[str, ...] = ("alice", "bob")

    @pytest.fixture
    def harness(self) -> Harness:
        raise NotImplementedError("define a `harness` fixture returning a Harness")

    @pytest.fixture(autouse=True)
    def _bind(self, harness: Harness) -> None:
        # The harness may name its own users and passwords (an upstream server's).
        self.users = tuple(getattr(harness, "users", type(self).users))
        password = getattr(harness, "password", None)
        self._passwords = {u: password(u) if password else PASSWORD for u in self.users}

    @property
    def alice(self) -> str:
        return self.users[0]

    @property
    def bob(self) -> str:
        return self.users[1]

    # -- helpers --

    async def _open(self, backend: Backend, user: str) -> Mailbox:
        """The maildrop, as the server would open it."""
        if isinstance(backend, SelfAuthenticating):
            return await backend.authenticate(Credentials(user, self._passwords[user]))
        return await backend.open_mailbox(user)

    @asynccontextmanager
    async def _server(self, backend: Backend, **overrides: object) -> AsyncIterator[Server]:
        config = ServerConfig(
            listen=[("127.0.0.1", 0)],
            auth_failure_delay=0.0,
            auth_penalty_max=0.0,
            shutdown_timeout=5.0,
        )
        for key, value in overrides.items():
            setattr(config, key, value)
        store = None
        if not isinstance(backend, SelfAuthenticating):
            store = MemoryCredentialStore(self._passwords)
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                lambda task_status: serve(
                    config, backend=backend, store=store, task_status=task_status
                )
            )
            try:
                yield server
            finally:
                server.shutdown()

    async def _client(self, server: Server, user: str, fn: Callable[[poplib.POP3], T]) -> T:
        host, port = server.addresses[0]
        password = self._passwords[user]

        def run() -> T:
            pop = poplib.POP3(host, port, timeout=30)
            try:
                # RFC 6856: a UTF8 client gets 8-bit headers as stored (the kit checks
                # exact bytes; a client that never sends UTF8 gets -ERR [UTF8]).
                pop.utf8()
                pop.user(user)
                pop.pass_(password)
                return fn(pop)
            finally:
                pop.close()

        return await trio.to_thread.run_sync(run)

    # -- the contract, directly --

    async def test_uidls_valid_unique_and_stable(self, harness: Harness) -> None:
        backend = harness.make_backend()
        for n in range(5):
            await harness.deliver(backend, self.alice, f"Subject: {n}\r\n\r\nsame\r\n".encode())
        await harness.deliver(backend, self.alice, b"Subject: 0\r\n\r\nsame\r\n")  # a duplicate
        box = await self._open(backend, self.alice)
        first = [m.uid for m in box.messages]
        await box.aclose()
        box = await self._open(backend, self.alice)
        second = [m.uid for m in box.messages]
        await box.aclose()
        assert len(first) == 6
        assert first == second
        assert len(set(first)) == 6
        assert all(is_valid_uid(u) for u in first)
        await backend.aclose()

    async def test_sizes_match_streamed_octets(self, harness: Harness) -> None:
        backend = harness.make_backend()
        for msg in HARD_MESSAGES.values():
            await harness.deliver(backend, self.alice, msg)
        box = await self._open(backend, self.alice)
        try:
            assert len(box.messages) == len(HARD_MESSAGES)
            for i, (name, info) in enumerate(zip(HARD_MESSAGES, box.messages, strict=True)):
                data = b"".join([b async for b in box.retrieve(i)])
                assert (name, info.size) == (name, HARD_SIZES[name])
                assert (name, wire_size(data)) == (name, info.size)
        finally:
            await box.aclose()
        await backend.aclose()

    async def test_lock_is_exclusive_and_released(self, harness: Harness) -> None:
        backend = harness.make_backend()
        await harness.deliver(backend, self.alice, b"Subject: x\r\n\r\ny\r\n")
        box = await self._open(backend, self.alice)
        with pytest.raises(MailboxLocked):
            await self._open(backend, self.alice)
        other = await self._open(backend, self.bob)  # other users are independent
        await other.aclose()
        await box.aclose()
        await box.aclose()  # idempotent
        again = await self._open(backend, self.alice)
        await again.aclose()
        await backend.aclose()

    async def test_snapshot_hides_later_delivery(self, harness: Harness) -> None:
        backend = harness.make_backend()
        await harness.deliver(backend, self.alice, b"Subject: 1\r\n\r\n1\r\n")
        box = await self._open(backend, self.alice)
        await harness.deliver(backend, self.alice, b"Subject: 2\r\n\r\n2\r\n")
        assert len(box.messages) == 1
        await box.commit([])
        box = await self._open(backend, self.alice)
        assert len(box.messages) == 2
        await box.aclose()
        await backend.aclose()

    async def test_hostile_user_names_never_reach_another_maildrop(self, harness: Harness) -> None:
        backend = harness.make_backend()
        secret = b"Subject: for bob only\r\n\r\nsecret\r\n"
        await harness.deliver(backend, self.bob, secret)
        for name in HOSTILE_USERS:
            try:
                if isinstance(backend, SelfAuthenticating):
                    # With bob's password, as an attacker who knows it would try.
                    credentials = Credentials(name, self._passwords[self.bob])
                    box = await backend.authenticate(credentials)
                else:
                    box = await backend.open_mailbox(name)
            except (AuthFailed, PermanentFailure, TemporaryFailure):
                continue  # refused: the server answers -ERR, and that is all
            try:
                for i in range(len(box.messages)):
                    data = b"".join([b async for b in box.retrieve(i)])
                    assert data != secret, f"user name {name[:40]!r} reached bob's maildrop"
            finally:
                await box.commit([])
        box = await self._open(backend, self.bob)  # bob's maildrop is whole and unlocked
        try:
            assert len(box.messages) == 1
        finally:
            await box.aclose()
        await backend.aclose()

    # -- through a real server --

    async def test_retr_delivers_listed_size_and_exact_bytes(self, harness: Harness) -> None:
        backend = harness.make_backend()
        for msg in HARD_MESSAGES.values():
            await harness.deliver(backend, self.alice, msg)

        def fetch(pop: poplib.POP3) -> tuple[tuple[int, int], list[tuple[int, bytes]]]:
            sizes = [int(x.split()[1]) for x in pop.list()[1]]
            listed = [(s, _retr_bytes(pop.retr(i + 1)[1])) for i, s in enumerate(sizes)]
            return pop.stat(), listed

        async with self._server(backend) as server:
            stat, got = await self._client(server, self.alice, fetch)
        assert stat == (len(HARD_MESSAGES), sum(HARD_SIZES.values()))
        assert len(got) == len(HARD_MESSAGES)
        for (size, data), (name, msg) in zip(got, HARD_MESSAGES.items(), strict=True):
            assert (name, data) == (name, expected_retr(msg))
            assert (name, size) == (name, HARD_SIZES[name])
            # RETR gives the listed size, plus the CRLF added to a last line without one.
            closing = 0 if msg.endswith((b"\n", b"\r")) or not msg else 2
            assert (name, len(data)) == (name, size + closing)

    async def test_top_returns_headers_and_n_lines(self, harness: Harness) -> None:
        backend = harness.make_backend()
        await harness.deliver(backend, self.alice, b"A: 1\r\nB: 2\r\n\r\nl1\r\n.l2\r\nl3\r\n")
        async with self._server(backend) as server:
            tops = await self._client(
                server, self.alice, lambda p: [p.top(1, n)[1] for n in (0, 2, 10)]
            )
        assert tops == [
            [b"A: 1", b"B: 2", b""],
            [b"A: 1", b"B: 2", b"", b"l1", b".l2"],
            [b"A: 1", b"B: 2", b"", b"l1", b".l2", b"l3"],
        ]

    async def test_quit_removes_exactly_the_marked(self, harness: Harness) -> None:
        backend = harness.make_backend()
        for n in range(1, 5):
            await harness.deliver(backend, self.alice, f"Subject: {n}\r\n\r\n{n}\r\n".encode())

        def dele_2_and_4(pop: poplib.POP3) -> list[bytes]:
            uids = pop.uidl()[1]
            pop.dele(2)
            pop.dele(4)
            pop.quit()
            return uids

        async with self._server(backend) as server:
            before = await self._client(server, self.alice, dele_2_and_4)
            after = await self._client(server, self.alice, lambda p: p.uidl()[1])
        ids = [u.split()[1] for u in before]
        assert [u.split()[1] for u in after] == [ids[0], ids[2]]

    async def test_rset_restores(self, harness: Harness) -> None:
        backend = harness.make_backend()
        for n in range(3):
            await harness.deliver(backend, self.alice, f"Subject: {n}\r\n\r\n\r\n".encode())

        def dele_rset_quit(pop: poplib.POP3) -> tuple[int, int]:
            pop.dele(1)
            pop.dele(3)
            marked = pop.stat()[0]
            pop.rset()
            count = pop.stat()[0]
            pop.quit()
            return marked, count

        async with self._server(backend) as server:
            assert await self._client(server, self.alice, dele_rset_quit) == (1, 3)
            assert await self._client(server, self.alice, lambda p: p.stat()[0]) == 3

    async def test_dropped_connection_deletes_nothing(self, harness: Harness) -> None:
        backend = harness.make_backend()
        for n in range(3):
            await harness.deliver(backend, self.alice, f"Subject: {n}\r\n\r\n\r\n".encode())

        def dele_all_then_drop(pop: poplib.POP3) -> None:
            for i in (1, 2, 3):
                pop.dele(i)
            # Vanish without QUIT: RST, not FIN.
            sock = pop.sock
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )

        async with self._server(backend) as server:
            await self._client(server, self.alice, dele_all_then_drop)
            # The server notices the drop and releases the lock; poll briefly.
            for _ in range(100):
                try:
                    count = await self._client(server, self.alice, lambda p: p.stat()[0])
                    break
                except poplib.error_proto as exc:
                    if b"[IN-USE]" not in exc.args[0]:
                        raise
                    await trio.sleep(0.05)
            else:
                pytest.fail("the dropped session never released its lock")
        assert count == 3

    async def test_second_session_gets_in_use(self, harness: Harness) -> None:
        backend = harness.make_backend()
        await harness.deliver(backend, self.alice, b"Subject: x\r\n\r\n\r\n")
        async with self._server(backend) as server:
            host, port = server.addresses[0]

            alice, bob, pw = self.alice, self.bob, self._passwords

            def two_sessions() -> bytes:
                first = poplib.POP3(host, port, timeout=30)
                first.user(alice)
                first.pass_(pw[alice])
                second = poplib.POP3(host, port, timeout=30)
                second.user(alice)
                try:
                    second.pass_(pw[alice])
                except poplib.error_proto as exc:
                    reply: bytes = exc.args[0]
                else:
                    reply = b"+OK (no lock!)"
                other = poplib.POP3(host, port, timeout=30)
                other.user(bob)
                other.pass_(pw[bob])  # a different user is not blocked
                other.quit()
                second.quit()
                first.quit()
                return reply

            reply = await trio.to_thread.run_sync(two_sessions)
        assert reply == b"-ERR [IN-USE] Mailbox is locked by another session"

    async def test_concurrent_sessions_for_different_users(self, harness: Harness) -> None:
        backend = harness.make_backend()
        for user in self.users:
            for n in range(3):
                await harness.deliver(backend, user, f"To: {user}\r\n\r\n{n}\r\n".encode())
        results: dict[str, list[bytes]] = {}
        async with self._server(backend) as server:

            async def one(user: str) -> None:
                def fetch(p: poplib.POP3) -> list[bytes]:
                    return [line for i in (1, 2, 3) for line in p.retr(i)[1]]

                results[user] = await self._client(server, user, fetch)

            async with trio.open_nursery() as nursery:
                for user in self.users:
                    nursery.start_soon(one, user)
        for user in self.users:
            assert results[user][0] == f"To: {user}".encode()
            assert len(results[user]) == 9

    async def test_empty_maildrop(self, harness: Harness) -> None:
        backend = harness.make_backend()

        def stat_list_uidl(p: poplib.POP3) -> tuple[object, ...]:
            return p.stat(), p.list()[1], p.uidl()[1]

        async with self._server(backend) as server:
            assert await self._client(server, self.alice, stat_list_uidl) == ((0, 0), [], [])

    # -- backends that authenticate themselves --

    @staticmethod
    def _self_authenticating(backend: Backend) -> SelfAuthenticating:
        if not isinstance(backend, SelfAuthenticating):
            pytest.skip("the backend does not authenticate itself")
        return backend

    async def test_wrong_password_is_auth_failed(self, harness: Harness) -> None:
        backend = harness.make_backend()
        auth = self._self_authenticating(backend)
        await harness.deliver(backend, self.alice, b"Subject: x\r\n\r\ny\r\n")
        with pytest.raises(AuthFailed):
            await auth.authenticate(Credentials(self.alice, "wrong " + self._passwords[self.alice]))
        with pytest.raises(AuthFailed):
            await auth.authenticate(Credentials(self.alice + "-nobody", "x"))
        box = await self._open(backend, self.alice)  # no lock was left behind
        await box.aclose()
        async with self._server(backend) as server:
            host, port = server.addresses[0]

            def wrong() -> bytes:
                pop = poplib.POP3(host, port, timeout=30)
                pop.user(self.alice)
                try:
                    pop.pass_("wrong")
                except poplib.error_proto as exc:
                    reply: bytes = exc.args[0]
                    return reply
                finally:
                    pop.close()
                return b"+OK (wrong password accepted)"

            reply = await trio.to_thread.run_sync(wrong)
        assert reply == b"-ERR [AUTH] Authentication failed"
        await backend.aclose()

    async def test_in_use_only_after_the_right_credentials(self, harness: Harness) -> None:
        backend = harness.make_backend()
        auth = self._self_authenticating(backend)
        box = await self._open(backend, self.alice)
        try:
            with pytest.raises(AuthFailed):  # not MailboxLocked: that would tell
                await auth.authenticate(Credentials(self.alice, "wrong"))
            with pytest.raises(MailboxLocked):
                await self._open(backend, self.alice)
        finally:
            await box.aclose()
        await backend.aclose()

    async def test_offers_only_what_can_pass_through(self, harness: Harness) -> None:
        backend = harness.make_backend()
        self._self_authenticating(backend)
        await harness.deliver(backend, self.alice, b"Subject: x\r\n\r\nbody\r\n")
        mechanisms = ["SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5"]
        async with self._server(backend, apop=True, mechanisms=mechanisms) as server:
            host, port = server.addresses[0]
            user, password = self.alice, self._passwords[self.alice]

            def errors() -> list[bytes]:
                out = []
                for command in (f"APOP {user} {'0' * 32}", "AUTH CRAM-MD5", "AUTH SCRAM-SHA-256"):
                    out.append(_raw(host, port, [command.encode()], 1)[1])
                return out

            def capa() -> tuple[bytes, list[bytes]]:
                pop = poplib.POP3(host, port, timeout=30)
                try:
                    caps = pop.capa()
                    lines = [" ".join([k, *v]).encode() for k, v in caps.items()]
                    return pop.getwelcome(), lines
                finally:
                    pop.close()

            def plain_and_login() -> list[list[bytes]]:
                b64 = base64.b64encode
                plain = b"AUTH PLAIN " + b64(f"\0{user}\0{password}".encode())
                login = [b"AUTH LOGIN", b64(user.encode()), b64(password.encode())]
                return [
                    _raw(host, port, [plain, b"STAT", b"QUIT"], 3)[1:],
                    _raw(host, port, [*login, b"STAT", b"QUIT"], 5)[3:],
                ]

            greeting, lines = await trio.to_thread.run_sync(capa)
            refused = await trio.to_thread.run_sync(errors)
            logins = await trio.to_thread.run_sync(plain_and_login)
        assert b"<" not in greeting  # no APOP timestamp
        sasl = [line for line in lines if line.startswith(b"SASL ")]
        assert sasl == [b"SASL PLAIN LOGIN"]  # no CRAM-MD5, no SCRAM
        assert b"USER" in lines
        assert refused[0] == b"-ERR APOP not available"
        assert refused[1:] == [b"-ERR Unsupported authentication mechanism"] * 2
        for replies in logins:
            assert [r[:3] for r in replies] == [b"+OK"] * 3
            assert replies[1] == b"+OK 1 " + str(len(b"Subject: x\r\n\r\nbody\r\n")).encode()
        await backend.aclose()
