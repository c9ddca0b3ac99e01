"""``pypop fetch`` as a user runs it (a subprocess) against a real ``pypop serve``:
rows as table/JSON/CSV, delivery to maildir and mbox, --keep/--new, exit codes, and
killing the process at random points without losing or duplicating mail."""

from __future__ import annotations

import json
import mailbox
import os
import random
import signal
import subprocess
import sys
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

from pypop.backends.memory import sample_message
from pypop.client import Client
from pypop.client.deliver import Maildir, StateFile

from . import popservers
from .fakeserver import FakeServer
from .popservers import PASSWORD, Certs, PopServer, corpus, pypop_server

BOB = [sample_message("bob", n, body_octets=2000) for n in range(1, 61)]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs.make(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def server(tmp_path: Path, certs: Certs) -> Iterator[PopServer]:
    srv = pypop_server(tmp_path / "srv", certs, {"alice": corpus(), "bob": BOB})
    yield srv
    srv.stop()


def fetch(
    *args: str, password: str = PASSWORD, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYPOP_PASSWORD=password)
    return subprocess.run(
        [sys.executable, "-m", "pypop", "fetch", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def message_ids(messages: list[bytes]) -> list[str]:
    out = []
    for m in messages:
        for line in m.split(b"\n"):
            if line.lower().startswith(b"message-id:"):
                out.append(line.split(b":", 1)[1].strip().decode())
    return out


def maildir_ids(path: Path) -> list[str]:
    return message_ids([p.read_bytes() for p in (path / "new").iterdir()])


def test_rows_table_json_csv(server: PopServer, certs: Certs) -> None:
    ca = ["--cafile", str(certs.ca_file)]
    table = fetch(server.url(), *ca, "--msg", "8,1")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["#", "UID", "Date", "(UTC)", "From", "Subject"]
    assert lines[1].split()[:4] == ["8", "0008", "2026-12-01", "14:00"]
    assert "Date in -0400" in lines[1]
    assert "Große Grüße" in lines[2]
    js = fetch(server.url(), *ca, "--json", "--uid", "0004,zzz")
    data = json.loads(js.stdout)
    assert data["unknown"] == {"messages": [], "uids": ["zzz"], "needs_utf8": []}
    [row] = data["rows"]
    assert row["Subject"].startswith("nested multiparts")
    assert row["Body"] is None  # headers only
    assert "not on the server: zzz" in js.stderr
    csv_run = fetch(server.url(), *ca, "--all", "--csv", "--msg", "2")
    assert csv_run.stdout.splitlines()[0].startswith("MessageNumber,UID,Date,")
    assert "Rechnung für März 2026.pdf" in csv_run.stdout


# Any sender chooses these: a clear-screen and cursor-home, an OSC 8 hyperlink, BEL,
# the 8-bit CSI and a right-to-left override, all through encoded words.
ESCAPES = (
    b"From: =?utf-8?q?Bank=1B]8;;http://evil.example/=1B=5C?= <bank@example.org>\r\n"
    b"Subject: =?utf-8?q?hi=1B[2J=1B[1;1Hall_fine=07=C2=9B_=E2=80=AEfdp.exe?=\r\n"
    b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <esc@example.org>\r\n\r\nx\r\n"
)


def test_the_table_does_not_pass_terminal_escapes_through(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # the From column is 30 wide then
    srv = pypop_server(tmp_path / "srv", certs, {"ivy": [ESCAPES]})
    try:
        table = fetch(srv.url("ivy"), "--cafile", str(certs.ca_file))
    finally:
        srv.stop()
    assert table.returncode == 0, table.stderr
    row = table.stdout.splitlines()[1]
    assert row.split(None, 4)[:4] == ["1", "0001", "2026-12-01", "10:00"]
    assert ' "Bank\ufffd]8;;http://evil.example/ hi' in row
    assert row.endswith(" hi\ufffd[2J\ufffd[1;1Hall fine\ufffd\ufffd \ufffdfdp.exe")
    assert not any(unicodedata.category(c) == "Cc" for c in table.stdout if c != "\n")


def test_server_text_in_errors_does_not_pass_terminal_escapes_through() -> None:
    fake = FakeServer({"USER": b"+OK\r\n", "PASS": b"-ERR [AUTH] \x1b[2Jno\x9b\r\n"})
    try:
        run = fetch(f"pop://u@127.0.0.1:{fake.port}")
    finally:
        fake.close()
    assert run.returncode == 3
    assert run.stderr == "pypop fetch: login failed: server said -ERR [AUTH] \ufffd[2Jno\ufffd\n"


def test_new_without_deliver_lists_each_message_once(
    server: PopServer, certs: Certs, tmp_path: Path
) -> None:
    args = [server.url(), "--cafile", str(certs.ca_file), "--new", "--json"]
    args += ["--state", str(tmp_path / "st")]
    first = fetch(*args, "--max-rows", "3")
    assert [r["MessageNumber"] for r in json.loads(first.stdout)["rows"]] == [1, 2, 3]
    second = fetch(*args)
    assert [r["MessageNumber"] for r in json.loads(second.stdout)["rows"]] == list(range(4, 13))
    assert fetch(*args).returncode == 1


def test_listing_with_new_does_not_count_as_delivered(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--new`` remembers the UIDs it listed; --deliver took the same state file for
    "delivered here" and deleted those messages on the server without a copy."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    mail = [sample_message("fay", n) for n in (1, 2)]
    srv = pypop_server(tmp_path / "srv", certs, {"fay": mail})
    args = [srv.url("fay"), "--cafile", str(certs.ca_file)]
    md = tmp_path / "Mail"
    try:
        listed = fetch(*args, "--new", "--json")  # the default state file, as a user would
        assert [r["UID"] for r in json.loads(listed.stdout)["rows"]] == ["0001", "0002"]
        got = fetch(*args, "--deliver", f"maildir:{md}", "--keep")
        assert got.returncode == 0, got.stderr
        assert "2 message(s)" in got.stderr
        assert sorted(maildir_ids(md)) == sorted(message_ids(mail))
        # --new still skips what was listed or delivered before.
        assert fetch(*args, "--new", "--json").returncode == 1
        done = fetch(*args, "--deliver", f"maildir:{md}")
        assert done.returncode == 1, done.stderr
        assert "0 message(s)" in done.stderr
        assert "2 deleted" in done.stderr
        assert sorted(maildir_ids(md)) == sorted(message_ids(mail))
    finally:
        srv.stop()


def test_exit_codes(server: PopServer, certs: Certs, tmp_path: Path) -> None:
    ca = ["--cafile", str(certs.ca_file)]
    assert fetch(server.url(), *ca, password="wrong").returncode == 3
    assert fetch(server.url()).returncode == 12  # certificate not trusted
    assert fetch("http://nope", *ca).returncode == 5
    assert fetch("pop://u@127.0.0.1:1", *ca, "--tls", "auto").returncode == 2
    empty = fetch(server.url(), *ca, "--msg", "99")
    assert empty.returncode == 1
    with Client(server.url("bob"), password=PASSWORD, cafile=certs.ca_file):
        locked = fetch(server.url("bob"), *ca)
        assert locked.returncode == 9, locked.stderr
        assert "[IN-USE]" in locked.stderr


def test_deliver_maildir_keep_new_then_delete(
    server: PopServer, certs: Certs, tmp_path: Path
) -> None:
    ca = ["--cafile", str(certs.ca_file)]
    md, state = tmp_path / "Mail", tmp_path / "state"
    deliver = ["--deliver", f"maildir:{md}", "--state", str(state)]
    first = fetch(server.url("bob"), *ca, *deliver, "--keep", "--new")
    assert first.returncode == 0, first.stderr
    assert "60 message(s)" in first.stderr
    assert sorted(maildir_ids(md)) == sorted(message_ids(BOB))
    delivered = {p.read_bytes() for p in (md / "new").iterdir()}
    assert delivered == {m.replace(b"\r\n", b"\n") for m in BOB}  # local line ends
    again = fetch(server.url("bob"), *ca, *deliver, "--keep", "--new")
    assert again.returncode == 1
    assert "already here" in again.stderr
    # Without --keep: nothing fetched twice, and the delivered ones are deleted.
    final = fetch(server.url("bob"), *ca, *deliver)
    assert final.returncode == 1
    assert "60 deleted" in final.stderr
    assert len(list((md / "new").iterdir())) == 60
    with Client(server.url("bob"), password=PASSWORD, cafile=certs.ca_file) as pop:
        assert pop.stat() == (0, 0)
    assert state.read_text() == "# pypop fetch UIDL state v1\n"


def test_a_reused_uid_is_delivered_not_deleted_unseen(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 1939 only says a server *should* never reuse a UID (a recreated mailbox, a
    restored backup, a UIDL made from a counter). The Maildir keeps the tags of mail
    delivered long ago; a new message under an old UID must be fetched, not taken
    for an interrupted delivery and deleted on the server without a local copy."""
    md, state = tmp_path / "Mail", tmp_path / "state"
    old = [sample_message("dave", n) for n in (1, 2)]
    first = pypop_server(tmp_path / "one", certs, {"dave": old})
    ports = iter([first.port, first.tls_port])
    args = [first.url("dave"), "--cafile", str(certs.ca_file)]
    args += ["--deliver", f"maildir:{md}", "--state", str(state)]
    try:
        run = fetch(*args)
        assert run.returncode == 0, run.stderr
    finally:
        first.stop()
    assert sorted(maildir_ids(md)) == sorted(message_ids(old))
    # The same account, its mailbox recreated: UID 0001 names another message now.
    monkeypatch.setattr(popservers, "free_port", lambda: next(ports))
    new = [sample_message("dave", 7)]
    second = pypop_server(tmp_path / "two", certs, {"dave": new})
    try:
        again = fetch(*args)
        assert again.returncode == 0, again.stderr
        assert "1 message(s)" in again.stderr
        assert sorted(maildir_ids(md)) == sorted(message_ids(old + new))
        with Client(second.url("dave"), password=PASSWORD, cafile=certs.ca_file) as pop:
            assert pop.stat() == (0, 0)
    finally:
        second.stop()


def test_a_delivery_begun_and_not_recorded_is_recovered_not_repeated(
    certs: Certs, tmp_path: Path
) -> None:
    """A run killed after the rename into new/ and before the state update: the next
    run finds the begun UID's tagged file, records it and deletes it on the server,
    and fetches only the other message."""
    md, state_path = tmp_path / "Mail", tmp_path / "state"
    mail = [sample_message("erin", n) for n in (1, 2)]
    srv = pypop_server(tmp_path / "srv", certs, {"erin": mail})
    try:
        account = f"erin@127.0.0.1:{srv.port}"
        state, maildir = StateFile(state_path), Maildir(md, account)
        state.begin(["0001"])
        maildir.deliver([("0001", mail[0])])
        maildir.close()
        state.close()  # killed here: "0001" never recorded
        args = [srv.url("erin"), "--cafile", str(certs.ca_file)]
        run = fetch(*args, "--deliver", f"maildir:{md}", "--state", str(state_path))
        assert run.returncode == 0, run.stderr
        assert "1 message(s)" in run.stderr
        assert "2 deleted" in run.stderr
        assert sorted(maildir_ids(md)) == sorted(message_ids(mail))
        with Client(srv.url("erin"), password=PASSWORD, cafile=certs.ca_file) as pop:
            assert pop.stat() == (0, 0)
    finally:
        srv.stop()


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
def test_uids_starting_with_a_hash_are_remembered(certs: Certs, tmp_path: Path, kind: str) -> None:
    """``#`` is a UIDL character like any in 0x21-0x7E (RFC 1939 §7); the state file
    took such lines for comments, so --keep --new delivered those messages again on
    every run."""
    mail = [sample_message("hash", n) for n in (1, 2)]
    seed = tmp_path / "srv" / "seed" / "hash"  # the memory backend's UIDs: file names
    seed.mkdir(parents=True)
    (seed / "#1.eml").write_bytes(mail[0])
    (seed / "plain.eml").write_bytes(mail[1])
    srv = pypop_server(tmp_path / "srv", certs, {"hash": []})
    target = tmp_path / ("Mail" if kind == "maildir" else "mbox")
    args = [srv.url("hash"), "--cafile", str(certs.ca_file), "--keep", "--new"]
    args += ["--deliver", f"{kind}:{target}", "--state", str(tmp_path / "state")]
    try:
        with Client(srv.url("hash"), password=PASSWORD, cafile=certs.ca_file) as pop:
            assert sorted(pop.uidl().values()) == ["#1", "plain"]
        first = fetch(*args)
        assert first.returncode == 0, first.stderr
        assert "2 message(s)" in first.stderr
        again = fetch(*args)
        assert again.returncode == 1, again.stderr
        assert "0 message(s)" in again.stderr
        if kind == "maildir":
            assert sorted(maildir_ids(target)) == sorted(message_ids(mail))
        else:
            box = mailbox.mbox(target)
            assert len(box) == 2
            box.close()
    finally:
        srv.stop()


def test_a_second_account_does_not_remove_a_delivery_in_flight(
    certs: Certs, tmp_path: Path
) -> None:
    """Two accounts delivering into one Maildir (each has its own state lock): the
    second's clean-up of tmp/ removed the first's files between write and rename, so
    that delivery failed. Only leftovers older than 36 hours (maildir(5)) go now."""
    md = tmp_path / "Mail"
    other = Maildir(md, "other@pop.example.org:995")
    in_flight = other._name("u1")
    other._write(in_flight, b"Subject: in flight\r\n\r\nx\r\n")
    stale = other._name("u0")
    other._write(stale, b"Subject: killed two days ago\r\n\r\nx\r\n")
    two_days_ago = time.time() - 2 * 86400
    os.utime(md / "tmp" / stale, (two_days_ago, two_days_ago))
    srv = pypop_server(tmp_path / "srv", certs, {"joe": [sample_message("joe", 1)]})
    try:
        run = fetch(srv.url("joe"), "--cafile", str(certs.ca_file), "--deliver", f"maildir:{md}")
        assert run.returncode == 0, run.stderr
    finally:
        srv.stop()
    assert sorted(os.listdir(md / "tmp")) == [in_flight]
    os.rename(md / "tmp" / in_flight, md / "new" / in_flight)  # the first one goes on
    other.close()
    assert len(os.listdir(md / "new")) == 2


def test_deliver_mbox(server: PopServer, certs: Certs, tmp_path: Path) -> None:
    box = tmp_path / "mbox"
    run = fetch(
        server.url(),
        "--cafile",
        str(certs.ca_file),
        "--deliver",
        f"mbox:{box}",
        "--state",
        str(tmp_path / "st"),
    )
    assert run.returncode == 0, run.stderr
    mbox = mailbox.mbox(box)
    try:
        assert len(mbox) == len(corpus())
        dots = next(m for m in mbox if m["Subject"] == "lines that start with dots")
        assert str(dots.get_payload()).startswith(".\n..\n.leading dot\n")
    finally:
        mbox.close()


def test_mbox_short_write_is_a_delivery_failure(certs: Certs, tmp_path: Path) -> None:
    """A file system that takes part of a write (full disk, quota, size limit) makes
    os.write return a short count; the rest of the message was dropped, the message
    recorded and deleted on the server. RLIMIT_FSIZE (SIGXFSZ ignored) gives the short
    write, then EFBIG."""
    import re
    import resource

    mail = [sample_message("gus", n, body_octets=2000) for n in (1, 2)]
    srv = pypop_server(tmp_path / "srv", certs, {"gus": mail})
    box = tmp_path / "mbox"
    limit = 4000  # the first message fits, the second only in part

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    def whole_messages() -> list[bytes]:
        data = box.read_bytes()
        return re.split(rb"(?m)^From MAILER-DAEMON [^\n]*\n", data)[1:]

    local = [m.replace(b"\r\n", b"\n") + b"\n" for m in mail]
    env = dict(os.environ, PYPOP_PASSWORD=PASSWORD, PYTHONDONTWRITEBYTECODE="1")
    args = [srv.url("gus"), "--cafile", str(certs.ca_file), "--deliver", f"mbox:{box}"]
    args += ["--state", str(tmp_path / "state")]
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pypop", "fetch", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            preexec_fn=small_files,
        )
        assert run.returncode == 10, run.stderr
        assert "delivery failed" in run.stderr
        with Client(srv.url("gus"), password=PASSWORD, cafile=certs.ca_file) as pop:
            assert pop.stat()[0] == 2  # nothing deleted
        assert whole_messages() == local[:1]  # the torn append is cut off
        rest = fetch(*args)
        assert rest.returncode == 0, rest.stderr
        assert whole_messages() == local
        with Client(srv.url("gus"), password=PASSWORD, cafile=certs.ca_file) as pop:
            assert pop.stat() == (0, 0)
    finally:
        srv.stop()


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
def test_killed_at_random_points_loses_nothing(
    server: PopServer, certs: Certs, tmp_path: Path, kind: str
) -> None:
    """SIGKILL ``pypop fetch`` at random moments, then let it finish: every message is
    delivered, the server is empty, and at most the in-flight message per kill
    duplicates (Maildir: none, its file names say what was delivered)."""
    rng = random.Random(int(os.environ.get("PYPOP_KILL_SEED", "0")) or None)
    target = tmp_path / ("Mail" if kind == "maildir" else "mbox")
    args = [
        server.url("bob"),
        "--cafile",
        str(certs.ca_file),
        "--deliver",
        f"{kind}:{target}",
        "--state",
        str(tmp_path / "state"),
        "--batch",
        "2",
    ]
    env = dict(os.environ, PYPOP_PASSWORD=PASSWORD)
    kills = 0
    for _ in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-m", "pypop", "fetch", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.3, 1.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(30)
        assert proc.stderr is not None
        proc.stderr.close()
        time.sleep(0.2)  # the server notices the dead connection and drops its lock
    for _ in range(20):
        done = fetch(*args)
        if done.returncode != 9:  # IN-USE while the server still holds a dead session
            break
        time.sleep(0.2)
    assert done.returncode in (0, 1), done.stderr
    if kind == "maildir":
        got = maildir_ids(target)
    else:
        box = mailbox.mbox(target)
        got = message_ids([m.as_bytes() for m in box])
        box.close()
    want = message_ids(BOB)
    assert set(got) == set(want)  # nothing lost
    duplicates = len(got) - len(set(got))
    assert duplicates <= (0 if kind == "maildir" else kills)
    with Client(server.url("bob"), password=PASSWORD, cafile=certs.ca_file) as pop:
        assert pop.stat() == (0, 0)


def test_utf8_when_offered_and_no_utf8(server: PopServer, certs: Certs) -> None:
    """RFC 6856: pypop fetch sends UTF8 when the server offers it, so message 5 (raw
    UTF-8 in From and Subject) comes out; with --no-utf8 the server refuses it with
    -ERR [UTF8], and fetch says so instead of calling it missing."""
    ca = ["--cafile", str(certs.ca_file)]
    js = fetch(server.url(), *ca, "--json", "--msg", "5")
    assert js.returncode == 0, js.stderr
    [row] = json.loads(js.stdout)["rows"]
    assert row["Subject"] == "Ünïcödé without encoded words"
    assert row["From"] == "Zoë Çelik <zoe@example.org>"
    legacy = fetch(server.url(), *ca, "--json", "--msg", "5,99", "--no-utf8")
    assert json.loads(legacy.stdout) == {
        "rows": [],
        "unknown": {"messages": [99], "uids": [], "needs_utf8": [5]},
    }
    assert legacy.stderr == (
        "pypop fetch: not on the server: 99\n"
        "pypop fetch: the server sends these only to a client that uses UTF8 "
        "(-ERR [UTF8], 8-bit headers; drop --no-utf8): 5\n"
    )
    assert legacy.returncode == 1  # no mail listed
