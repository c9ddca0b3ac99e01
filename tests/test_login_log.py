"""What the administrator sees (issue 9, admin experience 4): one log line per failed
login with user, client address, method and reason; server-side failures with their
cause (the client only gets [SYS/TEMP]); and a fail2ban filter (docs/fail2ban.conf)
whose failregex matches the lines ``pypop serve`` really writes."""

from __future__ import annotations

import base64
import configparser
import hashlib
import logging
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from pypop.auth import MemoryCredentialStore
from pypop.backend import Mailbox
from pypop.backends.memory import MemoryBackend
from pypop.errors import PermanentFailure, TemporaryFailure

from .conftest import PASSWORDS, ServerStarter
from .test_server import port_of
from .test_tls import Client

ROOT = Path(__file__).parent.parent
AUTH_FAILED = b"-ERR [AUTH] Authentication failed\r\n"


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def login_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pypop.login"]


async def settle(caplog: pytest.LogCaptureFixture, count: int) -> list[str]:
    for _ in range(200):
        if len(login_lines(caplog)) >= count:
            break
        await trio.sleep(0.01)
    return login_lines(caplog)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="pypop")
    return caplog


async def greeted(port: int) -> tuple[Client, bytes]:
    c = await Client.connect(port)
    return c, await c.line()


# ---- one line per failure ---------------------------------------------------------------


async def test_every_failed_login_is_one_line(
    start_server: ServerStarter, logs: pytest.LogCaptureFixture
) -> None:
    server = await start_server(apop=True, mechanisms=["SCRAM-SHA-256", "PLAIN", "LOGIN"])
    port = port_of(server)
    c, greeting = await greeted(port)
    assert await c.cmd(b"USER alice\r\n") == b"+OK\r\n"
    assert await c.cmd(b"PASS wrong\r\n") == AUTH_FAILED
    assert await c.cmd(b"USER nobody\r\n") == b"+OK\r\n"
    assert await c.cmd(b"PASS wrong\r\n") == AUTH_FAILED
    stamp = re.search(rb"<[^>]+>", greeting)
    assert stamp is not None
    digest = hashlib.md5(stamp.group(0) + b"wrong").hexdigest()  # noqa: S324 (APOP)
    assert await c.cmd(f"APOP bob {digest}\r\n".encode()) == AUTH_FAILED
    assert await c.cmd(b"AUTH PLAIN " + b64("\0bob\0wrong") + b"\r\n") == AUTH_FAILED
    await c.aclose()
    c, _ = await greeted(port)
    assert (await c.cmd(b"AUTH SCRAM-SHA-256 " + b64("n,,n=alice,r=abc") + b"\r\n"))[:2] == b"+ "
    assert await c.cmd(b"*\r\n") == b"-ERR Authentication cancelled\r\n"
    assert await c.cmd(b"AUTH LOGIN\r\n") == b"+ " + b64("Username:") + b"\r\n"
    assert await c.cmd(b"!!!\r\n") == b"-ERR Invalid base64 data\r\n"
    await c.aclose()
    assert await settle(logs, 6) == [
        "login failed: user=<alice> method=USER rip=127.0.0.1 reason=credentials",
        "login failed: user=<nobody> method=USER rip=127.0.0.1 reason=credentials",
        "login failed: user=<bob> method=APOP rip=127.0.0.1 reason=credentials",
        "login failed: user=<bob> method=PLAIN rip=127.0.0.1 reason=credentials",
        "login failed: user=<alice> method=SCRAM-SHA-256 rip=127.0.0.1 reason=cancelled",
        "login failed: user=<> method=LOGIN rip=127.0.0.1 reason=malformed",
    ]
    assert all(r.levelno == logging.WARNING for r in logs.records if r.name == "pypop.login")
    assert "wrong" not in logs.text  # never a password


async def test_peer_controlled_names_are_cleaned_and_bounded(
    start_server: ServerStarter, logs: pytest.LogCaptureFixture
) -> None:
    server = await start_server()
    c, _ = await greeted(port_of(server))
    forged = "x> method=USER rip=6.6.6.6 reason=credentials\u2028<"
    assert await c.cmd(b"AUTH PLAIN " + b64(f"\0{forged}\0pw") + b"\r\n") == AUTH_FAILED
    long = "é" * 100  # 200 octets: within PLAIN's 255, beyond the log's 64 characters
    assert await c.cmd(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert await c.cmd(b64(f"\0{long}\0pw") + b"\r\n") == AUTH_FAILED
    await c.aclose()
    lines = await settle(logs, 2)
    assert lines[0] == (
        "login failed: user=<x??method?USER?rip?6.6.6.6?reason?credentials??> method=PLAIN "
        "rip=127.0.0.1 reason=credentials"
    )
    assert lines[1] == (
        f"login failed: user=<{'é' * 64}...> method=PLAIN rip=127.0.0.1 reason=credentials"
    )


class FailingBackend(MemoryBackend):
    """Each user fails in its own way (injected faults)."""

    async def open_mailbox(self, user: str) -> Mailbox:
        if user == "alice":
            try:
                raise OSError(5, "Input/output error", "/srv/mail/alice")
            except OSError as exc:
                raise TemporaryFailure("cannot read maildir") from exc
        if user == "bob":
            raise PermanentFailure("account disabled")
        return await super().open_mailbox(user)


class DownStore(MemoryCredentialStore):
    async def verify_password(self, user: str, password: str) -> bool:
        raise TemporaryFailure("database unreachable")


async def test_server_side_failures_are_logged_with_their_cause(
    start_server: ServerStarter, logs: pytest.LogCaptureFixture
) -> None:
    server = await start_server(backend=FailingBackend(), max_auth_failures=1)
    c, _ = await greeted(port_of(server))
    for user, password in PASSWORDS.items():
        await c.cmd(f"USER {user}\r\n".encode())
        reply = await c.cmd(f"PASS {password}\r\n".encode())
        assert reply in (
            b"-ERR [SYS/TEMP] Mailbox temporarily unavailable\r\n",
            b"-ERR [SYS/PERM] Mailbox cannot be opened\r\n",
        )
    # Neither counted toward max_auth_failures = 1: the session is still there.
    assert await c.multiline(b"CAPA\r\n") != b""
    await c.aclose()
    down = await start_server(store=DownStore(PASSWORDS))
    c, _ = await greeted(port_of(down))
    await c.cmd(b"USER alice\r\n")
    assert await c.cmd(b"PASS x\r\n") == b"-ERR [SYS/TEMP] Temporary authentication failure\r\n"
    await c.aclose()
    lines = await settle(logs, 3)
    assert lines == [
        'login failed: user=<alice> method=USER rip=127.0.0.1 reason=temporary cause="cannot '
        'read maildir: Input/output error: /srv/mail/alice"',
        'login failed: user=<bob> method=USER rip=127.0.0.1 reason=permanent cause="account '
        'disabled"',
        'login failed: user=<alice> method=USER rip=127.0.0.1 reason=temporary cause="database '
        'unreachable"',
    ]
    assert all(r.levelno == logging.ERROR for r in logs.records if r.name == "pypop.login")
    assert not [r for r in logs.records if r.exc_info]  # expected failures: no traceback


async def test_mbox_mail_root_says_why(
    start_server: ServerStarter, logs: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Debian's /var/mail holds mbox files: the Maildir backend cannot serve them, and
    the log must say why (it said nothing, even at DEBUG)."""
    maildir = pytest.importorskip("pypop_maildir")
    (tmp_path / "alice").write_bytes(b"From alice@example.org Mon Jan  1 00:00:00 2026\n\n")
    backend = maildir.create({"root": str(tmp_path)})
    server = await start_server(backend=backend)
    c, _ = await greeted(port_of(server))
    await c.cmd(b"USER alice\r\n")
    assert await c.cmd(b"PASS wonderland\r\n") == (
        b"-ERR [SYS/TEMP] Mailbox temporarily unavailable\r\n"
    )
    await c.aclose()
    (line,) = await settle(logs, 1)
    assert line.startswith("login failed: user=<alice> method=USER rip=127.0.0.1 reason=temporary")
    assert f"Not a directory: {tmp_path}/alice/" in line


# ---- the fail2ban filter ---------------------------------------------------------------------

# fail2ban's <HOST> (fail2ban/server/failregex.py, R_HOST with usedns=yes), simplified.
HOST = (
    r"(?:\[?(?:(?:::f{4,6}:)?(?P<ip4>(?:\d{1,3}\.){3}\d{1,3})"
    r"|(?P<ip6>(?:[0-9a-fA-F]{0,4}:){2,7}[0-9a-fA-F]{0,4}))\]?|(?P<dns>[\w\-.^_]*\w))"
)
DATE_FIELDS = {
    "%Y": r"\d{4}",
    "%m": r"\d{2}",
    "%d": r"\d{2}",
    "%H": r"\d{2}",
    "%M": r"\d{2}",
    "%S": r"\d{2}",
    "%f": r"\d+",
}


def fail2ban_filter() -> tuple[re.Pattern[str], list[re.Pattern[str]]]:
    """docs/fail2ban.conf, read the way fail2ban reads it: an INI file with %%
    escapes; the date pattern is cut from the line before failregex is applied."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "docs" / "fail2ban.conf", encoding="utf-8")
    section = parser["Definition"]
    date = section["datepattern"].replace("{^LN-BEG}", "^")
    for field, regex in DATE_FIELDS.items():
        date = date.replace(field, regex)
    fails = [
        re.compile(line.strip().replace("<HOST>", HOST))
        for line in section["failregex"].splitlines()
        if line.strip()
    ]
    return re.compile(date), fails


def banned_hosts(lines: list[str]) -> list[str]:
    date, fails = fail2ban_filter()
    hosts = []
    for line in lines:
        cut = date.search(line)
        if cut is None:
            continue
        rest = line[: cut.start()] + line[cut.end() :]
        for regex in fails:
            m = regex.search(rest)
            if m:
                hosts.append(m.group("ip4") or m.group("ip6") or m.group("dns"))
                break
    return hosts


def test_fail2ban_filter_matches_what_pypop_serve_logs(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}wonderland\n")
    log = tmp_path / "pypop.log"
    config = tmp_path / "pypop.toml"
    config.write_text(
        "[limits]\nauth_failure_delay = 0\nauth_penalty_max = 0\nlock_wait = 0\n"
        "[auth]\nmechanisms = ['SCRAM-SHA-256', 'PLAIN']\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    listen = ["--listen", f"127.0.0.1:{port}"]
    v6 = _has_ipv6()
    if v6:
        listen += ["--listen", f"[::1]:{port}"]
    with log.open("w") as err:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "pypop", "serve", "-c", str(config),
                "--passwd-file", str(passwd), *listen,
            ],
            stderr=err,
        )  # fmt: skip
        try:
            _talk(port, "127.0.0.1", v6)
        finally:
            proc.terminate()
            proc.wait(30)
    lines = log.read_text().splitlines()
    failed = [line for line in lines if "login failed:" in line]
    assert len(failed) == (9 if v6 else 7), lines
    expected = ["127.0.0.1"] * 5 + (["::1"] * 2 if v6 else [])
    assert banned_hosts(lines) == expected  # not the in-use or temporary lines


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _talk(port: int, host: str, v6: bool) -> None:
    def session(address: str, lines: list[bytes]) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                sock = socket.create_connection((address, port), timeout=10)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with sock, sock.makefile("rb") as f:
            f.readline()
            for line in lines:
                sock.sendall(line + b"\r\n")
                f.readline()

    # credentials x2, a cancelled SCRAM, malformed base64, and a forged name.
    session(host, [b"USER alice", b"PASS wrong", b"USER bob", b"PASS wrong"])
    session(host, [b"AUTH SCRAM-SHA-256 " + b64("n,,n=alice,r=abc"), b"*"])
    session(host, [b"AUTH PLAIN", b"!!!"])
    session(host, [b"AUTH PLAIN " + b64("\0evil rip=203.0.113.9 reason=credentials\0pw")])
    # Not the client's fault: [IN-USE] while another session holds the maildrop.
    with socket.create_connection((host, port), timeout=10) as first, first.makefile("rb") as f:
        f.readline()
        first.sendall(b"USER alice\r\nPASS wonderland\r\n")
        f.readline()
        assert f.readline().startswith(b"+OK maildrop")
        session(host, [b"USER alice", b"PASS wonderland"])
        session(host, [b"USER alice", b"PASS wonderland"])
    if v6:
        session("::1", [b"USER alice", b"PASS wrong", b"USER x", b"PASS y"])
