"""The in-memory reference backend, registered as ``memory`` like any plugin.

Options (``[backend]`` in the config file):

- ``seed``: a folder with one sub-folder per user, each holding ``*.eml`` files
  (delivery order = file name order). UIDLs come from the file names, so they survive
  a restart as long as the files do.
- ``sample_users`` / ``sample_messages``: generate ``user1``..``userN`` with that many
  sample messages each (for demos and benchmarks).
- ``expire_days``: RFC 2449 EXPIRE, enforced at UPDATE (:meth:`Options.expire_days`).

A user whose user database entry names a maildrop (``userdb_mail=memory:NAME``) is
served the maildrop ``NAME`` (:meth:`MemoryBackend.open_account`).

Mail lives for the life of the process. Locks and UPDATE behave as in any backend.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

from pypop.backend import Account, Mailbox, MessageInfo, is_valid_uid
from pypop.backend_kit import LockSet, Options, SnapshotMailbox, blocks
from pypop.errors import MailboxLocked, PermanentFailure
from pypop.wire import stuff, wire_size

__all__ = ["MemoryBackend", "MemoryMailbox", "create", "sample_message"]

_UID_CHARS = re.compile(r"[^\x21-\x7e]")


@dataclass(eq=False, slots=True)
class _Stored:
    uid: str
    data: bytes
    size: int
    received: float
    wire: bytes | None = None  # stuff(data), made at the first RETR


def _uid_from_name(name: str) -> str:
    uid = _UID_CHARS.sub("_", name)
    if not is_valid_uid(uid):
        uid = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:40]
    return uid


def sample_message(user: str, n: int, *, body_octets: int = 400) -> bytes:
    """A plausible text message; some lines start with "." to exercise stuffing."""
    date = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=n)
    lines = [
        f"From: Sender {n} <sender{n}@example.org>",
        f"To: {user} <{user}@example.org>",
        f"Subject: Sample message {n} for {user}",
        f"Date: {format_datetime(date)}",
        f"Message-ID: <sample-{n}-{user}@example.org>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        f"Hello {user}, this is sample message {n}.",
        ".A line that starts with a dot.",
        ".",
    ]
    text = "\r\n".join(lines) + "\r\n"
    filler = "The quick brown fox jumps over the lazy dog. " * 2
    line = filler.strip() + "\r\n"
    missing = max(0, body_octets - len(text))
    return (text + line * -(-missing // len(line))).encode()


class MemoryMailbox(SnapshotMailbox):
    def __init__(
        self,
        backend: MemoryBackend,
        user: str,
        snapshot: Sequence[_Stored],
        messages: Sequence[MessageInfo],
    ) -> None:
        super().__init__(messages)
        self._backend = backend
        self._user = user
        self._snapshot = snapshot

    async def received_times(self) -> list[float | None]:
        """pypop.backend.MessageTimes: when deliver() took each message."""
        return [stored.received for stored in self._snapshot]

    def wire_message(self, index: int, top_lines: int | None = None) -> bytes:
        """pypop.backend.WireCache: a RETR is one cached buffer (memory for speed)."""
        stored = self._snapshot[index]
        if top_lines is not None:
            return stuff(stored.data, top_lines)
        wire = stored.wire
        if wire is None:
            wire = stored.wire = stuff(stored.data)
        return wire

    async def retrieve(self, index: int, *, top_lines: int | None = None) -> AsyncIterator[bytes]:
        # Only this session's commit removes mail from a locked maildrop, so a
        # snapshot entry cannot vanish here.
        for block in blocks(self._snapshot[index].data):
            yield block

    async def update(self, deleted: Sequence[int]) -> None:
        if not deleted:
            return
        gone = {id(self._snapshot[i]) for i in deleted}
        box = self._backend._mail.get(self._user, [])
        box[:] = [m for m in box if id(m) not in gone]
        self._backend._views.pop(self._user, None)

    def commits_at_once(self, deleted: Sequence[int]) -> bool:
        return True  # a list and a set in memory

    async def release(self) -> None:
        self.release_now()

    def release_now(self) -> bool:
        self._backend._locks.release(self._user)  # a set in memory: no waiting
        return True


class MemoryBackend:
    """Maildrops in a dict; one lock per user."""

    # The mail and the locks live in this process: several workers would each have
    # their own (pypop serve refuses --workers > 1 for a backend that says this).
    process_local = True

    def __init__(self, *, expire_days: int | None = None) -> None:
        self.expire_days = expire_days
        self._mail: dict[str, list[_Stored]] = {}
        # Immutable snapshots per user, rebuilt only after the maildrop changes, so
        # an open costs no per-message work.
        self._views: dict[str, tuple[tuple[_Stored, ...], tuple[MessageInfo, ...]]] = {}
        self._locks = LockSet()
        self._seq = itertools.count(1)

    def deliver(
        self, user: str, data: bytes, *, uid: str | None = None, received: float | None = None
    ) -> str:
        """Append a message to ``user``'s maildrop; returns its UIDL. ``received``:
        when it arrived (seconds since the epoch; default now)."""
        if uid is None:
            uid = f"{next(self._seq):08d}.{hashlib.sha256(data).hexdigest()[:16]}"
        elif not is_valid_uid(uid):
            raise ValueError(f"invalid UIDL {uid!r}")
        when = time.time() if received is None else received
        self._mail.setdefault(user, []).append(_Stored(uid, data, wire_size(data), when))
        self._views.pop(user, None)
        return uid

    def seed_folder(self, folder: Path) -> None:
        if not folder.is_dir():
            raise ValueError(f"seed folder {str(folder)!r} is not a directory")
        for user_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            for eml in sorted(user_dir.glob("*.eml")):
                self.deliver(user_dir.name, eml.read_bytes(), uid=_uid_from_name(eml.stem))

    def users(self) -> list[str]:
        return sorted(self._mail)

    async def open_account(self, account: Account) -> Mailbox:
        """pypop.backend.AccountBackend: ``memory:NAME`` serves maildrop NAME; a home
        directory means nothing here (the default maildrop)."""
        if account.mail is None:
            return await self.open_mailbox(account.user)
        driver, sep, name = account.mail.partition(":")
        if driver != "memory" or not sep or not name:
            raise PermanentFailure(f"the memory backend cannot serve {account.mail!r}")
        return await self.open_mailbox(name)

    async def open_mailbox(self, user: str) -> Mailbox:
        if not self._locks.acquire(user):
            raise MailboxLocked(user)
        view = self._views.get(user)
        if view is None:
            stored = tuple(self._mail.get(user, ()))
            view = (stored, tuple(MessageInfo(m.size, m.uid) for m in stored))
            self._views[user] = view
        return MemoryMailbox(self, user, *view)

    async def aclose(self) -> None:
        self._locks.clear()


def create(options: Mapping[str, object]) -> MemoryBackend:
    """Entry point ``memory`` in ``pypop.backends``."""
    opts = Options("memory", options)
    seed = opts.optional_text("seed")
    users = opts.integer("sample_users", 0, minimum=0)
    count = opts.integer("sample_messages", 3, minimum=0)
    size = opts.integer("sample_size", 400, minimum=0)
    expire_days = opts.expire_days()
    opts.finish()
    backend = MemoryBackend(expire_days=expire_days)
    if seed is not None:
        backend.seed_folder(Path(seed))
    for u in range(1, users + 1):
        for n in range(1, count + 1):
            backend.deliver(f"user{u}", sample_message(f"user{u}", n, body_octets=size))
    return backend
