"""Servers under test: Dovecot's POP3 service and pypop, each pinned to one core.

Each server gets a throwaway directory, listens on 127.0.0.1 only on free ports
(plain POP3 and implicit TLS), and is stopped with SIGTERM (SIGKILL after a grace
period). ``pid`` is the process whose tree the load generator measures.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benches.fixtures import Fixture

__all__ = [
    "DovecotServer",
    "PypopServer",
    "Server",
    "ServerError",
    "dovecot_available",
    "free_port",
    "make_cert",
    "pin_prefix",
    "pypop_available",
    "pypop_maildir_available",
    "pypop_sql_available",
]

REPO = Path(__file__).resolve().parent.parent


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_prefix(core: int) -> list[str]:
    """``taskset -c CORE`` when there are two cores and taskset exists, else nothing."""
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(core)]
    return []


def wait_port(port: int, proc: subprocess.Popen[bytes], limit: float, log: Path | None) -> None:
    """Wait until something accepts on 127.0.0.1:port (bounded by ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"server exited with {proc.returncode}{_tail(log)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            try:
                s.connect(("127.0.0.1", port))
                # Wait for the greeting so the server is really serving.
                if s.recv(512).startswith(b"+OK"):
                    return
            except OSError:
                pass
        time.sleep(0.1)
    raise ServerError(f"server did not answer on port {port} within {limit:.0f} s{_tail(log)}")


def _tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n  " + "\n  ".join(text) if text else ""


def make_cert(dest: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server cert for localhost/127.0.0.1: (ca, cert, key) PEM files.

    Uses trustme when installed, else the openssl command.
    """
    dest.mkdir(parents=True, exist_ok=True)
    ca_p, cert_p, key_p = dest / "ca.pem", dest / "cert.pem", dest / "key.pem"
    if importlib.util.find_spec("trustme") is not None:
        import trustme

        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        ca.cert_pem.write_to_path(str(ca_p))
        leaf.private_key_pem.write_to_path(str(key_p))
        with cert_p.open("wb") as f:
            for blob in leaf.cert_chain_pems:
                f.write(blob.bytes())
    else:

        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=dest)

        run(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "30",
            "-subj",
            "/CN=pypop bench CA",
        )
        run(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "req.csr",
            "-subj",
            "/CN=localhost",
        )
        (dest / "ext.cnf").write_text(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
            "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        )
        run(
            "x509",
            "-req",
            "-in",
            "req.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
        )
    for p in (ca_p, cert_p):
        os.chmod(p, 0o644)
    os.chmod(key_p, 0o640)
    return ca_p, cert_p, key_p


@dataclass
class Server:
    name: str  # "dovecot", "pypop-memory", "pypop-maildir"
    workdir: Path
    port: int = 0
    tls_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        raise NotImplementedError

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=grace)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# ---------------------------------------------------------------- Dovecot


def dovecot_available() -> tuple[bool, str]:
    """(usable, reason): Dovecot needs its binary, the pop3 service, and root."""
    binary = shutil.which("dovecot") or (
        "/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists() else None
    )
    if binary is None:
        return False, "Dovecot is not installed (run benches/setup.sh)"
    if not any(Path(d, "pop3").exists() for d in ("/usr/lib/dovecot", "/usr/libexec/dovecot")):
        return False, "dovecot-pop3d is not installed (run benches/setup.sh)"
    if os.geteuid() != 0:
        return False, "Dovecot needs root to start (it drops privileges itself)"
    return True, binary


def _account(names: tuple[str, ...]) -> tuple[str, int, int]:
    for n in names:
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(n)
            return n, pw.pw_uid, pw.pw_gid
    raise ServerError(f"none of the users {names} exists")


class DovecotServer(Server):
    """Dovecot 2.3 with its own config: POP3 (and with ``imap=True`` IMAP, on
    ``imap_port``, for the IMAP backend's benchmark), high-performance login mode."""

    def __init__(
        self,
        workdir: Path,
        fixture: Fixture,
        cert: Path,
        key: Path,
        max_connections: int = 2000,
        *,
        imap: bool = False,
    ) -> None:
        super().__init__("dovecot", workdir)
        self.fixture = fixture
        self.cert, self.key = cert, key
        self.max_connections = max_connections
        self.imap = imap
        self.imap_port = 0
        ok, self.binary = dovecot_available()
        if not ok:
            raise ServerError(self.binary)
        if imap and not any(
            Path(d, "imap").exists() for d in ("/usr/lib/dovecot", "/usr/libexec/dovecot")
        ):
            raise ServerError("dovecot-imapd is not installed (run benches/setup.sh)")

    def config_text(self) -> str:
        internal, _, _ = _account(("dovecot", "nobody"))
        login, _, _ = _account(("dovenull", "nobody"))
        mail_user, uid, gid = _account(("nobody",))
        n = self.max_connections
        mail = self.fixture.maildir("dovecot")
        imap = ""
        if self.imap:
            # The same high-performance login mode as POP3's.
            imap = f"""service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  service_count = 0
  process_min_avail = 1
  client_limit = {n + 100}
  vsz_limit = 1G
}}
service imap {{
  process_limit = {n + 100}
}}
protocol imap {{
  mail_max_userip_connections = {n + 100}
}}
"""
        return f"""# Throwaway Dovecot config written by benches (pypop benchmark suite).
base_dir = {self.workdir}/run
state_dir = {self.workdir}/state
instance_name = pypop-bench-{self.port}
log_path = {self.workdir}/dovecot.log
info_log_path = {self.workdir}/dovecot.log
protocols = pop3{" imap" if self.imap else ""}
listen = 127.0.0.1
default_internal_user = {internal}
default_login_user = {login}
default_process_limit = {n + 100}
default_client_limit = {n + 1000}
default_vsz_limit = 1G
mail_location = maildir:{mail}/%u
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = 1
first_valid_gid = 1
mail_max_userip_connections = {n + 100}
disable_plaintext_auth = no
auth_mechanisms = plain login
ssl = yes
ssl_cert = <{self.cert}
ssl_key = <{self.key}
ssl_min_protocol = TLSv1.2
shutdown_clients = yes
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.fixture.passwd}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={mail}/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {self.tls_port}
    ssl = yes
  }}
  # High-performance mode: login processes serve many connections each
  # (doc.dovecot.org admin_manual/login_processes); one per CPU we may use.
  service_count = 0
  process_min_avail = 1
  client_limit = {n + 100}
  vsz_limit = 1G
}}
service pop3 {{
  process_limit = {n + 100}
}}
service anvil {{
  client_limit = {2 * n + 1000}
}}
service auth {{
  client_limit = {2 * n + 1000}
}}
protocol pop3 {{
  mail_max_userip_connections = {n + 100}
}}
{imap}# mail user {mail_user}
"""

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)  # noqa: S103 - Dovecot\'s unprivileged users read it
        for d in ("run", "state"):
            (self.workdir / d).mkdir(exist_ok=True)
        self.port, self.tls_port = free_port(), free_port()
        if self.imap:
            self.imap_port = free_port()
        conf = self.workdir / "dovecot.conf"
        conf.write_text(self.config_text())
        _, uid, gid = _account(("nobody",))
        self.fixture.chown_maildir("dovecot", uid, gid)
        check = subprocess.run(
            [self.binary, "-n", "-c", str(conf)], capture_output=True, text=True, timeout=30
        )
        if check.returncode != 0:
            raise ServerError(f"dovecot -n rejected the config:\n{check.stderr}")
        self.log = self.workdir / "dovecot.log"
        out = (self.workdir / "dovecot.stdout").open("wb")
        self.proc = subprocess.Popen(
            [*pin_prefix(0), self.binary, "-F", "-c", str(conf)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        out.close()
        wait_port(self.port, self.proc, 30, self.log)


# ---------------------------------------------------------------- pypop


def pypop_available() -> tuple[bool, str]:
    """(usable, reason): pypop imports and has the ``serve`` command."""
    if importlib.util.find_spec("pypop") is None:
        return False, "pypop is not importable (pip install -e .)"
    if importlib.util.find_spec("pypop.cli") is None:
        return False, "pypop has no cli module yet (pypop serve is not there)"
    return True, ""


def pypop_maildir_available() -> tuple[bool, str]:
    """The maildir backend must be installed: the registry finds it by entry point."""
    eps = importlib.metadata.entry_points(group="pypop.backends")
    if any(ep.name == "maildir" for ep in eps):
        return True, ""
    return False, "pypop3-maildir is not installed (pip install -e backends/maildir)"


def pypop_sql_available(engine: str) -> tuple[bool, str]:
    """pypop-sql must be installed; PostgreSQL also needs psycopg and its binaries."""
    eps = importlib.metadata.entry_points(group="pypop.backends")
    if not any(ep.name == "sql" for ep in eps):
        return False, "pypop-sql is not installed (pip install -e 'backends/sql[postgresql]')"
    if engine == "postgresql":
        if importlib.util.find_spec("psycopg") is None:
            return False, "psycopg is not installed (pip install -e 'backends/sql[postgresql]')"
        from pypop_sql.testing import pg_unavailable_reason

        why = pg_unavailable_reason()
        if why is not None:
            return False, why
    return True, ""


class PypopServer(Server):
    """``python -m pypop serve`` with a config file equivalent to Dovecot's."""

    def __init__(
        self,
        backend: str,
        workdir: Path,
        fixture: Fixture,
        cert: Path,
        key: Path,
        max_connections: int = 20000,
        python: str = sys.executable,
    ) -> None:
        super().__init__(f"pypop-{backend}", workdir)
        self.backend = backend
        self.fixture = fixture
        self.cert, self.key = cert, key
        self.max_connections = max_connections
        self.python = python

    def config_text(self) -> str:
        if self.backend == "memory":
            backend = f'name = "memory"\nseed = "{self.fixture.eml}"\n'
        elif self.backend.startswith("sql-"):
            backend = f'name = "sql"\nurl = "{self.sql_url()}"\n'
        else:
            backend = f'name = "maildir"\nroot = "{self.fixture.maildir("pypop")}"\n'
        n = self.max_connections
        return f"""# Throwaway pypop config written by benches (pypop benchmark suite).
[server]
listen = ["127.0.0.1:{self.port}"]
listen_tls = ["127.0.0.1:{self.tls_port}"]
hostname = "bench.invalid"
workers = 1                        # one core against Dovecot's one core

[limits]
max_connections = {n}
max_connections_per_ip = {n}

[auth]
passwd_file = "{self.fixture.passwd}"
allow_plaintext = true

[tls]
cert = "{self.cert}"
key = "{self.key}"

[backend]
{backend}"""

    def command(self, conf: Path) -> list[str]:
        return [*pin_prefix(0), self.python, "-m", "pypop", "serve", "--config", str(conf)]

    def sql_url(self) -> str:
        raise NotImplementedError

    def prepare(self) -> None:
        """Before the start: anything the backend needs (a loaded database)."""

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        self.port, self.tls_port = free_port(), free_port()
        conf = self.workdir / "pypop.toml"
        conf.write_text(self.config_text())
        self.log = self.workdir / "pypop.log"
        out = self.log.open("wb")
        self.proc = subprocess.Popen(
            self.command(conf),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
        )
        out.close()
        # Seeding 10,000 users may take a while.
        wait_port(self.port, self.proc, 120, self.log)


# ---------------------------------------------------------------- the Trio floor

# What benches/floor.py serves: no TLS, and nothing worth measuring while idle.
FLOOR_SCENARIOS = frozenset({"login", "retr-all", "top", "pipelined"})


def floor_command(python: str, port: int, fixture_eml: Path, passwd: Path) -> list[str]:
    """The command line of benches/floor.py (run it from REPO) serving a fixture."""
    args = ["--port", str(port), "--eml", str(fixture_eml), "--passwd", str(passwd)]
    return [python, "-m", "benches.floor", *args]


class FloorServer(Server):
    """``python -m benches.floor``: one Trio task per connection and no POP3 work, the
    ceiling of any server built as the design asks, measured in the same run."""

    def __init__(self, workdir: Path, fixture: Fixture, python: str = sys.executable) -> None:
        super().__init__("trio-floor", workdir)
        self.fixture = fixture
        self.python = python

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = self.workdir / "floor.log"
        out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [
                *pin_prefix(0),
                *floor_command(self.python, self.port, self.fixture.eml, self.fixture.passwd),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
        )
        out.close()
        wait_port(self.port, self.proc, 120, self.log)


# ---------------------------------------------------------------- pypop-sql


def load_sql(url: str, fixture: Fixture, relaxed: dict[str, object]) -> int:
    """Deliver every fixture message (eml/<user>/*.eml, in order) into the store.

    ``relaxed`` engine options speed up the load only (the server runs with the
    defaults). Returns the number of messages."""
    from pypop_sql import parse_options
    from pypop_sql._engine import make_engine

    engine = make_engine(parse_options({"url": url, **relaxed}))
    engine.start()
    count = 0
    try:
        for user_dir in sorted(p for p in fixture.eml.iterdir() if p.is_dir()):
            for eml in sorted(user_dir.glob("*.eml")):
                engine.deliver(user_dir.name, eml.read_bytes(), None, None)
                count += 1
    finally:
        engine.close()
    return count


class PypopSqliteServer(PypopServer):
    """pypop-sql on an SQLite file in the work folder (WAL, synchronous=full)."""

    def sql_url(self) -> str:
        return f"sqlite://{self.workdir / 'mail.db'}"

    def prepare(self) -> None:
        if not (self.workdir / "mail.db").exists():
            load_sql(self.sql_url(), self.fixture, {"synchronous": "normal"})


# The supervisor: PostgreSQL and pypop as children of one process, so that the load
# generator's process-tree CPU and memory figures count both (Dovecot's count all of
# its processes too), and both run on the server's core.
_SUPERVISOR = r"""
import os, signal, socket, subprocess, sys, time
pg_cmd, port, pypop_cmd = sys.argv[1].split("\x1f"), int(sys.argv[2]), sys.argv[3].split("\x1f")
pg = subprocess.Popen(pg_cmd, stdin=subprocess.DEVNULL)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        break
    except OSError:
        if pg.poll() is not None:
            sys.exit("postgres exited with %s" % pg.returncode)
        time.sleep(0.1)
srv = subprocess.Popen(pypop_cmd, stdin=subprocess.DEVNULL)
def stop(*_):
    srv.send_signal(signal.SIGTERM)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
status = srv.wait()
pg.send_signal(signal.SIGINT)
try:
    pg.wait(30)
except subprocess.TimeoutExpired:
    pg.kill()
sys.exit(status)
"""


class PypopPostgresServer(PypopServer):
    """pypop-sql on a PostgreSQL of its own (fsync on), started under one supervisor
    with pypop, both pinned to the server's core."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        from pypop_sql.testing import PgServer

        self.pg = PgServer(max_connections=400, durable=True, extra=["-c shared_buffers=256MB"])

    def sql_url(self) -> str:
        # One machine: pypop reaches its PostgreSQL through the Unix socket, as a
        # host does its own database (Debian's default). Over TCP loopback both sides
        # pay the TCP stack on this one core: docs/performance.md has that figure.
        return (
            self.pg.url("mail")
            if os.environ.get("PYPOP_BENCH_PG_TCP")
            else self.pg.socket_url("mail")
        )

    def prepare(self) -> None:
        import psycopg

        if self.pg.root is not None:
            return
        self.pg.start()
        try:
            with psycopg.connect(self.pg.url(), autocommit=True) as conn:
                conn.execute("CREATE DATABASE mail")
            load_sql(
                self.pg.url("mail") + "?options=-c%20synchronous_commit%3Doff", self.fixture, {}
            )
            with psycopg.connect(self.pg.url("mail"), autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE")
        finally:
            self.pg.stop()

    def command(self, conf: Path) -> list[str]:
        pypop = [self.python, "-m", "pypop", "serve", "--config", str(conf)]
        return [
            *pin_prefix(0),
            self.python,
            "-c",
            _SUPERVISOR,
            "\x1f".join(self.pg.foreground_command()),
            str(self.pg.port),
            "\x1f".join(pypop),
        ]

    def stop(self, grace: float = 10.0) -> None:
        super().stop(grace)
        self.pg.cleanup()
