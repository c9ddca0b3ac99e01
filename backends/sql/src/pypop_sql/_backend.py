"""The ``sql`` backend: :class:`SqlBackend` and its :class:`SqlMailbox`."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Final, Self

import trio
from pypop.backend import Account
from pypop.backend_kit import IOThreads, SessionThreads, SnapshotMailbox, TopCut
from pypop.errors import NoSuchMessage, PermanentFailure, TemporaryFailure, UpdateFailed
from pypop.wire import stuff

from pypop_sql._config import SqlConfig, parse_options
from pypop_sql._engine import Engine, Handle, Snapshot, make_engine

__all__ = ["SqlBackend", "SqlMailbox"]

# Read-ahead: the thread hop that reads a one-chunk message also reads the one-chunk
# messages after it (clients RETR and TOP in order), up to this much per session.
READ_AHEAD_OCTETS: Final = 256 * 1024
READ_AHEAD_MESSAGES: Final = 64
# A large message is read about this much per thread hop (a query per hop costs the
# database more than the rows: 1 MiB per query halves PostgreSQL's CPU per MB against
# 256 KiB), and handed to the server in blocks of about BLOCK_OCTETS (fewer, larger
# sends). Chunks are 256 KiB (64 KiB in databases written by earlier versions: read 16 and
# joined 4 at a time); the plan goes by the message's own chunk size.
READ_OCTETS: Final = 1024 * 1024
BLOCK_OCTETS: Final = 256 * 1024


def read_plan(octets: int, chunks: int) -> tuple[int, int]:
    """(chunks per read, chunks per block) for a message of this many stored octets."""
    per_chunk = max(1, -(-octets // max(1, chunks)))
    return max(1, READ_OCTETS // per_chunk), max(1, BLOCK_OCTETS // per_chunk)


class _PendingOpen:
    """An open in a worker thread, and whether the login still waits for it."""

    __slots__ = ("abandoned", "guard", "handle")

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.abandoned = False
        self.handle: Handle | None = None


class SqlBackend:
    """Maildrops in an SQLite or PostgreSQL database (see README.md)."""

    def __init__(self, config: SqlConfig, *, engine: Engine | None = None) -> None:
        self.config = config
        self.engine = engine if engine is not None else make_engine(config)
        self.threads = IOThreads(
            config.io_threads, timeout=config.io_timeout, batch=config.batch_scheduling
        )
        # The server enforces and announces it (pypop.backend: expire_days).
        self.expire_days = config.expire_days
        self._closed = False

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> Self:
        """Check the options, connect, create or migrate the schema."""
        backend = cls(parse_options(options))
        backend.engine.start()
        return backend

    async def open_mailbox(self, user: str) -> SqlMailbox:
        threads = self.threads.session()
        create = self.config.autocreate != "no"
        # One thread call that returns a locked snapshot or raises with no lock held.
        # If the call is given up (io_timeout, a cancelled session), its thread still
        # finishes and takes the lock (and a PostgreSQL connection) that nobody will
        # release: whichever of the thread and this task comes second releases it.
        pending = _PendingOpen()
        try:
            handle, snapshot = await threads.run(self._open_sync, user, create, pending)
        except BaseException:
            with pending.guard:
                pending.abandoned = True
                late, pending.handle = pending.handle, None
            if late is not None:  # opened, but the result came after we gave up
                # (A thread of its own: the worker threads may all be busy.)
                threading.Thread(
                    target=self.engine.release, args=(late,), name="pypop-sql-release", daemon=True
                ).start()
            raise
        return SqlMailbox(self, handle, snapshot, threads)

    def _open_sync(self, user: str, create: bool, pending: _PendingOpen) -> tuple[Handle, Snapshot]:
        handle, snapshot = self.engine.open(user, create)
        with pending.guard:
            if not pending.abandoned:
                pending.handle = handle
                return handle, snapshot
        self.engine.release(handle)
        raise TemporaryFailure("the login gave up before the maildrop was opened")

    async def open_account(self, account: Account) -> SqlMailbox:
        """pypop.backend.AccountBackend: maildrops are named, not placed, so a home
        directory changes nothing; ``userdb_mail=sql:NAME`` serves maildrop NAME.
        Any other mail location is refused rather than served from here."""
        if account.mail is None:
            return await self.open_mailbox(account.user)
        driver, sep, name = account.mail.partition(":")
        if driver != "sql" or not sep or not name:
            raise PermanentFailure(f"the sql backend cannot serve {account.mail!r}")
        return await self.open_mailbox(name)

    async def deliver(
        self,
        user: str,
        message: bytes,
        *,
        uid: str | None = None,
        received: float | None = None,
    ) -> str:
        """pypop.backend.Deliverer: one transaction; durable when it returns."""
        return await self.threads.run(self.engine.deliver, user, bytes(message), uid, received)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            # Even in a cancelled scope (a server stopping, a test ending): otherwise
            # the connections and the pool's threads outlive the backend.
            with trio.CancelScope(shield=True):
                await self.threads.run(self.engine.close)


class SqlMailbox(SnapshotMailbox):
    """One locked maildrop (pypop.backend.Mailbox, WireCache for read-ahead, and
    MessageTimes for EXPIRE)."""

    def __init__(
        self, backend: SqlBackend, handle: Handle, snapshot: Snapshot, threads: SessionThreads
    ) -> None:
        # Shared with other sessions through the engine's SnapshotCache: read only.
        super().__init__(snapshot.infos)
        self._engine = backend.engine
        self._handle = handle
        self._rows = snapshot.rows
        self._threads = threads
        self._ahead: dict[int, bytes] = {}
        # UPDATE's deletion may outlive its caller (io_timeout, update_timeout) and
        # go on in its thread: the lock is then given up by that thread when it ends,
        # never under it (a new session would list what it is deleting; PostgreSQL's
        # connection would go back to the pool inside its transaction).
        self._guard = threading.Lock()
        self._deleting = False  # from update() until its thread ends (or never starts)
        self._delete_started = False
        self._release_when_deleted = False
        self._released = False

    async def received_times(self) -> list[float | None]:
        """pypop.backend.MessageTimes: one query, only at an UPDATE with EXPIRE."""
        times = await self._threads.run(self._engine.received, self._handle)
        return [times.get(row.id) for row in self._rows]

    def wire_message(self, index: int, top_lines: int | None = None) -> bytes | None:
        """pypop.backend.WireCache: messages already read ahead need no thread hop."""
        # TOP leaves the message for a later RETR; RETR takes it.
        ahead = self._ahead
        data = ahead.pop(index, None) if top_lines is None else ahead.get(index)
        return None if data is None else stuff(data, top_lines)

    def _read_ahead(self, index: int) -> dict[int, bytes]:
        """Message ``index`` (one chunk) and the one-chunk messages after it."""
        rows = self._rows
        want = [index]
        budget = READ_AHEAD_OCTETS - rows[index].octets
        for j in range(index + 1, min(len(rows), index + READ_AHEAD_MESSAGES)):
            row = rows[j]
            if row.chunks != 1 or row.octets > budget:
                break
            want.append(j)
            budget -= row.octets
        data = self._engine.read_small(self._handle, [rows[j].id for j in want])
        return {j: data[rows[j].id] for j in want if rows[j].id in data}

    async def retrieve(self, index: int, *, top_lines: int | None = None) -> AsyncIterator[bytes]:
        if not 0 <= index < len(self._rows):
            raise NoSuchMessage(f"no message at index {index}")
        row = self._rows[index]
        cutter = TopCut(top_lines) if top_lines is not None else None
        if row.chunks == 1:
            data = self._ahead.pop(index, None)
            if data is None:
                ahead = await self._threads.run(self._read_ahead, index)
                data = ahead.pop(index, None)
                self._ahead = ahead
                if data is None:
                    raise NoSuchMessage("message was removed")
                if top_lines is not None:
                    self._ahead[index] = data  # TOP then RETR of one message
            yield cutter.feed(data)[0] if cutter is not None else data
            return
        per_read, per_block = read_plan(row.octets, row.chunks)
        seq = 0
        while seq < row.chunks:
            # TOP mostly stops in the first chunk: read that alone first.
            step = 1 if cutter is not None and seq == 0 else per_read
            last = min(row.chunks, seq + step) - 1
            if step > 1 and row.chunks - 1 - last <= per_read // 4:
                # A short tail rides along (1 MiB of LF mail is a little more in the
                # CRLF form): one hop more costs more than a quarter more rows.
                last = row.chunks - 1
            blocks = await self._threads.run(self._engine.read, self._handle, row.id, seq, last)
            if len(blocks) != last - seq + 1:
                if seq == 0 and not blocks:
                    raise NoSuchMessage("message was removed")
                raise TemporaryFailure("message chunks are missing")
            seq = last + 1
            for i in range(0, len(blocks), per_block):
                # A join of one is that bytes object itself: no copy of 256 KiB rows.
                block = b"".join(blocks[i : i + per_block])
                if cutter is None:
                    yield block
                    continue
                part, stop = cutter.feed(block)
                if part:
                    yield part
                if stop:
                    return

    async def update(self, deleted: Sequence[int]) -> None:
        """One transaction: every marked message goes, or none does."""
        if deleted:
            ids = [self._rows[i].id for i in deleted]
            self._deleting = True
            try:
                await self._threads.run(self._delete, ids)
            except BaseException as exc:
                with self._guard:
                    if not self._delete_started:  # given up before a thread took it
                        self._deleting = False
                if isinstance(exc, TemporaryFailure):
                    raise UpdateFailed(f"nothing was removed: {exc}") from exc
                raise

    def _delete(self, ids: list[int]) -> None:
        """In a worker thread: the deletion, then the release if it was asked for
        meanwhile (the caller gave up waiting)."""
        with self._guard:
            if not self._deleting:  # the caller gave up before this thread started
                return
            self._delete_started = True
        try:
            self._engine.delete(self._handle, ids)
        finally:
            with self._guard:
                self._deleting = False
                release = self._release_when_deleted
            if release:
                self._release_once()

    def _release_later(self) -> bool:
        """True if a deletion still runs: its thread releases the lock when it ends."""
        with self._guard:
            if self._deleting:
                self._release_when_deleted = True
            return self._deleting

    def commits_at_once(self, deleted: Sequence[int]) -> bool:
        """pypop.backend_kit.SnapshotMailbox: nothing to delete (no transaction) and a
        lock that ``release_now`` gives up (SQLite's fcntl lock)."""
        return not deleted and not self._engine.release_blocks

    def release_now(self) -> bool:
        """pypop.backend_kit.SnapshotMailbox: SQLite's lock is a non-blocking fcntl
        call, given up here without a shielded scope; PostgreSQL's needs its server."""
        if self._engine.release_blocks:
            return False
        self._ahead = {}
        if not self._release_later():
            self._release_once()
        return True

    async def release(self) -> None:
        self._ahead = {}
        if self._release_later():
            return
        try:
            await self._threads.run(self._release_once)
        except TemporaryFailure:
            # Given up: if no worker took the call (all busy past io_timeout), the
            # lock and the pooled connection would stay taken. A thread of its own.
            threading.Thread(
                target=self._release_once, name="pypop-sql-release", daemon=True
            ).start()

    def _release_once(self) -> None:
        """The engine's release, by whichever thread comes first."""
        with self._guard:
            if self._released:
                return
            self._released = True
        self._engine.release(self._handle)
