"""The exclusive maildrop lock (RFC 1939 §4), across threads, processes and hosts.

All functions here block; the backend calls them in a worker thread.

Methods
-------
``fcntl``
    A POSIX record lock (``lockf``) on ``<maildir>/pypop-pop3.flock``; that file is
    never removed. The kernel (or the NFS lock manager) drops the lock when the holder
    dies, so a killed process never leaves a stale lock. Needs working ``fcntl`` locks
    on the file system (NFSv4, or NFSv3 with lockd).
``dotlock``
    ``<maildir>/pypop-pop3.lock``, created NFS-safely (a private temporary file
    ``link()``-ed into place, so creation is atomic even on NFSv2/3) and holding
    ``"<pid>:<host>\\n"`` like Dovecot's dotlocks. An existing dotlock is stale, and is
    removed, when its host is ours and its pid is not a running process, or, when that
    cannot be checked (other host, unreadable content), when its mtime is older than
    ``lock_stale_timeout``. The holder refreshes the mtime while it works (at most
    once a minute), so choose a timeout above the server's idle timeout.
``auto`` (default)
    The dotlock above, and the holder also keeps an ``fcntl`` lock on the dotlock
    file itself (taken before the file appears under its name) and says so in it
    (a second line ``fcntl``). Whoever finds such a dotlock probes that lock: if the
    probe gets it, the holder is dead and the dotlock is recovered at once, from any
    host that shares working ``fcntl`` locks; if ``fcntl`` is not supported, the
    pid/host/age rules of ``dotlock`` apply. ``auto`` and ``dotlock`` interoperate.

Within one process (one server with many sessions), a registry of held maildirs makes
a second open of the same maildir a conflict too: POSIX locks alone would not, and a
probe of one's own ``fcntl`` lock would release it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import threading
import time
from typing import Literal

__all__ = ["DOTLOCK_NAME", "FLOCK_NAME", "HeldLock", "LockBusy", "acquire"]

DOTLOCK_NAME = "pypop-pop3.lock"
FLOCK_NAME = "pypop-pop3.flock"
_REFRESH_EVERY = 60.0

_registry_guard = threading.Lock()
_held: set[str] = set()


class LockBusy(Exception):
    """Another session (here or elsewhere) holds the maildrop."""


def _lockf_nb(fd: int) -> bool:
    """Try an exclusive fcntl lock; True if taken, False if held elsewhere.

    Raises OSError if the file system does not support it.
    """
    import fcntl

    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class HeldLock:
    """A held lock; :meth:`release` is idempotent."""

    def __init__(
        self,
        key: str,
        method: Literal["auto", "dotlock", "fcntl"],
        path: str,
        fd: int | None,
        ino: tuple[int, int] | None,
    ) -> None:
        self._key = key
        self.method = method
        self.path = path
        self._fd = fd
        self._ino = ino
        self._last_refresh = time.monotonic()
        self._released = False

    def refresh(self, *, force: bool = False) -> None:
        """Touch a dotlock so other hosts do not take it for stale."""
        if self._released or self.method == "fcntl":
            return
        now = time.monotonic()
        if not force and now - self._last_refresh < _REFRESH_EVERY:
            return
        self._last_refresh = now
        with contextlib.suppress(OSError):
            os.utime(self.path)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            if self.method != "fcntl":
                try:
                    st = os.lstat(self.path)
                    if (st.st_dev, st.st_ino) == self._ino:
                        os.unlink(self.path)
                except FileNotFoundError:
                    pass  # someone judged it stale and removed it; nothing to undo
        finally:
            if self._fd is not None:
                os.close(self._fd)  # drops the fcntl lock, after the unlink
                self._fd = None
            with _registry_guard:
                _held.discard(self._key)


def acquire(
    maildir: str,
    method: Literal["auto", "dotlock", "fcntl"],
    stale_timeout: float,
) -> HeldLock:
    """Lock ``maildir`` without waiting; raises :class:`LockBusy` on conflict."""
    key = os.path.realpath(maildir)
    with _registry_guard:
        if key in _held:
            raise LockBusy(maildir)
        _held.add(key)
    try:
        if method == "fcntl":
            return _acquire_fcntl(key, maildir)
        return _acquire_dotlock(key, maildir, method, stale_timeout)
    except BaseException:
        with _registry_guard:
            _held.discard(key)
        raise


def _acquire_fcntl(key: str, maildir: str) -> HeldLock:
    path = os.path.join(maildir, FLOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if not _lockf_nb(fd):
            raise LockBusy(maildir)
    except BaseException:
        os.close(fd)
        raise
    return HeldLock(key, "fcntl", path, fd, None)


def _hostname() -> str:
    return socket.gethostname() or "localhost"


def _create(path: str, content: bytes, want_fcntl: bool) -> tuple[int | None, tuple[int, int]]:
    """Create the dotlock atomically; raises FileExistsError if it exists.

    Returns the fd that holds the fcntl lock (``auto``) or None, and (st_dev, st_ino).
    """
    tmp = f"{path}.{_hostname()}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    locked = False
    try:
        if want_fcntl:
            try:
                locked = _lockf_nb(fd)
            except OSError:
                locked = False  # no fcntl locks here: a plain dotlock
        if not locked:
            content = content.replace(b"fcntl\n", b"")
        os.write(fd, content)
        st = os.fstat(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # No hard links on this file system: O_EXCL is atomic on local and NFSv3+
            # file systems. The file is briefly empty, which readers treat as "fresh".
            os.close(fd)
            locked = False
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            if want_fcntl:
                try:
                    locked = _lockf_nb(fd)
                except OSError:
                    locked = False
            os.write(fd, content if locked else content.replace(b"fcntl\n", b""))
            st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    if not locked:
        os.close(fd)
        return None, (st.st_dev, st.st_ino)
    return fd, (st.st_dev, st.st_ino)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(path: str, stale_timeout: float) -> tuple[bool, os.stat_result | None]:
    """Decide whether the existing dotlock at ``path`` is stale."""
    try:
        st = os.lstat(path)
        with open(path, "rb") as f:
            content = f.read(512)
    except FileNotFoundError:
        return True, None
    lines = content.decode("utf-8", "replace").splitlines()
    if len(lines) >= 2 and lines[1] == "fcntl":
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return True, None
        try:
            if os.fstat(fd).st_ino == st.st_ino:
                taken = _lockf_nb(fd)
                if not taken:
                    return False, st
                # The holder's lock is gone: it died. Our probe lock is released on close.
                return True, st
        except OSError:
            pass  # fcntl unsupported here: fall through to pid/host/age
        finally:
            os.close(fd)
    if lines:
        pid_s, sep, host = lines[0].partition(":")
        if sep and host == _hostname() and pid_s.isdigit() and int(pid_s) > 0:
            pid = int(pid_s)
            # Our own pid: every lock this process holds is in the registry, which was
            # checked first, so this one was left by an earlier process with our pid.
            return pid == os.getpid() or not _pid_alive(pid), st
    return time.time() - st.st_mtime > stale_timeout, st


def _acquire_dotlock(
    key: str, maildir: str, method: Literal["auto", "dotlock", "fcntl"], stale_timeout: float
) -> HeldLock:
    path = os.path.join(maildir, DOTLOCK_NAME)
    content = f"{os.getpid()}:{_hostname()}\n".encode()
    if method == "auto":
        content += b"fcntl\n"
    for _attempt in range(2):
        try:
            fd, ino = _create(path, content, want_fcntl=method == "auto")
        except FileExistsError:
            stale, st = _is_stale(path, stale_timeout)
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
            continue
        return HeldLock(key, method, path, fd, ino)
    raise LockBusy(maildir)
