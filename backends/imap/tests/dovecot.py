"""A real Dovecot (IMAP and POP3) for the tests: its own config in a temporary
directory, listening on 127.0.0.1 only, on free ports; mail delivered with
``doveadm save`` (Dovecot's own tool).

Like benches/servers.py's Dovecot: a throwaway ``dovecot.conf`` checked with
``dovecot -n``, started in the foreground (``-F``) as root (it drops privileges to
``nobody`` for mail access), stopped with SIGTERM.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["Dovecot", "DovecotUnavailable", "dovecot_available", "free_port"]


class DovecotUnavailable(RuntimeError):
    pass


def dovecot_available() -> str | None:
    """None if the tests can run Dovecot here, else why not."""
    if shutil.which("dovecot") is None and not Path("/usr/sbin/dovecot").exists():
        return "Dovecot is not installed (benches/setup.sh installs dovecot-imapd)"
    for name in ("imap", "pop3"):
        if not any(Path(d, name).exists() for d in ("/usr/lib/dovecot", "/usr/libexec/dovecot")):
            return f"dovecot-{name}d is not installed (benches/setup.sh installs it)"
    if os.geteuid() != 0:
        return "Dovecot needs root to start (it drops privileges itself)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary() -> str:
    return shutil.which("dovecot") or "/usr/sbin/dovecot"


class Dovecot:
    """One Dovecot instance. ``users``: name -> password ({PLAIN} in a passwd-file).

    ``masters``: master users (Dovecot's ``auth_master_user_separator = *`` and
    SASL PLAIN with an authorization identity both work). ``capabilities``: replaces
    the IMAP capability list Dovecot announces (to test a server without UIDPLUS).
    ``oauth_url``: an introspection URL for an oauth2 passdb (XOAUTH2, OAUTHBEARER).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        users: dict[str, str] | None = None,
        masters: dict[str, str] | None = None,
        capabilities: str | None = None,
        oauth_url: str | None = None,
        cert: tuple[Path, Path] | None = None,
        pop3_uidl_format: str | None = None,
    ) -> None:
        self.dir = workdir
        self.users = dict(users or {})
        self.masters = dict(masters or {})
        self.capabilities = capabilities
        self.oauth_url = oauth_url
        self.cert = cert
        self.pop3_uidl_format = pop3_uidl_format
        self.imap_port = 0
        self.imaps_port = 0
        self.pop3_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        nobody = pwd.getpwnam("nobody")
        self.uid, self.gid = nobody.pw_uid, nobody.pw_gid

    @property
    def conf(self) -> Path:
        return self.dir / "dovecot.conf"

    @property
    def log(self) -> str:
        path = self.dir / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _write_users(self) -> None:
        text = "".join(f"{u}:{{PLAIN}}{p}\n" for u, p in self.users.items())
        (self.dir / "passwd").write_text(text)
        masters = "".join(f"{u}:{{PLAIN}}{p}\n" for u, p in self.masters.items())
        (self.dir / "masters").write_text(masters)

    def add_user(self, user: str, password: str) -> None:
        """A new user; Dovecot notices the changed passwd-file on the next login."""
        self.users[user] = password
        self._write_users()

    def config_text(self) -> str:
        d = self.dir
        assert self.cert is not None
        cert, key = self.cert
        oauth = ""
        mechanisms = "plain login"
        if self.oauth_url is not None:
            mechanisms += " xoauth2 oauthbearer"
            (d / "oauth2.conf").write_text(
                f"introspection_mode = post\nintrospection_url = {self.oauth_url}\n"
                "username_attribute = username\nactive_attribute = active\n"
                "active_value = true\n"
            )
            oauth = f"""passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {d}/oauth2.conf
}}
"""
        caps = f"imap_capability = {self.capabilities}\n" if self.capabilities else ""
        if self.pop3_uidl_format:
            caps += f"pop3_uidl_format = {self.pop3_uidl_format}\n"
        return f"""# Throwaway Dovecot config written by the pypop3-imap tests.
base_dir = {d}/run
state_dir = {d}/state
instance_name = pypop-imap-test-{self.imap_port}
log_path = {d}/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:{d}/mail/%u
mail_uid = {self.uid}
mail_gid = {self.gid}
first_valid_uid = 1
first_valid_gid = 1
disable_plaintext_auth = no
# pypop connects from 127.0.0.1 for every user: trusted, Dovecot takes the client's
# address from ID x-originating-ip and applies its login penalty to that, not to us.
login_trusted_networks = 127.0.0.0/8
auth_mechanisms = {mechanisms}
auth_master_user_separator = *
auth_failure_delay = 0
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
shutdown_clients = yes
{caps}passdb {{
  driver = passwd-file
  args = scheme=PLAIN {d}/masters
  master = yes
  pass = yes
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
}}
{oauth}userdb {{
  driver = static
  args = uid={self.uid} gid={self.gid} home={d}/mail/%u
}}
# Every test logs in from 127.0.0.1; failures in one must not slow the next down
# (pypop applies its own penalty per real client).
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
"""

    def start(self) -> None:
        why = dovecot_available()
        if why is not None:
            raise DovecotUnavailable(why)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)  # noqa: S103 - Dovecot's unprivileged users read it
        for sub in ("run", "state", "mail"):
            (self.dir / sub).mkdir(exist_ok=True)
        os.chown(self.dir / "mail", self.uid, self.gid)
        if not self.imap_port:
            self.imap_port, self.imaps_port, self.pop3_port = free_port(), free_port(), free_port()
        self._write_users()
        self.conf.write_text(self.config_text())
        check = subprocess.run(
            [_binary(), "-n", "-c", str(self.conf)], capture_output=True, text=True, timeout=30
        )
        if check.returncode != 0:
            raise DovecotUnavailable(f"dovecot -n rejected the config:\n{check.stderr}")
        out = (self.dir / "dovecot.stdout").open("ab")
        self.proc = subprocess.Popen(
            [_binary(), "-F", "-c", str(self.conf)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        out.close()
        self._wait_ready(30)

    def _wait_ready(self, limit: float) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise DovecotUnavailable(f"dovecot exited with {self.proc.returncode}\n{self.log}")
            ready = 0
            for port, greeting in ((self.imap_port, b"* OK"), (self.pop3_port, b"+OK")):
                with socket.socket() as s:
                    s.settimeout(1)
                    with contextlib.suppress(OSError):
                        s.connect(("127.0.0.1", port))
                        if s.recv(512).startswith(greeting):
                            ready += 1
            if ready == 2:
                return
            time.sleep(0.05)
        raise DovecotUnavailable(f"dovecot did not answer within {limit:.0f} s\n{self.log}")

    def _tree(self) -> list[int]:
        """The master's process and its descendants (processes this harness started)."""
        if self.proc is None:
            return []
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
        self._wait_gone()

    def kill(self) -> None:
        """SIGKILL the whole Dovecot tree at once: connections die mid-stream."""
        for pid in self._tree():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=15)
        self._wait_gone()

    def _wait_gone(self) -> None:
        # Ports must be free before a restart on the same ports.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            busy = False
            for port in (self.imap_port, self.imaps_port, self.pop3_port):
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        busy = True
            if not busy:
                # The kernel may still hold the listening addresses for a moment.
                run = self.dir / "run"
                if run.exists():
                    shutil.rmtree(run, ignore_errors=True)
                    run.mkdir()
                return
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    # -- mail --

    def deliver(self, user: str, message: bytes, mailbox: str = "INBOX") -> None:
        """Store ``message`` exactly as given with ``doveadm save``."""
        done = subprocess.run(
            ["doveadm", "-c", str(self.conf), "save", "-u", user, "-m", mailbox],
            input=message,
            capture_output=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise RuntimeError(f"doveadm save failed: {done.stderr.decode(errors='replace')}")

    @contextlib.contextmanager
    def imap(self, user: str, *, readonly: bool = False) -> Iterator[imaplib.IMAP4]:
        """Another IMAP client (stdlib imaplib), logged in and with INBOX selected."""
        client = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=30)
        try:
            client.login(user, self.users[user])
            client.select("INBOX", readonly=readonly)
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.logout()

    def expunge(self, user: str, uid: int) -> None:
        """Expunge one message from another IMAP connection."""
        with self.imap(user) as client:
            client.uid("STORE", str(uid), "+FLAGS.SILENT", r"(\Deleted)")
            client.expunge()

    def uids(self, user: str) -> list[int]:
        with self.imap(user, readonly=True) as client:
            _, data = client.uid("SEARCH", "ALL")
        return [int(x) for x in data[0].split()]

    def flags(self, user: str) -> dict[int, str]:
        """UID -> flags (without \\Recent, a session flag), read-only."""
        with self.imap(user, readonly=True) as client:
            _, data = client.uid("FETCH", "1:*", "(FLAGS)")
        out: dict[int, str] = {}
        for item in data:
            if not isinstance(item, bytes):
                continue
            text = item.decode()
            uid = int(text.split("UID ")[1].split()[0].rstrip(")"))
            flags = text.split("FLAGS (")[1].split(")")[0].split()
            out[uid] = " ".join(f for f in flags if f != "\\Recent")
        return out
