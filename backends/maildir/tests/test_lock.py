"""The exclusive lock: in one process, across processes, stale recovery."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio
from pypop.backend import MailboxLocked

from pypop_maildir import _lock, create
from pypop_maildir._lock import DOTLOCK_NAME, FLOCK_NAME, LOCAL_FS_TYPES, HeldLock, fs_type

from .test_hostile_maildir import lock_state_elsewhere

METHODS = ["auto", "dotlock", "fcntl"]

HOLDER = """
import sys, trio
from pypop_maildir import create

async def main() -> None:
    backend = create({"root": sys.argv[1], "lock": sys.argv[2]})
    mb = await backend.open_mailbox("alice")
    print("locked", flush=True)
    await trio.to_thread.run_sync(sys.stdin.readline)
    await mb.aclose()
    print("released", flush=True)

trio.run(main)
"""


def start_holder(root: Path, method: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), method],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "locked\n"
    return proc


def close_holder(proc: subprocess.Popen[str]) -> None:
    proc.wait(timeout=10)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


def try_open(root: Path, method: str, **options: object) -> bool:
    """True if this process can lock alice's maildrop (and releases it again)."""

    async def main() -> bool:
        backend = create({"root": str(root), "lock": method, **options})
        try:
            mb = await backend.open_mailbox("alice")
        except MailboxLocked:
            return False
        await mb.aclose()
        return True

    return trio.run(main)


@pytest.mark.parametrize("method", METHODS)
async def test_two_opens_in_one_process_conflict(alice: Path, root: Path, method: str) -> None:
    backend = create({"root": str(root), "lock": method})
    mb = await backend.open_mailbox("alice")
    with pytest.raises(MailboxLocked):
        await backend.open_mailbox("alice")
    other = create({"root": str(root), "lock": method})  # a second backend instance too
    with pytest.raises(MailboxLocked):
        await other.open_mailbox("alice")
    await mb.aclose()
    mb = await backend.open_mailbox("alice")
    await mb.aclose()
    assert not (alice / DOTLOCK_NAME).is_symlink()


@pytest.mark.parametrize("method", METHODS)
def test_lock_across_processes_and_release(alice: Path, root: Path, method: str) -> None:
    proc = start_holder(root, method)
    try:
        assert not try_open(root, method)
        if method == "auto":
            assert not try_open(root, "dotlock")  # the two interoperate
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "released\n"
    finally:
        close_holder(proc)
    assert try_open(root, method)


# Pairs that share a lock: auto and fcntl the fcntl lock, auto and dotlock the dotlock.
@pytest.mark.parametrize(
    ("holder", "other"),
    [("auto", "fcntl"), ("fcntl", "auto"), ("auto", "dotlock"), ("dotlock", "auto")],
)
def test_methods_interoperate(alice: Path, root: Path, holder: str, other: str) -> None:
    proc = start_holder(root, holder)
    try:
        assert not try_open(root, other)
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
    finally:
        close_holder(proc)
    assert try_open(root, other)


@pytest.mark.parametrize("alive", [True, False])
def test_dotlock_of_an_earlier_version_is_understood(alice: Path, root: Path, alive: bool) -> None:
    """A regular file "pid:host\\nfcntl\\n" whose holder keeps an fcntl lock on it."""
    lock = alice / DOTLOCK_NAME
    lock.write_text("1:some-other-host.example\nfcntl\n")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
            str(lock),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        if not alive:
            holder.kill()
            holder.wait()
        assert try_open(root, "auto") is not alive
    finally:
        holder.kill()
        holder.wait()
        for pipe in (holder.stdin, holder.stdout):
            if pipe is not None:
                pipe.close()


@pytest.mark.parametrize("method", METHODS)
def test_lock_of_killed_process_is_recovered(alice: Path, root: Path, method: str) -> None:
    proc = start_holder(root, method)
    assert not try_open(root, method)
    proc.send_signal(signal.SIGKILL)
    close_holder(proc)
    if method == "dotlock":
        assert os.path.lexists(alice / DOTLOCK_NAME)  # left behind ...
    assert try_open(root, method)  # ... and recovered at once
    assert not os.path.lexists(alice / DOTLOCK_NAME)


def test_dotlock_content_is_pid_and_host(alice: Path, root: Path) -> None:
    async def main() -> None:
        mb = await create({"root": str(root), "lock": "dotlock"}).open_mailbox("alice")
        # A symbolic link that only carries text: no data block to write and free. The
        # fcntl lock (which this file system has) is held too, and it says so.
        assert (alice / DOTLOCK_NAME).is_symlink()
        text = os.readlink(alice / DOTLOCK_NAME)
        assert text == f"{os.getpid()}:{socket.gethostname()}:fcntl"
        await mb.aclose()
        for method in ("auto", "fcntl"):
            # The fcntl lock alone where the file system has them: nothing is created.
            mb = await create({"root": str(root), "lock": method}).open_mailbox("alice")
            assert not (alice / DOTLOCK_NAME).is_symlink()
            assert (alice / FLOCK_NAME).exists()
            await mb.aclose()

    trio.run(main)
    assert sorted(p.name for p in alice.iterdir() if "lock" in p.name) == [FLOCK_NAME]


@pytest.mark.parametrize("method", ["auto", "dotlock"])
def test_stale_dotlock_from_other_host_by_age(alice: Path, root: Path, method: str) -> None:
    lock = alice / DOTLOCK_NAME
    lock.write_text("4242:some-other-host.example\n")
    assert not try_open(root, method, lock_stale_timeout=60)  # fresh: respected
    old = time.time() - 120
    os.utime(lock, (old, old))
    assert try_open(root, method, lock_stale_timeout=60)  # untouched for 2 min: stale
    assert not lock.exists()


@pytest.mark.parametrize("content", ["", "garbage", "notapid:HOST\n"])
def test_unreadable_dotlock_falls_back_to_age(alice: Path, root: Path, content: str) -> None:
    lock = alice / DOTLOCK_NAME
    lock.write_text(content.replace("HOST", socket.gethostname()))
    assert not try_open(root, "dotlock", lock_stale_timeout=60)
    old = time.time() - 120
    os.utime(lock, (old, old))
    assert try_open(root, "dotlock", lock_stale_timeout=60)


def test_dead_local_pid_is_stale_at_once(alice: Path, root: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (alice / DOTLOCK_NAME).write_text(f"{proc.pid}:{socket.gethostname()}\n")
    assert try_open(root, "dotlock")
    # our own pid, but not a lock this process holds: left by an earlier process
    (alice / DOTLOCK_NAME).write_text(f"{os.getpid()}:{socket.gethostname()}\n")
    assert try_open(root, "dotlock")


@pytest.mark.parametrize("method", ["auto", "dotlock"])
def test_live_local_pid_is_respected(alice: Path, root: Path, method: str) -> None:
    """A dotlock of a holder without fcntl locks: auto, holding the fcntl lock, still
    respects it."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (alice / DOTLOCK_NAME).write_text(f"{proc.pid}:{socket.gethostname()}\n")
        old = time.time() - 10_000
        os.utime(alice / DOTLOCK_NAME, (old, old))
        assert not try_open(root, method)  # alive: the age does not matter
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------- where the release runs (a thread or not)


def test_fs_type_names_local_and_other_file_systems(root: Path) -> None:
    fd = os.open(root, os.O_RDONLY)
    try:
        here = fs_type(fd)
    finally:
        os.close(fd)
    if sys.platform.startswith("linux"):
        assert here is not None
    proc = os.open("/proc/self", os.O_RDONLY) if os.path.isdir("/proc/self") else None
    if proc is not None:
        try:
            assert fs_type(proc) not in LOCAL_FS_TYPES  # procfs: not a disk's
        finally:
            os.close(proc)
    bad = os.open(root, os.O_RDONLY)
    os.close(bad)
    assert fs_type(bad) is None  # a closed descriptor: unknown, never "local"


def _record_release_threads(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Spy: for each HeldLock.release, whether it ran on the event loop's thread."""
    on_loop: list[bool] = []
    real = HeldLock.release

    def spy(self: HeldLock) -> None:
        on_loop.append(threading.current_thread() is threading.main_thread())
        real(self)

    monkeypatch.setattr(HeldLock, "release", spy)
    return on_loop


@pytest.mark.parametrize(("method", "quick"), [("auto", True), ("fcntl", True), ("dotlock", False)])
async def test_release_of_an_fcntl_lock_on_a_local_file_system_needs_no_thread(
    alice: Path, root: Path, monkeypatch: pytest.MonkeyPatch, method: str, quick: bool
) -> None:
    """An fcntl lock on a local file system goes with one close() on the event loop
    (cheaper than a thread hop); a dotlock's release (an unlink) still goes to a
    worker thread. Either way the maildrop is free for another process at once."""
    fd = os.open(root, os.O_RDONLY)
    try:
        if fs_type(fd) not in LOCAL_FS_TYPES:
            pytest.skip("the test directory is not on a local file system pypop knows")
    finally:
        os.close(fd)
    on_loop = _record_release_threads(monkeypatch)
    backend = create({"root": str(root), "lock": method})
    mb = await backend.open_mailbox("alice")
    assert await trio.to_thread.run_sync(lock_state_elsewhere, root, method) == "locked"
    await mb.aclose()
    assert on_loop == [quick]
    assert await trio.to_thread.run_sync(lock_state_elsewhere, root, method) == "free"
    again = await backend.open_mailbox("alice")  # and for this process too
    await again.aclose()


async def test_release_elsewhere_goes_to_a_worker_thread(
    alice: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the lock file's file system says NFS (a close() there is an
    RPC that may hang): the release leaves the event loop."""
    monkeypatch.setattr(_lock, "fs_type", lambda fd: 0x6969)  # NFS_SUPER_MAGIC
    on_loop = _record_release_threads(monkeypatch)
    backend = create({"root": str(root), "lock": "auto"})
    mb = await backend.open_mailbox("alice")
    await mb.aclose()
    assert on_loop == [False]
    assert await trio.to_thread.run_sync(lock_state_elsewhere, root, "auto") == "free"


@pytest.mark.parametrize("method", METHODS)
def test_refresh_due_says_when_refresh_would_touch_the_dotlock(alice: Path, method: str) -> None:
    """What lets a large message be read on the event loop: only a dotlock is ever
    touched, once _REFRESH_EVERY has passed since the last touch, never once released."""
    held = _lock.acquire(str(alice), method, 600.0)  # type: ignore[arg-type]
    try:
        dotlock = (alice / DOTLOCK_NAME).is_symlink()
        assert dotlock is (method == "dotlock")
        assert not held.refresh_due()
        held._last_refresh -= _lock._REFRESH_EVERY  # (a minute and more ago)
        assert held.refresh_due() is dotlock
        held.refresh()
        assert not held.refresh_due()
        held._last_refresh -= _lock._REFRESH_EVERY
    finally:
        held.release()
    assert not held.refresh_due()
