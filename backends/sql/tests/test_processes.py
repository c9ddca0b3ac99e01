"""Several ``pypop serve`` processes on one database, as several hosts would run them.

- the RFC 1939 lock holds across processes: the second login gets ``[IN-USE]``;
- ``kill -9`` of the holder frees the lock at once (its PostgreSQL connection, or
  its fcntl lock, dies with it);
- DELE + QUIT on one process is seen by the other;
- ``kill -9`` in the middle of UPDATE leaves all the marked messages (the
  transaction never committed); a finished UPDATE removes exactly the marked ones.
"""

from __future__ import annotations

import poplib
import socket
import time
from pathlib import Path

import pytest

from tests.helpers import ServeProcess, open_engine, start_serve


def _deliver(url: str, user: str, n: int) -> list[str]:
    with open_engine(url) as e:
        return [
            e.deliver(user, f"Subject: {i}\r\n\r\nbody {i}\r\n".encode(), None, None)
            for i in range(1, n + 1)
        ]


def _uids(url: str, user: str) -> list[str]:
    with open_engine(url) as e:
        handle, snapshot = e.open(user, True)
        e.release(handle)
        return [r.uidl for r in snapshot.rows]


def test_lock_across_processes_kill9_and_shared_updates(db_url: str, tmp_path: Path) -> None:
    uids = _deliver(db_url, "alice", 4)
    a = start_serve(tmp_path, db_url, "a")
    b = start_serve(tmp_path, db_url, "b")
    try:
        # DELE + QUIT on A is seen by B.
        pop = a.login()
        assert pop.stat() == (4, pop.stat()[1])
        pop.dele(2)
        assert pop.quit().startswith(b"+OK")
        pop = b.login()
        listed = [line.split()[1].decode() for line in pop.uidl()[1]]
        assert listed == [uids[0], uids[2], uids[3]]
        assert pop.stat()[0] == 3
        pop.quit()

        # A holds the maildrop: B says [IN-USE], for this user only.
        holder = a.login()
        assert holder.stat()[0] == 3
        with pytest.raises(poplib.error_proto) as info:
            b.login()
        assert info.value.args[0].startswith(b"-ERR [IN-USE]")
        b.login("bob").quit()  # another maildrop is free

        # kill -9 A: the next login on B works at once.
        a.kill9()
        start = time.monotonic()
        pop = _login_soon(b, limit=2.0)
        waited = time.monotonic() - start
        assert pop.stat()[0] == 3
        pop.quit()
        assert waited < 2.0
        holder.close()
    finally:
        a.stop()
        b.stop()


def _login_soon(server: ServeProcess, limit: float) -> poplib.POP3:
    """Log in, retrying [IN-USE] for at most ``limit`` s (the kernel or PostgreSQL
    must notice the dead process first: microseconds to milliseconds)."""
    deadline = time.monotonic() + limit
    while True:
        try:
            return server.login()
        except poplib.error_proto as exc:
            if not exc.args[0].startswith(b"-ERR [IN-USE]") or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# Fault injection: UPDATE deletes part of the marked rows inside its transaction,
# says so through a marker file, and hangs there until it is killed.
PRELUDE = """
import os, time
from pypop_sql import _engine
marker = {marker!r}
for cls in (_engine.SqliteEngine, _engine.PostgresEngine):
    real = cls._delete_batch
    def hang(self, conn, mailbox_id, batch, real=real):
        real(self, conn, mailbox_id, batch[: len(batch) // 2])
        open(marker, "w").close()
        time.sleep(120)
    cls._delete_batch = hang
"""


def test_kill9_during_update_is_all_or_nothing(db_url: str, tmp_path: Path) -> None:
    uids = _deliver(db_url, "alice", 6)
    marker = tmp_path / "in-update"
    hanging = start_serve(tmp_path, db_url, "hang", prelude=PRELUDE.format(marker=str(marker)))
    try:
        pop = hanging.login()
        for n in (1, 2, 4, 5):
            pop.dele(n)
        pop.sock.sendall(b"QUIT\r\n")  # UPDATE starts; no reply will come
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline, hanging.tail()
            time.sleep(0.02)
        hanging.kill9()
        pop.close()
    finally:
        hanging.stop()
    assert _uids(db_url, "alice") == uids  # nothing removed

    server = start_serve(tmp_path, db_url, "normal")
    try:
        pop = _login_soon(server, limit=2.0)
        for n in (1, 2, 4, 5):
            pop.dele(n)
        assert pop.quit().startswith(b"+OK")
    finally:
        server.stop()
    assert _uids(db_url, "alice") == [uids[2], uids[5]]  # exactly the marked ones


def test_update_failure_changes_nothing_and_says_err(db_url: str, tmp_path: Path) -> None:
    """A database error in UPDATE: -ERR, and no message is gone."""
    uids = _deliver(db_url, "alice", 3)
    prelude = """
from pypop_sql import _engine
def boom(self, conn, mailbox_id, batch):
    raise _engine.sqlite3.OperationalError("disk I/O error (injected)")
_engine.SqliteEngine._delete_batch = boom
import psycopg
def boom_pg(self, conn, mailbox_id, batch):
    conn.execute("DELETE FROM chunks WHERE message_id = ANY(%s)", (batch,))
    raise psycopg.OperationalError("server closed the connection (injected)")
_engine.PostgresEngine._delete_batch = boom_pg
"""
    server = start_serve(tmp_path, db_url, "failing", prelude=prelude)
    try:
        pop = server.login()
        pop.dele(1)
        pop.dele(3)
        with pytest.raises(poplib.error_proto) as info:
            pop.quit()
        pop.close()
        assert info.value.args[0].startswith(b"-ERR")
        assert b"injected" not in info.value.args[0]  # no exception text to the peer
    finally:
        server.stop()
    assert _uids(db_url, "alice") == uids
    assert "Traceback" not in server.tail()


def test_sessions_on_many_processes_never_share_a_maildrop(db_url: str, tmp_path: Path) -> None:
    """Raw sockets from many clients at once, half on each process: at every moment
    at most one session per maildrop is in TRANSACTION."""
    _deliver(db_url, "alice", 1)
    a = start_serve(tmp_path, db_url, "a")
    b = start_serve(tmp_path, db_url, "b")
    try:
        socks = []
        for i in range(10):
            server = a if i % 2 else b
            s = socket.create_connection(("127.0.0.1", server.port), 10)
            s.recv(512)
            s.sendall(b"USER alice\r\nPASS secret-pw\r\n")
            socks.append(s)
        replies = []
        for s in socks:
            data = b""
            while data.count(b"\r\n") < 2:
                chunk = s.recv(512)
                assert chunk
                data += chunk
            replies.append(data.split(b"\r\n")[1])
        ok = [r for r in replies if r.startswith(b"+OK")]
        assert len(ok) == 1, replies
        assert all(r.startswith(b"-ERR [IN-USE]") for r in replies if not r.startswith(b"+OK"))
        for s in socks:
            s.close()
    finally:
        a.stop()
        b.stop()


def test_postgresql_restart_is_survived(pg_server: object, tmp_path: Path) -> None:
    """Pooled connections die with a PostgreSQL restart: the next login (and the
    credential lookup before it) tests the pool and works, no [SYS/TEMP]."""
    from pypop_sql.testing import PgServer

    with PgServer() as pg:
        url = pg.create_database()
        uids = _deliver(url, "alice", 2)
        with open_engine(url) as e:
            e.deliver("bob", b"Subject: b\r\n\r\n", None, None)
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            for user in ("alice", "bob"):
                conn.execute(
                    "INSERT INTO users (name, password) VALUES (%s, '{PLAIN}secret-pw')", (user,)
                )
        server = start_serve(tmp_path, url, "pgrestart", credentials="sql")
        try:
            both = [server.login("alice"), server.login("bob")]  # two pooled connections
            for pop in both:
                pop.quit()
            pg.stop()
            pg.restart()
            pop = server.login("alice")
            assert [line.split()[1].decode() for line in pop.uidl()[1]] == uids
            pop.quit()
            server.login("bob").quit()
        finally:
            server.stop()
        assert "Traceback" not in server.tail()
