"""Issue 15 item 1: per-session peak RSS and other clients' latency under a flood.

Starts ``pypop serve`` (maildir backend, a maildrop of ``--messages`` messages) in a
subprocess, logs in ``--sessions`` clients that each send ``UIDL\\n`` * ``--commands``
in one write and then read nothing, and meanwhile times NOOP round trips on another
logged-in connection. Prints the server's peak RSS growth (VmHWM) per flooding
session, its RSS after the flooders left, and the slowest NOOP round trip::

    python benches/flood_rss.py                      # the issue's repro
    python benches/flood_rss.py --capa 100           # 100 unauthenticated CAPA floods
    python benches/flood_rss.py --quick              # smaller (CI smoke run)

A figure, not a test: the hostile-client tests (tests/test_hostile.py) hold the bound.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MESSAGE = b"From: a@example.org\nSubject: flood\n\nbody\n"


def populate(root: Path, user: str, count: int) -> None:
    for sub in ("cur", "new", "tmp"):
        (root / user / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (root / user / "cur" / f"{1700000000 + i}.M{i}P1.flood:2,S").write_bytes(MESSAGE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def read_until(sock: socket.socket, marker: bytes, timeout: float = 60.0) -> bytes:
    sock.settimeout(timeout)
    got = b""
    while marker not in got:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(got)
        got += chunk
    return got


def login(port: int, user: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    read_until(sock, b"\r\n")
    sock.sendall(f"USER {user}\r\nPASS secret\r\n".encode())
    reply = read_until(sock, b"maildrop has")
    read_until(sock, b"\r\n") if not reply.endswith(b"\r\n") else None
    return sock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--commands", type=int, default=20000)
    parser.add_argument("--sessions", type=int, default=1, help="flooding sessions")
    parser.add_argument("--capa", type=int, default=0, help="unauthenticated CAPA floods")
    parser.add_argument("--seconds", type=float, default=15.0, help="how long to flood")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    if args.quick:
        args.messages, args.commands, args.seconds = 500, 2000, 3.0

    work = Path(tempfile.mkdtemp(prefix="pypop-flood-"))
    users = [f"user{n}" for n in range(max(1, args.sessions))] + ["probe"]
    try:
        root = work / "mail"
        for user in users:
            populate(root, user, args.messages if user != "probe" else 1)
        (work / "passwd").write_text("".join(f"{u}:{{PLAIN}}secret\n" for u in users))
        port = free_port()
        server = subprocess.Popen(
            [
                args.python, "-m", "pypop", "serve", "--backend", "maildir",
                "-o", f"root={root}", "-o", "flag_updates=false",
                "--passwd-file", str(work / "passwd"),
                "--listen", f"127.0.0.1:{port}", "--log-level", "WARNING",
                "--max-connections-per-ip", "1000", "--workers", "1",
            ],
        )  # fmt: skip
        try:
            return run(args, server, port, users)
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(
    args: argparse.Namespace, server: subprocess.Popen[bytes], port: int, users: list[str]
) -> int:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                print("server did not start", file=sys.stderr)
                return 1
            time.sleep(0.1)
    pid = server.pid
    # Warm up: every maildrop opened once, so the baseline holds the snapshot code.
    for user in users:
        s = login(port, user)
        s.sendall(b"UIDL\r\nQUIT\r\n")
        read_until(s, b"Logging out")
        s.close()
    base_rss = status_kib(pid, "VmRSS")
    base_hwm = status_kib(pid, "VmHWM")

    probe = login(port, "probe")
    flooders: list[socket.socket] = []
    t0 = time.monotonic()
    if args.capa:
        what = f"{args.capa} unauthenticated sessions, CAPA x {args.commands * 5}"
        for _ in range(args.capa):
            s = socket.create_connection(("127.0.0.1", port))
            s.setblocking(False)
            data = memoryview(b"CAPA\n" * (args.commands * 5))
            try:
                while data:
                    data = data[s.send(data) :]
            except BlockingIOError:
                pass  # the rest would block: the server is not reading, as intended
            flooders.append(s)
        n = args.capa
    else:
        what = (
            f"{args.sessions} session(s), {args.messages} messages, "
            f"UIDL x {args.commands} in one write"
        )
        for user in users[: args.sessions]:
            s = login(port, user)
            s.setblocking(False)
            data = memoryview(b"UIDL\n" * args.commands)
            try:
                while data:
                    data = data[s.send(data) :]
            except BlockingIOError:
                pass
            flooders.append(s)
        n = args.sessions

    trips: list[float] = []
    while time.monotonic() - t0 < args.seconds:
        start = time.monotonic()
        probe.sendall(b"NOOP\r\n")
        read_until(probe, b"+OK\r\n", timeout=120)
        trips.append(time.monotonic() - start)
        time.sleep(0.05)
    trips.sort()
    worst, median = trips[-1], trips[len(trips) // 2]
    peak = status_kib(pid, "VmHWM")
    during = status_kib(pid, "VmRSS")
    for s in flooders:
        s.close()
    time.sleep(2)
    after = status_kib(pid, "VmRSS")
    probe.close()

    print(f"flood: {what}, {args.seconds:g} s")
    print(f"server RSS before: {base_rss} KiB (peak so far {base_hwm} KiB)")
    print(f"server peak RSS during the flood: {peak} KiB; RSS at the end: {during} KiB")
    per_session = (peak - max(base_hwm, base_rss)) / n
    print(f"peak RSS growth per flooding session: {per_session:,.0f} KiB")
    print(f"RSS 2 s after the flooders left: {after} KiB ({after - base_rss:+,} KiB)")
    print(
        f"other client: {len(trips)} NOOP round trips, median {median * 1000:,.1f} ms, "
        f"slowest {worst * 1000:,.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
