"""Subclassing the Maildir backend at its documented hooks (README: "Subclassing")."""

from __future__ import annotations

import hashlib
import os
import poplib
from collections.abc import Mapping
from pathlib import Path

import trio
from pypop.errors import AuthFailed

from pypop_maildir import MaildirBackend

from .conftest import deliver, make_maildir
from .test_e2e import PASSWORD, running


class HashedNoTrash(MaildirBackend):
    """The README's example: users spread over hashed folders, trashed mail hidden."""

    def maildir_path(self, user: str) -> str:
        if not user.isalnum():
            raise AuthFailed("unexpected user name")
        digest = hashlib.sha256(user.encode()).hexdigest()
        return os.path.join(self.config.root, digest[:2], user)

    def keep_message(self, user: str, subdir: str, name: str) -> bool:
        # Maildir flags follow ":2,"; "T" means trashed (an IMAP client deleted it).
        _, _, flags = name.partition(":2,")
        return "T" not in flags


def create(options: Mapping[str, object]) -> HashedNoTrash:
    return HashedNoTrash.from_options(options)


async def test_subclass_hooks_end_to_end(root: Path) -> None:
    backend = create({"root": str(root), "template": "%u"})
    assert isinstance(backend, HashedNoTrash)
    box = make_maildir(root / hashlib.sha256(b"alice").hexdigest()[:2] / "alice")
    deliver(box, "1700000001.M1P1.h:2,S", b"Subject: kept\r\n\r\none\r\n", sub="cur")
    trashed = deliver(box, "1700000002.M2P1.h:2,ST", b"Subject: trash\r\n\r\ntwo\r\n", sub="cur")
    deliver(box, "1700000003.M3P1.h", b"Subject: new\r\n\r\nthree\r\n")

    async with running(backend) as server:
        host, port = server.addresses[0]

        def session() -> tuple[list[bytes], bytes]:
            pop = poplib.POP3(host, port, timeout=10)
            pop.user("alice")
            pop.pass_(PASSWORD)
            uidl = pop.uidl()[1]
            pop.dele(1)
            pop.dele(2)
            return uidl, pop.quit()

        uidl, bye = await trio.to_thread.run_sync(session)
    # The trashed file is invisible: never listed, never numbered, never deleted.
    assert uidl == [b"1 1700000001.M1P1.h", b"2 1700000003.M3P1.h"]
    assert bye.startswith(b"+OK")
    assert [p.name for p in (box / "cur").iterdir()] == [trashed.name]
    assert list((box / "new").iterdir()) == []


async def test_subclass_refusal_is_an_auth_failure(root: Path) -> None:
    backend = create({"root": str(root)})
    async with running(backend) as server:
        host, port = server.addresses[0]

        def login() -> object:
            pop = poplib.POP3(host, port, timeout=10)
            pop.user("al.ice")
            try:
                pop.pass_(PASSWORD)
            except poplib.error_proto as exc:
                return exc.args[0]
            finally:
                pop.close()
            return "logged in"

        assert await trio.to_thread.run_sync(login) == b"-ERR [AUTH] Authentication failed"
