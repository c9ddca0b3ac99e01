"""PostgreSQL from Trio: psycopg 3 in worker threads, or psycopg's async core driven by Trio.

Trio is not asyncio, so psycopg's ``AsyncConnection`` cannot run as is. Two ways:

- ``threads``: the sync ``psycopg.Connection``, each call in a worker thread
  (``trio.to_thread.run_sync`` under a ``CapacityLimiter``), which is what
  pypop-sql does (through ``pypop.backend_kit.IOThreads``).
- ``trio-wait``: an ``AsyncConnection`` whose ``wait`` (the one place psycopg's
  sans-I/O generators meet an event loop) is driven by ``trio.lowlevel.wait_readable``
  / ``wait_writable``; connecting drives ``_connect_gen`` the same way. No thread hop,
  but it relies on psycopg internals and on asyncio locks never being contended.

Each mode runs the two queries a POP3 session makes most: the snapshot at login (50
rows from the covering index) and one 4 KiB chunk (bytea, binary), by 1 and by 8
concurrent tasks, against a throwaway PostgreSQL. It prints operations per second and
the client's CPU time per operation (the figure that matters when pypop has one core).

    python benches/sql_driver_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

QUERIES: dict[str, tuple[str, Callable[[int], tuple[int]], bool]] = {
    "snapshot": (
        "SELECT id, size, uidl, octets, chunks FROM messages WHERE mailbox_id = %s ORDER BY id",
        lambda i: (1 + i % 20,),
        False,
    ),
    "chunk-4k": (
        "SELECT data FROM chunks WHERE message_id = %s AND seq >= 0 AND seq <= 0",
        lambda i: (1 + i % 1000,),
        True,
    ),
    "msg-1m": (
        "SELECT data FROM chunks WHERE message_id = %s AND seq >= 0 AND seq <= 15",
        lambda i: (1001 + i % 20,),
        True,
    ),
}


def setup(url: str) -> None:
    import psycopg
    from pypop_sql import create

    backend = create({"url": url})
    trio.run(backend.aclose)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO mailboxes (name) SELECT 'u' || g FROM generate_series(1, 20) g")
        conn.execute(
            "INSERT INTO messages (mailbox_id, uidl, received, size, octets, chunks) "
            "SELECT 1 + (g - 1) % 20, 'uid' || g, now(), 4200, 4096, 1 "
            "FROM generate_series(1, 1000) g"
        )
        conn.execute(
            "INSERT INTO chunks (message_id, seq, data) "
            "SELECT g, 0, convert_to(repeat('x', 4094) || E'\\r\\n', 'UTF8') "
            "FROM generate_series(1, 1000) g"
        )
        conn.execute(
            "INSERT INTO messages (mailbox_id, uidl, received, size, octets, chunks) "
            "SELECT 1, 'big' || g, now(), 1048576, 1048576, 16 FROM generate_series(1, 20) g"
        )
        conn.execute(
            "INSERT INTO chunks (message_id, seq, data) "
            "SELECT 1000 + g, s, decode(repeat(md5(g::text || s::text), 4096), 'hex') "
            "FROM generate_series(1, 20) g, generate_series(0, 15) s"
        )
        conn.execute("VACUUM ANALYZE")


class TrioConnection:
    """Factory for a psycopg AsyncConnection driven by Trio (see the module doc)."""

    @staticmethod
    async def connect(url: str) -> Any:
        from psycopg import AsyncConnection
        from psycopg.waiting import Ready, Wait

        class _Conn(AsyncConnection[Any]):
            async def wait(self, gen: Any, interval: float = 0.1, timeout: Any = None) -> Any:  # noqa: ASYNC109 - psycopg's signature
                fileno = self.pgconn.socket
                try:
                    state = next(gen)
                    while True:
                        if state & Wait.W:
                            await trio.lowlevel.wait_writable(fileno)
                            state = gen.send(Ready.W)
                        else:
                            await trio.lowlevel.wait_readable(fileno)
                            state = gen.send(Ready.R)
                except StopIteration as stop:
                    return stop.value

        gen = _Conn._connect_gen(url)
        try:
            fileno, state = next(gen)
            while True:
                if state & Wait.W:
                    await trio.lowlevel.wait_writable(fileno)
                    fileno, state = gen.send(Ready.W)
                else:
                    await trio.lowlevel.wait_readable(fileno)
                    fileno, state = gen.send(Ready.R)
        except StopIteration as stop:
            conn = stop.value
        await conn.set_autocommit(True)
        return conn


async def run_mode(mode: str, url: str, query: str, tasks: int, ops: int) -> tuple[float, float]:
    import psycopg

    sql, params, binary = QUERIES[query]
    limiter = trio.CapacityLimiter(16)
    conns: list[Any] = []
    for _ in range(tasks):
        if mode == "threads":
            conns.append(psycopg.connect(url, autocommit=True))
        else:
            conns.append(await TrioConnection.connect(url))

    def sync_op(conn: Any, i: int) -> int:
        return len(conn.execute(sql, params(i), binary=binary).fetchall())

    async def one(k: int, conn: Any) -> None:
        op: Callable[[int], Awaitable[int]]
        if mode == "threads":

            async def op(i: int) -> int:
                return await trio.to_thread.run_sync(sync_op, conn, i, limiter=limiter)
        else:

            async def op(i: int) -> int:
                cur = await conn.execute(sql, params(i), binary=binary)
                return len(await cur.fetchall())

        for i in range(ops // tasks):
            assert await op(k * 7919 + i) > 0

    for conn in conns:  # warm up: prepared statements, caches
        for i in range(10):
            await one_warm(mode, conn, sql, params(i), binary, limiter)
    cpu0, t0 = time.process_time(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for k, conn in enumerate(conns):
            nursery.start_soon(one, k, conn)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    for conn in conns:
        if mode == "threads":
            conn.close()
        else:
            await conn.close()
    done = (ops // tasks) * tasks
    return done / wall, cpu / done * 1e6


async def one_warm(
    mode: str, conn: Any, sql: str, params: tuple[Any, ...], binary: bool, lim: Any
) -> None:
    if mode == "threads":
        await trio.to_thread.run_sync(
            lambda: conn.execute(sql, params, binary=binary).fetchall(), limiter=lim
        )
    else:
        cur = await conn.execute(sql, params, binary=binary)
        await cur.fetchall()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--quick", action="store_true", help="few operations (smoke run)")
    p.add_argument("--ops", type=int, help="operations per run (default 4000; quick 160)")
    p.add_argument("--repeats", type=int, default=3, help="runs per cell; the best is shown")
    args = p.parse_args(argv)
    try:
        from pypop_sql.testing import PgServer, pg_unavailable_reason
    except ImportError:
        print("sql_driver_bench: pypop-sql is not installed: skipped", file=sys.stderr)
        return 0
    why = pg_unavailable_reason()
    if why is not None:
        print(f"sql_driver_bench: skipped: {why}", file=sys.stderr)
        return 0
    ops = args.ops or (160 if args.quick else 4000)
    repeats = 1 if args.quick else args.repeats
    pin = os.sched_getaffinity(0)
    with PgServer() as pg:
        url = pg.create_database("drv")
        setup(url)
        print(f"psycopg from Trio: {ops} operations per run, best of {repeats}; "
              f"{len(pin)} CPUs; client CPU per operation is this process's time")  # fmt: skip
        print(f"{'query':<10} {'tasks':>5}  {'threads ops/s':>14} {'µs CPU/op':>10}  "
              f"{'trio-wait ops/s':>16} {'µs CPU/op':>10}  {'speed-up':>8}")  # fmt: skip
        for query in QUERIES:
            for tasks in (1, 8):
                n = ops if query != "msg-1m" else max(tasks, ops // 20)
                cells: dict[str, tuple[float, float]] = {}
                for mode in ("threads", "trio-wait"):
                    runs = [trio.run(run_mode, mode, url, query, tasks, n) for _ in range(repeats)]
                    cells[mode] = (max(r[0] for r in runs), min(r[1] for r in runs))
                t, w = cells["threads"], cells["trio-wait"]
                print(f"{query:<10} {tasks:>5}  {t[0]:>14,.0f} {t[1]:>10.1f}  "
                      f"{w[0]:>16,.0f} {w[1]:>10.1f}  {w[0] / t[0]:>7.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
