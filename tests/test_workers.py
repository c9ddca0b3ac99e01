"""``pypop serve --workers N`` as an administrator runs it: real processes, real signals.

- limits hold for the whole server: 50 wrong passwords from one client, spread over 4
  workers, meet the penalty they meet on one worker (issue 13), and the metrics,
  added up over the workers, count them;
- the supervisor restarts a killed worker, passes SIGHUP, SIGTERM and SIGINT
  (graceful) and a second SIGTERM (at once) on to every worker; the default is one
  worker per core;
- the memory backend refuses ``--workers 2``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .test_login_log import banned_hosts

pytest.importorskip("pypop_maildir")

CLIENT = "127.0.0.9"  # the attacker's own loopback address
# The penalty before attempt k (k >= 2) is INITIAL * 2 ** (k - 2), capped at 1 s: with
# INITIAL = 2**-45 s, attempts 47 to 50 wait a whole second and 46 half of one. Worker-
# local counters would reach level 12 or 13 on each of 4 workers: 2**-34 s, nothing.
INITIAL = 2.0**-45
CONFIG = f"""
[limits]
auth_failure_delay = 0
auth_penalty_initial = {INITIAL!r}
auth_penalty_max = 1.0
max_auth_failures = 100
shutdown_timeout = 20
"""


@dataclass
class Serving:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int
    metrics: int
    root: Path
    host: str = "127.0.0.1"

    def text(self) -> str:
        return self.log.read_text()

    def wait_log(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text())
            if m:
                return m
            assert self.proc.poll() is None or time.monotonic() < deadline, self.text()
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.text()}"
            time.sleep(0.02)

    def metric(self, name: str, until: Callable[[float], bool] | None = None) -> float:
        """A sample from /metrics: ``name{labels}`` exactly, or every series of a
        bare ``name`` added up. ``until``: scrape again until it holds (10 s at
        most): a worker's session amounts go out up to 0.1 s after the session
        (pypop.server.sessionlog), and the supervisor adds up what has."""
        deadline = time.monotonic() + 10
        while True:
            url = f"http://{self.host}:{self.metrics}/metrics"
            with urllib.request.urlopen(url, timeout=10) as r:
                body = r.read().decode()
            found = []
            for line in body.splitlines():
                key, _, value = line.rpartition(" ")
                if key == name or ("{" not in name and key.startswith(name + "{")):
                    found.append(float(value))
            if found and (until is None or until(sum(found)) or time.monotonic() > deadline):
                return sum(found)
            assert found or until is not None, (name, body)
            assert time.monotonic() < deadline, (name, body)
            time.sleep(0.02)

    def settled(self, name: str) -> float:
        """A sample no session still adds to: the same in two scrapes 0.25 s apart
        (more than a worker's 0.1 s batch interval)."""
        value = self.metric(name)
        while True:
            time.sleep(0.25)
            again = self.metric(name)
            if again == value:
                return value
            value = again


def messages(maildir: Path) -> int:
    return sum(1 for sub in ("cur", "new") for _ in (maildir / sub).iterdir())


def ready(server: Serving, count: int) -> None:
    """Wait until ``count`` worker processes have logged that they listen."""
    deadline = time.monotonic() + 60
    while len(re.findall(r"pypop\.server\[\d+\]: listening on", server.text())) < count:
        assert time.monotonic() < deadline, server.text()
        time.sleep(0.05)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def maildir(root: Path, user: str, messages: int) -> None:
    for sub in ("cur", "new", "tmp"):
        (root / user / sub).mkdir(parents=True, exist_ok=True)
    for n in range(messages):
        (root / user / "new" / f"17000000{n:02d}.M{n}P1.test").write_bytes(
            b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n)
        )


@contextlib.contextmanager
def serve(
    directory: Path,
    workers: int,
    *extra: str,
    host: str = "127.0.0.1",
    root: Path | None = None,
    config: str = CONFIG,
    backend: list[str] | None = None,
) -> Iterator[Serving]:
    """``pypop serve --workers N`` (0: no flag, the default) on ``host`` (a maildir
    backend: ``root``, or a new one with alice's 3 messages and bob's 1; or the
    ``backend`` flags given), metrics on ``host`` too, logging to a file."""
    directory.mkdir(parents=True, exist_ok=True)
    if root is None:
        root = directory / "mail"
        maildir(root, "alice", 3)
        maildir(root, "bob", 1)
    (directory / "passwd").write_text("alice:{PLAIN}wonderland\nbob:{PLAIN}builder\n")
    (directory / "pypop.toml").write_text(config)
    log = directory / f"pypop-{workers}.log"
    log.write_text("")
    metrics = free_port(host)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "pypop", "serve", "-c", str(directory / "pypop.toml"),
            *(backend or ["--backend", "maildir", "-o", f"root={root}"]),
            "--passwd-file", str(directory / "passwd"), "--allow-plaintext",
            "--listen", f"{host}:0", *(["--workers", str(workers)] if workers else []),
            "--metrics-listen", f"{host}:{metrics}", "--log-target", str(log), *extra,
        ],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    served = Serving(proc, log, 0, metrics, root, host)
    try:
        m = served.wait_log(rf"listening on {re.escape(host)}:(\d+)")
        served.port = int(m.group(1))
        count = workers or len(os.sched_getaffinity(0))
        if count > 1:
            for n in range(count):
                served.wait_log(rf"worker {n} started")
            ready(served, count)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Pop:
    """A blocking POP3 client from its own loopback address."""

    def __init__(self, port: int, source: str = CLIENT) -> None:
        self.sock = socket.socket()
        try:
            self.sock.bind((source, 0))
            self.sock.settimeout(30)
            self.sock.connect(("127.0.0.1", port))
            self.file = self.sock.makefile("rb")
            try:
                self.greeting = self.file.readline()
            except OSError:
                self.file.close()
                raise
        except OSError:
            self.sock.close()
            raise

    def cmd(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.file.readline()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def refused(port: int) -> bool:
    """True once new connections are refused (within 10 s)."""
    for _ in range(200):
        try:
            Pop(port).close()
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:
            # Queued in the backlog just before the last listener closed: the kernel
            # resets those. The next connection must find the port closed.
            pass
        time.sleep(0.05)
    return False


def fifty_wrong_passwords(port: int) -> list[float]:
    """Seconds from each PASS to its -ERR, one new connection per attempt."""
    waits = []
    for n in range(50):
        c = Pop(port)
        assert c.greeting.startswith(b"+OK"), c.greeting
        assert c.cmd(b"USER alice") == b"+OK\r\n"
        start = time.monotonic()
        assert c.cmd(b"PASS wrong-%d" % n) == b"-ERR [AUTH] Authentication failed\r\n"
        waits.append(time.monotonic() - start)
        c.close()
    return waits


def expected_penalty(k: int) -> float:
    """The penalty before attempt k (1-based) of one client: level k - 1."""
    return 0.0 if k == 1 else min(1.0, INITIAL * 2 ** (k - 2))


def test_fifty_wrong_passwords_meet_one_penalty_over_four_workers(tmp_path: Path) -> None:
    results: dict[int, list[float]] = {}
    for workers in (1, 4):
        with serve(tmp_path / str(workers), workers) as server:
            results[workers] = fifty_wrong_passwords(server.port)
            pids = Counter(re.findall(r"pypop\.login(?:\[(\d+)\])?: login failed", server.text()))
            assert sum(pids.values()) == 50
            # docs/fail2ban.conf matches every line, with or without the worker's pid.
            assert banned_hosts(server.text().splitlines()) == [CLIENT] * 50
            if workers == 4:
                # Spread over the workers (the kernel hands each new connection to
                # whichever is free): at least 3 of the 4 took part.
                assert len(pids) >= 3, pids
                # The metrics, added up over the workers, count every attempt.
                logins = 'pypop_logins_total{mechanism="USER",result="credentials"}'
                assert server.metric(logins, until=lambda v: v >= 50) == 50
                assert server.metric("pypop_auth_penalties_total", until=lambda v: v >= 49) == 49
                assert server.metric("pypop_sessions_total", until=lambda v: v >= 50) == 50
    for workers, waits in results.items():
        for k, waited in enumerate(waits, start=1):
            # A sleep is never shorter than asked; a loaded machine may make it longer.
            assert waited >= expected_penalty(k) * 0.99, (workers, k, waits)
    # The last four meet the full second on 4 workers as on 1.
    assert min(results[4][46:]) >= 0.99
    assert sum(results[4]) >= sum(expected_penalty(k) for k in range(1, 51)) * 0.99


def test_memory_backend_refuses_more_workers(tmp_path: Path) -> None:
    (tmp_path / "passwd").write_text("alice:{PLAIN}wonderland\n")
    run = subprocess.run(
        [
            sys.executable, "-m", "pypop", "serve", "--passwd-file", str(tmp_path / "passwd"),
            "--listen", "127.0.0.1:0", "--workers", "2",
        ],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "pypop: the memory backend keeps its mail in one process: it cannot run with "
        "server.workers = 2 (use --workers 1, or a backend that stores mail outside "
        "the process, such as maildir)"
    )


def test_supervisor_restarts_reloads_and_stops(tmp_path: Path) -> None:
    with serve(tmp_path, 2) as server:
        first = int(server.wait_log(r"worker 0 started \(pid (\d+)\)").group(1))
        os.kill(first, signal.SIGKILL)
        server.wait_log(rf"worker 0 \(pid {first}\) killed by SIGKILL; restarting in 0\.5s")
        deadline = time.monotonic() + 30
        while len(starts := re.findall(r"worker 0 started \(pid (\d+)\)", server.text())) < 2:
            assert time.monotonic() < deadline, server.text()
            time.sleep(0.05)
        assert int(starts[-1]) != first
        ready(server, 3)  # the two first workers and the new one
        assert server.metric("pypop_worker_restarts_total") == 1
        assert server.metric("pypop_workers") == 2
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/healthz", timeout=5) as r:
            assert r.read() == b"ok\n"

        # SIGHUP reaches every worker: both read the passwd-file again.
        passwd = tmp_path / "passwd"
        passwd.write_text(passwd.read_text() + "carol:{PLAIN}secret\n")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while server.text().count("SIGHUP: reloading the TLS certificate and the passwd-file") < 2:
            assert time.monotonic() < deadline, server.text()
            time.sleep(0.05)

        # SIGTERM: a session in progress finishes; new connections are refused.
        c = Pop(server.port)
        assert c.cmd(b"USER alice") == b"+OK\r\n"
        assert c.cmd(b"PASS wonderland").startswith(b"+OK maildrop has 3 messages")
        server.proc.send_signal(signal.SIGTERM)
        server.wait_log(r"SIGTERM: graceful shutdown of 2 workers")
        assert refused(server.port)
        assert c.cmd(b"DELE 1") == b"+OK Marked to be deleted\r\n"
        assert c.cmd(b"QUIT").startswith(b"+OK")
        c.close()
        assert server.proc.wait(30) == 0
    assert messages(server.root / "alice") == 2


def test_one_worker_per_core_by_default_and_sigint_is_graceful(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one core: one process, no supervisor")
    with serve(tmp_path, 0) as server:
        server.wait_log(rf"\(plain\) with {cores} workers \(pid {server.proc.pid} supervises\)")
        c = Pop(server.port)
        assert c.cmd(b"USER alice") == b"+OK\r\n"
        assert c.cmd(b"PASS wonderland").startswith(b"+OK maildrop has 3 messages")
        server.proc.send_signal(signal.SIGINT)  # Ctrl-C: as graceful as SIGTERM
        server.wait_log(rf"SIGINT: graceful shutdown of {cores} workers")
        assert refused(server.port)
        assert c.cmd(b"DELE 1") == b"+OK Marked to be deleted\r\n"
        assert c.cmd(b"QUIT").startswith(b"+OK")
        c.close()
        assert server.proc.wait(30) == 0
    # Every worker got it (once: they run in their own process group).
    assert len(re.findall(r"pypop\[\d+\]: SIGINT: graceful shutdown\n", server.text())) == cores
    assert messages(server.root / "alice") == 2


def test_a_second_sigterm_stops_at_once(tmp_path: Path) -> None:
    with serve(tmp_path, 2) as server:
        c = Pop(server.port)
        assert c.cmd(b"USER bob") == b"+OK\r\n"
        assert c.cmd(b"PASS builder").startswith(b"+OK")
        assert c.cmd(b"DELE 1").startswith(b"+OK")
        server.proc.send_signal(signal.SIGTERM)
        server.wait_log(r"graceful shutdown of 2 workers")
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(15) == 1
        assert time.monotonic() - start < 10  # not the 20 s shutdown_timeout
        assert c.file.readline() == b""  # cut, without UPDATE
        c.close()
    assert messages(server.root / "bob") == 1  # nothing deleted


def test_a_second_sigterm_stops_a_worker_that_had_not_read_the_first(tmp_path: Path) -> None:
    """A worker that has not yet read the first stop signal when the second comes (a
    busy or stopped process): two pending SIGTERMs are one to the kernel and to
    trio, so it only drained, waiting for its sessions, and its heartbeat spared it
    the kill. The supervisor passes the second on as the other stop signal."""
    with serve(tmp_path, 2) as server:
        workers = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", server.text())]
        assert len(workers) == 2
        c = Pop(server.port)
        assert c.cmd(b"USER bob") == b"+OK\r\n"
        assert c.cmd(b"PASS builder").startswith(b"+OK")
        assert c.cmd(b"DELE 1").startswith(b"+OK")
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            server.proc.send_signal(signal.SIGTERM)
            server.wait_log(r"graceful shutdown of 2 workers")
            server.proc.send_signal(signal.SIGTERM)
            server.wait_log(r"second SIGTERM: workers stop now")
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        start = time.monotonic()
        assert server.proc.wait(15) == 1
        assert time.monotonic() - start < 4  # neither the drain nor the 5 s kill
        assert c.file.readline() == b""  # cut, without UPDATE
        c.close()
    assert messages(server.root / "bob") == 1  # nothing deleted


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its new parent counts)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def test_workers_stop_when_the_supervisor_dies(tmp_path: Path) -> None:
    """kill -9 of the supervisor: its workers see the anvil's socket close, refuse
    new connections, let their sessions finish and exit."""
    with serve(tmp_path, 2) as server:
        workers = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", server.text())]
        assert len(workers) == 2
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        deadline = time.monotonic() + 30
        while not all(gone(pid) for pid in workers):
            assert time.monotonic() < deadline, server.text()
            time.sleep(0.05)
        assert server.text().count("the supervisor is gone: shutting down") == 2
