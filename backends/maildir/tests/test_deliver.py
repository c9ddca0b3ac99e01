"""MaildirBackend as a pypop.backend.Deliverer (pypop deliver / pypop import)."""

from __future__ import annotations

import os
import poplib
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from pypop.backend import Deliverer
from pypop.errors import DuplicateUid, NoSuchUser
from pypop.wire import wire_size

from pypop_maildir import create

from .conftest import HARD_CASES


async def _served(root: Path, user: str) -> list[tuple[str, int, bytes]]:
    backend = create({"root": str(root), "flag_updates": False})
    box = await backend.open_mailbox(user)
    try:
        out = []
        for i, m in enumerate(box.messages):
            out.append((m.uid, m.size, b"".join([b async for b in box.retrieve(i)])))
        return out
    finally:
        await box.aclose()


async def test_deliver_writes_new_and_keeps_bytes(tmp_path: Path) -> None:
    backend = create({"root": str(tmp_path)})
    assert isinstance(backend, Deliverer)
    uids = [await backend.deliver("alice", data) for data in HARD_CASES.values()]
    assert len(set(uids)) == len(uids)
    names = sorted(os.listdir(tmp_path / "alice" / "new"))
    assert len(names) == len(HARD_CASES)
    assert os.listdir(tmp_path / "alice" / "tmp") == []  # nothing left behind
    served = await _served(tmp_path, "alice")
    assert [u for u, _, _ in served] == uids  # delivery order, the UIDL deliver said
    assert [d for _, _, d in served] == list(HARD_CASES.values())
    assert [s for _, s, _ in served] == [wire_size(d) for d in HARD_CASES.values()]
    for name in names:  # Dovecot-style S= and W= sizes in the name
        data = (tmp_path / "alice" / "new" / name).read_bytes()
        assert f",S={len(data)},W={wire_size(data)}" in name


async def test_deliver_with_uid_and_time(tmp_path: Path) -> None:
    backend = create({"root": str(tmp_path)})
    assert await backend.deliver("bob", b"Subject: a\n\n", uid="kept.1", received=1.7e9) == "kept.1"
    assert (tmp_path / "bob" / "new" / "kept.1").stat().st_mtime == 1.7e9
    with pytest.raises(DuplicateUid):
        await backend.deliver("bob", b"again", uid="kept.1")
    with pytest.raises(ValueError, match="file name"):
        await backend.deliver("bob", b"x", uid="a/b")
    assert [u for u, _, _ in await _served(tmp_path, "bob")] == ["kept.1"]


async def test_deliver_unknown_or_unsafe_user(tmp_path: Path) -> None:
    backend = create({"root": str(tmp_path), "autocreate": False})
    with pytest.raises(NoSuchUser):
        await backend.deliver("nobody", b"x")
    with pytest.raises(NoSuchUser):
        await backend.deliver("../etc", b"x")
    assert os.listdir(tmp_path) == []


def test_pypop_deliver_into_maildir(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pypop", "deliver", "--backend", "maildir",
         "-o", f"root={tmp_path}", "-u", "carol", "-v"],
        input=b"Subject: via cli\n\nhello\n", capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    [name] = os.listdir(tmp_path / "carol" / "new")
    assert r.stdout.decode().strip() == name
    assert (tmp_path / "carol" / "new" / name).read_bytes() == b"Subject: via cli\n\nhello\n"


def _import(root: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "pypop", "import", "--backend", "maildir",
         "-o", f"root={root}", *args],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip


def test_import_goes_on_past_a_uidl_that_cannot_be_a_file_name(tmp_path: Path) -> None:
    # A Maildir migrated from a host with a long name: a base name over 70 octets is
    # served with a mapped UIDL ("pypop/..."), which holds a slash. And an X-UIDL
    # header in an mbox is whatever a sender wrote. Neither may stop the import.
    long_name = "1700000000.M1P1." + "h" * 80 + ",S=13"
    src = tmp_path / "src" / "bob"
    for d in ("cur", "new", "tmp"):
        (src / d).mkdir(parents=True)
    (src / "cur" / f"{long_name}:2,S").write_bytes(b"Subject: a\n\nA\n")
    (src / "cur" / "1700000001.M1P1.host:2,S").write_bytes(b"Subject: b\n\nB\n")
    dst = tmp_path / "dst"
    dst.mkdir()
    r = _import(dst, "--maildir-root", str(tmp_path / "src"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"bob: 2 imported, 0 already there\n"
    assert r.stderr == (
        b"pypop import: bob: message 1: its UIDL cannot be kept here (UIDL '"
        + trio.run(_served, tmp_path / "src", "bob")[0][0].encode()
        + b"' cannot be a maildir file name): stored with a new UIDL\n"
    )
    served = trio.run(_served, dst, "bob")
    # (The message under a new UIDL is named after now, so it is listed last.)
    assert [d for _, _, d in served] == [b"Subject: b\n\nB\n", b"Subject: a\n\nA\n"]
    assert served[0][0] == "1700000001.M1P1.host"

    mbox = tmp_path / "inbox"
    mbox.write_bytes(
        b"From a@example.org Thu Jan  1 00:00:00 2026\nX-UIDL: a/b\nSubject: 1\n\none\n\n"
        b"From a@example.org Thu Jan  1 00:01:00 2026\nX-UIDL: kept\nSubject: 2\n\ntwo\n"
    )
    r = _import(dst, "--mbox", str(mbox), "-u", "al")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"al: 2 imported, 0 already there\n"
    assert r.stderr == (
        b"pypop import: al: message 1: its UIDL cannot be kept here "
        b"(UIDL 'a/b' cannot be a maildir file name): stored with a new UIDL\n"
    )
    served = trio.run(_served, dst, "al")
    assert sorted(d for _, _, d in served) == [
        b"X-UIDL: a/b\nSubject: 1\n\none\n",
        b"X-UIDL: kept\nSubject: 2\n\ntwo\n",
    ]
    assert "kept" in [u for u, _, _ in served]


def test_a_kept_uidl_never_states_a_false_size(tmp_path: Path) -> None:
    # The UIDL becomes the file name, and a ",W=" in a file name is the POP3 size
    # LIST reports without reading the file: a sender's "X-UIDL: x,W=1" made a
    # 40-octet message list as 1 octet (a client that trusts LIST reads short).
    backend = create({"root": str(tmp_path)})
    data = b"Subject: a\n\nhello\n"
    with pytest.raises(ValueError, match="size"):
        trio.run(lambda: backend.deliver("al", data, uid="x,W=1"))
    assert not (tmp_path / "al").exists()  # refused before anything is written
    # A true one, as a Dovecot maildir being migrated has, is kept.
    right = f"1.M1P1.host,S={len(data)},W={wire_size(data)}"
    assert trio.run(lambda: backend.deliver("al", data, uid=right)) == right

    mbox = tmp_path / "inbox"
    mbox.write_bytes(b"From a@example.org Thu Jan  1 00:00:00 2026\nX-UIDL: x,W=1\n\nbody\n")
    r = _import(tmp_path, "--mbox", str(mbox), "-u", "bob")
    assert r.returncode == 0, r.stderr
    [(uid, size, got)] = trio.run(_served, tmp_path, "bob")
    assert got == b"X-UIDL: x,W=1\n\nbody\n"
    assert size == wire_size(got) == 23
    assert uid != "x,W=1"


async def test_deliver_uses_the_name_a_login_opens(tmp_path: Path) -> None:
    # A login's name is prepared with PRECIS (RFC 8265: NFC, full-width letters made
    # narrow) before the maildrop is opened. The MTA's recipient must be too: mail
    # for "jose" + U+0301 was stored exit 0 in a maildir that no login reaches.
    from pypop.auth import MemoryCredentialStore
    from pypop.config import ServerConfig
    from pypop.server import Server, serve

    def deliver_cli(user: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "pypop", "deliver", "--backend", "maildir",
             "-o", f"root={tmp_path}", "-u", user],
            input=data, capture_output=True, timeout=60, check=False,
        )  # fmt: skip

    r = await trio.to_thread.run_sync(deliver_cli, "jose\u0301", b"Subject: 1\n\nNFD\n")
    assert (r.returncode, r.stderr) == (0, b"")
    r = await trio.to_thread.run_sync(deliver_cli, "\uff4aose\u0301", b"Subject: 2\n\nwide\n")
    assert (r.returncode, r.stderr) == (0, b"")
    # A name no login can ever use bounces (EX_NOUSER), no maildir is made for it.
    r = await trio.to_thread.run_sync(deliver_cli, "a b", b"Subject: 3\n\nspace\n")
    assert (r.returncode, r.stderr) == (67, b"pypop deliver: 'a b': no such user\n")
    assert sorted(os.listdir(tmp_path)) == ["jos\u00e9"]

    config = ServerConfig(listen=[("127.0.0.1", 0)], auth_failure_delay=0.0,
                          auth_penalty_max=0.0, shutdown_timeout=5.0)  # fmt: skip
    store = MemoryCredentialStore({"jos\u00e9": "pw-of-jose"})
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            lambda task_status: serve(
                config,
                backend=create({"root": str(tmp_path)}),
                store=store,
                task_status=task_status,
            )
        )
        host, port = server.addresses[0]

        def session() -> list[bytes]:
            pop = poplib.POP3(host, port, timeout=30)
            try:
                pop.utf8()
                pop.user("jos\u00e9")
                pop.pass_("pw-of-jose")
                bodies = [b"\n".join(pop.retr(i + 1)[1]) for i in range(pop.stat()[0])]
                pop.quit()
                return bodies
            finally:
                pop.close()

        try:
            bodies = await trio.to_thread.run_sync(session)
        finally:
            server.shutdown()
    assert bodies == [b"Subject: 1\n\nNFD", b"Subject: 2\n\nwide"]


def test_a_recipient_too_long_for_a_path_bounces(tmp_path: Path) -> None:
    # 300 octets make a path component the file system refuses (ENAMETOOLONG): that
    # never gets better, yet it was EX_TEMPFAIL, and the MTA retried for days.
    r = subprocess.run(
        [sys.executable, "-m", "pypop", "deliver", "--backend", "maildir",
         "-o", f"root={tmp_path}", "-u", "a" * 300],
        input=b"Subject: x\n\nx\n", capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 67  # EX_NOUSER
    assert r.stderr == b"pypop deliver: " + b"a" * 300 + b": user name too long for a maildir\n"
    assert os.listdir(tmp_path) == []


def test_import_uses_the_name_a_login_opens(tmp_path: Path) -> None:
    # As pypop deliver (test above): a login's name is prepared with PRECIS, so an
    # import for "jose" + U+0301, or of a folder so named, must land in "jos\u00e9"'s
    # maildrop; a folder whose name no login can use is reported, the rest imported.
    src = tmp_path / "src"
    for user in ("jose\u0301", "a b", "carol"):
        for d in ("cur", "new", "tmp"):
            (src / user / d).mkdir(parents=True)
        (src / user / "cur" / "1700000000.M1P1.host:2,S").write_bytes(b"Subject: x\n\nx\n")
    dest = tmp_path / "dest"
    dest.mkdir()
    r = _import(dest, "--maildir-root", str(src))
    assert r.returncode == 67, r.stderr
    assert r.stderr == b"pypop import: 'a b': not a name a login can use: not imported\n"
    assert sorted(r.stdout.decode().splitlines()) == [
        "carol: 1 imported, 0 already there",
        "jos\u00e9: 1 imported, 0 already there",
    ]
    assert sorted(os.listdir(dest)) == ["carol", "jos\u00e9"]

    mbox = tmp_path / "in.mbox"
    mbox.write_bytes(b"From a@b Thu Jan  1 00:00:00 2026\nSubject: m\n\nm\n")
    r = _import(dest, "--mbox", str(mbox), "--user", "\uff4aose\u0301")
    assert (r.returncode, r.stdout) == (0, "jos\u00e9: 1 imported, 0 already there\n".encode())
    assert sorted(os.listdir(dest)) == ["carol", "jos\u00e9"]
    r = _import(dest, "--mbox", str(mbox), "--user", "a b")
    assert (r.returncode, r.stderr) == (67, b"pypop import: 'a b': not a name a login can use\n")
