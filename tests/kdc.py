"""A real MIT Kerberos realm in a temporary directory, for the GSSAPI tests.

``kdb5_util`` creates the database, ``kadmin.local`` adds the principals and exports
the service keytab, ``krb5kdc`` runs on a free port of 127.0.0.1 (TCP and UDP), and
``kinit`` fills a private credential cache per user. Everything the Kerberos library
reads comes from the environment of this process (``KRB5_CONFIG``,
``KRB5_KDC_PROFILE``, ``KRB5CCNAME``, ``KRB5RCACHEDIR``): the machine's
``/etc/krb5.conf`` is never used. scripts/test installs the Debian packages
(krb5-kdc, krb5-admin-server, krb5-user, libkrb5-dev).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REALM = "PYPOP.TEST"
TOOLS = ("kdb5_util", "kadmin.local", "krb5kdc", "kinit")


def missing_tools() -> list[str]:
    search = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [t for t in TOOLS if shutil.which(t, path=search) is None]


def _tool(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert found is not None, name
    return found


def _free_port() -> int:
    # TCP and UDP on the same number; the KDC binds both.
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port for the KDC")


@dataclass
class Realm:
    root: Path
    port: int
    env: dict[str, str]
    keytab: Path
    passwords: dict[str, str] = field(default_factory=dict)
    kdc: subprocess.Popen[bytes] | None = None

    def run(self, *args: str, stdin: str | None = None, extra: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            list(args),
            input=stdin.encode() if stdin is not None else None,
            env={**self.env, **(extra or {})},
            capture_output=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({result.returncode}): {result.stderr.decode(errors='replace')}"
            )
        return result.stdout.decode(errors="replace")

    def kadmin(self, query: str) -> str:
        return self.run(_tool("kadmin.local"), "-r", REALM, "-q", query)

    def add_user(self, name: str, password: str) -> None:
        self.kadmin(f"addprinc -pw {password} {name}")
        self.passwords[name] = password

    def kinit(self, name: str, *, lifetime: str | None = None) -> Path:
        """A credential cache of its own for ``name``; returns its path."""
        cache = self.root / f"cc_{name.replace('/', '_')}"
        args = [_tool("kinit")]
        if lifetime is not None:
            args += ["-l", lifetime]
        self.run(
            *args,
            name,
            stdin=self.passwords[name] + "\n",
            extra={"KRB5CCNAME": f"FILE:{cache}"},
        )
        return cache

    def stop(self) -> None:
        if self.kdc is not None and self.kdc.poll() is None:
            self.kdc.send_signal(signal.SIGTERM)
            try:
                self.kdc.wait(10)
            except subprocess.TimeoutExpired:
                self.kdc.kill()
                self.kdc.wait()
        if self.kdc is not None and self.kdc.stderr is not None:
            self.kdc.stderr.close()


def create_realm(root: Path, *, clockskew: int = 2) -> Realm:
    """The realm, its KDC running; service keys pop/localhost and pop/127.0.0.1 in
    ``realm.keytab``; users alice, bob and alice/admin; imap/localhost not in it."""
    port = _free_port()
    conf = root / "krb5.conf"
    conf.write_text(
        f"""[libdefaults]
    default_realm = {REALM}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    dns_canonicalize_hostname = false
    rdns = false
    udp_preference_limit = 1
    clockskew = {clockskew}
    forwardable = false

[realms]
    {REALM} = {{
        kdc = 127.0.0.1:{port}
    }}

[domain_realm]
    localhost = {REALM}
    127.0.0.1 = {REALM}
""",
        encoding="utf-8",
    )
    kdc_conf = root / "kdc.conf"
    kdc_conf.write_text(
        f"""[kdcdefaults]
    kdc_listen = 127.0.0.1:{port}
    kdc_tcp_listen = 127.0.0.1:{port}

[realms]
    {REALM} = {{
        database_name = {root}/principal
        key_stash_file = {root}/stash
        acl_file = {root}/kadm5.acl
        max_life = 1h
        max_renewable_life = 0
        supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
    }}

[logging]
    kdc = FILE:{root}/kdc.log
""",
        encoding="utf-8",
    )
    (root / "kadm5.acl").write_text("", encoding="utf-8")
    rcache = root / "rcache"
    rcache.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin",
        "KRB5_CONFIG": str(conf),
        "KRB5_KDC_PROFILE": str(kdc_conf),
        "KRB5RCACHEDIR": str(rcache),
        "KRB5CCNAME": f"FILE:{root}/cc_default",
        "KRB5_TRACE": str(root / "trace.log"),
    }
    realm = Realm(root, port, env, root / "pop.keytab")
    realm.run(_tool("kdb5_util"), "create", "-s", "-r", REALM, "-P", "master-password")
    for service in ("pop/localhost", "pop/127.0.0.1", "imap/localhost"):
        realm.kadmin(f"addprinc -randkey {service}")
    realm.kadmin(f"ktadd -k {realm.keytab} pop/localhost pop/127.0.0.1")
    realm.add_user("alice", "alice-password")
    realm.add_user("bob", "bob-password")
    realm.add_user("alice/admin", "admin-password")
    realm.kdc = subprocess.Popen(
        [_tool("krb5kdc"), "-n", "-r", REALM],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while True:
        if realm.kdc.poll() is not None:
            err = realm.kdc.stderr.read().decode(errors="replace") if realm.kdc.stderr else ""
            raise RuntimeError(f"krb5kdc exited: {err}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                realm.stop()
                raise RuntimeError("krb5kdc did not start listening") from None
            time.sleep(0.05)
    return realm
