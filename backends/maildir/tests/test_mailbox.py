"""The maildir backend against the pypop.backend contract, on real maildirs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from pypop.backend import (
    AuthFailed,
    Backend,
    Mailbox,
    NoSuchMessage,
    UpdateFailed,
    is_valid_uid,
)
from pypop.wire import IMPLEMENTATION, read_at_now, read_file_now, stuff, wire_size

from pypop_maildir import BLOCK_SIZE, MaildirBackend, MaildirMailbox, _backend
from pypop_maildir._backend import LARGE_BLOCK, READ_AHEAD_MESSAGES, READ_AHEAD_TTL
from pypop_maildir._lock import HeldLock
from pypop_maildir._store import SIZE_CACHE_NAME, UIDLIST_NAME, delivery_key, mapped_uid

from .conftest import HARD_CASES, BackendMaker, deliver, make_maildir, reads_without_waiting


async def read_all(mb: Mailbox, index: int, top_lines: int | None = None) -> list[bytes]:
    return [block async for block in mb.retrieve(index, top_lines=top_lines)]


def name_for(i: int, tag: str = "host") -> str:
    return f"{1700000000 + i}.M{i}P{100 + i}.{tag}"


async def test_is_a_backend_and_mailbox(alice: Path, backend_factory: BackendMaker) -> None:
    backend = backend_factory()
    assert isinstance(backend, Backend)
    mb = await backend.open_mailbox("alice")
    assert isinstance(mb, Mailbox)
    assert list(mb.messages) == []
    await mb.aclose()
    await backend.aclose()


async def test_hard_cases_sizes_and_bytes(alice: Path, backend_factory: BackendMaker) -> None:
    names = list(HARD_CASES)
    for i, key in enumerate(names):
        deliver(alice, name_for(i, key), HARD_CASES[key])
    mb = await backend_factory().open_mailbox("alice")
    try:
        assert len(mb.messages) == len(names)
        for i, key in enumerate(names):
            data = HARD_CASES[key]
            assert mb.messages[i].size == wire_size(data), key
            assert b"".join(await read_all(mb, i)) == data, key
    finally:
        await mb.aclose()
    # exact figures for a few, independent of the codec (Dovecot's rule: no octets for
    # the CRLF the server adds to a last line without one; a bare CR counts 2)
    sizes = {key: mb.messages[i].size for i, key in enumerate(names)}
    assert sizes["lf"] == len(HARD_CASES["lf"]) + 5 == 61
    assert sizes["no-final-newline"] == len(HARD_CASES["no-final-newline"]) == 35
    assert sizes["just-dot"] == 1
    assert sizes["bare-cr"] == len(HARD_CASES["bare-cr"]) + 3 == 26
    assert sizes["empty"] == 0


async def test_five_mib_streams_in_bounded_blocks(
    alice: Path, backend_factory: BackendMaker
) -> None:
    line = b"0123456789" * 7 + b"\n"  # LF-only lines: size differs from the file size
    body = line * (5 * 1024 * 1024 // len(line) + 1)
    data = b"Subject: big\n\n" + body
    deliver(alice, name_for(1), data)
    mb = await backend_factory().open_mailbox("alice")
    try:
        assert mb.messages[0].size == wire_size(data) == len(data) + data.count(b"\n")
        blocks = await read_all(mb, 0)
        # Never read whole: LARGE_BLOCK at a time (the listing says it is large).
        assert [len(b) for b in blocks[:-1]] == [LARGE_BLOCK] * (len(blocks) - 1)
        assert len(blocks) == -(-len(data) // LARGE_BLOCK)
        assert b"".join(blocks) == data
        # TOP hint: stops early, but the server's cut of what we send is the same.
        for n in (0, 1, 3):
            top = b"".join(await read_all(mb, 0, top_lines=n))
            assert len(top) < BLOCK_SIZE
            assert stuff(top, top_lines=n) == stuff(data, top_lines=n)
    finally:
        await mb.aclose()


@pytest.mark.parametrize("key", sorted(HARD_CASES))
@pytest.mark.parametrize("n", [0, 1, 2, 100])
async def test_top_hint_never_cuts_short(
    alice: Path, backend_factory: BackendMaker, key: str, n: int
) -> None:
    data = HARD_CASES[key]
    deliver(alice, name_for(1), data)
    mb = await backend_factory().open_mailbox("alice")
    try:
        top = b"".join(await read_all(mb, 0, top_lines=n))
        assert data.startswith(top)
        assert stuff(top, top_lines=n) == stuff(data, top_lines=n)
    finally:
        await mb.aclose()


async def test_delivery_order_new_and_cur(alice: Path, backend_factory: BackendMaker) -> None:
    deliver(alice, "1700000005.M5P1.h:2,S", b"c\n", sub="cur")
    deliver(alice, "1700000001.M900000P1.h", b"b\n")
    deliver(alice, "1700000001.M12P1.h", b"a\n")  # same second, earlier microsecond
    deliver(alice, "zzz-no-time", b"e\n")
    deliver(alice, "1700000010.M1P1.h", b"d\n", sub="cur")
    (alice / "new" / ".hidden").write_bytes(b"x")
    (alice / "cur" / "subdir").mkdir()
    mb = await backend_factory(flag_updates=False).open_mailbox("alice")
    try:
        assert [m.uid for m in mb.messages] == [
            "1700000001.M12P1.h",
            "1700000001.M900000P1.h",
            "1700000005.M5P1.h",
            "1700000010.M1P1.h",
            "zzz-no-time",
        ]
        assert [b"".join(await read_all(mb, i)) for i in range(5)] == [
            b"a\n", b"b\n", b"c\n", b"d\n", b"e\n",
        ]  # fmt: skip
    finally:
        await mb.aclose()
    assert delivery_key("123") < delivery_key("abc")


async def test_uidl_stable_across_flags_and_new_to_cur(
    alice: Path, backend_factory: BackendMaker
) -> None:
    deliver(alice, "1700000001.M1P1.h,S=10,W=12", b"Subject: 1\n")
    deliver(alice, "1700000002.M1P1.h", b"Subject: 2\n")
    backend = backend_factory()
    mb = await backend.open_mailbox("alice")
    first = [m.uid for m in mb.messages]
    assert first == ["1700000001.M1P1.h,S=10,W=12", "1700000002.M1P1.h"]  # Dovecot %f
    await mb.aclose()
    # Dovecot behaviour: moved to cur/ with an empty info.
    assert sorted(os.listdir(alice / "cur")) == [
        "1700000001.M1P1.h,S=10,W=12:2,",
        "1700000002.M1P1.h:2,",
    ]
    assert os.listdir(alice / "new") == []
    os.rename(alice / "cur" / "1700000002.M1P1.h:2,", alice / "cur" / "1700000002.M1P1.h:2,FS")
    mb = await backend.open_mailbox("alice")
    assert [m.uid for m in mb.messages] == first
    await mb.aclose()


async def test_invalid_names_get_stable_valid_uids(
    alice: Path, backend_factory: BackendMaker
) -> None:
    long = "1700000001.M1P1." + "h" * 80
    deliver(alice, long, b"a\n")
    deliver(alice, "1700000002.with space", b"b\n")
    deliver(alice, "1700000003.caf\u00e9", b"c\n")
    backend = backend_factory()
    mb = await backend.open_mailbox("alice")
    uids = [m.uid for m in mb.messages]
    await mb.aclose()
    assert uids == [mapped_uid(long), mapped_uid("1700000002.with space"), mapped_uid(
        "1700000003.caf\u00e9"
    )]  # fmt: skip
    assert all(is_valid_uid(u) and u.startswith("pypop/") for u in uids)
    assert len(set(uids)) == 3
    mb = await backend.open_mailbox("alice")
    assert [m.uid for m in mb.messages] == uids
    await mb.aclose()


async def test_duplicate_base_names_stay_unique(alice: Path, backend_factory: BackendMaker) -> None:
    deliver(alice, "1700000001.M1P1.h:2,S", b"a\n", sub="cur")
    deliver(alice, "1700000001.M1P1.h:2,T", b"a\n", sub="cur")
    mb = await backend_factory().open_mailbox("alice")
    uids = [m.uid for m in mb.messages]
    await mb.aclose()
    assert uids[0] == "1700000001.M1P1.h"
    assert uids[1].startswith("pypop/")
    assert len(set(uids)) == 2


async def test_w_field_is_used_without_reading(alice: Path, backend_factory: BackendMaker) -> None:
    # A W= that disagrees with the content proves the file was not read for the size.
    deliver(alice, "1700000001.M1P1.h,S=5,W=999", b"abc\n")
    mb = await backend_factory().open_mailbox("alice")
    assert mb.messages[0].size == 999
    await mb.aclose()
    mb = await backend_factory(filename_sizes=False).open_mailbox("alice")
    assert mb.messages[0].size == 5
    await mb.aclose()


async def test_size_cache_used_and_stale_entry_never_served(
    alice: Path, backend_factory: BackendMaker
) -> None:
    path = deliver(alice, "1700000001.M1P1.h", b"one\ntwo\n", sub="cur")
    backend = backend_factory()
    mb = await backend.open_mailbox("alice")
    assert mb.messages[0].size == 10
    await mb.aclose()
    cache = alice / SIZE_CACHE_NAME
    lines = cache.read_text().splitlines()
    assert lines[0] == "pypop-sizes 2"
    st = path.stat()
    assert lines[1] == f"1700000001.M1P1.h\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ino}\t10"
    # A valid entry is served (we plant a different size to see it used) ...
    cache.write_text(lines[0] + "\n" + lines[1].rsplit("\t", 1)[0] + "\t77\n")
    mb = await backend.open_mailbox("alice")
    assert mb.messages[0].size == 77
    await mb.aclose()
    # ... and survives a flag rename (same size, mtime, inode).
    renamed = alice / "cur" / "1700000001.M1P1.h:2,S"
    os.rename(path, renamed)
    mb = await backend.open_mailbox("alice")
    assert mb.messages[0].size == 77
    await mb.aclose()
    # Same length, different content and mtime: stale, recomputed.
    renamed.write_bytes(b"one\r\ntw\n")
    os.utime(renamed, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    mb = await backend.open_mailbox("alice")
    assert mb.messages[0].size == wire_size(b"one\r\ntw\n") == 9
    await mb.aclose()
    assert cache.read_text().splitlines()[1].endswith("\t9")
    # A garbled cache is ignored, not trusted.
    cache.write_bytes(b"garbage\x00\n")
    mb = await backend.open_mailbox("alice")
    assert mb.messages[0].size == 9
    await mb.aclose()


async def test_size_cache_of_the_old_rule_is_not_trusted(
    alice: Path, backend_factory: BackendMaker
) -> None:
    # Written by a pypop that counted the CRLF added to a last line without one: every
    # entry matches its file (size, mtime, inode) but holds a size of the old rule.
    nofinal = b"Subject: x\r\n\r\nno newline at the end"
    lf_nofinal = b"Subject: y\n\nline\nlast"
    paths = [
        deliver(alice, "1700000001.M1P1.h", nofinal, sub="cur"),
        deliver(alice, "1700000002.M1P1.h", lf_nofinal, sub="cur"),
    ]
    old_sizes = [len(nofinal) + 2, 24 + 2]
    cache = alice / SIZE_CACHE_NAME
    lines = ["pypop-sizes 1\n"]
    for path, size in zip(paths, old_sizes, strict=True):
        st = path.stat()
        lines.append(f"{path.name}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ino}\t{size}\n")
    cache.write_text("".join(lines))
    mb = await backend_factory().open_mailbox("alice")
    try:
        assert [m.size for m in mb.messages] == [35, 24]
        assert [m.size for m in mb.messages] == [len(nofinal), wire_size(lf_nofinal)]
    finally:
        await mb.aclose()
    # Rewritten under the new version, with the new sizes, and then trusted.
    new_lines = cache.read_text().splitlines()
    assert new_lines[0] == "pypop-sizes 2"
    assert [ln.rsplit("\t", 1)[1] for ln in new_lines[1:]] == ["35", "24"]
    cache.write_text(cache.read_text().replace("\t35\n", "\t77\n"))
    mb = await backend_factory().open_mailbox("alice")
    assert mb.messages[0].size == 77  # proves a current-version entry is used
    await mb.aclose()


async def test_snapshot_excludes_mail_delivered_during_session(
    alice: Path, backend_factory: BackendMaker
) -> None:
    deliver(alice, name_for(1), b"first\n")
    backend = backend_factory()
    mb = await backend.open_mailbox("alice")
    deliver(alice, name_for(2), b"second\n")
    assert len(mb.messages) == 1
    await mb.commit([])
    mb = await backend.open_mailbox("alice")
    assert [m.uid for m in mb.messages] == [name_for(1), name_for(2)]
    await mb.aclose()


async def test_removed_from_outside_is_no_such_message(
    alice: Path, backend_factory: BackendMaker
) -> None:
    deliver(alice, name_for(1), b"one\n")
    deliver(alice, name_for(2), b"two\n")
    deliver(alice, name_for(3), b"three\n")
    mb = await backend_factory().open_mailbox("alice")
    try:
        (alice / "cur" / (name_for(2) + ":2,")).unlink()
        # renamed from outside (an IMAP client set a flag): still served
        os.rename(alice / "cur" / (name_for(3) + ":2,"), alice / "cur" / (name_for(3) + ":2,RS"))
        with pytest.raises(NoSuchMessage):
            await read_all(mb, 1)
        assert b"".join(await read_all(mb, 0)) == b"one\n"
        assert b"".join(await read_all(mb, 2)) == b"three\n"
        with pytest.raises(NoSuchMessage):
            await read_all(mb, 3)
        # the gone one marked: UPDATE still succeeds and removes the others marked
        await mb.commit([1, 2])
    finally:
        await mb.aclose()
    assert os.listdir(alice / "cur") == [name_for(1) + ":2,S"]  # RETR-ed: seen


async def test_commit_removes_exactly_the_marked(
    alice: Path, backend_factory: BackendMaker
) -> None:
    for i in range(6):
        deliver(alice, name_for(i), f"m{i}\n".encode())
    backend = backend_factory(flag_updates=False)
    mb = await backend.open_mailbox("alice")
    await mb.commit([0, 2, 5, 2, 99, -1])
    await mb.aclose()  # idempotent after commit
    assert sorted(os.listdir(alice / "new")) == [name_for(1), name_for(3), name_for(4)]
    mb = await backend.open_mailbox("alice")  # lock was released
    assert [m.uid for m in mb.messages] == [name_for(1), name_for(3), name_for(4)]
    await mb.aclose()


async def test_aclose_removes_nothing(alice: Path, backend_factory: BackendMaker) -> None:
    deliver(alice, name_for(1), b"x\n")
    backend = backend_factory()
    mb = await backend.open_mailbox("alice")
    await mb.aclose()
    await mb.aclose()
    mb = await backend.open_mailbox("alice")
    assert len(mb.messages) == 1
    await mb.aclose()


async def test_commit_partial_failure(
    alice: Path, backend_factory: BackendMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(4):
        deliver(alice, name_for(i), f"m{i}\n".encode())
    backend = backend_factory(flag_updates=False)
    mb = await backend.open_mailbox("alice")
    real_unlink = os.unlink
    bad = name_for(1)  # (removed by name, relative to new/'s descriptor)

    def failing_unlink(path: str, *, dir_fd: int | None = None) -> None:
        if os.fspath(path) == bad:  # fault injection: one marked file cannot be removed
            raise PermissionError(13, "Permission denied", bad)
        real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", failing_unlink)
    with pytest.raises(UpdateFailed, match="1 of 2"):
        await mb.commit([1, 2])
    monkeypatch.undo()
    assert sorted(os.listdir(alice / "new")) == [name_for(0), name_for(1), name_for(3)]
    mb = await backend.open_mailbox("alice")  # the lock was released anyway
    await mb.aclose()


async def test_seen_flag_after_retr_and_quit(alice: Path, backend_factory: BackendMaker) -> None:
    deliver(alice, name_for(1), b"one\n")
    deliver(alice, name_for(2), b"two\n")
    deliver(alice, name_for(3) + ":2,F", b"three\n", sub="cur")
    backend = backend_factory()
    mb = await backend.open_mailbox("alice")
    await read_all(mb, 0)  # RETR
    await read_all(mb, 1, top_lines=0)  # TOP: not seen
    await read_all(mb, 2)
    await mb.commit([])
    assert sorted(os.listdir(alice / "cur")) == [
        name_for(1) + ":2,S",
        name_for(2) + ":2,",
        name_for(3) + ":2,FS",
    ]


async def test_commits_at_once_only_without_io(alice: Path, backend_factory: BackendMaker) -> None:
    """UPDATE can skip its cancel scope only when it has nothing to unlink or flag and
    the lock goes with one close() (fcntl on this local file system); its commit then
    makes no thread hop and leaves the maildir as it was."""
    deliver(alice, name_for(1), b"one\n")
    deliver(alice, name_for(2), b"two\n")
    backend = backend_factory()
    mb = await backend.open_mailbox("alice")
    assert isinstance(mb, MaildirMailbox)
    assert mb.commits_at_once([])
    assert not mb.commits_at_once([1])  # an unlink
    await read_all(mb, 0, top_lines=0)  # TOP: nothing to flag
    assert mb.commits_at_once([])
    await read_all(mb, 0)  # RETR: Seen to set, in a worker thread
    assert not mb.commits_at_once([])
    await mb.commit([])
    assert sorted(os.listdir(alice / "cur")) == [name_for(1) + ":2,S", name_for(2) + ":2,"]
    # Nothing to do: no thread hop, and the lock goes (the next open gets it).
    mb = await backend.open_mailbox("alice")
    assert isinstance(mb, MaildirMailbox)
    assert mb.commits_at_once([])
    hops = backend.threads.busy
    with trio.testing.assert_no_checkpoints():
        await mb.commit([])
    assert backend.threads.busy == hops
    mb = await backend.open_mailbox("alice")
    await mb.aclose()
    # A message retrieved again, Seen already: nothing to flag, at once.
    mb = await backend.open_mailbox("alice")
    assert isinstance(mb, MaildirMailbox)
    await read_all(mb, 0)
    assert mb.commits_at_once([])
    with trio.testing.assert_no_checkpoints():
        await mb.commit([])
    # One retrieved Seen already, one not: the second is flagged.
    mb = await backend.open_mailbox("alice")
    assert isinstance(mb, MaildirMailbox)
    await read_all(mb, 0)
    await read_all(mb, 1)
    assert not mb.commits_at_once([])
    await mb.commit([])
    assert sorted(os.listdir(alice / "cur")) == [name_for(1) + ":2,S", name_for(2) + ":2,S"]
    # Without flag updates a RETR leaves nothing for UPDATE to do.
    mb = await backend_factory(flag_updates=False).open_mailbox("alice")
    assert isinstance(mb, MaildirMailbox)
    await read_all(mb, 1)
    assert mb.commits_at_once([])
    await mb.aclose()
    # A dotlock is removed in a worker thread: never at once.
    mb = await backend_factory(lock="dotlock").open_mailbox("alice")
    assert isinstance(mb, MaildirMailbox)
    assert not mb.commits_at_once([])
    await mb.aclose()


async def test_no_flag_updates_touches_nothing(alice: Path, backend_factory: BackendMaker) -> None:
    deliver(alice, name_for(1), b"one\n")
    mb = await backend_factory(flag_updates=False).open_mailbox("alice")
    await read_all(mb, 0)
    await mb.commit([])
    assert os.listdir(alice / "new") == [name_for(1)]
    assert os.listdir(alice / "cur") == []


async def test_save_uidl_survives_base_rename(alice: Path, backend_factory: BackendMaker) -> None:
    deliver(alice, name_for(1), b"one\n", sub="cur")
    deliver(alice, name_for(2), b"two\n", sub="cur")
    backend = backend_factory(save_uidl=True)
    mb = await backend.open_mailbox("alice")
    uids = [m.uid for m in mb.messages]
    await mb.aclose()
    assert uids == [name_for(1), name_for(2)]
    assert (alice / UIDLIST_NAME).read_text().startswith("pypop-uidlist 1\n")
    # another tool renames the file and adds a size field: the base name changes
    os.rename(alice / "cur" / name_for(2), alice / "cur" / (name_for(2) + ",S=4:2,S"))
    mb = await backend.open_mailbox("alice")
    assert [m.uid for m in mb.messages] == uids
    await mb.commit([0])
    assert name_for(1) not in (alice / UIDLIST_NAME).read_text()


@pytest.mark.parametrize(
    "user",
    ["", "a/b", "..", ".", ".hidden", "a\x00b", "a\nb", "a\x7fb", "a\\b", "/etc", "x\x1b"],
)
async def test_unsafe_user_names_fail_auth(
    root: Path, backend_factory: BackendMaker, user: str
) -> None:
    with pytest.raises(AuthFailed):
        await backend_factory().open_mailbox(user)
    assert os.listdir(root) == []


async def test_template_domain_and_local_part(root: Path, backend_factory: BackendMaker) -> None:
    md = make_maildir(root / "example.org" / "bob" / "Maildir")
    deliver(md, name_for(1), b"hi\n")
    backend = backend_factory(template="%d/%n/Maildir")
    mb = await backend.open_mailbox("bob@example.org")
    assert isinstance(mb, MaildirMailbox)
    assert mb.maildir == str(md)
    assert len(mb.messages) == 1
    await mb.aclose()
    with pytest.raises(AuthFailed):  # no domain: empty component
        await backend.open_mailbox("bob")
    with pytest.raises(AuthFailed):
        await backend.open_mailbox("..@example.org")


def test_maildir_paths_are_kept_bounded_and_unsafe_names_never(
    root: Path, backend_factory: BackendMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_backend, "PATHS_CACHED", 3)
    backend = backend_factory(template="%d/%n/Maildir")
    names = [f"user{n}@example.org" for n in range(8)]
    for _ in range(2):
        for name in names:
            n = name.split("@")[0]
            assert backend.maildir_path(name) == str(root / "example.org" / n / "Maildir")
            assert len(backend._paths) <= 3
        for unsafe in ("bob", "../x@example.org"):  # refused every time, never kept
            with pytest.raises(AuthFailed):
                backend.maildir_path(unsafe)
    assert set(backend._paths) <= set(names)


async def test_autocreate(root: Path, backend_factory: BackendMaker) -> None:
    from pypop.backend import PermanentFailure

    with pytest.raises(PermanentFailure):
        await backend_factory(autocreate=False).open_mailbox("carol")
    mb = await backend_factory().open_mailbox("carol")
    assert list(mb.messages) == []
    await mb.aclose()
    # The fcntl lock's file stays (auto and fcntl modes); the dotlock is gone.
    assert sorted(os.listdir(root / "carol")) == ["cur", "new", "pypop-pop3.flock", "tmp"]


def test_fast_uid_check_equals_contract() -> None:
    from pypop_maildir._store import valid_uid

    for n in range(0x110):
        c = chr(n)
        for uid in (c, "a" + c, c * 70, c * 71, ""):
            assert valid_uid(uid) == is_valid_uid(uid), repr(uid)


class _Hops:
    """Counts a backend's worker-thread hops (instrumentation only)."""

    def __init__(self, backend: MaildirBackend) -> None:
        self.count = 0
        real_run = backend.threads._run

        async def counting_run(*args: Any) -> Any:
            self.count += 1
            return await real_run(*args)

        backend.threads._run = counting_run  # type: ignore[method-assign,assignment]


async def _open_counting_hops(
    alice: Path, backend_factory: BackendMaker, bodies: list[bytes]
) -> tuple[MaildirMailbox, _Hops]:
    """``bodies`` delivered to alice, her mailbox opened, its hops counted from now."""
    for n, body in enumerate(bodies):
        deliver(alice, f"{1700000000 + n}.M{n}P1.host", body)
    backend = backend_factory()
    box = await backend.open_mailbox("alice")
    assert isinstance(box, MaildirMailbox)
    return box, _Hops(backend)


async def _fetch(box: MaildirMailbox, index: int) -> bytes:
    return b"".join([b async for b in box.retrieve(index)])


@pytest.mark.parametrize("in_memory", [True, False])
async def test_read_ahead_saves_thread_hops_and_keeps_bytes_exact(
    alice: Path, backend_factory: BackendMaker, monkeypatch: pytest.MonkeyPatch, in_memory: bool
) -> None:
    bodies = [f"Subject: {n}\n\n{'x' * (100 + n)}\n".encode() for n in range(40)]
    bodies.insert(20, b"Subject: big\n\n" + b"y" * (BLOCK_SIZE + 10) + b"\n")
    box, hops = await _open_counting_hops(alice, backend_factory, bodies)
    if not in_memory:  # the kernel would have to wait for the disk
        monkeypatch.setattr(_backend, "read_file_now", lambda *args: None)
    got = [await _fetch(box, i) for i in range(len(bodies))]
    assert got == bodies
    # 0..19 in one hop, the big one alone (one LARGE_BLOCK read; none if the kernel has
    # it in memory: just written, it has), then 21..40 in one hop.
    at_once = in_memory and reads_without_waiting(alice, IMPLEMENTATION)
    assert hops.count == (2 if at_once else 3)
    assert box._retrieved == set(range(len(bodies)))
    await box.aclose()


async def test_large_message_read_without_a_hop_when_in_memory_and_no_lock_waits(
    alice: Path, backend_factory: BackendMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event loop reads a large message of one block itself, and the later blocks
    of a larger one (its first block comes from a hop, which opens it), when they are
    in memory and no dotlock refresh is due (a write, which may wait); a TOP reads its
    small first block in a hop; what goes out is the same. A block not in memory is
    read by a hop, from where the last one ended."""
    if not reads_without_waiting(alice, IMPLEMENTATION):
        pytest.skip("this kernel or file system cannot read without waiting")
    just = b"Subject: a\n\n" + b"a" * (LARGE_BLOCK - 13) + b"\n"
    over = b"Subject: b\n\n" + b"b" * (LARGE_BLOCK - 12) + b"\n"
    three = b"Subject: c\n\n" + b"".join(b"%07d\n" % i for i in range(LARGE_BLOCK * 5 // 16))
    assert (len(just), len(over)) == (LARGE_BLOCK, LARGE_BLOCK + 1)
    assert 2 * LARGE_BLOCK < len(three) < 3 * LARGE_BLOCK
    box, hops = await _open_counting_hops(alice, backend_factory, [just, over, just, three])
    calls: list[int] = []
    real = read_file_now

    def spy(path: str, limit: int, dir_fd: int | None = None) -> bytes | None:
        calls.append(limit)
        return real(path, limit, dir_fd)

    monkeypatch.setattr(_backend, "read_file_now", spy)
    # The first read opens the listed folders, in a hop (never on the event loop);
    # from then on the event loop reads through them.
    assert await _fetch(box, 0) == just
    assert (hops.count, calls) == (1, [])
    assert await _fetch(box, 0) == just
    assert (hops.count, calls) == (1, [LARGE_BLOCK + 1])
    assert await _fetch(box, 1) == over  # read_file_now declines it: too large
    assert (hops.count, calls) == (2, [LARGE_BLOCK + 1] * 2)  # the last octet: no hop
    assert await _fetch(box, 3) == three
    assert hops.count == 3
    assert b"".join([b async for b in box.retrieve(2, top_lines=0)]) == b"Subject: a\n\n"
    assert (hops.count, len(calls)) == (4, 3)
    monkeypatch.setattr(HeldLock, "refresh_due", lambda self: True)
    assert await _fetch(box, 2) == just
    assert (hops.count, len(calls)) == (5, 3)
    monkeypatch.undo()
    # The second block not in memory: a hop reads it, and the third follows on.
    asked: list[int] = []

    def second_not_in_memory(fd: int, offset: int, size: int) -> bytes | None:
        asked.append(offset)
        return None if len(asked) == 1 else read_at_now(fd, offset, size)

    monkeypatch.setattr(_backend, "read_at_now", second_not_in_memory)
    assert await _fetch(box, 3) == three
    assert hops.count == 7  # (read_file_now declined it: a first block, then one more)
    assert asked == [LARGE_BLOCK, 2 * LARGE_BLOCK]
    assert box._retrieved == {0, 1, 2, 3}
    await box.aclose()


async def _serve(box: MaildirMailbox, index: int, top_lines: int | None = None) -> bytes:
    """What the server sends for RETR/TOP: the wire cache's answer, else retrieve()."""
    wire = box.wire_message(index, top_lines)
    if wire is not None:
        return wire
    data = b"".join([b async for b in box.retrieve(index, top_lines=top_lines)])
    return stuff(data, top_lines)


async def test_large_message_in_memory_goes_out_through_the_wire_cache(
    alice: Path, backend_factory: BackendMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server's RETR of a message of BLOCK_SIZE to LARGE_BLOCK octets that the kernel
    has in memory: wire_message reads and stuffs it (no hop, no retrieve(), marked
    retrieved at once). Not for a TOP, a small message (the read-ahead's), one past
    LARGE_BLOCK, one with an 8-bit header (the server may refuse it: retrieve()'s),
    one not in memory, or while a dotlock refresh is due."""
    if not reads_without_waiting(alice, IMPLEMENTATION):
        pytest.skip("this kernel or file system cannot read without waiting")
    large = b"Subject: big\n\n" + b".dot\n" * (BLOCK_SIZE // 5 + 1)
    bodies = [
        large,
        b"Subject: small\n\nbody\n",
        b"Subject: over\n\n" + b"o" * LARGE_BLOCK + b"\n",
        "Subject: caf\u00e9\n\n".encode() + b"e" * BLOCK_SIZE + b"\n",
        large,
    ]
    box, hops = await _open_counting_hops(alice, backend_factory, bodies)
    # Until a read's hop has opened the listed folders, the event loop reads nothing.
    assert box.wire_message(0) is None
    assert await _serve(box, 1) == stuff(bodies[1])
    assert hops.count == 1
    assert box.wire_message(0, 0) is None  # TOP
    assert box.wire_message(0) == stuff(large)
    assert (hops.count, box._retrieved) == (1, {0, 1})
    for n in (1, 2, 3):
        assert box.wire_message(n) is None, n
        assert await _serve(box, n) == stuff(bodies[n]), n
    assert box._retrieved == {0, 1, 2, 3}
    monkeypatch.setattr(_backend, "read_file_now", lambda *args: None)
    assert box.wire_message(4) is None
    monkeypatch.undo()
    monkeypatch.setattr(HeldLock, "refresh_due", lambda self: True)
    assert box.wire_message(4) is None
    monkeypatch.undo()
    assert box._retrieved == {0, 1, 2, 3}
    assert box.wire_message(4) == stuff(large)
    assert box._retrieved == {0, 1, 2, 3, 4}
    await box.aclose()


async def test_read_ahead_for_the_server_comes_stuffed(
    alice: Path, backend_factory: BackendMaker
) -> None:
    """A server's RETR reads the next messages ahead in wire form, in one hop; one with
    an 8-bit header is kept as stored for retrieve() (the server may refuse it, and
    only a retrieval read to its end is marked), without a second read; a TOP of a
    message read ahead for RETR reads ahead again, as stored."""
    bodies = [f"Subject: {n}\n\n.{'x' * (100 + n)}\n".encode() for n in range(30)]
    for n in (3, 4, 17):
        bodies[n] = f"Subject: caf\u00e9 {n}\n\nbody\n".encode()
    box, hops = await _open_counting_hops(alice, backend_factory, bodies)
    assert await _serve(box, 0) == stuff(bodies[0])
    assert hops.count == 1
    assert sorted(box._ahead_wire or {}) == [n for n in range(1, 30) if n not in (3, 4, 17)]
    assert sorted(box._ahead or {}) == [3, 4, 17]
    assert box._retrieved == {0}
    for n in range(1, 20):
        assert await _serve(box, n) == stuff(bodies[n]), n
    assert hops.count == 1
    assert box._retrieved == set(range(20))
    assert sorted(box._ahead or {}) == []
    # TOP of a message read ahead for RETR: read again, and ahead as stored.
    assert await _serve(box, 20, 0) == stuff(bodies[20], 0)
    assert hops.count == 2
    assert box._ahead_wire is None
    assert sorted(box._ahead or {}) == list(range(21, 30))
    # Its RETR reads it (a TOP's first message is not kept) and ahead again, stuffed.
    assert await _serve(box, 20) == stuff(bodies[20])
    assert hops.count == 3
    assert sorted(box._ahead_wire or {}) == list(range(21, 30))
    for n in range(21, 30):
        assert await _serve(box, n) == stuff(bodies[n]), n
    assert hops.count == 3
    assert box._retrieved == set(range(30))
    await box.aclose()


async def test_read_ahead_bounds(alice: Path, backend_factory: BackendMaker) -> None:
    """A read-ahead takes at most READ_AHEAD_MESSAGES messages and READ_AHEAD_OCTETS
    octets (the first message's block included, by POP3 sizes), and stops before a
    message of a block or more."""
    bodies = [b"Subject: %d\n\nbody\n" % n for n in range(READ_AHEAD_MESSAGES + 6)]
    box, hops = await _open_counting_hops(alice, backend_factory, bodies)
    assert await _fetch(box, 0) == bodies[0]
    assert sorted(box._ahead or {}) == list(range(1, READ_AHEAD_MESSAGES + 1))
    assert hops.count == 1
    await box.aclose()
    # 60,000-octet messages: the first and three more fit in 256 KiB, a fifth does not.
    for path in (alice / "cur").iterdir():
        path.unlink()
    big = [b"Subject: %d\n\n" % n + b"x" * 59_984 + b"\n" for n in range(8)]
    big[6] = b"Subject: 6\n\n" + b"y" * BLOCK_SIZE + b"\n"
    box, hops = await _open_counting_hops(alice, backend_factory, big)
    assert [m.size for m in box.messages[:2]] == [60_000, 60_000]
    assert await _fetch(box, 0) == big[0]
    assert sorted(box._ahead or {}) == [1, 2, 3]
    for n in (1, 2, 3):
        assert await _fetch(box, n) == big[n]
    assert hops.count == 1
    assert await _fetch(box, 4) == big[4]
    assert sorted(box._ahead or {}) == [5]  # stopped before the one of a block
    await box.aclose()


async def test_read_ahead_in_wire_form_expires(
    alice: Path, backend_factory: BackendMaker, autojump_clock: trio.testing.MockClock
) -> None:
    """Past READ_AHEAD_TTL a message read ahead in wire form is not served from it (it
    is read again), and is not counted as retrieved."""
    bodies = [b"Subject: %d\n\nbody\n" % n for n in range(3)]
    box, hops = await _open_counting_hops(alice, backend_factory, bodies)
    assert await _serve(box, 0) == stuff(bodies[0])
    assert sorted(box._ahead_wire or {}) == [1, 2]
    assert box.wire_message(1) == stuff(bodies[1])
    await trio.sleep(READ_AHEAD_TTL + 1)
    assert box.wire_message(2) is None
    assert box._ahead_wire is None
    assert box._retrieved == {0, 1}
    assert await _serve(box, 2) == stuff(bodies[2])
    assert hops.count == 2
    await box.aclose()


async def test_read_ahead_stops_at_a_file_that_is_not_a_message(
    alice: Path, backend_factory: BackendMaker, tmp_path: Path
) -> None:
    """A message swapped for a symlink (or removed) after the snapshot: the read-ahead
    stops before it, never reads through it, and the messages after it are read later."""
    bodies = [b"Subject: %d\n\nbody %d\n" % (n, n) for n in range(5)]
    for n, body in enumerate(bodies):
        deliver(alice, f"{1700000000 + n}.M{n}P1.host", body)
    secret = tmp_path / "secret"
    secret.write_bytes(b"Subject: 2\n\nSECRET!\n")  # same size as message 2
    box = await backend_factory().open_mailbox("alice")
    assert isinstance(box, MaildirMailbox)
    swapped = next((alice / "cur").glob("1700000002.*"))
    swapped.unlink()
    swapped.symlink_to(secret)
    gone = next((alice / "cur").glob("1700000004.*"))
    assert await _fetch(box, 0) == bodies[0]
    assert sorted(box._ahead or {}) == [1]
    gone.unlink()  # after the read-ahead from 0; 3 is read on its own, 4 is gone
    assert await _fetch(box, 1) == bodies[1]
    with pytest.raises(NoSuchMessage):
        await _fetch(box, 2)
    assert await _fetch(box, 3) == bodies[3]
    assert sorted(box._ahead or {}) == []
    with pytest.raises(NoSuchMessage):
        await _fetch(box, 4)
    await box.aclose()


async def test_read_ahead_expires(
    alice: Path, backend_factory: BackendMaker, autojump_clock: trio.testing.MockClock
) -> None:
    for n in range(3):
        deliver(alice, f"{1700000000 + n}.M{n}P1.host", b"Subject: %d\n\nbody\n" % n)
    box = await backend_factory().open_mailbox("alice")
    assert isinstance(box, MaildirMailbox)
    assert await _fetch(box, 0) == b"Subject: 0\n\nbody\n"
    path = next((alice / "cur").glob("1700000001.*"))
    path.write_bytes(b"Subject: 1\n\nBODY\n")  # same size, rewritten from outside
    assert await _fetch(box, 1) == b"Subject: 1\n\nbody\n"  # read ahead, within the TTL
    path = next((alice / "cur").glob("1700000002.*"))
    path.write_bytes(b"Subject: 2\n\nBODY\n")
    await trio.sleep(READ_AHEAD_TTL + 1)
    assert await _fetch(box, 2) == b"Subject: 2\n\nBODY\n"  # expired: read again
    await box.aclose()
