"""The exclusive maildrop lock (RFC 1939 §4), across threads, processes and hosts.

All functions here block; the backend calls them in a worker thread, except
:meth:`HeldLock.release` of a lock whose :attr:`~HeldLock.quick_release` is set (an
``fcntl`` lock on a local file system: one ``close()``).

Methods
-------
``fcntl``
    A POSIX record lock (``lockf``) on ``<maildir>/pypop-pop3.flock``; that file is
    never removed, and never opened through a symbolic link (a link in its place
    fails the login: ``-ERR [SYS/TEMP]``). The kernel (or the NFS lock manager) drops
    the lock when the holder dies, so a killed process never leaves a stale lock.
    Needs working ``fcntl`` locks on the file system (local ones, NFSv4, or NFSv3
    with lockd). Taking and dropping
    it creates nothing: about 9 µs here, where a dotlock costs about 70 µs of kernel
    time (a directory entry made and removed, through the journal).
``dotlock``
    ``<maildir>/pypop-pop3.lock``, a symbolic link whose target is ``<pid>:<host>``
    (never followed: it only carries that text). ``symlink()`` creates it atomically,
    on NFS too, and a short link lives in its inode: creating and removing it writes
    no data block, which a regular file with content would (on a file system mounted
    with ``discard`` each such removal waits for the disk). Where symbolic links are
    not supported, a regular file created with ``O_EXCL`` holding the same text is
    used. An existing dotlock is stale, and is removed, when its host is ours and its
    pid is not a running process, or, when that cannot be checked (other host,
    unreadable content), when its mtime is older than ``lock_stale_timeout``. The
    holder refreshes the mtime while it works (at most once a minute), so choose a
    timeout above the server's idle timeout. Where the file system has ``fcntl``
    locks, the holder takes the ``fcntl`` lock too (first) and says so
    (``<pid>:<host>:fcntl``): a dotlock that says so while that lock is free was left
    by a dead holder and is recovered at once.
``auto`` (default)
    The ``fcntl`` lock where the file system has them, as Dovecot's default
    ``lock_method = fcntl``; a dotlock found in place (a ``dotlock`` holder on a host
    without ``fcntl`` locks) is respected, or removed if stale. Where ``fcntl`` locks
    are not supported, the dotlock. NFS mounted with ``nolock`` or ``local_lock``
    keeps ``fcntl`` locks on one host: use ``dotlock`` there on every server.

All three interoperate: every method takes the ``fcntl`` lock where it works, and
``auto`` respects dotlocks.

Dotlocks of earlier versions (a regular file ``<pid>:<host>\\n`` with an optional second
line ``fcntl``, the ``fcntl`` lock then held on that file itself) are still understood.

Within one process (one server with many sessions), a registry of held maildirs (by
device and inode) makes a second open of the same maildir a conflict too: POSIX locks
alone would not, and a probe of one's own ``fcntl`` lock would release it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import Final, Literal

__all__ = ["DOTLOCK_NAME", "FLOCK_NAME", "HeldLock", "LockBusy", "acquire"]

DOTLOCK_NAME = "pypop-pop3.lock"
FLOCK_NAME = "pypop-pop3.flock"
_REFRESH_EVERY = 60.0
# symlink() refused: the file system has no symbolic links (a plain file then).
_NO_SYMLINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)

# File systems (statfs f_type, <linux/magic.h>) where closing a file never waits for a
# disk or a network: releasing an fcntl lock there is one close() that drops an
# in-memory lock, cheaper than a thread hop, so it runs on the event loop. Anything
# else (NFS, CIFS, FUSE, cluster file systems whose locks go through a lock manager)
# is released in a worker thread.
LOCAL_FS_TYPES: Final = frozenset(
    {
        0xEF53,  # ext2, ext3, ext4
        0x58465342,  # xfs
        0x9123683E,  # btrfs
        0x01021994,  # tmpfs
        0x858458F6,  # ramfs
        0xF2F52010,  # f2fs
        0x2FC12FC2,  # zfs
        0xCA451A4E,  # bcachefs
        0x794C7630,  # overlayfs
    }
)

_registry_guard = threading.Lock()
_held: set[int] = set()  # (st_dev << 64) | st_ino of each maildir this process holds
_hostname_cache: list[str] = []


class LockBusy(Exception):
    """Another session (here or elsewhere) holds the maildrop."""


def _lockf_nb(fd: int) -> bool:
    """Try an exclusive fcntl lock; True if taken, False if held elsewhere.

    Raises OSError if the file system does not support it.
    """
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class HeldLock:
    """A held lock; :meth:`release` is idempotent."""

    __slots__ = (
        "_fd",
        "_ino",
        "_key",
        "_last_refresh",
        "_released",
        "method",
        "path",
        "quick_release",
    )

    def __init__(
        self,
        key: int,
        method: Literal["auto", "dotlock", "fcntl"],
        path: str,
        fd: int | None,
        ino: tuple[int, int] | None,
    ) -> None:
        self._key = key
        self.method = method
        self.path = path  # the dotlock; "" when none was made
        self._fd = fd  # holds the fcntl lock, if any
        self._ino = ino  # our dotlock's (st_dev, st_ino); None: no dotlock
        self._last_refresh = time.monotonic()
        self._released = False
        # release() is a close() on a local file system: the caller need not leave the
        # event loop for it (no dotlock to unlink, no lock manager to ask).
        self.quick_release = ino is None and fd is not None and fs_type(fd) in LOCAL_FS_TYPES

    @property
    def released(self) -> bool:
        return self._released

    def refresh_due(self) -> bool:
        """Whether :meth:`refresh` would touch the dotlock now (a write that may wait)."""
        return (
            not self._released
            and self._ino is not None
            and time.monotonic() - self._last_refresh >= _REFRESH_EVERY
        )

    def refresh(self, *, force: bool = False) -> None:
        """Touch a dotlock so other hosts do not take it for stale."""
        if self._released or self._ino is None:
            return
        now = time.monotonic()
        if not force and now - self._last_refresh < _REFRESH_EVERY:
            return
        self._last_refresh = now
        with contextlib.suppress(OSError):
            os.utime(self.path, follow_symlinks=False)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            if self._ino is not None:
                try:
                    st = os.lstat(self.path)
                    if (st.st_dev, st.st_ino) == self._ino:
                        # Still ours: nobody judged it stale and replaced it.
                        os.unlink(self.path)
                except FileNotFoundError:
                    pass
        finally:
            if self._fd is not None:
                os.close(self._fd)  # drops the fcntl lock, after the unlink
                self._fd = None
            with _registry_guard:
                _held.discard(self._key)

    def forget(self) -> None:
        """Give up this process's claim without touching the file system (a release
        that could not finish): the maildir can be locked here again, and the dotlock
        left behind, naming this process, then reads as stale. A release still
        running in some thread removes only its own dotlock (same inode)."""
        with _registry_guard:
            _held.discard(self._key)


class _Statfs(ctypes.Structure):
    # struct statfs begins with f_type (a long, __fsword_t) on every Linux ABI; the
    # rest is room for the fields after it (120 octets on x86-64).
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


_fstatfs: Callable[[int, ctypes._Pointer[_Statfs]], int] | None = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None)
        _fstatfs = _libc.fstatfs
        _fstatfs.argtypes = (ctypes.c_int, ctypes.POINTER(_Statfs))
        _fstatfs.restype = ctypes.c_int
    except (OSError, AttributeError):
        _fstatfs = None


def fs_type(fd: int) -> int | None:
    """The file system type of ``fd`` (Linux ``statfs`` magic number), None if
    unknown (another platform, or the call failed)."""
    if _fstatfs is None:
        return None
    buf = _Statfs()
    if _fstatfs(fd, ctypes.pointer(buf)) != 0:
        return None
    return int(buf.f_type) & 0xFFFFFFFF  # a negative long on 32-bit ABIs


def acquire(
    maildir: str,
    method: Literal["auto", "dotlock", "fcntl"],
    stale_timeout: float,
) -> HeldLock:
    """Lock ``maildir`` without waiting; raises :class:`LockBusy` on conflict."""
    st = os.stat(maildir)
    # One stat, where realpath() would lstat every component; one int, not a tuple.
    key = (st.st_dev << 64) | st.st_ino
    with _registry_guard:
        if key in _held:
            raise LockBusy(maildir)
        _held.add(key)
    fd: int | None = None
    try:
        # Every method takes the fcntl lock where the file system has them: a live
        # holder of any method is found there at once, and nothing is created.
        # (f-strings, not os.path.join: a dozen lines of Python each, at every login)
        # O_NOFOLLOW: a link put in its place must not have us create or lock a file
        # elsewhere.
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(f"{maildir}/{FLOCK_NAME}", flags, 0o600)
        try:
            taken = _lockf_nb(fd)
        except OSError:
            if method == "fcntl":
                raise
            taken = None  # no fcntl locks here
        if taken is False:
            raise LockBusy(maildir)
        if taken is None:
            os.close(fd)
            fd = None
        path = f"{maildir}/{DOTLOCK_NAME}"
        if method == "fcntl":
            return HeldLock(key, method, "", fd, None)  # no path kept: idle memory
        if method == "auto" and fd is not None:
            # The fcntl lock is enough; a dotlock left by a holder that could not take
            # it (a host without fcntl locks) is still respected.
            if _dotlock_in_force(maildir, path, stale_timeout):
                raise LockBusy(maildir)
            return HeldLock(key, method, "", fd, None)
        content = f"{os.getpid()}:{_hostname()}" + (":fcntl" if fd is not None else "")
        ino = _make_dotlock(maildir, path, content, stale_timeout, fcntl_held=fd is not None)
        return HeldLock(key, method, path, fd, ino)
    except BaseException:
        if fd is not None:
            os.close(fd)
        with _registry_guard:
            _held.discard(key)
        raise


def _dotlock_in_force(maildir: str, path: str, stale_timeout: float) -> bool:
    """Is there a dotlock whose holder may be alive? A stale one is removed."""
    if not os.path.lexists(path):
        return False
    for _attempt in range(2):
        stale, st = _is_stale(maildir, path, stale_timeout, fcntl_held=True)
        if not stale:
            return True
        if st is None:
            return False
        try:
            now = os.lstat(path)
            if (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns):
                os.unlink(path)
                return False
        except FileNotFoundError:
            return False
    return True


def _hostname() -> str:
    if not _hostname_cache:
        _hostname_cache.append(socket.gethostname() or "localhost")
    return _hostname_cache[0]


def _create(path: str, content: str) -> None:
    """Create the dotlock atomically; raises FileExistsError if it exists."""
    try:
        os.symlink(content, path)
        return
    except OSError as exc:
        if exc.errno not in _NO_SYMLINKS:
            raise
    # No symbolic links here: O_EXCL is atomic on local and NFSv3+ file systems. The
    # file is briefly empty, which readers treat as "fresh".
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, content.encode() + b"\n")
    finally:
        os.close(fd)


def _make_dotlock(
    maildir: str, path: str, content: str, stale_timeout: float, *, fcntl_held: bool
) -> tuple[int, int]:
    """Create the dotlock; returns its (st_dev, st_ino)."""
    for _attempt in range(2):
        try:
            _create(path, content)
            mine = os.lstat(path)
            return mine.st_dev, mine.st_ino
        except FileExistsError:
            stale, st = _is_stale(maildir, path, stale_timeout, fcntl_held=fcntl_held)
            if not stale:
                raise LockBusy(maildir) from None
            if st is not None:
                # Remove it only if it is still the file we judged (Dovecot does the same).
                try:
                    now = os.lstat(path)
                    if (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns):
                        os.unlink(path)
                except FileNotFoundError:
                    pass
    raise LockBusy(maildir)


def _read_dotlock(path: str) -> str | None:
    """What a dotlock says: a symlink's target, or a regular file's first 512 octets.

    None if it is gone or unreadable. The file is opened without following links and
    without blocking, so a FIFO or a link put in its place cannot hang or redirect us.
    """
    try:
        return os.readlink(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: not a symlink
            return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, 512).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _probe(path: str, st: os.stat_result | None) -> bool | None:
    """Is the fcntl lock on ``path`` free (True), held (False), or unknown (None)?

    A probe that gets the lock drops it again when the descriptor is closed. With
    ``st``, the file must still be that inode.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if st is not None and os.fstat(fd).st_ino != st.st_ino:
            return None
        return _lockf_nb(fd)
    except OSError:
        return None  # fcntl unsupported here
    finally:
        os.close(fd)


def _is_stale(
    maildir: str, path: str, stale_timeout: float, *, fcntl_held: bool
) -> tuple[bool, os.stat_result | None]:
    """Decide whether the existing dotlock at ``path`` is stale.

    ``fcntl_held``: we hold the fcntl lock of ``pypop-pop3.flock`` ourselves.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True, None
    content = _read_dotlock(path)
    if content is None:
        # Gone meanwhile, or unreadable: only its age can tell.
        return time.time() - st.st_mtime > stale_timeout, st
    lines = content.splitlines()
    first = lines[0] if lines else ""
    fields = first.split(":")
    if len(fields) == 3 and fields[2] == "fcntl":
        # Its holder held the fcntl lock of pypop-pop3.flock, which is free now (we got
        # it, or a probe does): the holder died.
        free = True if fcntl_held else _probe(os.path.join(maildir, FLOCK_NAME), None)
        if free is not None:
            return free, st
    elif len(lines) >= 2 and lines[1] == "fcntl" and stat.S_ISREG(st.st_mode):
        # An earlier version's dotlock: the holder locked the dotlock file itself.
        free = _probe(path, st)
        if free is not None:
            return free, st
    if len(fields) >= 2:
        pid_s, host = fields[0], fields[1]
        if host == _hostname() and pid_s.isdigit() and int(pid_s) > 0:
            pid = int(pid_s)
            # Our own pid: every lock this process holds is in the registry, which was
            # checked first, so this one was left by an earlier process with our pid.
            return pid == os.getpid() or not _pid_alive(pid), st
    return time.time() - st.st_mtime > stale_timeout, st
