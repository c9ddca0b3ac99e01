"""Per-user maildrop locations (pypop.backend.Account), arrival times for EXPIRE, and
the expire_days option."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pypop.backend import Account
from pypop.errors import AuthFailed, PermanentFailure

from pypop_maildir import create
from pypop_maildir._config import UnsafeUser, location_path
from pypop_maildir._store import NotAFolder, list_messages

from .conftest import deliver, make_maildir


def test_location_path() -> None:
    assert location_path("maildir:~/Mail:LAYOUT=fs", "/home/a", "a", "Maildir") == "/home/a/Mail"
    assert location_path(None, "/home/a/", "a", "Maildir") == "/home/a/Maildir"
    assert location_path("/srv/%d/%n", None, "bob@example.org", "M") == "/srv/example.org/bob"
    assert location_path("maildir:/srv/100%%/%u", None, "x", "M") == "/srv/100%/x"
    for mail, home, why in [
        ("mbox:~/mail", "/h", "driver 'mbox'"),
        ("maildir:~/M", None, "no home"),
        ("Mail", None, "not an absolute path"),
        (None, None, "no mail location and no home"),
    ]:
        with pytest.raises(ValueError, match=why):
            location_path(mail, home, "a", "Maildir")
    with pytest.raises(UnsafeUser):
        location_path("/srv/%u", None, "../root", "M")


async def test_open_account_and_received(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    home = tmp_path / "home" / "alice"
    maildir = make_maildir(home / "Mail")
    deliver(maildir, "1700000000.M1P1.host", b"Subject: a\r\n\r\nx\r\n")
    deliver(maildir, "no-time-prefix", b"Subject: b\r\n\r\ny\r\n")
    backend = create({"root": str(root), "expire_days": 7})
    assert backend.expire_days == 7
    box = await backend.open_account(Account("alice", str(home), "maildir:~/Mail"))
    try:
        assert len(box.messages) == 2
        assert box.received(0) == 1700000000.0
        assert box.received(1) is None  # never expires
        assert await box.received_times() == [1700000000.0, None]
    finally:
        await box.aclose()
    with pytest.raises(PermanentFailure, match="driver 'sdbox'"):
        await backend.open_account(Account("alice", str(home), "sdbox:~/dbox"))
    with pytest.raises(AuthFailed):
        await backend.open_account(Account("../x", None, "/srv/%u"))
    # No location: the template under the root, as open_mailbox.
    box = await backend.open_account(Account("bob"))
    assert box.maildir == str(root / "bob")
    await box.aclose()


async def test_a_location_must_belong_to_the_users_uid(tmp_path: Path) -> None:
    # The home is the user's to change: alice's ~/Mail may be a link to bob's maildir,
    # which the server's user can read. With the uid the user database gives, the
    # folders the session lists must belong to it.
    root = tmp_path / "root"
    root.mkdir()
    alice_home, bob_home = tmp_path / "home" / "alice", tmp_path / "home" / "bob"
    alice = make_maildir(alice_home / "Mail")
    bob = make_maildir(bob_home / "Mail")
    deliver(alice, "1700000000.M1P1.host", b"Subject: alice's\r\n\r\nx\r\n")
    deliver(bob, "1700000001.M1P1.host", b"Subject: bob's\r\n\r\ny\r\n")
    alice_uid, bob_uid = 40001, 40002
    for maildir, uid in ((alice, alice_uid), (bob, bob_uid)):
        for path in (maildir, *maildir.iterdir()):
            os.chown(path, uid, uid)
    backend = create({"root": str(root)})

    async def count(account: Account) -> int:
        box = await backend.open_account(account)
        try:
            return len(box.messages)
        finally:
            await box.aclose()

    assert await count(Account("alice", str(alice_home), "maildir:~/Mail", alice_uid)) == 1
    assert await count(Account("bob", str(bob_home), "maildir:~/Mail", bob_uid)) == 1
    assert await count(Account("alice", str(alice_home), "maildir:~/Mail")) == 1  # no uid
    # Her ~/Mail made a link to bob's: refused, whether listed before or not.
    (alice_home / "Mail").rename(alice_home / "Mail.away")
    (alice_home / "Mail").symlink_to(bob)
    for _ in range(2):
        with pytest.raises(PermanentFailure, match="uid 40001"):
            await backend.open_account(Account("alice", str(alice_home), "maildir:~/Mail", 40001))
    # And a folder of hers that someone else owns (the listing is not cached: cur/ new).
    (alice_home / "Mail").unlink()
    (alice_home / "Mail.away").rename(alice_home / "Mail")
    os.chown(alice / "new", bob_uid, bob_uid)
    with pytest.raises(PermanentFailure, match="uid 40001"):
        await backend.open_account(Account("alice", str(alice_home), "maildir:~/Mail", 40001))
    assert [p.relative_to(bob) for p in bob.rglob("1700000001*")] == [
        Path("cur/1700000001.M1P1.host:2,")  # (moved there by bob's own login)
    ]


async def test_the_scan_checks_the_folders_it_opens(tmp_path: Path) -> None:
    # The folder swapped for another uid's between the listing's stat and its scan:
    # the descriptor the scan reads is checked too.
    alice = make_maildir(tmp_path / "alice")
    deliver(alice, "1700000000.M1P1.host", b"Subject: a\r\n\r\nx\r\n")
    os.chown(alice / "new", 40002, 40002)
    with pytest.raises(NotAFolder, match="uid 40001"):
        list_messages(str(alice), 40001)
    assert [e.name for e in list_messages(str(alice))] == ["1700000000.M1P1.host"]


async def test_a_location_for_another_uid_is_not_made(tmp_path: Path) -> None:
    # autocreate makes folders owned by the server's user: for an account with
    # another uid they would never be served, so none are made.
    root = tmp_path / "root"
    root.mkdir()
    home = tmp_path / "home" / "carol"
    home.mkdir(parents=True)
    backend = create({"root": str(root)})
    with pytest.raises(PermanentFailure, match="not made for uid 40003"):
        await backend.open_account(Account("carol", str(home), "maildir:~/Mail", 40003))
    assert not (home / "Mail").exists()
    own = os.geteuid()  # the server's own uid: made, and served
    box = await backend.open_account(Account("carol", str(home), "maildir:~/Mail", own))
    await box.aclose()
    assert sorted(p.name for p in (home / "Mail").iterdir()) == [
        "cur",
        "new",
        "pypop-pop3.flock",
        "tmp",
    ]
