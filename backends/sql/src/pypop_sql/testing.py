"""A throwaway PostgreSQL server, for tests and benchmarks (pypop-sql's own and yours).

``initdb`` into a temporary directory, ``pg_ctl start`` on a free port of 127.0.0.1
(and a Unix socket in the same directory), trust authentication for the role
``pypop``, fsync off (a test server: crash safety of the *process* is what the tests
check, not of the disk). As root the server runs as the ``postgres`` user (initdb
refuses root) through ``runuser``. ``scripts/test`` installs Debian's postgresql when
the binaries are missing.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PgServer", "find_bin_dir", "pg_unavailable_reason", "wait_until"]


def find_bin_dir() -> Path | None:
    """The folder holding initdb and pg_ctl: PATH first, then Debian's layout."""
    on_path = shutil.which("initdb"), shutil.which("pg_ctl")
    if all(on_path):
        return Path(os.path.realpath(on_path[0] or "")).parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    return Path(versions[-1]).parent if versions else None


def _run_as() -> list[str]:
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return ["runuser", "-u", name, "--"]
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")


def pg_unavailable_reason() -> str | None:
    if find_bin_dir() is None:
        return "PostgreSQL is not installed (initdb/pg_ctl not found; scripts/test installs it)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser (initdb refuses root)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    """``with PgServer() as pg: pg.url("mydb")``."""

    max_connections: int = 200
    durable: bool = False
    """fsync on (benchmarks); off for tests."""
    extra: list[str] = field(default_factory=list)
    port: int = 0
    root: Path | None = None
    _seq: int = 0

    @property
    def datadir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    def _cmd(self, *args: str) -> list[str]:
        bindir = find_bin_dir()
        assert bindir is not None
        return [*_run_as(), str(bindir / args[0]), *args[1:]]

    def init(self) -> None:
        """``initdb`` into a new temporary directory (no server started)."""
        reason = pg_unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self.root = Path(tempfile.mkdtemp(prefix="pypop-pg-"))
        os.chmod(self.root, 0o755)  # noqa: S103 - the server user reads it
        if os.geteuid() == 0:
            user = _run_as()[2]
            pw = pwd.getpwnam(user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        subprocess.run(
            self._cmd(
                "initdb", "-D", str(self.datadir), "-U", "pypop", "--auth=trust",
                "-E", "UTF8", "--locale=C", "--no-sync",
            ),
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        self.port = _free_port()

    def server_options(self) -> list[str]:
        """The ``postgres`` settings: loopback and a socket in our directory only."""
        opts = [
            f"-p {self.port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self.root}",
            f"-c max_connections={self.max_connections}",
        ]
        if not self.durable:
            # A test server: the tests kill processes, not the machine.
            opts += ["-c fsync=off", "-c full_page_writes=off"]
        return opts + list(self.extra)

    def foreground_command(self) -> list[str]:
        """``postgres`` in the foreground (for a supervisor that wants it as a child)."""
        opts = [word for opt in self.server_options() for word in opt.split(" ", 1)]
        return self._cmd("postgres", "-D", str(self.datadir), *opts)

    def start(self) -> None:
        if self.root is None:
            self.init()
        subprocess.run(
            self._cmd(
                "pg_ctl", "-D", str(self.datadir), "-l", str(self.datadir.parent / "log"),
                "-o", " ".join(self.server_options()), "-w", "-t", "60", "start",
            ),
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        if self.root is None:
            return
        subprocess.run(
            self._cmd("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop"),
            capture_output=True,
            timeout=120,
        )

    def restart(self) -> None:
        """Start again after :meth:`stop` (same port and data)."""
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://pypop@127.0.0.1:{self.port}/{database}"

    def socket_url(self, database: str = "postgres") -> str:
        """The same server through its Unix socket (how a host reaches its own
        PostgreSQL: no TCP stack on either side)."""
        assert self.root is not None, "server not initialised"
        return f"postgresql://pypop@/{database}?host={self.root}&port={self.port}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its URL."""
        import psycopg

        self._seq += 1
        name = f"{prefix}{os.getpid()}_{self._seq}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_tail(self, lines: int = 30) -> str:
        if self.root is None:
            return ""
        try:
            return "\n".join((self.root / "log").read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> PgServer:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def wait_until(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.05)
    return False
