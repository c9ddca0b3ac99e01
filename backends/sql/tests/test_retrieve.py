"""RETR and TOP of multi-chunk messages: every chunk count around the read plan.

A hop reads about 1 MiB of chunks, plus a tail of up to a quarter of that
(``read_plan``); TOP reads the first chunk alone. Messages of 1 to 40 chunks, in
today's 256 KiB chunks and in the 64 KiB chunks of earlier databases, come back
exactly on both engines, in the hops the plan promises.
"""

from __future__ import annotations

import itertools

import pytest
from pypop.server import malloc
from pypop.wire import stuff, unstuff

from pypop_sql import SqlBackend, create
from pypop_sql import _engine as engine_module
from pypop_sql._backend import read_plan
from pypop_sql._engine import CHUNK_SIZE, Engine, PostgresEngine, SqliteEngine

# chunk size -> chunk count -> hops for RETR
HOPS = {
    65536: {1: 0, 2: 1, 16: 1, 17: 1, 20: 1, 21: 2, 36: 2, 37: 3, 40: 3},
    CHUNK_SIZE: {1: 0, 2: 1, 4: 1, 5: 1, 6: 2, 9: 2, 10: 3},
}
CASES = [(size, n) for size, counts in HOPS.items() for n in counts]


def _message(chunks: int, size: int) -> bytes:
    """CRLF text of exactly ``chunks`` chunks of ``size``, with dot lines to stuff."""
    line = b"0123456789 text of a line.\r\n.dotted line\r\n"
    body = b"Subject: big\r\n\r\n" + line * (chunks * size // len(line) + 1)
    return body[: (chunks - 1) * size + 100]


def test_read_plan() -> None:
    assert CHUNK_SIZE == 256 * 1024
    assert read_plan(17 * 65536 - 5000, 17) == (16, 4)  # earlier databases
    assert read_plan(4 * CHUNK_SIZE + 70_000, 5) == (4, 1)


@pytest.mark.parametrize("tuned", [True, False], ids=["malloc-tuned", "malloc-default"])
@pytest.mark.parametrize(("size", "chunks"), CASES)
async def test_multi_chunk_retr_and_top(
    db_url: str, size: int, chunks: int, tuned: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(SQLite reads through blob handles in a process with malloc tuned, as pypop
    serve is, and with a SELECT otherwise.)"""
    monkeypatch.setattr(engine_module, "CHUNK_SIZE", size)  # as that version stored it
    monkeypatch.setattr(malloc, "_tuned", tuned)
    backend = create({"url": db_url})
    assert isinstance(backend, SqlBackend)
    engine: Engine = backend.engine
    reads: list[tuple[int, int]] = []
    real_read = engine.read

    def counting_read(handle: object, message_id: int, first: int, last: int) -> list[bytes]:
        reads.append((first, last))
        return real_read(handle, message_id, first, last)  # type: ignore[arg-type]

    engine.read = counting_read  # type: ignore[method-assign]
    message = _message(chunks, size)
    try:
        await backend.deliver("alice", message)
        box = await backend.open_mailbox("alice")
        try:
            assert box._rows[0].chunks == chunks
            got = [b async for b in box.retrieve(0)]
            assert b"".join(got) == message
            assert all(len(b) <= 256 * 1024 for b in got)
            assert len(reads) == HOPS[size][chunks]
            if reads:
                assert reads[0][0] == 0
                assert reads[-1][1] == chunks - 1
                assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(reads))
            reads.clear()
            top = b"".join([b async for b in box.retrieve(0, top_lines=2)])
            wire, _ = unstuff(stuff(message, 2))
            assert top.startswith(b"Subject: big\r\n\r\n0123456789")
            assert wire == b"Subject: big\r\n\r\n0123456789 text of a line.\r\n.dotted line\r\n"
            assert len(top) <= size
            assert reads in ([], [(0, 0)])  # the first chunk alone
        finally:
            await box.aclose()
    finally:
        await backend.aclose()


@pytest.mark.parametrize(
    ("given", "policy"), [({}, "SCHED_BATCH"), ({"batch_scheduling": "no"}, "SCHED_OTHER")]
)
def test_postgresql_reader_threads_run_batch(
    pg_url: str, given: dict[str, str], policy: str
) -> None:
    """A thread that read a message from PostgreSQL runs SCHED_BATCH (batch_scheduling)."""
    import os
    import threading

    from pypop_sql import parse_options
    from pypop_sql._engine import make_engine

    engine = make_engine(parse_options({"url": pg_url, **given}))
    engine.start()
    seen: list[int] = []
    try:
        engine.deliver("alice", _message(2, CHUNK_SIZE), None, None)
        handle, snapshot = engine.open("alice", True)

        def worker() -> None:
            before = os.sched_getscheduler(0)
            engine.read(handle, snapshot.rows[0].id, 0, 1)
            seen.extend([before, os.sched_getscheduler(0)])

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        engine.release(handle)
    finally:
        engine.close()
    assert seen == [os.SCHED_OTHER, getattr(os, policy)]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # only that thread


@pytest.mark.skipif(not hasattr(__import__("os"), "SCHED_BATCH"), reason="Linux policy")
@pytest.mark.parametrize(
    ("given", "policy"), [({}, "SCHED_BATCH"), ({"batch_scheduling": "no"}, "SCHED_OTHER")]
)
async def test_worker_threads_follow_batch_scheduling(
    sqlite_url: str, given: dict[str, str], policy: str
) -> None:
    """Every worker thread of the store (SQLite too) runs SCHED_BATCH, unless
    ``batch_scheduling = no`` keeps the default policy."""
    import os

    backend = create({"url": sqlite_url, **given})
    assert isinstance(backend, SqlBackend)
    try:
        assert await backend.threads.run(os.sched_getscheduler, 0) == getattr(os, policy)
    finally:
        await backend.aclose()


async def test_update_at_once_where_nothing_waits(db_url: str) -> None:
    """SQLite: a QUIT that deletes nothing needs no transaction, and the fcntl lock
    goes at once: UPDATE skips its cancel scope, and the commit reaches no checkpoint.
    PostgreSQL's lock needs its server: never at once."""
    import trio.testing

    backend = create({"url": db_url})
    assert isinstance(backend, SqlBackend)
    try:
        backend.engine.deliver("alice", _message(1, 100), None, None)
        box = await backend.open_mailbox("alice")
        sqlite = not backend.engine.release_blocks
        assert box.commits_at_once([]) == sqlite
        assert not box.commits_at_once([0])
        if sqlite:
            with trio.testing.assert_no_checkpoints():
                await box.commit([])
        else:
            await box.commit([])
        again = await backend.open_mailbox("alice")  # the lock went
        assert len(again.messages) == 1
        await again.commit([0])  # a transaction, under the scope
        last = await backend.open_mailbox("alice")
        assert len(last.messages) == 0
        await last.aclose()
    finally:
        await backend.aclose()


async def test_aclose_in_a_cancelled_scope_closes_the_engine(db_url: str) -> None:
    """A server that stops (or a test that ends) closes its backend in a cancelled
    scope: the engine must close all the same, or its pool and threads leak."""
    import trio
    from pypop.errors import TemporaryFailure

    backend = create({"url": db_url})
    assert isinstance(backend, SqlBackend)
    with trio.CancelScope() as scope:
        scope.cancel()
        await backend.aclose()
    engine = backend.engine
    if isinstance(engine, PostgresEngine):
        with pytest.raises(TemporaryFailure, match="closed"):
            engine.pool  # noqa: B018
    else:
        assert isinstance(engine, SqliteEngine)
        assert engine._locks is None


def test_sqlite_read_failure_leaves_no_transaction(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite reads chunks through blob handles in one read transaction (where malloc
    is tuned): a read that fails part way ends that transaction, and the thread's next
    read works."""
    import sqlite3

    from pypop.errors import TemporaryFailure

    from pypop_sql import parse_options
    from pypop_sql._engine import make_engine

    monkeypatch.setattr(malloc, "_tuned", True)  # as in pypop serve
    engine = make_engine(parse_options({"url": sqlite_url}))
    assert isinstance(engine, SqliteEngine)
    engine.start()
    try:
        message = _message(3, CHUNK_SIZE)
        engine.deliver("alice", message, None, None)
        handle, snapshot = engine.open("alice", True)
        message_id = snapshot.rows[0].id
        real = engine_module._Connection.blobopen
        calls = 0

        def failing(self: sqlite3.Connection, *args: object, **kwargs: object) -> object:
            nonlocal calls
            calls += 1
            if calls == 2:  # after one chunk was read
                raise sqlite3.OperationalError("disk I/O error")
            return real(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(engine_module._Connection, "blobopen", failing)
        with pytest.raises(TemporaryFailure, match="cannot read a message: OperationalError"):
            engine.read(handle, message_id, 0, 2)
        assert not engine._conn().in_transaction
        assert b"".join(engine.read(handle, message_id, 0, 2)) == message
        second = message[CHUNK_SIZE : 2 * CHUNK_SIZE]
        assert engine.read(handle, message_id, 1, 1) == [second]
        assert engine.read(handle, message_id + 1, 0, 2) == []  # no such message
        engine.release(handle)
    finally:
        engine.close()
