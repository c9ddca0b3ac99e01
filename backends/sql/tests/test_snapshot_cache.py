"""Schema 2: ``mailboxes.version`` kept by triggers, and the login snapshot cache.

A cached snapshot must never be served stale: whoever changes a mailbox's messages
(a session's UPDATE, ``pypop deliver`` in another process, an administrator's SQL),
the next login sees the change. Both engines, real databases.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from pypop_sql import SCHEMA_VERSION, parse_options
from pypop_sql._engine import Engine, make_engine
from pypop_sql._schema import MIGRATIONS
from tests.helpers import engine, open_engine


def _sql(e: Engine, statement: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """One autocommitted statement on a connection of its own (an administrator)."""
    if e.kind == "sqlite":
        conn = sqlite3.connect(e.config.path)
        try:
            rows = conn.execute(statement, params).fetchall()
            conn.commit()
            return rows
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(e.config.url, autocommit=True) as pg:
        cur = pg.execute(statement.replace("?", "%s"), params)
        return cur.fetchall() if cur.description is not None else []


def _uids(e: Engine, user: str) -> list[str]:
    handle, snapshot = e.open(user, True)
    e.release(handle)
    assert [i.uid for i in snapshot.infos] == [r.uidl for r in snapshot.rows]
    return [r.uidl for r in snapshot.rows]


def test_version_moves_with_every_change(db_url: str) -> None:
    with open_engine(db_url) as e:
        e.deliver("alice", b"Subject: 1\r\n\r\none\r\n", "u1", None)
        e.deliver("bob", b"Subject: b\r\n\r\nb\r\n", "b1", None)

        def version(user: str) -> int:
            return int(_sql(e, "SELECT version FROM mailboxes WHERE name = ?", (user,))[0][0])

        a, b = version("alice"), version("bob")
        e.deliver("alice", b"Subject: 2\r\n\r\ntwo\r\n", "u2", None)
        assert (version("alice"), version("bob")) == (a + 1, b)
        # Two messages deleted in one statement: PostgreSQL's statement trigger bumps
        # once, SQLite's row trigger once per row; either way it moves.
        _sql(e, "DELETE FROM messages WHERE uidl IN ('u1', 'u2')")
        assert version("alice") > a + 1
        c = version("alice")
        _sql(e, "UPDATE messages SET size = size + 1 WHERE uidl = 'b1'")
        assert version("bob") > b
        assert version("alice") == c


def test_login_reuses_the_snapshot_until_the_mailbox_changes(db_url: str) -> None:
    with open_engine(db_url) as e, open_engine(db_url) as other:
        e.deliver("alice", b"Subject: 1\r\n\r\none\r\n", "u1", None)
        h1, s1 = e.open("alice", True)
        e.release(h1)
        h2, s2 = e.open("alice", True)
        e.release(h2)
        assert s2 is s1  # unchanged: the cached snapshot, no rows read
        # Another process delivers: the next login sees the message.
        other.deliver("alice", b"Subject: 2\r\n\r\ntwo\r\n", "u2", None)
        assert _uids(e, "alice") == ["u1", "u2"]
        # A session elsewhere removes one (UPDATE): gone at the next login here.
        h, snap = other.open("alice", True)
        other.delete(h, [snap.rows[0].id])
        other.release(h)
        assert _uids(e, "alice") == ["u2"]
        # An administrator's SQL, past pypop: seen too.
        _sql(e, "DELETE FROM messages WHERE uidl = 'u2'")
        assert _uids(e, "alice") == []


def test_mailbox_made_again_under_the_same_name(db_url: str) -> None:
    with open_engine(db_url) as e:
        e.deliver("alice", b"Subject: 1\r\n\r\none\r\n", "u1", None)
        assert _uids(e, "alice") == ["u1"]  # the engine now knows alice's id
        _sql(e, "DELETE FROM messages")
        _sql(e, "DELETE FROM mailboxes WHERE name = 'alice'")
        _sql(e, "INSERT INTO mailboxes (name) VALUES ('alice')")
        new_id = _sql(e, "SELECT id FROM mailboxes WHERE name = 'alice'")[0][0]
        with open_engine(db_url) as other:
            other.deliver("alice", b"Subject: 2\r\n\r\ntwo\r\n", "u2", None)
        handle, snapshot = e.open("alice", True)
        try:
            assert handle.mailbox_id == new_id
            assert [r.uidl for r in snapshot.rows] == ["u2"]
        finally:
            e.release(handle)


def test_cache_limit_in_messages(sqlite_url: str) -> None:
    e = make_engine(parse_options({"url": sqlite_url, "snapshot_cache": "3"}))
    e.start()
    try:
        for user in ("a", "b"):
            for n in range(2):
                e.deliver(user, b"x\r\n", f"{user}{n}", None)
        ha, sa = e.open("a", True)  # 2 messages + 1: fits
        e.release(ha)
        hb, sb = e.open("b", True)  # evicts a
        e.release(hb)
        ha, sa2 = e.open("a", True)
        e.release(ha)
        assert sa2 is not sa
        assert sa2 == sa
        hb, sb2 = e.open("b", True)  # a evicted b in turn
        e.release(hb)
        assert sb2 is not sb
    finally:
        e.close()
    e = make_engine(parse_options({"url": sqlite_url, "snapshot_cache": "0"}))
    e.start()
    try:
        h, s1 = e.open("a", True)
        e.release(h)
        h, s2 = e.open("a", True)
        e.release(h)
        assert s1 is not s2
        assert s1 == s2
    finally:
        e.close()


def test_version_1_database_is_migrated_in_place(db_url: str) -> None:
    """A database written by schema 1 gets the column and the triggers; mail stays."""
    kind = "sqlite" if db_url.startswith("sqlite") else "postgresql"
    if kind == "sqlite":
        conn = sqlite3.connect(db_url.removeprefix("sqlite://"))
        for statement in MIGRATIONS[kind][1]:
            conn.execute(statement)
        conn.execute("INSERT INTO pypop_meta VALUES ('schema_version', '1')")
        conn.execute("INSERT INTO mailboxes (name) VALUES ('alice')")
        conn.execute(
            "INSERT INTO messages (mailbox_id, uidl, received, size, octets, chunks)"
            " VALUES (1, 'old', 0, 5, 5, 1)"
        )
        conn.execute("INSERT INTO chunks VALUES (1, 0, x'6f6c640d0a')")
        conn.commit()
        conn.close()
    else:
        import psycopg

        with psycopg.connect(db_url, autocommit=True) as pg:
            for statement in MIGRATIONS[kind][1]:
                pg.execute(statement)
            pg.execute("INSERT INTO pypop_meta VALUES ('schema_version', '1')")
            pg.execute("INSERT INTO mailboxes (name) VALUES ('alice')")
            pg.execute(
                "INSERT INTO messages (mailbox_id, uidl, received, size, octets, chunks)"
                " VALUES (1, 'old', now(), 5, 5, 1)"
            )
            pg.execute("INSERT INTO chunks VALUES (1, 0, '\\x6f6c640d0a'::bytea)")
    e = engine(db_url)
    try:
        meta = _sql(e, "SELECT value FROM pypop_meta WHERE key = 'schema_version'")
        assert meta == [(str(SCHEMA_VERSION),)]
        assert SCHEMA_VERSION == 2
        assert _uids(e, "alice") == ["old"]
        before = _sql(e, "SELECT version FROM mailboxes WHERE name = 'alice'")[0][0]
        e.deliver("alice", b"new\r\n", "new", None)
        assert _sql(e, "SELECT version FROM mailboxes WHERE name = 'alice'")[0][0] == before + 1
        assert _uids(e, "alice") == ["old", "new"]
    finally:
        e.close()
