"""The SQLite engine's maildrop lock: one byte of a lock file per mailbox.

``<database>-pop3.lock`` sits beside the database. Mailbox ``n`` is locked by an
exclusive POSIX record lock (``fcntl``) on byte ``n`` of that file, taken without
waiting. Every process on the host sees it; the kernel drops it when the holder
exits, however it exits, so a crashed server never leaves a stale lock (SQLite's WAL
mode already needs every process on one host, so a local lock file is enough).

POSIX record locks belong to a process, not to a descriptor, so two sessions of one
process would not exclude each other, and closing *any* descriptor of the file would
drop all of the process's locks. Hence one :class:`LockFile` per file per process,
opened once and shared, with a :class:`~pypop.backend_kit.LockSet` for the sessions
of this process.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading

from pypop.backend_kit import LockSet

__all__ = ["LockFile", "lock_file"]

_registry: dict[str, LockFile] = {}
_registry_guard = threading.Lock()


class LockFile:
    """The lock file of one database, shared by every engine of this process."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._held = LockSet()
        self._guard = threading.Lock()
        self._users = 0

    def try_lock(self, mailbox_id: int) -> bool:
        """Lock mailbox ``mailbox_id`` without waiting; False if anyone holds it."""
        key = str(mailbox_id)
        with self._guard:
            if not self._held.acquire(key):
                return False
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, mailbox_id)
            except OSError as exc:
                self._held.release(key)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    return False
                raise
            return True

    def unlock(self, mailbox_id: int) -> None:
        key = str(mailbox_id)
        with self._guard:
            if key in self._held:
                try:
                    fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, mailbox_id)
                finally:
                    self._held.release(key)

    def release_file(self) -> None:
        """One engine is done with the file; the last one closes it (it holds no lock
        then: every mailbox was released first)."""
        with _registry_guard:
            self._users -= 1
            if self._users > 0:
                return
            _registry.pop(self.path, None)
        with self._guard:
            self._held.clear()
            os.close(self._fd)


def lock_file(database: str) -> LockFile:
    """The shared :class:`LockFile` beside ``database`` (created if missing)."""
    path = os.path.realpath(database) + "-pop3.lock"
    with _registry_guard:
        lf = _registry.get(path)
        if lf is None:
            lf = _registry[path] = LockFile(path)
        lf._users += 1
        return lf
