"""An example pypop backend: each user is a folder of ``*.eml`` files.

It shows every part of a backend built on ``pypop.backend_kit``: options, the
per-process lock, blocking file I/O in bounded threads, the snapshot, UPDATE and the
release of the lock. DELE moves messages into ``<root>/.trash/<user>/`` instead of
deleting them. (Not for production: use pypop3-maildir.)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Mapping, Sequence

from pypop.backend import MessageInfo
from pypop.backend_kit import IOThreads, LockSet, Options, SessionThreads, SnapshotMailbox, blocks
from pypop.errors import AuthFailed, MailboxLocked, NoSuchMessage, TemporaryFailure, UpdateFailed
from pypop.wire import wire_size

__all__ = ["EmlBackend", "create"]


class EmlMailbox(SnapshotMailbox):
    def __init__(
        self, backend: EmlBackend, user: str, paths: list[str], sizes: list[int],
        threads: SessionThreads,
    ) -> None:  # fmt: skip
        # The UIDL is the file name: unique in the folder and stable across sessions.
        uids = [os.path.basename(p)[:-4] for p in paths]
        super().__init__([MessageInfo(s, u) for s, u in zip(sizes, uids, strict=True)])
        self._backend = backend
        self._user = user
        self._paths = paths
        self._threads = threads

    async def retrieve(self, index: int, *, top_lines: int | None = None) -> AsyncIterator[bytes]:
        try:
            data = await self._threads.run(_read, self._paths[index])
        except FileNotFoundError:
            raise NoSuchMessage("removed from outside") from None
        for block in blocks(data):
            yield block

    async def update(self, deleted: Sequence[int]) -> None:
        trash = os.path.join(self._backend.root, ".trash", self._user)
        failed = await self._threads.run(_move_all, [self._paths[i] for i in deleted], trash)
        if failed:
            raise UpdateFailed(f"{failed} messages could not be moved to the trash")

    async def release(self) -> None:
        self._backend.locks.release(self._user)


class EmlBackend:
    def __init__(self, root: str, io_threads: int) -> None:
        self.root = root
        self.threads = IOThreads(io_threads)
        self.locks = LockSet()

    async def open_mailbox(self, user: str) -> EmlMailbox:
        # A user is one plain folder name: no "..", "/", NUL, nothing over 64 characters.
        if not (user.isascii() and user.isalnum() and len(user) <= 64):
            raise AuthFailed("unsupported user name")
        if not self.locks.acquire(user):
            raise MailboxLocked(user)
        try:
            threads = self.threads.session()
            try:
                paths, sizes = await threads.run(_scan, os.path.join(self.root, user))
            except OSError as exc:  # logged by the server; the client gets [SYS/TEMP]
                raise TemporaryFailure(f"cannot read {user}'s folder: {exc}") from exc
            return EmlMailbox(self, user, paths, sizes, threads)
        except BaseException:
            self.locks.release(user)
            raise

    async def aclose(self) -> None:
        self.locks.clear()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _scan(folder: str) -> tuple[list[str], list[int]]:
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".eml"))
    except FileNotFoundError:
        return [], []
    paths = [os.path.join(folder, n) for n in names]
    # The POP3 size counts CRLF line ends (RFC 1939 §11): wire_size does that.
    return paths, [wire_size(_read(p)) for p in paths]


def _move_all(paths: list[str], trash: str) -> int:
    os.makedirs(trash, exist_ok=True)
    failed = 0
    for path in paths:
        try:
            shutil.move(path, os.path.join(trash, os.path.basename(path)))
        except OSError:
            failed += 1
    return failed


def create(options: Mapping[str, object]) -> EmlBackend:
    """The entry point: options arrive as strings from ``-o`` or typed from TOML."""
    opts = Options("eml", options)
    root = opts.path("root", required=True)
    io_threads = opts.integer("io_threads", 4, minimum=1)
    opts.finish()  # a misspelt option is an error with a "did you mean"
    if not os.path.isdir(root):
        raise opts.error(f"root {root!r} is not a directory")
    return EmlBackend(root, io_threads)
