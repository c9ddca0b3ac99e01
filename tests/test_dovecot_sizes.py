"""LIST and STAT sizes: pypop against a real Dovecot POP3 server, on the same mail.

One run starts Dovecot (``dovecot-pop3d``, installed by ``benches/setup.sh``, which
``scripts/test`` calls) with a throwaway config on 127.0.0.1, and pypop with the
maildir and the memory backends, over copies of one maildir. A real client (stdlib
``poplib``) reads STAT, LIST, UIDL and every RETR from all three.

The rule (docs/wire.md): the size is the message as stored with line ends made CRLF;
the CRLF a server adds before the terminator to a message without a final line end is
not counted. Dovecot counts so, and so must pypop. The one deliberate difference is a
bare CR: pypop sends it as CRLF and counts 2, Dovecot sends it as is and counts 1.
"""

from __future__ import annotations

import os
import poplib
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from pypop.auth import MemoryCredentialStore
from pypop.backend import Backend
from pypop.backends.memory import MemoryBackend
from pypop.config import ServerConfig
from pypop.server import Server, serve

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
USER = "alice"
PASSWORD = "sizes-password"

# Stored messages (as a maildir file holds them) and their size under the rule. Each
# name says what it exercises; the base name of the maildir file is the UIDL on both
# servers (pop3_uidl_format = %f), so the comparison does not depend on order.
MESSAGES: dict[str, tuple[bytes, int]] = {
    "crlf": (b"Subject: crlf\r\n\r\nline one\r\n", 27),
    "no-final-newline": (b"Subject: nofinal\r\n\r\nlast line", 29),
    "lf": (b"Subject: lf\n\nline one\nline two\n", 35),
    "lf-no-final-newline": (b"Subject: lf nofinal\n\nline one\nlast line", 42),
    "just-dot": (b".", 1),
    "dots-no-final-newline": (b"Subject: dots\n\n.one\n..two\n.", 31),
    "mixed-no-final-newline": (b"Subject: mixed\r\n\nline\r\nlast", 28),
}
# The deliberate difference: pypop counts each bare CR as a CRLF line end.
BARE_CR = (b"Subject: cr\r\n\r\na\rb\r\n", 21, 20)  # (message, pypop, Dovecot)

# Before this rule, pypop listed a message without a final line end 2 octets larger.
OLD_RULE_EXTRA = {
    name: 2 if data and not data.endswith((b"\n", b"\r")) else 0
    for name, (data, _size) in MESSAGES.items()
}


def _dovecot_usable() -> str | None:
    if not Path("/usr/lib/dovecot/pop3").exists() or not Path(DOVECOT).exists():
        return "dovecot-pop3d is not installed (benches/setup.sh installs it)"
    if os.geteuid() != 0:
        return "Dovecot needs root to start its services"
    try:
        for name in ("dovecot", "dovenull", "nobody"):
            pwd.getpwnam(name)
    except KeyError as exc:
        return f"account missing: {exc}"
    return None


_REASON = _dovecot_usable()
if _REASON is not None and os.environ.get("PYPOP_REQUIRE_DOVECOT") == "1":
    pytest.fail(f"PYPOP_REQUIRE_DOVECOT=1 but {_REASON}", pytrace=False)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _file_name(i: int, name: str) -> str:
    return f"{1700000000 + i}.M{i}P1.{name}:2,"


def _uidl(i: int, name: str) -> str:
    return _file_name(i, name).split(":", 1)[0]


def _write_maildir(root: Path, messages: dict[str, bytes]) -> None:
    box = root / USER
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True)
    for i, (name, data) in enumerate(messages.items(), 1):
        (box / "cur" / _file_name(i, name)).write_bytes(data)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Dovecot:
    port: int
    log: Path


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not under pytest's tmp_path: its parent is 0700, and Dovecot's mail process runs
    # as nobody and must reach the maildir.
    path = Path(tempfile.mkdtemp(prefix="pypop-dovecot-sizes-"))
    os.chmod(path, 0o755)  # noqa: S103 (Dovecot's unprivileged processes read it)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _start_dovecot(work: Path, mail: Path) -> tuple[subprocess.Popen[bytes], Dovecot]:
    nobody = pwd.getpwnam("nobody")
    for d in ("run", "state"):
        (work / d).mkdir(parents=True)
    passwd = work / "passwd"
    passwd.write_text(f"{USER}:{{PLAIN}}{PASSWORD}::::::\n")
    os.chmod(passwd, 0o644)
    for dirpath, _dirs, files in os.walk(mail):
        os.chown(dirpath, nobody.pw_uid, nobody.pw_gid)
        for f in files:
            os.chown(os.path.join(dirpath, f), nobody.pw_uid, nobody.pw_gid)
    port = _free_port()
    log = work / "dovecot.log"
    conf = work / "dovecot.conf"
    conf.write_text(
        f"""# Throwaway config written by tests/test_dovecot_sizes.py
base_dir = {work}/run
state_dir = {work}/state
instance_name = pypop-sizes-{port}
log_path = {log}
info_log_path = {log}
protocols = pop3
listen = 127.0.0.1
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:{mail}/%u
mail_uid = {nobody.pw_uid}
mail_gid = {nobody.pw_gid}
first_valid_uid = 1
first_valid_gid = 1
disable_plaintext_auth = no
auth_mechanisms = plain
ssl = no
pop3_uidl_format = %f
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = uid={nobody.pw_uid} gid={nobody.pw_gid} home={mail}/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""
    )
    proc = subprocess.Popen(
        [DOVECOT, "-F", "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"dovecot exited with {proc.returncode}: {_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(512).startswith(b"+OK"):
                    return proc, Dovecot(port, log)
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"dovecot did not answer on {port}: {_tail(log)}")
        time.sleep(0.1)


def _tail(log: Path) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@dataclass
class Seen:
    stat: tuple[int, int]
    sizes: dict[str, int]  # UIDL -> LIST size
    retr: dict[str, bytes]  # UIDL -> what the client reassembles from RETR


# Not fetched: Dovecot 2.3 does not dot-stuff the first line of a message, so a
# message that is just "." reaches the client as an early terminator (pypop stuffs it:
# tests/test_wire.py). Its size is compared all the same.
NO_RETR = ("just-dot",)


def _read(port: int) -> Seen:
    pop = poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        pop.user(USER)
        pop.pass_(PASSWORD)
        stat = pop.stat()
        sizes = dict(line.decode().split() for line in pop.list()[1])
        uidls = dict(line.decode().split() for line in pop.uidl()[1])
        retr = {
            uid: b"".join(line + b"\r\n" for line in pop.retr(int(n))[1])
            for n, uid in uidls.items()
            if not uid.endswith(NO_RETR)
        }
        pop.quit()
    finally:
        pop.close()
    return Seen(stat, {uidls[n]: int(s) for n, s in sizes.items()}, retr)


@asynccontextmanager
async def _pypop(backend: Backend) -> AsyncIterator[int]:
    config = ServerConfig(
        listen=[("127.0.0.1", 0)],
        auth_failure_delay=0.0,
        auth_penalty_max=0.0,
        shutdown_timeout=5.0,
    )
    store = MemoryCredentialStore({USER: PASSWORD})
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            lambda task_status: serve(config, backend=backend, store=store, task_status=task_status)
        )
        try:
            yield server.addresses[0][1]
        finally:
            server.shutdown()


async def test_list_and_stat_sizes_match_dovecot(workdir: Path) -> None:
    from pypop_maildir import create as maildir_backend

    stored = {name: data for name, (data, _size) in MESSAGES.items()}
    stored["bare-cr"] = BARE_CR[0]
    _write_maildir(workdir / "mail-dovecot", stored)
    _write_maildir(workdir / "mail-pypop", stored)
    memory = MemoryBackend()
    for i, (name, data) in enumerate(stored.items(), 1):
        memory.deliver(USER, data, uid=_uidl(i, name))

    proc, dovecot = _start_dovecot(workdir / "dovecot", workdir / "mail-dovecot")
    try:
        seen = {"dovecot": await trio.to_thread.run_sync(_read, dovecot.port)}
    finally:
        _stop(proc)
    backends: list[tuple[str, Backend]] = [
        ("pypop-maildir", maildir_backend({"root": str(workdir / "mail-pypop")})),
        ("pypop-memory", memory),
    ]
    for label, backend in backends:
        async with _pypop(backend) as port:
            seen[label] = await trio.to_thread.run_sync(_read, port)
        await backend.aclose()

    uid = {name: _uidl(i, name) for i, name in enumerate(stored, 1)}
    want = {uid[name]: size for name, (_data, size) in MESSAGES.items()}
    cr_pypop, cr_dovecot = BARE_CR[1], BARE_CR[2]
    report = {name: {label: s.sizes[uid[name]] for label, s in seen.items()} for name in stored}
    print("LIST sizes by server (the old pypop rule added 2 for no final line end):")
    for name, by in report.items():
        old = (dict(MESSAGES).get(name, (b"", cr_pypop))[1]) + OLD_RULE_EXTRA.get(name, 0)
        print(f"  {name:24} {by}  old rule: {old}")

    # Dovecot counts exactly by the rule, message by message ...
    assert {u: s for u, s in seen["dovecot"].sizes.items() if u != uid["bare-cr"]} == want
    assert seen["dovecot"].sizes[uid["bare-cr"]] == cr_dovecot
    n = len(stored)
    total = sum(want.values())
    assert seen["dovecot"].stat == (n, total + cr_dovecot)
    for label in ("pypop-maildir", "pypop-memory"):
        s = seen[label]
        # ... and pypop lists and states the same, except the bare CR (one octet more).
        assert {u: z for u, z in s.sizes.items() if u != uid["bare-cr"]} == want, label
        assert s.sizes[uid["bare-cr"]] == cr_pypop == cr_dovecot + 1, label
        assert s.stat == (n, total + cr_pypop), label
        # The same octets reach the client: CRLF line ends and, for a message without
        # a final line end, the same added CRLF, from both servers.
        for name in MESSAGES.keys() - set(NO_RETR):
            assert s.retr[uid[name]] == seen["dovecot"].retr[uid[name]], (label, name)
        assert s.retr[uid["bare-cr"]] == b"Subject: cr\r\n\r\na\r\nb\r\n", label
    assert seen["dovecot"].retr[uid["bare-cr"]] == b"Subject: cr\r\n\r\na\rb\r\n"
    # RETR gives the listed size, plus 2 for a message without a final line end.
    for name, (_data, size) in MESSAGES.items():
        if name not in NO_RETR:
            assert len(seen["dovecot"].retr[uid[name]]) == size + OLD_RULE_EXTRA[name], name
