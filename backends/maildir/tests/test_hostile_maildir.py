"""Hostile maildirs (issue 15): symlinks, FIFOs, stuck I/O, a crash half-way through a move.

A maildir is writable by its user, who must not read /etc/shadow through it nor hang
the server for everyone else.
"""

from __future__ import annotations

import contextlib
import os
import poplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio
from pypop.backend import Mailbox, NoSuchMessage
from pypop.errors import PermanentFailure, TemporaryFailure, UpdateFailed

from pypop_maildir import MaildirBackend, MaildirMailbox, _backend, _store, create
from pypop_maildir._lock import DOTLOCK_NAME, FLOCK_NAME

from .conftest import BackendMaker, deliver, make_maildir

SECRET = b"root:$6$secret-hash:19000:0:99999:7:::\n"
HELLO = b"Subject: hello\n\nhello\n"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "shadow"
    path.write_bytes(SECRET)
    return path


async def fetch(mb: Mailbox, index: int) -> bytes:
    return b"".join([b async for b in mb.retrieve(index)])


def wall(limit: float) -> contextlib.AbstractContextManager[trio.CancelScope]:
    """A deadline (these tests run on Trio's real clock and wait for real threads)."""
    return trio.fail_after(limit)


# ------------------------------------------------------------------ item 5: symlinks


async def test_symlinked_message_is_never_listed_or_served(
    alice: Path, secret: Path, backend_factory: BackendMaker
) -> None:
    deliver(alice, "1700000001.M1P1.h:2,", HELLO, sub="cur")
    os.symlink(secret, alice / "cur" / "1700000100.evil:2,")
    os.symlink(secret, alice / "new" / "1700000101.evil")
    mb = await backend_factory().open_mailbox("alice")
    try:
        assert [m.uid for m in mb.messages] == ["1700000001.M1P1.h"]
        assert await fetch(mb, 0) == HELLO
    finally:
        await mb.aclose()
    # The links were neither followed nor moved: new/ -> cur/ skips them too.
    assert (alice / "new" / "1700000101.evil").is_symlink()


@pytest.mark.parametrize("filename_sizes", [True, False])
async def test_message_swapped_for_a_symlink_after_login_is_not_served(
    alice: Path, secret: Path, backend_factory: BackendMaker, filename_sizes: bool
) -> None:
    path = deliver(alice, "1700000001.M1P1.h,S=22,W=25:2,", HELLO, sub="cur")
    mb = await backend_factory(filename_sizes=filename_sizes).open_mailbox("alice")
    try:
        os.unlink(path)
        os.symlink(secret, path)
        with pytest.raises(NoSuchMessage):
            await fetch(mb, 0)
    finally:
        await mb.aclose()


async def test_lock_file_that_is_a_link_is_never_followed(
    alice: Path, backend_factory: BackendMaker, tmp_path: Path
) -> None:
    # Where the lock file would be, a link to a name elsewhere: the login is refused,
    # and nothing is created (or locked) there.
    target = tmp_path / "created-elsewhere"
    (alice / FLOCK_NAME).symlink_to(target)
    deliver(alice, "1700000001.M1P1.h", HELLO)
    with pytest.raises(TemporaryFailure):
        await backend_factory(lock="fcntl").open_mailbox("alice")
    assert not target.exists()
    assert (alice / FLOCK_NAME).is_symlink()


@pytest.mark.parametrize("name", [_store.SIZE_CACHE_NAME, _store.UIDLIST_NAME])
@pytest.mark.parametrize("make", ["symlink", "fifo", "device"])
async def test_own_files_swapped_for_links_fifos_or_devices_are_not_read(
    alice: Path, backend_factory: BackendMaker, tmp_path: Path, name: str, make: str
) -> None:
    # The size cache and the UIDL list are ours, but the maildir's user can put
    # anything in their place: a link to a file of theirs elsewhere (with sizes and
    # UIDLs of their choosing), a FIFO (a reader would hang), a link to a device
    # (/dev/zero: readline without end).
    deliver(alice, "1700000001.M1P1.h", HELLO, sub="cur")  # no ,W=: the size is counted
    path = alice / name
    if make == "symlink":
        planted = tmp_path / "planted"
        base = "1700000001.M1P1.h"
        st = os.stat(alice / "cur" / base)
        if name == _store.SIZE_CACHE_NAME:
            body = f"{st.st_size}\t{st.st_mtime_ns}\t{st.st_ino}\t999"
        else:
            body = f"chosen-uidl\t{st.st_ino}\t{st.st_mtime_ns}"
        sizes = name == _store.SIZE_CACHE_NAME
        magic = _store._SIZE_CACHE_MAGIC if sizes else _store._UIDLIST_MAGIC
        planted.write_text(f"{magic}\n{base}\t{body}\n")
        path.symlink_to(planted)
    elif make == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    with wall(5):
        mb = await backend_factory(save_uidl=True).open_mailbox("alice")
    try:
        assert [(m.uid, m.size) for m in mb.messages] == [("1700000001.M1P1.h", 25)]
    finally:
        await mb.aclose()
    # Replaced by a regular file of ours (rename() replaces the name, never follows it).
    assert path.is_file()
    assert not path.is_symlink()


@pytest.mark.parametrize("folder", ["cur", "new"])
@pytest.mark.parametrize("cached", [False, True])
async def test_folders_linked_to_another_users_are_not_served(
    alice: Path, root: Path, backend_factory: BackendMaker, folder: str, cached: bool
) -> None:
    # The server's user can read every maildir; alice's owner points her cur/ (or
    # new/) at bob's. Her login must not list, serve, move or delete bob's mail.
    bob = make_maildir(root / "bob")
    deliver(bob, "1700000001.M1P1.h:2,", b"Subject: bob's\n\nprivate\n", sub="cur")
    deliver(bob, "1700000002.M2P1.h", b"Subject: bob's new\n\nprivate\n")
    before = sorted(p.relative_to(bob) for p in bob.rglob("*"))
    backend = backend_factory()
    if cached:  # a login before the swap: the listing is cached
        mb = await backend.open_mailbox("alice")
        await mb.aclose()
    (alice / folder).rename(alice / f"{folder}.away")
    (alice / folder).symlink_to(bob / folder)
    with pytest.raises(PermanentFailure):
        await backend.open_mailbox("alice")
    assert sorted(p.relative_to(bob) for p in bob.rglob("*")) == before
    mb = await backend.open_mailbox("bob")  # and bob's own login is unaffected
    assert len(mb.messages) == 2
    await mb.aclose()


@pytest.mark.parametrize("swap", ["link", "folder"])
@pytest.mark.parametrize("read", [False, True])
async def test_update_removes_nothing_through_a_folder_swapped_in_after_the_listing(
    alice: Path, root: Path, backend_factory: BackendMaker, swap: str, read: bool
) -> None:
    # After alice's login lists her cur/, it is swapped for a link to bob's (or for
    # another folder), which holds a file of the same name: her DELE and the Seen
    # flag at UPDATE must not remove or rename it, nor anything else. A session that
    # read a message before the swap holds her very folders: UPDATE goes through them.
    name = "1700000001.M1P1.h:2,"
    deliver(alice, name, HELLO, sub="cur")
    deliver(alice, "1700000002.M2P1.h:2,", HELLO, sub="cur")
    bob = make_maildir(root / "bob")
    deliver(bob, name, b"Subject: bob's\n\nprivate\n", sub="cur")
    deliver(bob, "1700000002.M2P1.h:2,", b"Subject: bob's\n\nalso\n", sub="cur")
    mb = await backend_factory().open_mailbox("alice")
    assert isinstance(mb, MaildirMailbox)
    if read:
        assert await fetch(mb, 1) == HELLO  # to be flagged Seen at UPDATE
    (alice / "cur").rename(alice / "cur.away")
    if swap == "link":
        (alice / "cur").symlink_to(bob / "cur")
    else:
        (alice / "cur").mkdir()
        (alice / "cur" / name).write_bytes(b"someone else's\n")
    if read:
        await mb.commit([0])
        kept = ["1700000002.M2P1.h:2,S"]  # in her own folder, wherever it is now
    else:
        with pytest.raises(UpdateFailed, match="nothing removed"):
            await mb.commit([0])
        kept = [name, "1700000002.M2P1.h:2,"]
    assert sorted(p.name for p in (bob / "cur").iterdir()) == [name, "1700000002.M2P1.h:2,"]
    assert sorted(p.name for p in (alice / "cur.away").iterdir()) == kept
    if swap == "folder":
        assert [p.name for p in (alice / "cur").iterdir()] == [name]


@pytest.mark.parametrize("folder", ["new", "tmp", "cur"])
async def test_delivery_never_goes_through_a_linked_folder(
    alice: Path, root: Path, backend_factory: BackendMaker, folder: str
) -> None:
    # pypop deliver for alice, whose new/ (or tmp/) points at bob's: nothing is
    # delivered, least of all into bob's maildir.
    bob = make_maildir(root / "bob")
    (alice / folder).rmdir()
    (alice / folder).symlink_to(bob / folder)
    with pytest.raises(PermanentFailure):
        await backend_factory().deliver("alice", HELLO)
    assert not any(bob.rglob("*.*"))
    if folder != "tmp":
        assert not any((alice / "tmp").iterdir())  # nothing left half-delivered


class SwapDuringListing(MaildirBackend):
    """Replaces every file it is asked about, between the listing and the sizes."""

    make: str = "symlink"
    target: Path

    def keep_message(self, user: str, subdir: str, name: str) -> bool:
        path = Path(self.config.root, user, subdir, name)
        path.unlink()
        if self.make == "symlink":
            path.symlink_to(self.target)
        else:
            os.mkfifo(path)
        return True


@pytest.mark.parametrize("make", ["symlink", "fifo"])
async def test_file_swapped_before_its_size_is_counted_is_left_out(
    alice: Path, root: Path, secret: Path, make: str
) -> None:
    deliver(alice, "1700000001.M1P1.h", HELLO, sub="cur")  # no ,W=: the size is counted
    backend = SwapDuringListing.from_options({"root": str(root)})
    backend.make, backend.target = make, secret
    with wall(5):
        mb = await backend.open_mailbox("alice")
    assert list(mb.messages) == []  # vanished as a message, and nobody hung
    await mb.aclose()


# ------------------------------------------------------------------ item 2: FIFOs


async def test_fifo_is_never_listed(alice: Path, backend_factory: BackendMaker) -> None:
    os.mkfifo(alice / "cur" / "1700000001.fifo:2,")
    os.mkfifo(alice / "new" / "1700000002.fifo")
    deliver(alice, "1700000003.M3P1.h", HELLO)
    with wall(5):
        mb = await backend_factory().open_mailbox("alice")
    assert len(mb.messages) == 1
    await mb.aclose()


async def test_message_swapped_for_a_fifo_is_refused_at_once(
    alice: Path, backend_factory: BackendMaker
) -> None:
    paths = [deliver(alice, f"170000000{i}.M{i}P1.h:2,", HELLO, sub="cur") for i in range(6)]
    # io_timeout is far above the deadline below: only a non-blocking open passes.
    backend = backend_factory(io_threads=4, io_timeout=60)
    mb = await backend.open_mailbox("alice")
    try:
        for path in paths:
            path.unlink()
            os.mkfifo(path)
        with wall(5):
            for i in range(len(paths)):
                with pytest.raises(NoSuchMessage):
                    await fetch(mb, i)
    finally:
        with wall(5):
            await mb.aclose()
    # No thread was left hanging: others log in at once.
    make_maildir(alice.parent / "bob")
    with wall(5):
        other = await backend.open_mailbox("bob")
        await other.aclose()


CHILD_OPEN = """
import sys, trio
from pypop.backend import MailboxLocked
from pypop_maildir import create

async def main() -> None:
    try:
        mb = await create({"root": sys.argv[1], "lock": sys.argv[2]}).open_mailbox("alice")
    except MailboxLocked:
        print("locked")
        return
    await mb.aclose()
    print("free")

trio.run(main)
"""


def lock_state_elsewhere(root: Path, lock: str) -> str:
    """What another process sees: "locked" or "free"."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD_OPEN, str(root), lock],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.strip()


class _Blocker:
    """Fault injection: message opens block on a FIFO nobody writes to (a hung NFS
    server, a stuck disk) until :meth:`release`."""

    def __init__(self, tmp: Path) -> None:
        self.fifo = tmp / "stuck"
        os.mkfifo(self.fifo)
        self.entered = threading.Semaphore(0)

    def open_message(self, *args: object) -> int:
        self.entered.release()
        fd = os.open(self.fifo, os.O_RDONLY)  # blocks until a writer appears
        os.close(fd)
        raise OSError("gave up")

    def release(self) -> None:
        # Unblock every stuck open: a writer that opens and closes.
        for _ in range(8):
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                break
            os.close(fd)
            time.sleep(0.05)


@pytest.mark.parametrize("lock", ["auto", "dotlock"])
async def test_stuck_io_frees_the_session_and_its_lock(
    alice: Path, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lock: str
) -> None:
    """io_timeout frees the session and its lock, and one user's stuck I/O leaves the
    other users' logins alone, even with every thread of that session stuck."""
    for i in range(4):
        deliver(alice, f"170000000{i}.M{i}P1.h:2,", b"x" * 70_000 + b"\n", sub="cur")
    make_maildir(root / "bob")
    deliver(root / "bob", "1700000009.M9P1.h", HELLO)
    backend = create({"root": str(root), "io_threads": 4, "io_timeout": 0.5, "lock": lock})
    blocker = _Blocker(tmp_path)
    fds_before = len(os.listdir("/proc/self/fd"))
    mb = await backend.open_mailbox("alice")
    assert isinstance(mb, MaildirMailbox)
    monkeypatch.setattr(_store, "open_message", blocker.open_message)
    # Not in the page cache: a large message is read in a thread, and sticks there.
    monkeypatch.setattr(_backend, "read_file_now", lambda *args: None)
    try:
        with wall(10):
            # More stuck reads than the session's share of threads.
            for i in range(3):
                with pytest.raises(TemporaryFailure):
                    await fetch(mb, i)
            assert (alice / DOTLOCK_NAME).is_symlink() is (lock == "dotlock")
            assert await trio.to_thread.run_sync(lock_state_elsewhere, root, lock) == "locked"
            await mb.aclose()  # frees the lock although the session's threads are stuck
        assert not (alice / DOTLOCK_NAME).is_symlink()
        assert await trio.to_thread.run_sync(lock_state_elsewhere, root, lock) == "free"
        monkeypatch.undo()
        with wall(5):
            again = await backend.open_mailbox("alice")  # the same user, at once
            await again.aclose()
            other = await backend.open_mailbox("bob")
            assert await fetch(other, 0) == HELLO
            await other.aclose()
    finally:
        blocker.release()
    # The threads left behind held alice's folders past her release: they close them
    # when they end (never closed under them, where the number could be reused).
    for _ in range(100):
        if len(os.listdir("/proc/self/fd")) == fds_before:
            break
        await trio.sleep(0.05)
    assert len(os.listdir("/proc/self/fd")) == fds_before


# ---------------------------------------------------- item 10: crash during new -> cur


@pytest.mark.parametrize("flag_updates", [True, False])
async def test_crash_between_link_and_unlink_lists_the_message_once(
    alice: Path, backend_factory: BackendMaker, flag_updates: bool
) -> None:
    """An earlier move died between link() and unlink(): both names of one file."""
    new = deliver(alice, "1700000001.M1P1.h", HELLO)
    cur = alice / "cur" / "1700000001.M1P1.h:2,"
    os.link(new, cur)
    deliver(alice, "1700000002.M2P1.h", b"Subject: two\n\n2\n")
    backend = backend_factory(flag_updates=flag_updates)
    mb = await backend.open_mailbox("alice")
    try:
        assert [m.uid for m in mb.messages] == ["1700000001.M1P1.h", "1700000002.M2P1.h"]
        assert await fetch(mb, 0) == HELLO
        await mb.commit([0])  # DELE 1, QUIT: the message goes, under both names
    finally:
        await mb.aclose()
    left = sorted(p.name for sub in ("new", "cur") for p in (alice / sub).iterdir())
    assert left == ["1700000002.M2P1.h" + (":2," if flag_updates else "")]


async def test_new_to_cur_is_one_rename(alice: Path, backend_factory: BackendMaker) -> None:
    """rename(), never link() + unlink(): no moment with two names, and the inode,
    its link count and a second hard link elsewhere are untouched."""
    new = deliver(alice, "1700000001.M1P1.h", HELLO)
    ino = new.stat().st_ino
    linked: list[tuple[str, str]] = []
    real_link = os.link

    def spy_link(src: str, dst: str, *args: object, **kwargs: object) -> None:
        linked.append((src, dst))
        real_link(src, dst)

    mp = pytest.MonkeyPatch()
    mp.setattr(os, "link", spy_link)
    try:
        mb = await backend_factory(lock="fcntl").open_mailbox("alice")
        await mb.aclose()
    finally:
        mp.undo()
    assert linked == []
    moved = alice / "cur" / "1700000001.M1P1.h:2,"
    assert moved.stat().st_ino == ino
    assert moved.stat().st_nlink == 1
    assert not new.exists()


async def test_same_base_name_different_files_both_listed(
    alice: Path, backend_factory: BackendMaker
) -> None:
    """Two different files sharing a base name are two messages (a copy): neither may
    be hidden, or DELE would leave one behind unseen."""
    deliver(alice, "1700000001.M1P1.h", HELLO)
    deliver(alice, "1700000001.M1P1.h:2,S", b"Subject: other\n\nother\n", sub="cur")
    mb = await backend_factory(flag_updates=False).open_mailbox("alice")
    try:
        assert len(mb.messages) == 2
        assert len({m.uid for m in mb.messages}) == 2
    finally:
        await mb.aclose()


async def test_stuck_io_through_the_server(
    alice: Path,
    root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """End to end: RETR of a message whose storage hangs gets -ERR [SYS/TEMP] after
    io_timeout, with a log line and no traceback; the user logs in again at once."""
    from .test_e2e import PASSWORD, running

    deliver(alice, "1700000001.M1P1.h:2,", b"x" * 70_000 + b"\n", sub="cur")
    blocker = _Blocker(tmp_path)
    backend = create({"root": str(root), "io_timeout": 0.5})
    try:
        async with running(backend) as server:
            host, port = server.addresses[0]

            def client() -> tuple[bytes, tuple[int, int]]:
                pop = poplib.POP3(host, port, timeout=30)
                try:
                    pop.user("alice")
                    pop.pass_(PASSWORD)
                    monkeypatch.setattr(_store, "open_message", blocker.open_message)
                    # Not in the page cache: read in a thread, which sticks.
                    monkeypatch.setattr(_backend, "read_file_now", lambda *args: None)
                    with pytest.raises(poplib.error_proto) as err:
                        pop.retr(1)
                    monkeypatch.undo()
                finally:
                    pop.close()
                again = poplib.POP3(host, port, timeout=30)
                try:
                    again.user("alice")
                    again.pass_(PASSWORD)
                    stat = again.stat()
                    again.quit()
                finally:
                    again.close()
                reply = err.value.args[0]
                assert isinstance(reply, bytes)
                return reply, stat

            with wall(20):
                error, stat = await trio.to_thread.run_sync(client)
    finally:
        blocker.release()
    assert error.startswith(b"-ERR [SYS/TEMP] ")
    assert stat == (1, 70002)  # 70,000 octets and a line end made CRLF
    assert 'read message 1 of alice: "blocking I/O did not finish within' in caplog.text
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info]


# ------------------------- RETR through the listed folders (a swap after the login)


def _mail(who: str, n: int, size: int = 0) -> bytes:
    """A message of ``who``'s (``size``: at least that many octets of body)."""
    line = f"{who}'s own mail {n}\n".encode()
    return f"Subject: {who} {n}\n\n".encode() + line * max(1, size // len(line))


def _name(n: int) -> str:
    return f"170000000{n}.M{n}P1.h:2,"


def _retr(pop: poplib.POP3, n: int) -> bytes | None:
    """The message as stored (LF line ends), or None for an -ERR [SYS/TEMP] (which
    ends the session: no UPDATE)."""
    try:
        _, lines, _ = pop.retr(n)
    except poplib.error_proto as exc:
        reply = exc.args[0]
    else:
        return b"\n".join(lines) + b"\n"
    assert reply.startswith(b"-ERR [SYS/TEMP] "), reply
    return None


async def _session_after_swap(
    root: Path, sizes: list[int], before: list[int], after: list[int], dele: list[int]
) -> tuple[dict[int, bytes | None], bytes | None]:
    """alice's messages of ``sizes`` (bob has files of the same names, his own content);
    over a real server, alice logs in, RETRs ``before``, her cur/ is swapped for a link
    to bob's, she DELEs ``dele`` and RETRs ``after``: the messages got, and QUIT's reply
    (None: the session ended at an -ERR, with no UPDATE)."""
    from .test_e2e import PASSWORD, running

    alice, bob = make_maildir(root / "alice"), make_maildir(root / "bob")
    for n, size in enumerate(sizes, 1):
        deliver(alice, _name(n), _mail("alice", n, size), sub="cur")
        deliver(bob, _name(n), _mail("bob", n, size), sub="cur")
    async with running(create({"root": str(root)})) as server:
        host, port = server.addresses[0]

        def client() -> tuple[dict[int, bytes | None], bytes | None]:
            got: dict[int, bytes | None] = {}
            pop = poplib.POP3(host, port, timeout=30)
            try:
                pop.user("alice")
                pop.pass_(PASSWORD)
                for n in before:
                    got[n] = _retr(pop, n)
                (alice / "cur").rename(alice / "cur.away")
                (alice / "cur").symlink_to(bob / "cur")
                for n in dele:
                    pop.dele(n)
                for n in after:
                    got[n] = _retr(pop, n)
                    if got[n] is None:
                        return got, None
                try:
                    quit_reply = pop.quit()
                except poplib.error_proto as exc:
                    quit_reply = exc.args[0]
            finally:
                pop.close()
            return got, quit_reply

        with wall(20):
            got, quit_reply = await trio.to_thread.run_sync(client)
    # Nothing of bob's removed or renamed, whatever alice did.
    assert sorted(p.name for p in (bob / "cur").iterdir()) == [
        _name(n) for n in range(1, 1 + len(sizes))
    ]
    return got, quit_reply


async def test_retr_of_first_message_after_cur_swapped_for_a_link(root: Path) -> None:
    # The worker's path: the first RETR opens the listed folders, finds cur/ is not the
    # one listed, and reads nothing: -ERR [SYS/TEMP], the session ends without UPDATE,
    # so her DELE before it removes nothing.
    got, quit_reply = await _session_after_swap(root, [0, 0], [], [1], [2])
    assert (got, quit_reply) == ({1: None}, None)
    assert sorted(p.name for p in (root / "alice" / "cur.away").iterdir()) == [_name(1), _name(2)]


async def test_retr_of_later_messages_after_cur_swapped_for_a_link(root: Path) -> None:
    # A RETR before the swap holds her folders (its read-ahead stops at the large
    # message 2); after it, message 3 is read in the worker and message 4 comes from the
    # read-ahead (read_small_files through the held descriptors): hers, never bob's.
    got, quit_reply = await _session_after_swap(root, [0, 70_000, 0, 0], [1], [3, 4], [2])
    assert got == {1: _mail("alice", 1), 3: _mail("alice", 3), 4: _mail("alice", 4)}
    assert quit_reply is not None
    assert quit_reply.startswith(b"+OK")
    # UPDATE went through her folder, wherever its name is now: 2 removed, the
    # messages retrieved flagged Seen.
    assert sorted(p.name for p in (root / "alice" / "cur.away").iterdir()) == [
        _name(1) + "S",
        _name(3) + "S",
        _name(4) + "S",
    ]


@pytest.mark.parametrize("size", [70_000, 900_000])
async def test_retr_of_large_message_after_cur_swapped_for_a_link(root: Path, size: int) -> None:
    # A large message (just written: in the page cache) goes out through read_file_now
    # on the event loop, relative to the held cur/: hers, never bob's.
    got, quit_reply = await _session_after_swap(root, [0, size], [1], [2], [])
    assert got == {1: _mail("alice", 1), 2: _mail("alice", 2, size)}
    assert quit_reply is not None
    assert quit_reply.startswith(b"+OK")


async def test_sessions_leave_no_descriptor_open(root: Path) -> None:
    """The folders' descriptors a session holds from its first read are closed at its
    end: after QUIT, after a dropped connection, after a RETR refused for a swapped
    cur/, after an idle session."""
    from .test_e2e import PASSWORD, running

    alice, bob = make_maildir(root / "alice"), make_maildir(root / "bob")
    for n, size in enumerate([0, 70_000, 0, 0], 1):
        deliver(alice, _name(n), _mail("alice", n, size), sub="cur")
        deliver(bob, _name(n), _mail("bob", n, size), sub="cur")

    def count() -> int:
        return len(os.listdir("/proc/self/fd"))

    async with running(create({"root": str(root)})) as server:
        host, port = server.addresses[0]

        def login() -> poplib.POP3:
            pop = poplib.POP3(host, port, timeout=30)
            pop.user("alice")
            pop.pass_(PASSWORD)
            return pop

        def sessions() -> None:
            pop = login()  # idle: QUIT at once
            pop.quit()
            pop = login()  # reads everything, deletes one, QUIT
            for n in range(1, 5):
                assert _retr(pop, n) == _mail("alice", n, [0, 70_000, 0, 0][n - 1])
            pop.dele(3)
            pop.quit()
            pop = login()  # reads and drops the connection
            assert _retr(pop, 1) == _mail("alice", 1)
            pop.close()
            time.sleep(0.2)
            pop = login()  # a RETR refused: cur/ is not the one listed
            (alice / "cur").rename(alice / "cur.away")
            (alice / "cur").symlink_to(bob / "cur")
            assert _retr(pop, 1) is None
            pop.close()

        async def settled() -> int:
            """The count once the server has let go of the closed connections."""
            counts = [count()]
            for _ in range(100):
                if len(counts) >= 5 and len(set(counts[-5:])) == 1:
                    break
                await trio.sleep(0.05)
                counts.append(count())
            return counts[-1]

        def warm_up() -> None:  # whatever the process makes once (threads, wake-ups)
            pop = login()
            assert _retr(pop, 1) == _mail("alice", 1)
            pop.quit()

        with wall(30):
            await trio.to_thread.run_sync(warm_up)
            before = await settled()
            await trio.to_thread.run_sync(sessions)
            assert await settled() <= before
    assert (alice / "cur.away").is_dir()
