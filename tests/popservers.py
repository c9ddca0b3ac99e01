"""Real POP3 servers for the client tests: pypop (``python -m pypop serve``) and
Dovecot, each in a temp dir on 127.0.0.1 with trustme certificates, STLS on the plain
port and implicit TLS on the other."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trustme

CORPUS = Path(__file__).parent / "data" / "corpus"
PASSWORD = "s3cret pass"
TOKEN = "tok-alice-123"


def long_token(user: str) -> str:
    """A JWT-sized token: too long for an initial response on the 255-octet AUTH line."""
    return f"tok-{user}-" + "x" * 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_greeting(port: int, proc: subprocess.Popen[bytes], log: Path, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(512).startswith(b"+OK"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"no greeting on {port}: {log.read_text()[-2000:]}")


@dataclass
class Certs:
    ca: trustme.CA
    ca_file: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path) -> Certs:
        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        ca_file, cert, key = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        os.chmod(key, 0o644)
        os.chmod(directory, 0o755)  # noqa: S103 - Dovecot's users read the certificates
        return cls(ca, ca_file, cert, key)


@dataclass
class PopServer:
    kind: str
    workdir: Path
    port: int
    tls_port: int
    certs: Certs
    proc: subprocess.Popen[bytes] | None = None
    maildir: Path | None = None
    users: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def url(self, user: str = "alice", *, tls: bool = False, auth: str | None = None) -> str:
        scheme = "pops" if tls else "pop"
        port = self.tls_port if tls else self.port
        param = f";AUTH={auth}" if auth else ""
        return f"{scheme}://{user}{param}@127.0.0.1:{port}"


def pypop_server(
    workdir: Path,
    certs: Certs,
    mail: Mapping[str, list[bytes]],
    *,
    extra_auth: str = "",
    plain_listener: bool = True,
    tls: bool = True,
) -> PopServer:
    """``python -m pypop serve`` with a memory backend seeded from ``mail``."""
    workdir.mkdir(parents=True, exist_ok=True)
    seed = workdir / "seed"
    for user, messages in mail.items():
        (seed / user).mkdir(parents=True, exist_ok=True)
        for n, data in enumerate(messages, 1):
            (seed / user / f"{n:04d}.eml").write_bytes(data)
    (workdir / "passwd").write_text("".join(f"{u}:{{PLAIN}}{PASSWORD}\n" for u in mail))
    (workdir / "tokens").write_text(
        "".join(f"{u}:tok-{u}-123\n{u}:{long_token(u)}\n" for u in mail)
    )
    port, tls_port = free_port(), free_port()
    tls_conf = f'[tls]\ncert = "{certs.cert}"\nkey = "{certs.key}"\n' if tls else ""
    listen = f'listen = ["127.0.0.1:{port}"]\n' if plain_listener else ""
    listen_tls = f'listen_tls = ["127.0.0.1:{tls_port}"]\n' if tls else ""
    (workdir / "pypop.toml").write_text(
        f"""[server]
{listen}{listen_tls}hostname = "localhost"

[limits]
auth_failure_delay = 0
auth_penalty_max = 0

[auth]
passwd_file = "{workdir / "passwd"}"
tokens_file = "{workdir / "tokens"}"
apop = true
mechanisms = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN",
              "OAUTHBEARER", "XOAUTH2"]
{extra_auth}
{tls_conf}
[backend]
name = "memory"
seed = "{seed}"
"""
    )
    log = workdir / "pypop.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pypop", "serve", "-c", str(workdir / "pypop.toml")],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = PopServer("pypop", workdir, port, tls_port, certs, proc)
    server.users = {u: PASSWORD for u in mail}
    wait_greeting(port if plain_listener else tls_port, proc, log) if plain_listener else None
    if not plain_listener:
        time.sleep(0.5)
        _wait_tls(tls_port, proc, log)
    return server


def _wait_tls(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-2000:])
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("TLS listener did not open")


# --------------------------------------------------------------------------- Dovecot


def dovecot_missing() -> str | None:
    """Why Dovecot cannot run here, or None."""
    if shutil.which("dovecot") is None and not Path("/usr/sbin/dovecot").exists():
        return "Dovecot is not installed (benches/setup.sh installs it)"
    if not any(Path(d, "pop3").exists() for d in ("/usr/lib/dovecot", "/usr/libexec/dovecot")):
        return "dovecot-pop3d is not installed"
    if os.geteuid() != 0:
        return "Dovecot needs root to start"
    return None


def _account(*names: str) -> tuple[str, int, int]:
    for n in names:
        try:
            pw = pwd.getpwnam(n)
        except KeyError:
            continue
        return n, pw.pw_uid, pw.pw_gid
    raise RuntimeError(f"none of {names} exists")


def write_maildir(root: Path, messages: list[bytes], uid: int, gid: int) -> None:
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for n, data in enumerate(messages, 1):
        (root / "new" / f"{1700000000 + n}.M{n}P1.test").write_bytes(data)
    for path in [root, *root.rglob("*")]:
        os.chown(path, uid, gid)


def dovecot_server(
    workdir: Path,
    certs: Certs,
    mail: Mapping[str, list[bytes]],
    *,
    mechanisms: str = "",
    extra_config: str = "",
) -> PopServer:
    """Dovecot 2.3 POP3, PLAIN passwords, maildir per user; STLS + implicit TLS.
    ``extra_config`` is appended to dovecot.conf (e.g. Kerberos settings)."""
    binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)  # noqa: S103 - Dovecot's unprivileged users read it
    internal, _, _ = _account("dovecot", "nobody")
    login, _, _ = _account("dovenull", "nobody")
    _, uid, gid = _account("nobody")
    maildirs = workdir / "mail"
    for user, messages in mail.items():
        write_maildir(maildirs / user, messages, uid, gid)
    os.chown(maildirs, uid, gid)
    passwd = workdir / "passwd"
    passwd.write_text("".join(f"{u}:{{PLAIN}}{PASSWORD}\n" for u in mail))
    os.chmod(passwd, 0o644)
    for d in ("run", "state"):
        (workdir / d).mkdir(exist_ok=True)
    port, tls_port = free_port(), free_port()
    mechs = mechanisms or "plain login cram-md5 scram-sha-256 apop"
    conf = workdir / "dovecot.conf"
    conf.write_text(
        f"""base_dir = {workdir}/run
state_dir = {workdir}/state
instance_name = pypop-test-{port}
log_path = {workdir}/dovecot.log
protocols = pop3
listen = 127.0.0.1
default_internal_user = {internal}
default_login_user = {login}
mail_location = maildir:{maildirs}/%u
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = 1
first_valid_gid = 1
disable_plaintext_auth = yes
auth_mechanisms = {mechs}
ssl = yes
ssl_cert = <{certs.cert}
ssl_key = <{certs.key}
ssl_min_protocol = TLSv1.2
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={maildirs}/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {tls_port}
    ssl = yes
  }}
}}
{extra_config}
"""
    )
    check = subprocess.run([binary, "-n", "-c", str(conf)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"dovecot -n: {check.stderr}")
    log = workdir / "dovecot.log"
    log.touch()
    proc = subprocess.Popen(
        [binary, "-F", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    server = PopServer("dovecot", workdir, port, tls_port, certs, proc, maildir=maildirs)
    server.users = {u: PASSWORD for u in mail}
    wait_greeting(port, proc, log)
    return server


def corpus() -> list[bytes]:
    return [p.read_bytes() for p in sorted(CORPUS.glob("*.eml"))]
