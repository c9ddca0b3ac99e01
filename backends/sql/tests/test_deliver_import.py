"""``pypop deliver`` and ``pypop import`` as an MTA and an admin run them (subprocesses).

Bytes and UIDLs are kept exactly; sysexits codes tell the MTA what to do.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import trio
from pypop.backend import Backend, NoSuchUser
from pypop.registry import create_backend
from pypop.testing import HARD_MESSAGES, expected_retr
from pypop.wire import wire_size

from pypop_sql._engine import crlf_form
from pypop_sql.testing import PgServer
from tests.helpers import open_engine, pypop, start_serve


async def _contents(backend: Backend, user: str) -> list[tuple[str, int, bytes]]:
    box = await backend.open_mailbox(user)
    try:
        out = []
        for i, info in enumerate(box.messages):
            data = b"".join([b async for b in box.retrieve(i)])
            out.append((info.uid, info.size, data))
        return out
    finally:
        await box.aclose()
        await backend.aclose()


def contents(url: str, user: str) -> list[tuple[str, int, bytes]]:
    return trio.run(_contents, create_backend("sql", {"url": url}), user)


def deliver(url: str, user: str, message: bytes, *extra: str) -> tuple[int, str, str]:
    r = pypop("deliver", "--backend", "sql", "-o", f"url={url}", "-u", user, "-v", *extra,
              stdin=message)  # fmt: skip
    return r.returncode, r.stdout.decode().strip(), r.stderr.decode().strip()


def test_deliver_keeps_bytes_and_reports_the_uidl(db_url: str) -> None:
    uids = []
    for message in HARD_MESSAGES.values():
        status, out, err = deliver(db_url, "alice", message)
        assert (status, err) == (0, "")
        uids.append(out)
    got = contents(db_url, "alice")
    assert [u for u, _, _ in got] == uids
    # Stored in CRLF form (README: Stored form); what RETR sends is checked below.
    assert [d for _, _, d in got] == [crlf_form(m) for m in HARD_MESSAGES.values()]
    assert [s for _, s, _ in got] == [wire_size(m) for m in HARD_MESSAGES.values()]


def test_delivered_mail_retrieved_exactly_through_a_server(db_url: str, tmp_path: Path) -> None:
    messages = list(HARD_MESSAGES.values())
    uids = [deliver(db_url, "alice", m)[1] for m in messages]
    server = start_serve(tmp_path, db_url, "retr")
    try:
        # UTF8 (RFC 6856): some of them have 8-bit headers, refused to other clients
        # (tests/test_policies.py).
        pop = server.login("alice", utf8=True)
        assert [line.split()[1].decode() for line in pop.uidl()[1]] == uids
        listed = [int(line.split()[1]) for line in pop.list()[1]]
        assert listed == [wire_size(m) for m in messages]
        for n, message in enumerate(messages, start=1):
            lines = pop.retr(n)[1]
            assert b"".join(line + b"\r\n" for line in lines) == expected_retr(message)
        pop.quit()
    finally:
        server.stop()


def test_deliver_large_message_in_chunks(db_url: str) -> None:
    big = b"Subject: big\r\n\r\n" + os.urandom(300_000).hex().encode() + b"\r\n"
    status, _, err = deliver(db_url, "alice", big)
    assert (status, err) == (0, "")
    [(_, size, data)] = contents(db_url, "alice")
    assert data == big  # already CRLF: stored as it is
    assert size == wire_size(big)


def test_deliver_exit_codes(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'mail.db'}"
    assert deliver(url, "alice", b"")[0] == 65  # EX_DATAERR: empty
    assert deliver(url, "alice", b"x" * 100, "--max-size", "99")[0] == 65
    status, _, err = deliver(url, "nobody", b"Subject: x\r\n\r\n", "-o", "autocreate=no")
    assert status == 67
    assert "no such mailbox" in err
    with open_engine(url) as e:
        e.deliver("carol", b"first", None, None)
    status, _, _ = deliver(url, "carol", b"Subject: x\r\n\r\n", "-o", "autocreate=no")
    assert status == 0  # an existing maildrop takes mail
    # autocreate=users: only users of the credential table get a maildrop.
    conn = sqlite3.connect(tmp_path / "mail.db")
    conn.execute("INSERT INTO users (name, password) VALUES ('dave', '{PLAIN}x')")
    conn.commit()
    conn.close()
    assert deliver(url, "dave", b"Subject: x\r\n\r\n", "-o", "autocreate=users")[0] == 0
    assert deliver(url, "erin", b"Subject: x\r\n\r\n", "-o", "autocreate=users")[0] == 67
    # Misconfiguration: EX_CONFIG (Postfix defers, the mail is kept).
    r = pypop("deliver", "--backend", "sql", "-o", "url=mysql://x", "-u", "a", stdin=b"x")
    assert r.returncode == 78
    assert b"url" in r.stderr
    r = pypop("deliver", "--backend", "memory", "-u", "a", stdin=b"x")
    assert r.returncode == 78
    assert b"does not take deliveries" in r.stderr


def test_deliver_to_a_name_that_is_not_utf8_bounces(db_url: str) -> None:
    """An MTA passes the recipient's local part as it came: octets that are not UTF-8
    (here Latin-1 e-acute) reach ``-u`` as a lone surrogate, which neither database
    can store. That was EX_CONFIG (78: Postfix defers and retries for days, the
    mail sits in its queue) from a UnicodeEncodeError; it is no such mailbox (67)."""
    status, out, err = deliver(db_url, "al\udce9", b"Subject: x\r\n\r\nbody\r\n")
    assert (status, out) == (67, "")
    # (pypop deliver refuses it first, as PRECIS does; the engine's own check below)
    assert err == "pypop deliver: 'al\\udce9': no such user", err
    assert "codec" not in err
    assert deliver(db_url, "al\u00e9", b"Subject: x\r\n\r\nbody\r\n")[0] == 0  # UTF-8 is fine

    async def direct() -> None:  # a caller that prepares no name (pypop import, the API)
        backend = create_backend("sql", {"url": db_url})
        try:
            with pytest.raises(NoSuchUser, match="no such mailbox"):
                await backend.deliver("al\udce9", b"Subject: x\r\n\r\nbody\r\n")  # type: ignore[attr-defined]
        finally:
            await backend.aclose()

    trio.run(direct)


def test_deliver_while_sqlite_is_locked_is_tempfail(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'mail.db'}"
    assert deliver(url, "alice", b"Subject: 1\r\n\r\n")[0] == 0
    writer = sqlite3.connect(tmp_path / "mail.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another writer holds the database
    try:
        status, _, err = deliver(url, "alice", b"Subject: 2\r\n\r\n", "-o", "busy_timeout=0.2")
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert status == 75
    assert "locked" in err
    assert deliver(url, "alice", b"Subject: 2\r\n\r\n")[0] == 0
    assert len(contents(url, "alice")) == 2


def test_deliver_while_postgresql_is_down_is_tempfail(pg_server: PgServer) -> None:
    # A server of its own, to stop and start again.
    with PgServer() as pg:
        url = pg.create_database()
        assert deliver(url, "alice", b"Subject: 1\r\n\r\n")[0] == 0
        pg.stop()
        status, out, err = deliver(url, "alice", b"Subject: 2\r\n\r\n")
        assert (status, out) == (75, "")
        assert "cannot connect" in err
        assert "Traceback" not in err
        pg.restart()
        assert deliver(url, "alice", b"Subject: 2\r\n\r\n")[0] == 0  # the MTA's retry
        assert [d for _, _, d in contents(url, "alice")] == [
            b"Subject: 1\r\n\r\n",
            b"Subject: 2\r\n\r\n",
        ]


def _maildir(root: Path, user: str, files: dict[str, bytes]) -> Path:
    md = root / user
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (md / name).write_bytes(data)
    return md


async def _maildir_view(root: Path, user: str) -> list[tuple[str, int, bytes]]:
    backend = create_backend("maildir", {"root": str(root), "flag_updates": False})
    return await _contents(backend, user)


def test_import_maildir_tree_keeps_uidls_and_bytes(db_url: str, tmp_path: Path) -> None:
    root = tmp_path / "mail"
    messages = list(HARD_MESSAGES.values())
    files = {f"cur/17000000{i:02d}.M{i}P7.host,S={len(m)}:2,S": m for i, m in enumerate(messages)}
    files["new/1800000000.M1P1.host"] = b"Subject: new\n\nnew mail\n"
    files["new/1800000001.weird name"] = b"Subject: odd\n\nmapped UIDL\n"  # space: mapped
    _maildir(root, "alice", files)
    _maildir(root, "bob", {"cur/1700000000.M1P1.h:2,": b"Subject: bob\r\n\r\nhi\r\n"})
    (root / "not-a-maildir").mkdir()
    expected = {
        u: [(uid, size, crlf_form(data)) for uid, size, data in trio.run(_maildir_view, root, u)]
        for u in ("alice", "bob")
    }

    r = pypop("import", "--backend", "sql", "-o", f"url={db_url}", "--maildir-root", str(root))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines() == [
        f"alice: {len(files)} imported, 0 already there",
        "bob: 1 imported, 0 already there",
    ]
    for user in ("alice", "bob"):
        assert contents(db_url, user) == expected[user]
    # The source is untouched: no file renamed, no cache written.
    assert sorted(p.name for p in (root / "alice" / "new").iterdir()) == sorted(
        n.split("/", 1)[1] for n in files if n.startswith("new/")
    )
    # Run again: nothing twice.
    r = pypop("import", "--backend", "sql", "-o", f"url={db_url}", "--maildir-root", str(root))
    assert r.stdout.decode().splitlines()[1] == "bob: 0 imported, 1 already there"
    assert len(contents(db_url, "bob")) == 1


def test_import_one_maildir_into_another_user(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'mail.db'}"
    md = _maildir(tmp_path / "src", "Maildir", {"cur/1.M1P1.h:2,": b"Subject: a\n\nb\n"})
    r = pypop("import", "--backend", "sql", "-o", f"url={url}", "--maildir", str(md), "-u", "zoe")
    assert r.returncode == 0, r.stderr
    assert contents(url, "zoe") == [
        ("1.M1P1.h", wire_size(b"Subject: a\n\nb\n"), b"Subject: a\r\n\r\nb\r\n")
    ]
    r = pypop("import", "--backend", "sql", "-o", f"url={url}", "--maildir", str(md))
    assert r.returncode == 64  # EX_USAGE: --maildir needs --user


def test_import_mbox(db_url: str, tmp_path: Path) -> None:
    mbox = tmp_path / "inbox"
    mbox.write_bytes(
        b"From alice@example.org Thu Jan  1 00:00:00 2026\n"
        b"X-UIDL: kept-uidl-1\nSubject: one\n\n>From the body\n.dot\n\n"
        b"From bob@example.org Thu Jan  1 00:01:00 2026\n"
        b"Subject: two\n\nno uidl\n\n"
        b"From bob@example.org Thu Jan  1 00:02:00 2026\n"
        b"X-UIDL: kept-uidl-1\nSubject: three\n\nduplicate X-UIDL\n"
    )
    r = pypop("import", "--backend", "sql", "-o", f"url={db_url}", "--mbox", str(mbox), "-u", "al")
    assert r.returncode == 0, r.stderr
    got = contents(db_url, "al")
    # The empty line before the next "From " is the separator, not the message's.
    assert [d for _, _, d in got] == [
        crlf_form(b"X-UIDL: kept-uidl-1\nSubject: one\n\n>From the body\n.dot\n"),
        crlf_form(b"Subject: two\n\nno uidl\n"),
        crlf_form(b"X-UIDL: kept-uidl-1\nSubject: three\n\nduplicate X-UIDL\n"),
    ]
    assert got[0][0] == "kept-uidl-1"
    assert len({u for u, _, _ in got}) == 3
    with open_engine(db_url) as e:
        if e.kind == "sqlite":
            conn = sqlite3.connect(e.config.path)
            times = [t for (t,) in conn.execute("SELECT received FROM messages ORDER BY id")]
            conn.close()
            assert times == [1767225600.0, 1767225660.0, 1767225720.0]


def test_import_needs_a_source(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'mail.db'}"
    r = pypop("import", "--backend", "sql", "-o", f"url={url}", "--mbox", "/nonexistent", "-u", "a")
    assert r.returncode == 66  # EX_NOINPUT


@pytest.mark.parametrize("engine", ["sqlite"])
def test_deliver_through_a_config_file(tmp_path: Path, engine: str) -> None:
    conf = tmp_path / "pypop.toml"
    conf.write_text(f'[backend]\nname = "sql"\nurl = "sqlite://{tmp_path / "m.db"}"\n')
    r = pypop("deliver", "-c", str(conf), "-u", "alice", stdin=b"Subject: c\r\n\r\n")
    assert r.returncode == 0, r.stderr
    assert len(contents(f"sqlite://{tmp_path / 'm.db'}", "alice")) == 1
