"""A slow or failing database against a real ``pypop serve``: what a login or a
session leaves behind when a database call outlives ``io_timeout``.

Each test runs a server process on 127.0.0.1 with a fault injected in its prelude,
and talks POP3 to it over a real socket, asserting the exact replies.
"""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

import pytest

from tests.helpers import PASSWORD, open_engine, start_serve


class Client:
    """A raw POP3 client: exact reply lines, nothing interpreted."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")
        assert self.line().startswith(b"+OK ")

    def line(self) -> bytes:
        return self.file.readline()

    def send(self, command: bytes) -> bytes:
        self.sock.sendall(command + b"\r\n")
        return self.line()

    def login(self, user: bytes = b"alice") -> bytes:
        assert self.send(b"USER " + user) == b"+OK\r\n"
        return self.send(b"PASS " + PASSWORD.encode())

    def close(self) -> None:
        self.file.close()
        self.sock.close()


# The first two opens of the mailbox are slow: each takes the lock, then its snapshot
# read outlives io_timeout (a loaded database). Later opens are quick.
SLOW_OPENS = """
import time
from pypop_sql import _engine
_real = _engine.SnapshotCache.get_or_make
_calls = []
def _slow(self, *args, **kwargs):
    _calls.append(1)
    if len(_calls) <= 2:
        time.sleep(1.5)
    return _real(self, *args, **kwargs)
_engine.SnapshotCache.get_or_make = _slow
"""


def test_login_that_times_out_does_not_keep_the_lock(db_url: str, tmp_path: Path) -> None:
    """A login whose open outlives io_timeout gets [SYS/TEMP]; the thread that was
    left to finish must not keep the maildrop locked (SQLite: the next login got
    [IN-USE] until a restart) nor, on PostgreSQL, its pooled connection (two such
    logins took a pool of two for good: every later login waited, then [SYS/TEMP])."""
    with open_engine(db_url) as e:
        e.deliver("alice", b"Subject: one\r\n\r\nbody\r\n", None, None)
    server = start_serve(
        tmp_path,
        db_url,
        "slow",
        prelude=SLOW_OPENS,
        backend_extra="io_timeout = 0.5\npool_size = 2\npool_timeout = 1",
    )
    try:
        for _ in range(2):
            with contextlib.closing(Client(server.port)) as slow:
                reply = slow.login()
            assert reply == b"-ERR [SYS/TEMP] Mailbox temporarily unavailable\r\n"
            time.sleep(2.0)  # the abandoned open has finished by now
        with contextlib.closing(Client(server.port)) as again:
            assert again.login() == b"+OK maildrop has 1 messages (22 octets)\r\n"
            assert again.send(b"STAT") == b"+OK 1 22\r\n"
            assert again.send(b"QUIT") == b"+OK Logging out\r\n"
    finally:
        server.stop()


# UPDATE's deletion is slow: it outlives io_timeout (a loaded database, a slow disk).
SLOW_UPDATE = """
import time
from pypop_sql import _engine
for _cls in (_engine.SqliteEngine, _engine.PostgresEngine):
    def _slow(self, conn, mailbox_id, batch, _real=_cls._delete_batch):
        time.sleep(3.0)
        return _real(self, conn, mailbox_id, batch)
    _cls._delete_batch = _slow
"""


def test_update_that_times_out_keeps_the_lock_until_it_ends(db_url: str, tmp_path: Path) -> None:
    """A QUIT whose deletion outlives io_timeout gets -ERR, and the deletion goes on
    in its thread. Until it ends the maildrop stays locked: SQLite gave its lock up
    at once, so a new session got a snapshot listing the message being deleted,
    which then vanished under it (its RETR: -ERR), while it held the lock."""
    with open_engine(db_url) as e:
        for n in (1, 2, 3):
            e.deliver("alice", f"Subject: {n}\r\n\r\nbody\r\n".encode(), None, None)
    server = start_serve(
        tmp_path, db_url, "slowupdate", prelude=SLOW_UPDATE, backend_extra="io_timeout = 0.5"
    )
    try:
        with contextlib.closing(Client(server.port)) as first:
            assert first.login() == b"+OK maildrop has 3 messages (60 octets)\r\n"
            assert first.send(b"DELE 1") == b"+OK Marked to be deleted\r\n"
            quit_reply = first.send(b"QUIT")
        assert quit_reply == b"-ERR [SYS/TEMP] Some deleted messages not removed\r\n"
        # The deletion still runs (3 s): a login meanwhile (it waits lock_wait, 1 s).
        with contextlib.closing(Client(server.port)) as second:
            assert second.login() == (b"-ERR [IN-USE] Mailbox is locked by another session\r\n"), (
                server.tail()
            )
        time.sleep(3.0)
        with contextlib.closing(Client(server.port)) as third:
            assert third.login() == b"+OK maildrop has 2 messages (40 octets)\r\n"
            assert third.send(b"RETR 1") == b"+OK 20 octets\r\n"
            assert third.line() == b"Subject: 2\r\n"
        assert "Traceback" not in server.tail()
    finally:
        server.stop()


async def test_update_given_up_before_it_ran_deletes_nothing_and_releases(
    sqlite_url: str,
) -> None:
    """An UPDATE whose deletion is given up while it waits for a worker thread (every
    thread busy past io_timeout): -ERR, the lock goes as usual, and the deletion
    never runs later (nothing was removed, as the error says)."""
    import trio
    from pypop.errors import TemporaryFailure, UpdateFailed

    from pypop_sql import SqlBackend, create

    backend = create({"url": sqlite_url, "io_threads": 1, "io_timeout": 0.3})
    assert isinstance(backend, SqlBackend)
    try:
        for n in (1, 2):
            await backend.deliver("alice", f"Subject: {n}\r\n\r\nbody\r\n".encode())
        box = await backend.open_mailbox("alice")

        async def hog() -> None:  # the only worker thread, for 1 s
            with contextlib.suppress(TemporaryFailure):
                await backend.threads.run(time.sleep, 1.0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hog)
            await trio.sleep(0.05)
            with pytest.raises(UpdateFailed, match="nothing was removed"):
                await box.commit([0])
            assert box.closed
        await trio.sleep(1.0)  # the hog's thread is free again
        again = await backend.open_mailbox("alice")
        assert [m.size for m in again.messages] == [20, 20]
        await again.aclose()
    finally:
        await backend.aclose()


async def test_postgresql_release_waiting_for_a_thread_still_happens(pg_url: str) -> None:
    """PostgreSQL's release is a query in a worker thread. When every thread is busy
    past io_timeout (a stalled database), that call was given up before it ran: the
    connection never went back to the pool (nor was its advisory lock released
    while anything referred to it), so a few such session ends took the whole pool
    and every later login waited pool_timeout, then failed."""
    import gc

    import trio
    from pypop.errors import TemporaryFailure

    from pypop_sql import SqlBackend, create

    backend = create(
        {"url": pg_url, "io_threads": 1, "io_timeout": 0.3, "pool_size": 2, "pool_timeout": 0.1}
    )
    assert isinstance(backend, SqlBackend)
    try:
        for user in ("alice", "bob"):
            await backend.deliver(user, b"Subject: 1\r\n\r\nbody\r\n")
        box = await backend.open_mailbox("alice")

        async def hog() -> None:  # the only worker thread, for 1 s
            with contextlib.suppress(TemporaryFailure):
                await backend.threads.run(time.sleep, 1.0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hog)
            await trio.sleep(0.05)
            with contextlib.suppress(TemporaryFailure):  # the server would log it
                await box.aclose()
        del box
        gc.collect()
        await trio.sleep(1.0)  # the hog's thread is free again
        boxes = [await backend.open_mailbox(user) for user in ("alice", "bob")]
        assert [len(b.messages) for b in boxes] == [1, 1]
        for b in boxes:
            await b.aclose()
    finally:
        await backend.aclose()


def test_postgresql_failed_snapshot_read_leaves_no_lock(pg_url: str, tmp_path: Path) -> None:
    """PostgreSQL sends lock, version and snapshot statements in one pipeline. When
    the snapshot statement failed (here: the messages table locked by an
    administrator's DDL, so it ran into statement_timeout), the error left the
    pipeline before the unlock handlers: the connection went back to the pool
    still holding the maildrop's advisory lock. Every other host (and most
    connections of this one) then answered [IN-USE] until that connection was
    recycled. The login must fail with [SYS/TEMP] and hold nothing."""
    import psycopg

    with open_engine(pg_url) as e:
        e.deliver("alice", b"Subject: one\r\n\r\nbody\r\n", None, None)
    a = start_serve(tmp_path, pg_url, "a", backend_extra="io_timeout = 1")
    b = start_serve(tmp_path, pg_url, "b")
    try:
        with psycopg.connect(pg_url) as admin:
            admin.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            with contextlib.closing(Client(a.port)) as blocked:
                reply = blocked.login()
            admin.rollback()
        assert reply == b"-ERR [SYS/TEMP] Mailbox temporarily unavailable\r\n", a.tail()
        with contextlib.closing(Client(b.port)) as other:
            assert other.login() == b"+OK maildrop has 1 messages (22 octets)\r\n", a.tail()
            assert other.send(b"QUIT") == b"+OK Logging out\r\n"
        assert "Traceback" not in a.tail()
    finally:
        a.stop()
        b.stop()
