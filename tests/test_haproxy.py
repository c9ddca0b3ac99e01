"""Two pypop hosts behind a real HAProxy, sharing one store: what a site would run.

- HAProxy (the Debian package; scripts/test installs it) listens on 127.0.0.1 and
  sends PROXY v2 to two pypop "hosts": two ``pypop serve --workers 2`` on 127.0.0.2
  and 127.0.0.3, sharing one store: a Maildir tree, and (run again) a PostgreSQL
  database through pypop3-sql, on a PostgreSQL server the test starts. HAProxy's
  health checks ask each host's ``/healthz``.
- The client has its own loopback address, 127.0.0.9: the hosts must see it, not
  HAProxy's, in their logs, penalties and metrics.

The test checks that clients get through; that a second session of one maildrop
gets ``[IN-USE]`` on whichever host it lands; that ``kill -9`` of a host in the
middle of a session loses no mail and that new sessions go to the other host; that
the penalty and the logs see the client's address; and that the metrics count it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_workers import CLIENT, Pop, Serving, free_port, maildir, messages, serve

pytest.importorskip("pypop_maildir")

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
if not os.path.exists(HAPROXY):
    if os.environ.get("PYPOP_REQUIRE_HAPROXY"):
        pytest.fail("haproxy is not installed (benches/setup.sh installs it)", pytrace=False)
    pytest.skip("haproxy is not installed", allow_module_level=True)

HOSTS = ("127.0.0.2", "127.0.0.3")
CONFIG = """
[server]
proxy_from = ["127.0.0.1/32"]

[limits]
auth_failure_delay = 0
auth_penalty_initial = 0.2
auth_penalty_max = 0.2
lock_wait = 0
shutdown_timeout = 5
"""
IN_USE = b"-ERR [IN-USE] Mailbox is locked by another session\r\n"
AUTH_FAILED = b"-ERR [AUTH] Authentication failed\r\n"

HAPROXY_CFG = """
global
    stats socket {socket} mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch

frontend pop3
    bind 127.0.0.1:{port}
    default_backend pypop

backend pypop
    balance roundrobin
    source 127.0.0.1
    option httpchk GET /healthz
    http-check expect status 200
    default-server send-proxy-v2 check inter 200ms fall 1 rise 1
    server a {a_host}:{a_port} check port {a_metrics}
    server b {b_host}:{b_port} check port {b_metrics}
"""


@contextlib.contextmanager
def haproxy(directory: Path, hosts: list[Serving]) -> Iterator[tuple[int, Path]]:
    port = free_port()
    admin = directory / "haproxy.sock"
    cfg = directory / "haproxy.cfg"
    a, b = hosts
    cfg.write_text(
        HAPROXY_CFG.format(
            socket=admin, port=port,
            a_host=a.host, a_port=a.port, a_metrics=a.metrics,
            b_host=b.host, b_port=b.port, b_metrics=b.metrics,
        )
    )  # fmt: skip
    check = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    with (directory / "haproxy.log").open("wb") as log:
        proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        wait_servers(admin, {"a": "UP", "b": "UP"})
        yield port, admin
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def server_states(admin: Path) -> dict[str, str]:
    """HAProxy's view of each pypop host (``show stat`` on the admin socket)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(admin))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    states = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == "pypop" and row.get("svname") in ("a", "b"):
            states[row["svname"]] = row["status"].split()[0]
    return states


def wait_servers(admin: Path, wanted: dict[str, str]) -> None:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError):
            if server_states(admin) == wanted:
                return
        assert time.monotonic() < deadline, server_states(admin)
        time.sleep(0.05)


def holding(hosts: list[Serving]) -> list[Serving]:
    """The hosts with a session open now (their metrics say so, within 0.1 s)."""
    deadline = time.monotonic() + 10
    while True:
        found = [h for h in hosts if h.metric("pypop_sessions_open") > 0]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def login(port: int, user: bytes = b"alice", password: bytes = b"wonderland") -> tuple[Pop, bytes]:
    c = Pop(port)
    assert c.greeting.startswith(b"+OK POP3 server ready"), c.greeting
    assert c.cmd(b"USER " + user) == b"+OK\r\n"
    return c, c.cmd(b"PASS " + password)


def kill_host(host: Serving) -> None:
    """kill -9 of a whole host: its supervisor and every worker at once."""
    pids = {host.proc.pid} | {int(p) for p in re.findall(r"started \(pid (\d+)\)", host.text())}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    host.proc.wait(10)


class Store:
    """The store both hosts share: a Maildir tree, or a PostgreSQL database
    (pypop3-sql) on a server the test starts."""

    def __init__(self, kind: str, tmp_path: Path, stack: contextlib.ExitStack) -> None:
        self.kind = kind
        self.root = tmp_path / "shared-mail"
        maildir(self.root, "alice", 3)
        maildir(self.root, "bob", 1)
        self.url = ""
        if kind == "postgresql":
            testing = pytest.importorskip("pypop_sql.testing")
            reason = testing.pg_unavailable_reason()
            if reason is not None:
                if os.environ.get("CI"):
                    pytest.fail(f"PostgreSQL is required in CI: {reason}")
                pytest.skip(reason)
            pg = stack.enter_context(testing.PgServer())
            self.url = pg.create_database()
            # The same mail, moved in as a site would (pypop import).
            run = subprocess.run(
                [sys.executable, "-m", "pypop", "import", "--backend", "sql",
                 "-o", f"url={self.url}", "--maildir-root", str(self.root)],
                capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            assert run.returncode == 0, run.stdout + run.stderr

    def backend(self) -> list[str]:
        if self.kind == "postgresql":
            return ["--backend", "sql", "-o", f"url={self.url}"]
        return ["--backend", "maildir", "-o", f"root={self.root}"]

    def messages(self, user: str) -> int:
        if self.kind == "maildir":
            return messages(self.root / user)
        import psycopg

        with psycopg.connect(self.url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM messages m JOIN mailboxes b ON m.mailbox_id = b.id "
                "WHERE b.name = %s",
                (user,),
            ).fetchone()
        assert row is not None
        return int(row[0])


@pytest.mark.parametrize("kind", ["maildir", "postgresql"])
def test_two_hosts_behind_haproxy(tmp_path: Path, kind: str) -> None:
    with contextlib.ExitStack() as stack:
        store = Store(kind, tmp_path, stack)
        hosts = [
            stack.enter_context(
                serve(
                    tmp_path / name, 2, host=address, config=CONFIG,
                    root=store.root, backend=store.backend(),
                )
            )
            for name, address in zip(("a", "b"), HOSTS, strict=True)
        ]  # fmt: skip
        port, admin = stack.enter_context(haproxy(tmp_path, hosts))

        # Through HAProxy: one session holds alice's maildrop...
        first, reply = login(port)
        assert reply.startswith(b"+OK maildrop has 3 messages")
        (holder,) = holding(hosts)
        # ...and a second one gets [IN-USE] on whichever host it lands (round robin:
        # the next connections alternate between the two).
        for _ in range(4):
            c, reply = login(port)
            assert reply == IN_USE
            c.close()
        for host in hosts:
            assert "rip=127.0.0.9 reason=in-use" in host.text(), host.text()
            in_use = 'pypop_logins_total{mechanism="USER",result="in-use"}'
            assert host.metric(in_use, until=lambda v: v >= 1) >= 1

        # kill -9 of the host holding the session, mid-session (a message marked).
        assert first.cmd(b"RETR 1").startswith(b"+OK")
        while first.file.readline() != b".\r\n":
            pass
        assert first.cmd(b"DELE 1") == b"+OK Marked to be deleted\r\n"
        kill_host(holder)
        assert first.file.readline() == b""  # the session is gone
        first.close()
        (survivor,) = [h for h in hosts if h is not holder]
        assert store.messages("alice") == 3  # no mail lost: DELE needs QUIT
        # New sessions go to the other host, at once (HAProxy retries a refused
        # connection elsewhere) and after its health check notices.
        sessions_before = survivor.settled("pypop_sessions_total")
        for n in range(4):
            c, reply = login(port)
            assert reply.startswith(b"+OK maildrop has 3 messages"), (n, reply)
            assert c.cmd(b"QUIT").startswith(b"+OK")
            c.close()
        want = sessions_before + 4
        assert survivor.metric("pypop_sessions_total", until=lambda v: v >= want) == want
        wait_servers(admin, {"a" if holder is hosts[0] else "b": "DOWN",
                             "a" if holder is hosts[1] else "b": "UP"})  # fmt: skip

        # The penalty and the logs see the client's address, not HAProxy's.
        penalties = survivor.settled("pypop_auth_penalties_total")
        for n in range(3):
            c, reply = login(port, b"bob", b"wrong-%d" % n)
            assert reply == AUTH_FAILED
            c.close()
        # The 2nd and 3rd attempts of 127.0.0.9 were delayed; another client is not.
        want = penalties + 2
        assert survivor.metric("pypop_auth_penalties_total", until=lambda v: v >= want) == want
        other = Pop(port, source="127.0.0.10")
        assert other.cmd(b"USER bob") == b"+OK\r\n"
        assert other.cmd(b"PASS builder").startswith(b"+OK maildrop has 1 message")
        assert other.cmd(b"QUIT").startswith(b"+OK")
        other.close()
        assert survivor.metric("pypop_auth_penalties_total") == penalties + 2
        survivor.wait_log(r"session peer=127\.0\.0\.10 user=bob")  # lines may wait 0.1 s
        log = survivor.text()
        assert len(re.findall(r"login failed: user=<bob> method=USER rip=127\.0\.0\.9 "
                              r"reason=credentials", log)) == 3  # fmt: skip
        assert "session peer=127.0.0.10 user=bob" in log
        assert "peer=127.0.0.1 " not in log
        assert "rip=127.0.0.1 " not in log

        # The metrics count what happened on the survivor.
        failed = 'pypop_logins_total{mechanism="USER",result="credentials"}'
        assert survivor.metric(failed, until=lambda v: v >= 3) == 3
        ok = 'pypop_logins_total{mechanism="USER",result="ok"}'
        assert survivor.metric(ok, until=lambda v: v >= 5) == 5
        quits = 'pypop_commands_total{verb="QUIT"}'
        assert survivor.metric(quits, until=lambda v: v >= 5) == 5
        assert survivor.metric("pypop_sessions_open", until=lambda v: v <= 0) == 0
        # After the clean QUITs the messages are all there (nothing was deleted).
        assert store.messages("alice") == 3
    assert CLIENT == "127.0.0.9"
