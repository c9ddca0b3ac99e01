"""RETR and TOP of multi-chunk messages: every chunk count around the read plan.

A hop reads 16 chunks, plus a tail of up to 4 (``CHUNKS_PER_READ``); TOP reads the
first chunk alone. Messages of 1 to 40 chunks come back exactly, in blocks, on both
engines, and the read plan's hop count is the one the plan promises.
"""

from __future__ import annotations

import pytest
from pypop.wire import stuff, unstuff

from pypop_sql import SqlBackend, create
from pypop_sql._backend import CHUNKS_PER_READ
from pypop_sql._engine import CHUNK_SIZE, Engine

COUNTS = (1, 2, 16, 17, 20, 21, 36, 37, 40)


def _message(chunks: int) -> bytes:
    """CRLF text of exactly ``chunks`` chunks, with dot lines to stuff."""
    line = b"0123456789 text of a line.\r\n.dotted line\r\n"
    body = b"Subject: big\r\n\r\n" + line * (chunks * CHUNK_SIZE // len(line) + 1)
    return body[: (chunks - 1) * CHUNK_SIZE + 100]


@pytest.mark.parametrize("chunks", COUNTS)
async def test_multi_chunk_retr_and_top(db_url: str, chunks: int) -> None:
    backend = create({"url": db_url})
    assert isinstance(backend, SqlBackend)
    engine: Engine = backend.engine
    reads: list[tuple[int, int]] = []
    real_read = engine.read

    def counting_read(handle: object, message_id: int, first: int, last: int) -> list[bytes]:
        reads.append((first, last))
        return real_read(handle, message_id, first, last)  # type: ignore[arg-type]

    engine.read = counting_read  # type: ignore[method-assign]
    message = _message(chunks)
    try:
        await backend.deliver("alice", message)
        box = await backend.open_mailbox("alice")
        try:
            assert box._rows[0].chunks == chunks
            got = [b async for b in box.retrieve(0)]
            assert b"".join(got) == message
            assert all(len(b) <= 4 * CHUNK_SIZE for b in got)
            if chunks > 1:
                plan = []
                seq = 0
                while seq < chunks:
                    last = min(chunks, seq + CHUNKS_PER_READ) - 1
                    if chunks - 1 - last <= CHUNKS_PER_READ // 4:
                        last = chunks - 1
                    plan.append((seq, last))
                    seq = last + 1
                assert reads == plan
                assert len(plan) == {2: 1, 16: 1, 17: 1, 20: 1, 21: 2, 36: 2, 37: 3, 40: 3}[chunks]
            reads.clear()
            top = b"".join([b async for b in box.retrieve(0, top_lines=2)])
            wire, _ = unstuff(stuff(message, 2))
            assert top.startswith(b"Subject: big\r\n\r\n0123456789")
            assert wire == b"Subject: big\r\n\r\n0123456789 text of a line.\r\n.dotted line\r\n"
            assert len(top) < 2 * CHUNK_SIZE
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
        engine.deliver("alice", _message(2), None, None)
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
