"""Real ``pypop serve`` processes and real ``pypop`` commands for the tests."""

from __future__ import annotations

import contextlib
import os
import poplib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pypop_sql import parse_options
from pypop_sql._engine import Engine, make_engine

PASSWORD = "secret-pw"
USERS = ("alice", "bob")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine(url: str) -> Engine:
    """A started engine for direct checks (close it)."""
    e = make_engine(parse_options({"url": url}))
    e.start()
    return e


@contextlib.contextmanager
def open_engine(url: str) -> Iterator[Engine]:
    e = engine(url)
    try:
        yield e
    finally:
        e.close()


def pypop(
    *args: str, stdin: bytes = b"", timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """``python -m pypop ARGS`` as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "pypop", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def login(self, user: str = "alice", *, utf8: bool = False) -> poplib.POP3:
        """poplib logged in; ``utf8``: send UTF8 first (RFC 6856), which a message with
        8-bit header octets needs."""
        pop = poplib.POP3("127.0.0.1", self.port, timeout=30)
        try:
            if utf8:
                pop.utf8()
            pop.user(user)
            pop.pass_(PASSWORD)
        except BaseException:
            pop.close()
            raise
        return pop

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


def write_config(
    tmp: Path,
    url: str,
    name: str,
    port: int,
    credentials: str = "passwd",
    *,
    passwd_text: str | None = None,
    backend_extra: str = "",
) -> Path:
    passwd = tmp / "passwd"
    if passwd_text is None:
        passwd_text = "".join(f"{u}:{{PLAIN}}{PASSWORD}\n" for u in USERS)
    passwd.write_text(passwd_text, encoding="utf-8")
    auth = (
        f'[auth]\npasswd_file = "{passwd}"\n'
        if credentials == "passwd"
        else f'[credentials]\nname = "sql"\nurl = "{url}"\n'
    )
    conf = tmp / f"{name}.toml"
    conf.write_text(
        f"""[server]
listen = ["127.0.0.1:{port}"]
hostname = "test.invalid"
# One process: the prelude's fault injection and kill -9 must reach the one serving
# (the default, one worker per core, would serve from child processes).
workers = 1

[limits]
auth_failure_delay = 0
auth_penalty_max = 0
shutdown_timeout = 2

{auth}
[backend]
name = "sql"
url = "{url}"
{backend_extra}
"""
    )
    return conf


def start_serve(
    tmp: Path,
    url: str,
    name: str,
    *,
    prelude: str = "",
    credentials: str = "passwd",
    passwd_text: str | None = None,
    backend_extra: str = "",
) -> ServeProcess:
    """``pypop serve`` on a free port; ``prelude`` is Python run first (fault injection);
    ``passwd_text`` replaces the passwd-file, ``backend_extra`` adds [backend] lines."""
    port = free_port()
    conf = write_config(
        tmp, url, name, port, credentials, passwd_text=passwd_text, backend_extra=backend_extra
    )
    log = tmp / f"{name}.log"
    code = f"{prelude}\nimport sys\nfrom pypop.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "serve", "-c", str(conf), "--log-level", "DEBUG"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = ServeProcess(proc, port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"pypop serve exited with {proc.returncode}:\n{server.tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            if s.recv(512).startswith(b"+OK"):
                return server
        time.sleep(0.05)
    server.stop()
    raise AssertionError(f"pypop serve did not answer:\n{server.tail()}")
