"""Where an idle session's memory goes: ``python benches/idle_memory.py``.

Runs the server in this process (Trio in a thread) with the memory or the Maildir
backend, ``--sessions`` users of one 1 KiB message each, logs every user in once and
out (the warm-up, as in the suite), then holds ``--sessions`` logged-in sessions
(USER, PASS, STAT, then nothing, as the suite's idle scenario) and prints the bytes
they allocated per session with ``tracemalloc``, by allocation site::

    python benches/idle_memory.py                     # memory backend, 2,000 sessions
    python benches/idle_memory.py --backend maildir --depth 6
    python benches/idle_memory.py --quick             # CI smoke run

The suite's ``idle`` scenario (``python -m benches --scenarios idle``) measures the
same sessions by RSS at 10,000 connections: this script says what the RSS is made of.
It counts Python allocations only (the kernel's socket buffers are not RSS; the
client sockets of this script are in the figure, about 90 octets each).
"""

from __future__ import annotations

import argparse
import gc
import resource
import socket
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import trio

from pypop.auth import MemoryCredentialStore
from pypop.backend import Backend
from pypop.config import ServerConfig
from pypop.registry import create_backend
from pypop.server import Server, serve

MESSAGE = b"Subject: idle\r\n\r\n" + b"x" * 1000 + b"\r\n"


def _backend(kind: str, users: list[str], root: Path) -> Backend:
    if kind == "memory":
        from pypop.backends.memory import MemoryBackend

        memory = MemoryBackend()
        for i, user in enumerate(users):
            memory.deliver(user, MESSAGE, uid=f"u{i}")
        return memory
    for i, user in enumerate(users):
        for sub in ("cur", "new", "tmp"):
            (root / user / sub).mkdir(parents=True, exist_ok=True)
        (root / user / "cur" / f"{i}.idle:2,").write_bytes(MESSAGE.replace(b"\r\n", b"\n"))
    return create_backend("maildir", {"root": str(root)})


def _reply(sock: socket.socket) -> None:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    if not data.startswith(b"+OK"):
        raise RuntimeError(f"unexpected reply: {data[:80]!r}")


def _login(port: int, user: str, password: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    _reply(sock)
    for line in (f"USER {user}", f"PASS {password}", "STAT"):
        sock.sendall(line.encode() + b"\r\n")
        _reply(sock)
    return sock


def main() -> int:
    p = argparse.ArgumentParser(prog="python benches/idle_memory.py")
    p.add_argument("--backend", choices=("memory", "maildir"), default="memory")
    p.add_argument("--sessions", type=int, default=2000)
    p.add_argument("--depth", type=int, default=1, help="traceback frames per site")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="200 sessions")
    args = p.parse_args()
    n = 200 if args.quick else args.sessions
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 3 * n + 100  # client and server sockets, maildir locks
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    users = [f"idle{i}" for i in range(n)]
    passwords = {u: f"pw-{u}" for u in users}
    with tempfile.TemporaryDirectory(prefix="pypop-idle-") as tmp:
        backend = _backend(args.backend, users, Path(tmp))
        config = ServerConfig(
            listen=[("127.0.0.1", 0)],
            auth_failure_delay=0.0,
            auth_penalty_max=0.0,
            max_connections=n + 100,
            max_connections_per_ip=n + 100,
        )
        started: list[Server] = []
        token: list[trio.lowlevel.TrioToken] = []

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                server: Server = await nursery.start(
                    lambda task_status: serve(
                        config,
                        backend=backend,
                        store=MemoryCredentialStore(passwords),
                        task_status=task_status,
                    )
                )
                token.append(trio.lowlevel.current_trio_token())
                started.append(server)

        thread = threading.Thread(target=trio.run, args=(run,), daemon=True)
        thread.start()
        while not started:
            time.sleep(0.01)
        port = started[0].addresses[0][1]
        for user in users:  # warm-up: every maildrop opened once
            sock = _login(port, user, passwords[user])
            sock.sendall(b"QUIT\r\n")
            _reply(sock)
            sock.close()
        time.sleep(0.3)
        gc.collect()
        tracemalloc.start(max(1, args.depth))
        before = tracemalloc.take_snapshot()
        held = [_login(port, user, passwords[user]) for user in users]
        time.sleep(0.3)
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        total = sum(s.size_diff for s in after.compare_to(before, "filename"))
        print(f"{args.backend}: {n} idle sessions, {total / n:,.0f} bytes each (tracemalloc)")
        key = "traceback" if args.depth > 1 else "lineno"
        for stat in after.compare_to(before, key)[: args.top]:
            if stat.size_diff / n < 8:
                break
            frames = stat.traceback.format()[::2]  # the "File ..., line N" lines
            where = " <- ".join(f.strip() for f in reversed(frames))
            print(f"{stat.size_diff / n:8.1f} B {stat.count_diff / n:5.2f} blocks  {where}")
        for sock in held:
            sock.close()
        token[0].run_sync_soon(started[0].shutdown)
        thread.join(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
