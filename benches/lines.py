"""Lines of Python per session on the server, by function: where the instructions go.

``python -m benches.lines KIND --backend B`` serves the fixture ``benches.instructions``
uses (4 KiB messages, every mailbox read and opened once before), then counts each line
of Python the server runs over ``--sessions`` scripted sessions of KIND (``login``,
``retr`` or ``pipelined``: the same scripts), and prints the lines per session of each
function, the event loop's thread and the worker threads apart, most first.
``--against B2`` counts B2 the same way and prints B2 minus B per function.

``benches.instructions`` says how much an operation costs; this says where, in the
unit the interpreter pays for (a line of pypop's code costs a few hundred instructions,
the C it calls included). The counts come from ``sys.settrace`` (the event loop's
thread) and ``threading.settrace`` (the workers, which the warm-up starts): tracing
makes the server many times slower, so the counts are the figure, never the time.
A line in C (the codec, the socket calls) counts as the one line of Python that calls it.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from benches.fixtures import Fixture, UserSet
from benches.instructions import (
    SETTLE,
    _creds,
    _section,
    _wait_port,
    server_toml,
    session,
    warm_up,
)
from benches.servers import REPO, free_port

__all__ = ["count_lines", "main"]

KINDS = ("login", "retr", "pipelined", "pipelined-dele")
THREADS = ("event loop", "workers")
Counts = dict[str, dict[str, float]]  # thread -> "file:line function" -> lines per session


def _where(code: CodeType) -> str:
    name = code.co_filename  # shortened: pypop's from the repository, the rest from lib/
    for prefix in (f"{REPO}/", "/site-packages/", "/lib/python3."):
        if prefix in name:
            name = name.split(prefix, 1)[1]
            if prefix == "/lib/python3.":
                name = name.split("/", 1)[-1]  # (past "11/")
    return f"{name}:{code.co_firstlineno} {code.co_qualname}"


def _serve_traced(out: Path, config: Path) -> int:
    """``pypop serve`` with line counters: SIGUSR1 starts them, SIGUSR2 writes ``out``."""
    loop: collections.Counter[CodeType] = collections.Counter()
    workers: collections.Counter[CodeType] = collections.Counter()
    on = False

    def loop_line(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            loop[frame.f_code] += 1
        return loop_line

    def loop_call(frame: FrameType, event: str, arg: Any) -> Any:
        return loop_line

    def worker_line(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            workers[frame.f_code] += 1
        return worker_line

    def worker_call(frame: FrameType, event: str, arg: Any) -> Any:
        return worker_line if on else None

    def start(signum: int, frame: FrameType | None) -> None:
        nonlocal on
        loop.clear()
        workers.clear()
        on = True
        sys.settrace(loop_call)

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal on
        sys.settrace(None)
        on = False
        tables = {
            thread: [[n, _where(code)] for code, n in counts.most_common()]
            for thread, counts in zip(THREADS, (loop, workers), strict=True)
        }
        part = out.with_suffix(".part")
        part.write_text(json.dumps(tables))
        part.rename(out)  # whole when the driver sees it

    threading.settrace(worker_call)  # every thread started from now on: the workers
    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from pypop.cli import main as pypop_main

    return pypop_main(["serve", "--config", str(config)])


def count_lines(backend: str, kind: str, *, sessions: int, users: int, work: Path) -> Counts:
    """Lines per session of ``kind`` against ``backend``, by thread and function."""
    fx = Fixture(work / "fixture", [UserSet("small", "user", users, 20, 4096)])
    fx.build(["pypop"])
    creds = _creds(fx, "small")
    port = free_port()
    conf = work / "server.toml"
    conf.write_text(server_toml(port, fx.passwd, _section(backend, fx)))
    out = work / "lines.json"
    cmd = [sys.executable, "-m", "benches.lines", "--serve-traced", str(out), str(conf)]
    with (work / "server.log").open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc, 60)
        warm_up(port, creds, 60)
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.2)
        for k in range(sessions):
            user, password = creds[k % len(creds)]
            session(port, user, password, kind, 120)
        time.sleep(SETTLE)  # the session lines go out up to 0.1 s late
        proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        tables: dict[str, list[list[Any]]] = json.loads(out.read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {thread: {where: n / sessions for n, where in rows} for thread, rows in tables.items()}


def _print(counts: Counts, top: int, title: str) -> None:
    for thread in THREADS:
        rows = sorted(counts.get(thread, {}).items(), key=lambda kv: -abs(kv[1]))
        total = sum(v for _, v in rows)
        print(f"\n{title}, {thread}: {total:,.1f} lines per session")
        for where, v in rows[:top]:
            print(f"{v:10.1f}  {where}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benches.lines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("kind", nargs="?", choices=KINDS, default="login")
    p.add_argument("--backend", choices=("memory", "maildir"), default="maildir")
    p.add_argument("--against", choices=("memory", "maildir"), help="print its difference")
    p.add_argument("--sessions", type=int, default=40)
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--top", type=int, default=40, help="functions shown per thread")
    p.add_argument("--serve-traced", nargs=2, metavar=("OUT", "CONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sessions < 1 or args.users < 1:
        p.error("--sessions and --users must be at least 1")
    if args.serve_traced:
        return _serve_traced(Path(args.serve_traced[0]), Path(args.serve_traced[1]))
    with tempfile.TemporaryDirectory(prefix="pypop-lines-") as tmp:
        runs: list[Counts] = []
        for n, backend in enumerate(b for b in (args.backend, args.against) if b is not None):
            work = Path(tmp) / str(n)
            work.mkdir()
            runs.append(
                count_lines(backend, args.kind, sessions=args.sessions, users=args.users, work=work)
            )
    counts = runs[0]
    if args.against is None:
        _print(counts, args.top, f"{args.backend}, {args.kind}")
        return 0
    other = runs[1]
    diff = {
        thread: {
            w: other.get(thread, {}).get(w, 0.0) - counts.get(thread, {}).get(w, 0.0)
            for w in set(counts.get(thread, {})) | set(other.get(thread, {}))
        }
        for thread in THREADS
    }
    _print(diff, args.top, f"{args.against} minus {args.backend}, {args.kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
