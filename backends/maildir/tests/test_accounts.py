"""Per-user maildrop locations (pypop.backend.Account), arrival times for EXPIRE, and
the expire_days option."""

from __future__ import annotations

from pathlib import Path

import pytest
from pypop.backend import Account
from pypop.errors import AuthFailed, PermanentFailure

from pypop_maildir import create
from pypop_maildir._config import UnsafeUser, location_path

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
