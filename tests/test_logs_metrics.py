"""Where ``pypop serve`` logs (stderr, a file, syslog; text or JSON lines), that no
secret reaches any of them, and the metrics endpoint of a single process.

Every target gets the same sessions: wrong and right passwords over USER/PASS and
AUTH PLAIN. The passwords (and their base64 forms) must appear nowhere.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_login_log import banned_hosts
from .test_workers import Pop, free_port

LOCAL = "127.0.0.1"
SECRET = "s3cret-Pa55word"
WRONG = "wr0ng-Pa55word"


def plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


@contextlib.contextmanager
def serve(tmp_path: Path, *args: str) -> Iterator[tuple[int, int]]:
    """A single-process ``pypop serve`` (memory backend); yields (port, metrics port).
    Started again on other ports if one was taken between free_port() and the bind."""
    (tmp_path / "passwd").write_text(f"alice:{{PLAIN}}{SECRET}\n")
    (tmp_path / "pypop.toml").write_text("[limits]\nauth_failure_delay = 0\nauth_penalty_max = 0\n")
    errors = tmp_path / "serve.stderr"
    for _ in range(3):
        port, metrics = free_port(), free_port()
        with errors.open("wb") as err:
            proc = subprocess.Popen(
                [
                    sys.executable, "-m", "pypop", "serve", "-c", str(tmp_path / "pypop.toml"),
                    "--passwd-file", str(tmp_path / "passwd"),
                    "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics}",
                    "-o", "sample_users=0", *args,
                ],
                stdin=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while proc.poll() is None:
            try:
                Pop(port, LOCAL).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        if proc.poll() is None:
            break
        stderr = errors.read_text(errors="replace")
        assert "in use" in stderr, f"pypop serve exited: {stderr[-2000:]}"
    else:
        raise AssertionError("no free ports in three tries")
    try:
        yield port, metrics
    finally:
        proc.terminate()
        proc.wait(30)


def sessions(port: int) -> None:
    c = Pop(port, LOCAL)
    assert c.cmd(b"USER alice") == b"+OK\r\n"
    assert c.cmd(b"PASS " + WRONG.encode()).startswith(b"-ERR [AUTH]")
    assert c.cmd(b"AUTH PLAIN " + plain("alice", WRONG)).startswith(b"-ERR [AUTH]")
    assert c.cmd(b"AUTH PLAIN " + plain("alice", SECRET)).startswith(b"+OK")
    assert c.cmd(b"QUIT").startswith(b"+OK")
    c.close()
    c = Pop(port, LOCAL)
    assert c.cmd(b"USER alice") == b"+OK\r\n"
    assert c.cmd(b"PASS " + SECRET.encode()).startswith(b"+OK")
    assert c.cmd(b"QUIT").startswith(b"+OK")
    c.close()


def no_secrets(text: str) -> None:
    for secret in (SECRET, WRONG):
        assert secret not in text
        for user in ("alice", ""):
            assert plain(user, secret).decode() not in text
            assert base64.b64encode(secret.encode()).decode() not in text


def read_until(path: Path, needle: str) -> str:
    deadline = time.monotonic() + 30
    while needle not in (text := path.read_text()):
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    return text


def test_json_lines_to_a_file(tmp_path: Path) -> None:
    log = tmp_path / "pypop.json"
    with serve(tmp_path, "--log-target", str(log), "--log-format", "json") as (port, _):
        sessions(port)
        text = read_until(log, "session peer=127.0.0.1 user=alice commands=3")
    records = [json.loads(line) for line in text.splitlines()]
    assert {tuple(sorted(r)) for r in records} == {("level", "logger", "message", "pid", "time")}
    failed = [r for r in records if r["logger"] == "pypop.login"]
    assert [(r["level"], r["message"]) for r in failed] == [
        ("WARNING", "login failed: user=<alice> method=USER rip=127.0.0.1 reason=credentials"),
        ("WARNING", "login failed: user=<alice> method=PLAIN rip=127.0.0.1 reason=credentials"),
    ]
    assert all(r["time"].endswith("Z") and len(r["time"]) == 24 for r in records)
    no_secrets(text)


def test_text_to_a_file_matches_the_fail2ban_filter(tmp_path: Path) -> None:
    log = tmp_path / "pypop.log"
    with serve(tmp_path, "--log-target", str(log)) as (port, _):
        sessions(port)
        text = read_until(log, "session peer=127.0.0.1 user=alice commands=3")
    assert banned_hosts(text.splitlines()) == ["127.0.0.1", "127.0.0.1"]
    no_secrets(text)


def test_syslog(tmp_path: Path) -> None:
    address = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(address))
        syslog.settimeout(30)
        with serve(tmp_path, "--log-target", f"syslog:{address}") as (port, _):
            sessions(port)
            got: list[bytes] = []
            while not any(b"session peer=127.0.0.1 user=alice commands=3" in g for g in got):
                got.append(syslog.recv(65536))
    text = b"\n".join(got).decode()
    # <22>: facility mail (2), priority info (6); <20>: warning.
    assert "<20>pypop[" in text
    assert (
        "]: WARNING pypop.login: login failed: user=<alice> method=USER "
        "rip=127.0.0.1 reason=credentials" in text
    )
    assert "<22>pypop[" in text
    no_secrets(text)


def test_metrics_and_healthz_of_one_process(tmp_path: Path) -> None:
    with serve(tmp_path) as (port, metrics):
        sessions(port)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/healthz", timeout=10) as r:
            assert (r.status, r.read()) == (200, b"ok\n")
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
                body = r.read().decode()
                assert r.headers["Content-Type"].startswith("text/plain; version=")
            if "pypop_sessions_open 0.0" in body or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for sample in [
            "pypop_sessions_open 0.0",
            "pypop_sessions_total 3.0",  # and the probe that waited for the port
            'pypop_logins_total{mechanism="USER",result="credentials"} 1.0',
            'pypop_logins_total{mechanism="PLAIN",result="credentials"} 1.0',
            'pypop_logins_total{mechanism="PLAIN",result="ok"} 1.0',
            'pypop_logins_total{mechanism="USER",result="ok"} 1.0',
            'pypop_commands_total{verb="USER"} 2.0',
            'pypop_commands_total{verb="AUTH"} 2.0',
            'pypop_commands_total{verb="QUIT"} 2.0',
            'pypop_login_duration_seconds_count{result="ok"} 2.0',
            'pypop_login_duration_seconds_count{result="failed"} 2.0',
        ]:
            assert sample + "\n" in body, sample
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics}/nothing", timeout=10)
        assert err.value.code == 404
        err.value.close()
        # A request head is bounded (8 KiB): a client that never ends it is cut off.
        with socket.create_connection(("127.0.0.1", metrics), timeout=10) as s:
            s.sendall(b"GET /" + b"x" * 9000)
            assert s.recv(4096).startswith(b"HTTP/1.0 404")


@pytest.mark.parametrize("created", [0.0, 0.9995, 1_700_000_000.5, 1_700_000_001.0])
def test_text_formatter_writes_what_logging_writes(created: float) -> None:
    """The text format's date is formatted once a second: the lines stay logging's own."""
    import logging

    from pypop.server.logsetup import TextFormatter

    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    ours, theirs = TextFormatter(fmt), logging.Formatter(fmt)
    for _ in range(2):  # the second time from the cached second
        record = logging.LogRecord("pypop.session", logging.INFO, "x", 1, "a=%s", ("b",), None)
        record.created = created
        record.msecs = int((created - int(created)) * 1000) + 0.0
        assert ours.format(record) == theirs.format(record)
