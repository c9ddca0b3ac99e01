"""The listing cache: a login skips the folder scan only while nothing can have changed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from pypop.wire import wire_size

from pypop_maildir import MaildirBackend, _backend, _store

from .conftest import BackendMaker, deliver, make_maildir

SETTLE_S = 0.05


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts folder scans; the settle margin shortened so tests need not wait 2 s."""
    monkeypatch.setattr(_backend, "SETTLE_NS", int(SETTLE_S * 1e9))
    seen: list[str] = []
    real = _store.list_messages

    def counting(maildir: str, owner: int | None = None) -> list[_store.Entry]:
        seen.append(maildir)
        return real(maildir, owner)

    monkeypatch.setattr(_store, "list_messages", counting)
    return seen


def settle() -> None:
    time.sleep(SETTLE_S * 2)


async def uids_sizes(backend: MaildirBackend) -> list[tuple[str, int]]:
    mb = await backend.open_mailbox("alice")
    try:
        return [(m.uid, m.size) for m in mb.messages]
    finally:
        await mb.aclose()


async def test_unchanged_folders_are_not_scanned_again(
    alice: Path, backend_factory: BackendMaker, scans: list[str]
) -> None:
    deliver(alice, "1700000001.M1P1.h,W=25:2,S", b"Subject: a\n\nhello\n", sub="cur")
    settle()
    backend = backend_factory()
    first = await uids_sizes(backend)
    assert await uids_sizes(backend) == first == [("1700000001.M1P1.h,W=25", 25)]
    assert len(scans) == 1
    # A delivery changes new/: seen at the next login.
    deliver(alice, "1700000002.M2P1.h", b"Subject: b\n\nworld\n")
    assert [u for u, _ in await uids_sizes(backend)] == [
        "1700000001.M1P1.h,W=25",
        "1700000002.M2P1.h",
    ]
    assert len(scans) == 2


async def test_folders_changed_just_before_the_scan_are_never_trusted(
    alice: Path, backend_factory: BackendMaker, scans: list[str]
) -> None:
    deliver(alice, "1700000001.M1P1.h:2,S", b"Subject: a\n\nhello\n", sub="cur")
    backend = backend_factory()
    await uids_sizes(backend)
    await uids_sizes(backend)
    # Changed within the settle margin: a later change in the same clock tick would
    # not show in the folder's ctime, so neither listing was cached.
    assert len(scans) == 2


async def test_message_rewritten_in_place_is_counted_again(
    alice: Path, backend_factory: BackendMaker, scans: list[str]
) -> None:
    """No ,W=: the size comes from the content, and a rewrite does not touch the folder."""
    path = deliver(alice, "1700000001.M1P1.h:2,S", b"one\ntwo\n", sub="cur")
    settle()
    backend = backend_factory()
    assert await uids_sizes(backend) == [("1700000001.M1P1.h", 10)]
    path.write_bytes(b"one\ntwo\nthree\n")
    assert await uids_sizes(backend) == [("1700000001.M1P1.h", wire_size(b"one\ntwo\nthree\n"))]
    assert len(scans) == 2


async def test_moves_at_open_are_not_cached_as_they_were(
    alice: Path, backend_factory: BackendMaker, scans: list[str]
) -> None:
    deliver(alice, "1700000001.M1P1.h", b"Subject: a\n\nhello\n")
    settle()
    backend = backend_factory()
    await uids_sizes(backend)  # moves new/ -> cur/: changes both folders
    assert os.listdir(alice / "cur") == ["1700000001.M1P1.h:2,"]
    settle()
    await uids_sizes(backend)
    await uids_sizes(backend)
    assert len(scans) == 2


async def test_subclass_with_keep_message_scans_every_time(root: Path, scans: list[str]) -> None:
    class OnlySeen(MaildirBackend):
        def keep_message(self, user: str, subdir: str, name: str) -> bool:
            return name.endswith("S")

    alice = make_maildir(root / "alice")
    deliver(alice, "1700000001.M1P1.h:2,S", b"a\n", sub="cur")
    deliver(alice, "1700000002.M2P1.h:2,", b"b\n", sub="cur")
    settle()
    backend = OnlySeen.from_options({"root": str(root)})
    assert len(await uids_sizes(backend)) == 1
    assert len(await uids_sizes(backend)) == 1
    assert len(scans) == 2


async def test_listing_cache_is_bounded_and_can_be_off(
    root: Path, backend_factory: BackendMaker, scans: list[str]
) -> None:
    for user in ("alice", "bob"):
        make_maildir(root / user)
        deliver(root / user, "1700000001.M1P1.h:2,S", b"a\n", sub="cur")
        deliver(root / user, "1700000002.M2P1.h:2,S", b"b\n", sub="cur")
    settle()
    backend = backend_factory(listing_cache=3)  # room for one of the two maildrops
    for user in ("alice", "bob", "alice", "bob"):
        mb = await backend.open_mailbox(user)
        await mb.aclose()
    assert len(scans) == 4
    scans.clear()
    off = backend_factory(listing_cache=0)
    for _ in range(2):
        mb = await off.open_mailbox("alice")
        await mb.aclose()
    assert len(scans) == 2
