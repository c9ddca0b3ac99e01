"""The schema, per engine, and its version.

Why it looks like this (README.md has the long form):

- ``mailboxes``: one row per maildrop; its integer id is the lock key (an SQLite
  lock-file byte, a PostgreSQL advisory-lock key).
- ``messages``: one row per message with what a login needs and nothing else: UIDL,
  delivery time, the POP3 size (computed once at delivery, so a login never reads a
  body), the stored length and the number of chunks. A covering index on
  ``(mailbox_id, id)`` answers the snapshot from the index alone; ``id`` order is
  delivery order. ``UNIQUE (mailbox_id, uidl)`` makes a UIDL unique in its maildrop.
  Ids are never reused (AUTOINCREMENT / identity), nor are UIDLs.
- ``chunks``: the message octets in the CRLF form, in 256 KiB rows (64 KiB in
  databases of earlier versions; readers plan by each message's size) keyed by
  ``(message_id, seq)``: RETR streams them a few at a time, TOP reads the first
  one(s) only, delivery and deletion are plain rows in one transaction. (PostgreSQL
  large objects would need ``lo_unlink`` bookkeeping outside the row's life, and
  SQLite has none.) PostgreSQL keeps chunk data uncompressed (``STORAGE
  EXTERNAL``): mail is mostly compressed already, and RETR then costs no
  decompression; rows up to 8 KB stay in the heap page (``toast_tuple_target``).
- ``users``: optional credentials for the ``sql`` credential store, ``{SCHEME}hash``
  as in Dovecot's SQL passdb.
- ``pypop_meta``: ``schema_version``.
- ``mailboxes.version`` (schema 2): a counter that triggers on ``messages`` raise in
  the transaction of every insert, delete or update of a mailbox's messages, whoever
  writes them (pypop, ``pypop deliver``, an administrator's SQL). A server keeps the
  snapshot of a mailbox it opened and reuses it at the next login while the counter
  is unchanged: a login then reads one row, not one per message.
"""

from __future__ import annotations

from typing import Final

__all__ = ["LOCK_NAMESPACE", "MIGRATIONS", "SCHEMA_VERSION"]

SCHEMA_VERSION: Final = 2

LOCK_NAMESPACE: Final = 0x706F7033
"""First key of PostgreSQL's two-key advisory locks ("pop3"): keeps our keys apart
from other applications' advisory locks in the same database."""

_SQLITE_V1 = [
    "CREATE TABLE pypop_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE mailboxes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        created REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
    )""",
    """CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        mailbox_id INTEGER NOT NULL REFERENCES mailboxes (id),
        uidl TEXT NOT NULL,
        received REAL NOT NULL,
        size INTEGER NOT NULL,
        octets INTEGER NOT NULL,
        chunks INTEGER NOT NULL,
        UNIQUE (mailbox_id, uidl)
    )""",
    "CREATE INDEX messages_snapshot ON messages (mailbox_id, id, size, uidl, octets, chunks)",
    """CREATE TABLE chunks (
        message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (message_id, seq)
    )""",
    """CREATE TABLE users (
        name TEXT PRIMARY KEY,
        password TEXT NOT NULL,
        enabled INTEGER NOT NULL DEFAULT 1
    )""",
]

_POSTGRESQL_V1 = [
    "CREATE TABLE pypop_meta (key text PRIMARY KEY, value text NOT NULL)",
    """CREATE TABLE mailboxes (
        id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        name text NOT NULL UNIQUE,
        created timestamptz NOT NULL DEFAULT now()
    )""",
    """CREATE TABLE messages (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        mailbox_id integer NOT NULL REFERENCES mailboxes (id),
        uidl text NOT NULL,
        received timestamptz NOT NULL,
        size bigint NOT NULL,
        octets bigint NOT NULL,
        chunks integer NOT NULL,
        UNIQUE (mailbox_id, uidl)
    )""",
    """CREATE INDEX messages_snapshot ON messages (mailbox_id, id)
        INCLUDE (size, uidl, octets, chunks)""",
    """CREATE TABLE chunks (
        message_id bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        seq integer NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (message_id, seq)
    )""",
    "ALTER TABLE chunks ALTER COLUMN data SET STORAGE EXTERNAL",
    # Rows up to ~8 KB stay in the heap page (one read for a small message); larger
    # chunks go out of line, uncompressed.
    "ALTER TABLE chunks SET (toast_tuple_target = 8160)",
    """CREATE TABLE users (
        name text PRIMARY KEY,
        password text NOT NULL,
        enabled boolean NOT NULL DEFAULT true
    )""",
]

_SQLITE_V2 = [
    "ALTER TABLE mailboxes ADD COLUMN version INTEGER NOT NULL DEFAULT 0",
    """CREATE TRIGGER messages_inserted AFTER INSERT ON messages BEGIN
        UPDATE mailboxes SET version = version + 1 WHERE id = NEW.mailbox_id;
    END""",
    """CREATE TRIGGER messages_deleted AFTER DELETE ON messages BEGIN
        UPDATE mailboxes SET version = version + 1 WHERE id = OLD.mailbox_id;
    END""",
    """CREATE TRIGGER messages_updated AFTER UPDATE ON messages BEGIN
        UPDATE mailboxes SET version = version + 1
            WHERE id IN (OLD.mailbox_id, NEW.mailbox_id);
    END""",
]

# Statement-level triggers: an UPDATE that deletes 500 messages bumps the counter
# once, not 500 times (each would leave a dead row version behind).
_POSTGRESQL_V2 = [
    "ALTER TABLE mailboxes ADD COLUMN version bigint NOT NULL DEFAULT 0",
    """CREATE FUNCTION pypop_messages_changed() RETURNS trigger LANGUAGE plpgsql AS $f$
    BEGIN
        IF TG_OP IN ('DELETE', 'UPDATE') THEN
            UPDATE mailboxes SET version = version + 1
                WHERE id IN (SELECT mailbox_id FROM old_rows);
        END IF;
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            UPDATE mailboxes SET version = version + 1
                WHERE id IN (SELECT mailbox_id FROM new_rows);
        END IF;
        RETURN NULL;
    END $f$""",
    """CREATE TRIGGER messages_inserted AFTER INSERT ON messages
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION pypop_messages_changed()""",
    """CREATE TRIGGER messages_deleted AFTER DELETE ON messages
        REFERENCING OLD TABLE AS old_rows
        FOR EACH STATEMENT EXECUTE FUNCTION pypop_messages_changed()""",
    """CREATE TRIGGER messages_updated AFTER UPDATE ON messages
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION pypop_messages_changed()""",
]

MIGRATIONS: Final[dict[str, dict[int, list[str]]]] = {
    # version -> statements that bring version-1 to it; 1 creates everything.
    "sqlite": {1: _SQLITE_V1, 2: _SQLITE_V2},
    "postgresql": {1: _POSTGRESQL_V1, 2: _POSTGRESQL_V2},
}
