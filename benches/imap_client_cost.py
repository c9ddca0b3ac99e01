"""What an IMAP client costs pypop per POP3 session: the measurement behind the choice
of client in backends/imap (see its README).

``python benches/imap_client_cost.py [--quick]`` starts Dovecot (IMAP, pinned to core
0) on a fixture of 4 KiB messages and runs, from this process (pinned to core 1), the
IMAP work of one POP3 retr-all session with each client: connect, log in, EXAMINE,
``UID FETCH 1:* (UID RFC822.SIZE)``, one ``UID FETCH uid (BODY.PEEK[])`` per message
(one command each, as RETR asks: no read-ahead, so the clients are compared, not
strategies), LOGOUT. 8 sessions run at once, as in the suite's retr-all scenario.

- ``imaplib+threads``: the standard library's client, each step in a worker thread
  (``trio.to_thread.run_sync``), as a backend on ``pypop.backend_kit.IOThreads`` would;
- ``imapclient+threads``: the same with imapclient (``pip install imapclient``);
- ``pypop_imap``: the backend's own Trio client (``pypop_imap._connection``).

It prints CPU time of this process per session and per message (what pypop would
spend), and sessions per second.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benches.fixtures import Fixture, UserSet
from benches.servers import DovecotServer, ServerError, dovecot_available, make_cert

Session = Callable[[int, str, str], Awaitable[int]]


async def imaplib_threads(port: int, user: str, password: str) -> int:
    import imaplib

    def open_() -> tuple[imaplib.IMAP4, list[bytes]]:
        m = imaplib.IMAP4("127.0.0.1", port, timeout=30)
        m.login(user, password)
        m.select("INBOX", readonly=True)
        _, data = m.uid("FETCH", "1:*", "(UID RFC822.SIZE)")
        uids = [d.split(b"UID ")[1].split()[0] for d in data if isinstance(d, bytes)]
        return m, uids

    m, uids = await trio.to_thread.run_sync(open_)
    n = 0
    for uid in uids:
        _, data = await trio.to_thread.run_sync(m.uid, "FETCH", uid.decode(), "(BODY.PEEK[])")
        n += sum(len(d[1]) for d in data if isinstance(d, tuple))
    await trio.to_thread.run_sync(m.logout)
    return len(uids)


async def imapclient_threads(port: int, user: str, password: str) -> int:
    from imapclient import IMAPClient

    def open_() -> tuple[IMAPClient, list[int]]:
        c = IMAPClient("127.0.0.1", port, ssl=False, timeout=30)
        c.login(user, password)
        exists = c.select_folder("INBOX", readonly=True)[b"EXISTS"]
        # imapclient keeps only the responses for the ids it asked for, so "1:*" is
        # not possible: ask by sequence number for UID and size (one command too).
        c.use_uid = False
        sizes = c.fetch(list(range(1, exists + 1)), [b"UID", b"RFC822.SIZE"])
        c.use_uid = True
        return c, sorted(v[b"UID"] for v in sizes.values())

    c, uids = await trio.to_thread.run_sync(open_)
    for uid in uids:
        await trio.to_thread.run_sync(c.fetch, [uid], ["BODY.PEEK[]"])
    await trio.to_thread.run_sync(c.logout)
    return len(uids)


async def pypop_imap(port: int, user: str, password: str) -> int:
    from pypop_imap._connection import Endpoint, ImapConnection

    conn = await ImapConnection.open(Endpoint("127.0.0.1", port, "none", None, 30))
    await conn.authenticate_plain(user, password)
    await conn.select(b"INBOX", read_only=True)
    rows, _ = await conn.sizes()
    for uid, _, _ in rows:
        async for _ in conn.stream(uid, [b"BODY.PEEK[]"]):
            pass
    await conn.logout()
    return len(rows)


CLIENTS: dict[str, Session] = {
    "imaplib+threads": imaplib_threads,
    "imapclient+threads": imapclient_threads,
    "pypop_imap": pypop_imap,
}


async def measure(
    fn: Session, port: int, users: list[tuple[str, str]], sessions: int, concurrency: int
) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, messages) for ``sessions``."""
    todo = iter(range(sessions))
    messages = 0

    async def worker(k: int) -> None:
        nonlocal messages
        for i in todo:
            user, password = users[(k + i * concurrency) % len(users)]
            got = await fn(port, user, password)  # not "+= await": another task may add
            messages += got

    t0, c0 = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for k in range(concurrency):
            nursery.start_soon(worker, k)
    return time.perf_counter() - t0, time.process_time() - c0, messages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few sessions, to check it runs")
    p.add_argument("--sessions", type=int, help="sessions per client (default 200; quick 16)")
    args = p.parse_args(argv)
    sessions = args.sessions or (16 if args.quick else 200)
    ok, why = dovecot_available()
    if not ok:
        print(f"imap_client_cost: skipped: {why}", file=sys.stderr)
        return 0
    available = {}
    for name, fn in CLIENTS.items():
        module = {"imaplib+threads": "imaplib", "imapclient+threads": "imapclient"}.get(
            name, "pypop_imap"
        )
        try:
            __import__(module)
        except ImportError:
            print(f"imap_client_cost: {name}: {module} is not installed", file=sys.stderr)
            continue
        available[name] = fn
    work = Path(tempfile.mkdtemp(prefix="pypop-imapcost-"))
    os.chmod(work, 0o755)  # noqa: S103 - Dovecot's unprivileged users read it
    users_n, msgs = (8, 10) if args.quick else (32, 50)
    fx = Fixture(work / "fixture", [UserSet("small", "user", users_n, msgs, 4096)])
    fx.build(["dovecot"])
    _, cert, key = make_cert(work / "tls")
    srv = DovecotServer(work / "dovecot", fx, cert, key, imap=True)
    users = [(u, pw) for u, pw in fx.get("small").user_names()]
    with contextlib.suppress(AttributeError, OSError):
        if (os.cpu_count() or 1) >= 2:
            os.sched_setaffinity(0, {1})
    try:
        srv.start()
        # Warm-up: every mailbox opened once (Dovecot builds its index files).
        trio.run(measure, pypop_imap, srv.imap_port, users, len(users), 4)
        print(
            f"IMAP client cost per POP3 retr-all session ({msgs} x 4 KiB messages, "
            f"{sessions} sessions, 8 at once; Dovecot {srv.imap_port} on core 0, "
            "client on core 1)"
        )
        print(f"{'client':20} {'CPU ms/session':>15} {'CPU us/message':>15} {'sessions/s':>11}")
        for name, fn in available.items():
            wall, cpu, n = trio.run(measure, fn, srv.imap_port, users, sessions, 8)
            print(
                f"{name:20} {1000 * cpu / sessions:15.2f} {1e6 * cpu / max(n, 1):15.1f} "
                f"{sessions / wall:11.1f}"
            )
    except ServerError as exc:
        print(f"imap_client_cost: Dovecot failed: {exc}", file=sys.stderr)
        return 1
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
