"""The two engines: SQLite (stdlib ``sqlite3``) and PostgreSQL (psycopg 3 + psycopg_pool).

Every method here blocks: the backend calls them in worker threads
(:class:`pypop.backend_kit.IOThreads`). Database errors leave as
:class:`~pypop.errors.TemporaryFailure` (the session says ``[SYS/TEMP]``, ``pypop
deliver`` exits 75 so that the MTA retries); the message names the engine's error
class and text, never a password.

The SQL is written once, with ``?`` placeholders; the PostgreSQL engine turns them
into ``%s``. Where the dialects differ (DDL, timestamps, list parameters, the lock),
each engine has its own method.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import secrets
import sqlite3
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar

from pypop.backend import MessageInfo, is_valid_uid
from pypop.backend_kit import BLOCK_SIZE, batch_policy
from pypop.errors import (
    DuplicateUid,
    MailboxLocked,
    NoSuchUser,
    PermanentFailure,
    TemporaryFailure,
)
from pypop.server import malloc
from pypop.wire import stuff, unstuff, wire_size

from pypop_sql._config import SqlConfig
from pypop_sql._locks import LockFile, lock_file
from pypop_sql._schema import LOCK_NAMESPACE, MIGRATIONS, SCHEMA_VERSION

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

__all__ = [
    "CHUNK_SIZE",
    "Engine",
    "Handle",
    "PostgresEngine",
    "Row",
    "SchemaError",
    "SqliteEngine",
    "crlf_form",
    "make_engine",
    "new_uid",
]

log = logging.getLogger("pypop.sql")

CHUNK_SIZE: Final = 4 * BLOCK_SIZE
"""Octets per ``chunks`` row (256 KiB): a 1 MiB message is four rows, each handed to
the server as it comes (the 64 KiB rows of earlier versions are joined four at a time: a copy of
every octet). Readers go by each message's own ``octets`` / ``chunks``."""

_DELETE_BATCH: Final = 500
T = TypeVar("T")


class SchemaError(ValueError):
    """The database's schema cannot be used by this code (newer, or not ours)."""


class Row(NamedTuple):
    """One message of a snapshot, as the ``messages_snapshot`` index has it."""

    id: int
    size: int
    uidl: str
    octets: int
    chunks: int


@dataclass(slots=True)
class Handle:
    """A locked mailbox: its id, and for PostgreSQL the connection holding the lock."""

    mailbox_id: int
    conn: Any = None


class Snapshot(NamedTuple):
    """A mailbox as a login sees it: what the server lists, and where to read it."""

    infos: tuple[MessageInfo, ...]
    rows: tuple[Row, ...]

    @classmethod
    def of(cls, rows: Iterable[tuple[Any, ...]]) -> Snapshot:
        made = tuple(Row(*r) for r in rows)
        return cls(tuple(MessageInfo(r.size, r.uidl) for r in made), made)


class SnapshotCache:
    """Snapshots of recently opened mailboxes, each with the ``mailboxes.version`` it
    was read at; at most ``limit`` messages in all, least recently used out first.

    The triggers of schema 2 raise ``version`` in the transaction of every change to
    a mailbox's messages, so a snapshot is reused only if the version read after the
    lock is the one it was read at: nothing was added or removed since. A snapshot
    read after that version was read may hold later changes too; the next change
    raises the version again, so such a snapshot is never reused stale. Shared by
    the worker threads (a lock), read-only once stored.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: collections.OrderedDict[int, tuple[int, Snapshot]] = (
            collections.OrderedDict()
        )
        self._held = 0
        self._guard = threading.Lock()

    def get(self, mailbox_id: int, version: int) -> Snapshot | None:
        with self._guard:
            entry = self._entries.get(mailbox_id)
            if entry is None or entry[0] != version:
                return None
            self._entries.move_to_end(mailbox_id)
            return entry[1]

    def get_or_make(
        self, mailbox_id: int, version: int, rows: Callable[[], Iterable[tuple[Any, ...]]]
    ) -> Snapshot:
        """The cached snapshot of this version, else one made of ``rows()`` and kept."""
        snapshot = self.get(mailbox_id, version)
        if snapshot is None:
            snapshot = Snapshot.of(rows())
            self.put(mailbox_id, version, snapshot)
        return snapshot

    def put(self, mailbox_id: int, version: int, snapshot: Snapshot) -> None:
        size = len(snapshot.rows) + 1
        if size > self.limit:
            return
        with self._guard:
            old = self._entries.pop(mailbox_id, None)
            if old is not None:
                self._held -= len(old[1].rows) + 1
            self._entries[mailbox_id] = (version, snapshot)
            self._held += size
            while self._held > self.limit:
                _, (_, gone) = self._entries.popitem(last=False)
                self._held -= len(gone.rows) + 1


def new_uid() -> str:
    """A fresh UIDL: delivery time (hex seconds) and 64 random bits, 25 characters."""
    return f"{int(time.time()):x}.{secrets.token_hex(8)}"


def crlf_form(data: bytes) -> bytes:
    """The stored form: every line end CRLF, as a client gets the message from RETR.

    Made by the wire codec itself (stuff, then unstuff), so the server sends exactly
    the same octets as for ``data`` (docs/wire.md: LF, CRLF and a bare CR are line
    ends), for RETR and every TOP cut. A last line without a line end stays without
    one (the CRLF the server adds there is not the message's). Mail that is already
    CRLF is returned as it is.
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\n") == crlf and data.count(b"\r") == crlf:
        return data
    out, _ = unstuff(stuff(data))
    if not data.endswith((b"\n", b"\r")):
        out = out[:-2]
    return out


def split_chunks(data: bytes) -> list[bytes]:
    if not data:
        return [b""]
    view = memoryview(data)
    return [bytes(view[i : i + CHUNK_SIZE]) for i in range(0, len(data), CHUNK_SIZE)]


def _batches(ids: Sequence[int]) -> Iterator[list[int]]:
    for i in range(0, len(ids), _DELETE_BATCH):
        yield list(ids[i : i + _DELETE_BATCH])


_SNAPSHOT = "SELECT id, size, uidl, octets, chunks FROM messages WHERE mailbox_id = ? ORDER BY id"
_SNAPSHOT_BY_NAME = (
    "SELECT m.id, m.size, m.uidl, m.octets, m.chunks FROM messages m"
    " JOIN mailboxes b ON b.id = m.mailbox_id WHERE b.name = %s ORDER BY m.id"
)
_VERSION = "SELECT id, version FROM mailboxes WHERE name = ?"
_READ = "SELECT data FROM chunks WHERE message_id = ? AND seq >= ? AND seq <= ? ORDER BY seq"
_CHUNK_ROWS = "SELECT rowid FROM chunks WHERE message_id = ? AND seq >= ? AND seq <= ? ORDER BY seq"
_RECEIVED = "SELECT id, received FROM messages WHERE mailbox_id = ?"
_LOOKUP = "SELECT password, enabled FROM users WHERE name = ?"
_SAMPLE = "SELECT password FROM users WHERE enabled LIMIT ?"


class Engine(ABC):
    """What the backend and the credential store need from a database."""

    kind: str
    _received_sql = "?"
    release_blocks = True
    """False if :meth:`release` never waits (it may run on the event loop)."""

    def __init__(self, config: SqlConfig) -> None:
        self.config = config
        self.snapshots = SnapshotCache(config.snapshot_cache)

    # -- life cycle --

    @abstractmethod
    def start(self) -> None:
        """Connect and create or migrate the schema. :class:`SchemaError` for a
        database newer than this code, :class:`TemporaryFailure` if unreachable."""

    @abstractmethod
    def close(self) -> None: ...

    def _migrate(self, execute: Callable[..., Any], fetch_version: Callable[[], int]) -> None:
        """Inside the caller's transaction: bring the schema to SCHEMA_VERSION."""
        version = fetch_version()
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"the database schema is version {version}, newer than this pypop-sql "
                f"understands ({SCHEMA_VERSION}): upgrade pypop3-sql"
            )
        if version == SCHEMA_VERSION:
            return
        steps = MIGRATIONS[self.kind]
        for v in range(version + 1, SCHEMA_VERSION + 1):
            for statement in steps[v]:
                execute(statement)
        if version == 0:
            execute(
                "INSERT INTO pypop_meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        else:
            execute(
                "UPDATE pypop_meta SET value = ? WHERE key = 'schema_version'",
                (str(SCHEMA_VERSION),),
            )
        log.info("sql: schema %s from version %d to %d", self.kind, version, SCHEMA_VERSION)

    # -- sessions --

    @abstractmethod
    def open(self, user: str, create: bool) -> tuple[Handle, Snapshot]:
        """Lock ``user``'s mailbox and read its snapshot. :class:`MailboxLocked` if
        someone holds it; :class:`PermanentFailure` if it does not exist and
        ``create`` is false."""

    @abstractmethod
    def release(self, handle: Handle) -> None: ...

    @abstractmethod
    def read(self, handle: Handle, message_id: int, first: int, last: int) -> list[bytes]:
        """Chunks ``first..last`` (inclusive) of one message."""

    @abstractmethod
    def read_small(self, handle: Handle, message_ids: Sequence[int]) -> dict[int, bytes]:
        """The only chunk of each of these one-chunk messages."""

    @abstractmethod
    def received(self, handle: Handle) -> dict[int, float]:
        """Message id -> delivery time (POSIX seconds) for the locked mailbox; read
        only at an UPDATE with EXPIRE in force (the snapshot index leaves it out)."""

    @abstractmethod
    def delete(self, handle: Handle, message_ids: Sequence[int]) -> None:
        """Remove these messages of the locked mailbox in one transaction."""

    # -- delivery and credentials --

    @abstractmethod
    def deliver(self, user: str, data: bytes, uid: str | None, received: float | None) -> str: ...

    @abstractmethod
    def password(self, user: str) -> tuple[str, bool] | None:
        """(stored password, enabled) of ``user`` in ``users``, or None."""

    @abstractmethod
    def sample_passwords(self, limit: int) -> list[str]: ...

    def _check_uid(self, uid: str | None) -> None:
        if uid is not None and not is_valid_uid(uid):
            raise ValueError(f"invalid UIDL {uid!r}: 1-70 characters in 0x21-0x7E")

    @staticmethod
    def _check_user(user: str) -> None:
        """A name neither database can store (octets that were not UTF-8, as an MTA
        may pass a recipient's local part) names no maildrop: a bounce, not the
        UnicodeEncodeError (a ValueError: EX_CONFIG, deferred for days)."""
        try:
            user.encode("utf-8")
        except UnicodeEncodeError:
            raise NoSuchUser("no such mailbox") from None

    def _mailbox_for_delivery(
        self, fetch: Callable[[str, tuple[object, ...]], Any], user: str
    ) -> int:
        """The mailbox id for a delivery, made if the ``autocreate`` rule allows."""
        row = fetch("SELECT id FROM mailboxes WHERE name = ?", (user,))
        if row is not None:
            return int(row[0])
        mode = self.config.autocreate
        if mode == "no" or (
            mode == "users"
            and fetch("SELECT 1 FROM users WHERE name = ? AND enabled", (user,)) is None
        ):
            raise NoSuchUser("no such mailbox")
        fetch("INSERT INTO mailboxes (name) VALUES (?) ON CONFLICT (name) DO NOTHING", (user,))
        row = fetch("SELECT id FROM mailboxes WHERE name = ?", (user,))
        if row is None:
            raise TemporaryFailure("mailbox vanished while it was created")
        return int(row[0])

    def _insert(
        self,
        fetch: Callable[[str, tuple[object, ...]], Any],
        insert_chunks: Callable[[list[tuple[int, int, bytes]]], None],
        mailbox_id: int,
        data: bytes,
        uid: str | None,
        received: float | None,
    ) -> str:
        """Insert one message; the caller holds the transaction."""
        size = wire_size(data)
        stored = crlf_form(data)
        chunks = split_chunks(stored)
        when = time.time() if received is None else received
        for _attempt in range(5):
            uidl = uid if uid is not None else new_uid()
            row = fetch(
                "INSERT INTO messages (mailbox_id, uidl, received, size, octets, chunks) "
                f"VALUES (?, ?, {self._received_sql}, ?, ?, ?) "
                "ON CONFLICT (mailbox_id, uidl) DO NOTHING RETURNING id",
                (mailbox_id, uidl, when, size, len(stored), len(chunks)),
            )
            if row is not None:
                message_id = int(row[0])
                insert_chunks([(message_id, seq, c) for seq, c in enumerate(chunks)])
                return uidl
            if uid is not None:
                raise DuplicateUid(f"the maildrop already has UIDL {uid!r}")
        raise TemporaryFailure("could not make a unique UIDL")


# ------------------------------------------------------------------------------ SQLite


def _sqlite_errors(what: str) -> contextlib.AbstractContextManager[None]:
    return _translate(sqlite3.Error, f"sqlite: {what}")


@contextlib.contextmanager
def _translate(kinds: type[BaseException] | tuple[type[BaseException], ...], what: str) -> Any:
    try:
        yield
    except kinds as exc:
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise TemporaryFailure(f"{what}: {type(exc).__name__}: {text}") from exc


class _Connection(sqlite3.Connection):
    """A connection that can be weakly referenced (the C type cannot)."""


class SqliteEngine(Engine):
    """One database file in WAL mode; a connection per worker thread; the lock file.

    A worker thread keeps its connection (and its statement cache) while it lives;
    when Trio retires an idle thread, the connection goes with it.
    """

    kind = "sqlite"
    release_blocks = False  # a non-blocking fcntl call

    def __init__(self, config: SqlConfig) -> None:
        super().__init__(config)
        self._local = threading.local()
        self._all: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._guard = threading.Lock()
        self._locks: LockFile | None = None
        # name -> mailbox id, for mailboxes opened before (ids are never reused).
        self._ids: dict[str, int] = {}

    def _connect(self) -> _Connection:
        # Autocommit (isolation_level None): reads are single statements, writes say
        # BEGIN IMMEDIATE themselves, so a writer never upgrades a read lock (which
        # can fail with SQLITE_BUSY at once instead of waiting).
        conn = sqlite3.connect(
            self.config.path,
            timeout=self.config.busy_timeout,
            isolation_level=None,
            check_same_thread=False,
            cached_statements=64,
            factory=_Connection,
        )
        conn.execute(f"PRAGMA synchronous = {self.config.synchronous.upper()}")
        # Message chunks are read straight from the mapped file instead of being
        # copied into SQLite's page cache first: about 3x less CPU per MB read.
        conn.execute(f"PRAGMA mmap_size = {int(self.config.mmap_size)}")
        return conn

    def _conn(self) -> _Connection:
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._guard:
                self._all.add(conn)
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def start(self) -> None:
        with _sqlite_errors(f"cannot open {self.config.path}"):
            conn = self._conn()
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("sqlite: %s cannot use WAL mode (%s)", self.config.path, mode)
            with self._write() as c:

                def version() -> int:
                    meta = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
                    if c.execute(meta, ("pypop_meta",)).fetchone() is None:
                        if c.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
                            raise SchemaError(
                                f"{self.config.path} holds tables but no pypop_meta: "
                                "not a pypop-sql database"
                            )
                        return 0
                    row = c.execute(
                        "SELECT value FROM pypop_meta WHERE key = 'schema_version'"
                    ).fetchone()
                    return int(row[0]) if row else 0

                self._migrate(c.execute, version)
        self._locks = lock_file(self.config.path)

    def close(self) -> None:
        with self._guard:
            conns, self._all = list(self._all), weakref.WeakSet()
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        if self._locks is not None:
            self._locks.release_file()
            self._locks = None

    def open(self, user: str, create: bool) -> tuple[Handle, Snapshot]:
        locks = self._locks
        assert locks is not None, "engine not started"
        with _sqlite_errors("cannot open the mailbox"):
            conn = self._conn()
            # Ids never change, so a known one is locked first and checked after:
            # a login the cache serves runs one statement.
            mailbox_id = self._ids.get(user)
            if mailbox_id is None:
                mailbox_id = self._mailbox_id(conn, user, create)
            for _attempt in (1, 2):
                try:
                    taken = locks.try_lock(mailbox_id)
                except OSError as exc:
                    raise TemporaryFailure(f"cannot lock {locks.path}: {exc.strerror}") from exc
                if not taken:
                    raise MailboxLocked("maildrop is locked by another session")
                try:
                    # After the lock: sees every UPDATE the previous holder committed.
                    row = conn.execute(_VERSION, (user,)).fetchone()
                    if row is not None and int(row[0]) == mailbox_id:
                        snapshot = self.snapshots.get_or_make(
                            mailbox_id,
                            int(row[1]),
                            functools.partial(conn.execute, _SNAPSHOT, (mailbox_id,)),
                        )
                        self._ids[user] = mailbox_id
                        return Handle(mailbox_id), snapshot
                except BaseException:
                    locks.unlock(mailbox_id)
                    raise
                # The name now has another id (or none): an administrator removed
                # the mailbox. Start again from the name.
                locks.unlock(mailbox_id)
                self._ids.pop(user, None)
                mailbox_id = self._mailbox_id(conn, user, create)
            raise TemporaryFailure("the mailbox changed while it was opened")

    def _mailbox_id(self, conn: sqlite3.Connection, user: str, create: bool) -> int:
        row = conn.execute("SELECT id FROM mailboxes WHERE name = ?", (user,)).fetchone()
        if row is None:
            if not create:
                raise PermanentFailure("no such mailbox")
            with self._write() as c:
                c.execute(
                    "INSERT INTO mailboxes (name) VALUES (?) ON CONFLICT (name) DO NOTHING",
                    (user,),
                )
                row = c.execute("SELECT id FROM mailboxes WHERE name = ?", (user,)).fetchone()
        return int(row[0])

    def release(self, handle: Handle) -> None:
        if self._locks is not None:
            self._locks.unlock(handle.mailbox_id)

    def read(self, handle: Handle, message_id: int, first: int, last: int) -> list[bytes]:
        conn = self._conn()
        with _sqlite_errors("cannot read a message"):
            if not malloc.tuned():
                # Each blob read is a fresh bytes of the chunk's size: with glibc's
                # default trim threshold the heap gives it back and faults it in again
                # every time (five times slower than the SELECT). pypop serve tunes malloc.
                return [r[0] for r in conn.execute(_READ, (message_id, first, last))]
            # Through blob handles: one copy, from the mapped file into the bytes
            # object (a SELECT copies twice, through SQLite's own buffer): a third
            # less CPU per MB. One read transaction, so the row ids and blobs agree.
            conn.execute("BEGIN")
            try:
                blocks = []
                for (rowid,) in conn.execute(_CHUNK_ROWS, (message_id, first, last)).fetchall():
                    with conn.blobopen("chunks", "data", rowid, readonly=True) as blob:
                        blocks.append(blob.read())
                return blocks
            finally:
                conn.execute("ROLLBACK")  # read only: nothing to keep

    def read_small(self, handle: Handle, message_ids: Sequence[int]) -> dict[int, bytes]:
        marks = ",".join("?" * len(message_ids))
        with _sqlite_errors("cannot read messages"):
            cur = self._conn().execute(
                f"SELECT message_id, data FROM chunks WHERE message_id IN ({marks}) AND seq = 0",
                tuple(message_ids),
            )
            return {int(mid): data for mid, data in cur}

    def received(self, handle: Handle) -> dict[int, float]:
        with _sqlite_errors("cannot read arrival times"):
            cur = self._conn().execute(_RECEIVED, (handle.mailbox_id,))
            return {int(mid): float(when) for mid, when in cur}

    def delete(self, handle: Handle, message_ids: Sequence[int]) -> None:
        with _sqlite_errors("UPDATE failed"), self._write() as conn:
            for batch in _batches(message_ids):
                self._delete_batch(conn, handle.mailbox_id, batch)

    def _delete_batch(self, conn: sqlite3.Connection, mailbox_id: int, batch: list[int]) -> None:
        marks = ",".join("?" * len(batch))
        conn.execute(f"DELETE FROM chunks WHERE message_id IN ({marks})", batch)
        conn.execute(
            f"DELETE FROM messages WHERE mailbox_id = ? AND id IN ({marks})", (mailbox_id, *batch)
        )

    def deliver(self, user: str, data: bytes, uid: str | None, received: float | None) -> str:
        self._check_uid(uid)
        self._check_user(user)
        with _sqlite_errors("cannot deliver"), self._write() as conn:

            def fetch(sql: str, params: tuple[object, ...]) -> Any:
                return conn.execute(sql, params).fetchone()

            def chunks(rows: list[tuple[int, int, bytes]]) -> None:
                conn.executemany(
                    "INSERT INTO chunks (message_id, seq, data) VALUES (?, ?, ?)", rows
                )

            mailbox_id = self._mailbox_for_delivery(fetch, user)
            return self._insert(fetch, chunks, mailbox_id, data, uid, received)

    def password(self, user: str) -> tuple[str, bool] | None:
        with _sqlite_errors("cannot look up a user"):
            row = self._conn().execute(_LOOKUP, (user,)).fetchone()
        return None if row is None else (str(row[0]), bool(row[1]))

    def sample_passwords(self, limit: int) -> list[str]:
        with _sqlite_errors("cannot read users"):
            return [str(r[0]) for r in self._conn().execute(_SAMPLE, (limit,))]


# -------------------------------------------------------------------------- PostgreSQL


# Per worker thread: whether it runs SCHED_BATCH (PostgresEngine._batch_thread).
_THREAD = threading.local()


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")


class PostgresEngine(Engine):
    """psycopg 3 connections from a psycopg_pool pool, in autocommit mode.

    A POP3 session takes a connection at login and keeps it until it ends: that
    connection holds the session-level advisory lock ``(LOCK_NAMESPACE, mailbox id)``
    and runs the session's queries. If the frontend dies, PostgreSQL ends the
    backend when the socket closes, and the lock with it.
    """

    kind = "postgresql"
    _received_sql = "to_timestamp(?)"

    def __init__(self, config: SqlConfig) -> None:
        super().__init__(config)
        try:
            import psycopg
            import psycopg_pool  # noqa: F401
        except ImportError:
            raise SchemaError(
                "the PostgreSQL engine needs psycopg 3 and psycopg_pool: "
                "pip install 'pypop3-sql[postgresql]'"
            ) from None
        from psycopg.conninfo import conninfo_to_dict

        self._pool: psycopg_pool.ConnectionPool[Any] | None = None
        timeout_ms = int(config.io_timeout * 1000)
        try:
            given = str(conninfo_to_dict(config.url).get("options") or "")
        except psycopg.ProgrammingError as exc:
            raise SchemaError(f"option 'url' is not a valid PostgreSQL URI: {exc}") from None
        self._kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(1, round(config.connect_timeout)),
            # The server ends a query that outlives the session's I/O timeout, so an
            # abandoned thread does not keep a connection (and a lock) busy. Options
            # given in the URL are kept.
            "options": f"{given} -c statement_timeout={timeout_ms}".strip(),
        }

    def _errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        import psycopg
        import psycopg_pool

        return _translate((psycopg.Error, psycopg_pool.PoolTimeout), f"postgresql: {what}")

    def start(self) -> None:
        import psycopg
        import psycopg_pool

        with (
            self._errors("cannot connect"),
            psycopg.connect(self.config.url, **self._kwargs) as conn,
            conn.transaction(),
        ):
            # Two servers starting at once: one migrates, the other waits.
            conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_NAMESPACE,))

            def execute(sql: str, params: tuple[object, ...] = ()) -> Any:
                return conn.execute(_pg(sql), params)

            def version() -> int:
                if conn.execute("SELECT to_regclass('pypop_meta')").fetchone() == (None,):
                    if conn.execute("SELECT to_regclass('messages')").fetchone() != (None,):
                        raise SchemaError(
                            "the database has a messages table but no pypop_meta: "
                            "not a pypop-sql database"
                        )
                    return 0
                row = conn.execute(
                    "SELECT value FROM pypop_meta WHERE key = 'schema_version'"
                ).fetchone()
                return int(row[0]) if row else 0

            self._migrate(execute, version)
        self._pool = psycopg_pool.ConnectionPool(
            self.config.url,
            min_size=1,
            max_size=self.config.pool_size,
            kwargs=self._kwargs,
            timeout=self.config.pool_timeout,
            name="pypop-sql",
            open=False,
        )
        self._pool.open(wait=False)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=5)

    @property
    def pool(self) -> psycopg_pool.ConnectionPool[Any]:
        if self._pool is None:
            raise TemporaryFailure("postgresql: engine not started or closed")
        return self._pool

    def _put(self, conn: psycopg.Connection[Any]) -> None:
        with contextlib.suppress(Exception):
            self.pool.putconn(conn)

    def open(self, user: str, create: bool) -> tuple[Handle, Snapshot]:
        # The connection stays with the session: it holds the advisory lock.
        return self._read(
            "cannot open the mailbox", lambda conn: self._open_on(conn, user, create), keep=True
        )

    def _open_on(
        self, conn: psycopg.Connection[Any], user: str, create: bool
    ) -> tuple[Handle, Snapshot]:
        try:
            return self._lock_and_read(conn, user, create)
        except (MailboxLocked, PermanentFailure):
            raise  # no lock was taken: no round trip more for an [IN-USE] answer
        except BaseException:
            # The lock statement may have taken the lock before a later statement
            # failed (in the pipeline, the error comes at its end): the connection
            # goes back to the pool holding no lock, or is closed. (A broken one
            # holds none, and stays "broken" for _read's retry.)
            if not conn.broken:
                try:
                    conn.execute("SELECT pg_advisory_unlock_all()")
                except Exception:
                    if not conn.broken:
                        with contextlib.suppress(Exception):
                            conn.close()
            raise

    def _lock_and_read(
        self, conn: psycopg.Connection[Any], user: str, create: bool
    ) -> tuple[Handle, Snapshot]:
        lock = "SELECT id, pg_try_advisory_lock(%s, id) FROM mailboxes WHERE name = %s"
        # Lock and snapshot in one round trip (pipeline mode). The server runs them in
        # order, so the snapshot statement starts after the lock is taken and sees
        # every UPDATE the previous holder committed; without the lock it is unused.
        # The version statement also runs after the lock: a cached snapshot of that
        # version is used, and the rows sent by the snapshot statement are not
        # made into Python objects.
        with conn.pipeline():
            locked = conn.execute(lock, (LOCK_NAMESPACE, user))
            version = conn.execute(_pg(_VERSION), (user,))
            snapshot = conn.execute(_SNAPSHOT_BY_NAME, (user,))
        row = locked.fetchone()
        if row is not None:
            mailbox_id, taken = int(row[0]), bool(row[1])
            if not taken:
                raise MailboxLocked("maildrop is locked by another session")
            seen = version.fetchone()
            if seen is None or int(seen[0]) != mailbox_id:
                # Removed and made again between the statements: no cache.
                return Handle(mailbox_id, conn), Snapshot.of(
                    conn.execute(_pg(_SNAPSHOT), (mailbox_id,))
                )
            cached = self.snapshots.get_or_make(mailbox_id, int(seen[1]), lambda: snapshot)
            return Handle(mailbox_id, conn), cached
        if row is None:
            if not create:
                raise PermanentFailure("no such mailbox")
            conn.execute(
                "INSERT INTO mailboxes (name) VALUES (%s) ON CONFLICT (name) DO NOTHING", (user,)
            )
            row = conn.execute(lock, (LOCK_NAMESPACE, user)).fetchone()
            if row is None:
                raise TemporaryFailure("mailbox vanished while it was created")
        mailbox_id, taken = int(row[0]), bool(row[1])
        if not taken:
            raise MailboxLocked("maildrop is locked by another session")
        # A statement after the lock: its snapshot sees every UPDATE committed by
        # the previous holder.
        snap = Snapshot.of(conn.execute(_pg(_SNAPSHOT), (mailbox_id,)))
        return Handle(mailbox_id, conn), snap

    def release(self, handle: Handle) -> None:
        conn, handle.conn = handle.conn, None
        if conn is None:
            return
        try:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_NAMESPACE, handle.mailbox_id))
        except Exception:
            # Whatever state it is in, a closed connection holds no lock.
            with contextlib.suppress(Exception):
                conn.close()
        self._put(conn)

    def _batch_thread(self) -> None:
        """Once per worker thread: SCHED_BATCH (``batch_scheduling``), so that data
        arriving from the server does not wake and preempt on every write.

        A PostgreSQL backend sends a result in 8 KB writes; on a core shared with it
        (a host with its own database) each write woke this thread, which preempted
        the backend to read 8 KB: a context switch per 8 KB. A batch thread is not
        run ahead of the backend at wake-up, so it reads what a time slice produced.
        Measured: +12-20% MB/s on retr-all-1m (docs/performance.md)."""
        if not self.config.batch_scheduling or getattr(_THREAD, "batch", False):
            return
        _THREAD.batch = True
        if not batch_policy():  # not Linux, or refused (seccomp)
            log.debug("sql: SCHED_BATCH not available")

    def read(self, handle: Handle, message_id: int, first: int, last: int) -> list[bytes]:
        self._batch_thread()
        with self._errors("cannot read a message"):
            cur = handle.conn.execute(_pg(_READ), (message_id, first, last), binary=True)
            return [r[0] for r in cur]

    def read_small(self, handle: Handle, message_ids: Sequence[int]) -> dict[int, bytes]:
        self._batch_thread()
        with self._errors("cannot read messages"):
            cur = handle.conn.execute(
                "SELECT message_id, data FROM chunks WHERE message_id = ANY(%s) AND seq = 0",
                (list(message_ids),),
                binary=True,
            )
            return {int(mid): data for mid, data in cur}

    def received(self, handle: Handle) -> dict[int, float]:
        with self._errors("cannot read arrival times"):
            cur = handle.conn.execute(
                "SELECT id, extract(epoch FROM received)::float8 FROM messages"
                " WHERE mailbox_id = %s",
                (handle.mailbox_id,),
            )
            return {int(mid): float(when) for mid, when in cur}

    def delete(self, handle: Handle, message_ids: Sequence[int]) -> None:
        conn = handle.conn
        with self._errors("UPDATE failed"), conn.transaction():
            for batch in _batches(message_ids):
                self._delete_batch(conn, handle.mailbox_id, batch)

    def _delete_batch(
        self, conn: psycopg.Connection[Any], mailbox_id: int, batch: list[int]
    ) -> None:
        conn.execute("DELETE FROM chunks WHERE message_id = ANY(%s)", (batch,))
        conn.execute(
            "DELETE FROM messages WHERE mailbox_id = %s AND id = ANY(%s)", (mailbox_id, batch)
        )

    def deliver(self, user: str, data: bytes, uid: str | None, received: float | None) -> str:
        self._check_uid(uid)
        self._check_user(user)
        with self._errors("cannot deliver"), self.pool.connection() as conn, conn.transaction():

            def fetch(sql: str, params: tuple[object, ...]) -> Any:
                cur = conn.execute(_pg(sql), params)
                return cur.fetchone() if cur.description is not None else None

            def chunks(rows: list[tuple[int, int, bytes]]) -> None:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO chunks (message_id, seq, data) VALUES (%s, %s, %b)", rows
                    )

            mailbox_id = self._mailbox_for_delivery(fetch, user)
            return self._insert(fetch, chunks, mailbox_id, data, uid, received)

    def _read(
        self, what: str, fn: Callable[[psycopg.Connection[Any]], T], *, keep: bool = False
    ) -> T:
        """``fn(conn)`` on a pooled connection; once more on a fresh one if the first
        was broken (a pooled connection from before a server restart). Reads only.
        ``keep``: on success the connection is not given back (the caller owns it)."""
        import psycopg

        pool = self.pool
        for attempt in (1, 2):
            with self._errors(what):
                conn = pool.getconn()
                try:
                    result = fn(conn)
                except psycopg.OperationalError:
                    broken = conn.broken
                    self._put(conn)
                    if broken and attempt == 1:
                        # Pooled connections from before a server restart: test them
                        # all now (dead ones are replaced), then try again.
                        pool.check()
                        continue
                    raise
                except BaseException:
                    self._put(conn)
                    raise
                if not keep:
                    self._put(conn)
                return result
        raise AssertionError("unreachable")

    def password(self, user: str) -> tuple[str, bool] | None:
        row = self._read(
            "cannot look up a user", lambda conn: conn.execute(_pg(_LOOKUP), (user,)).fetchone()
        )
        return None if row is None else (str(row[0]), bool(row[1]))

    def sample_passwords(self, limit: int) -> list[str]:
        return self._read(
            "cannot read users",
            lambda conn: [str(r[0]) for r in conn.execute(_pg(_SAMPLE), (limit,))],
        )


def make_engine(config: SqlConfig) -> Engine:
    if config.engine == "postgresql":
        return PostgresEngine(config)
    return SqliteEngine(config)
