"""The ``maildir`` backend: :class:`MaildirBackend` and its :class:`MaildirMailbox`."""

from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import itertools
import logging
import operator
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Self

import trio
from pypop.backend import Account, MessageInfo, is_valid_uid
from pypop.backend_kit import (
    BLOCK_SIZE,
    IOThreads,
    LockSet,
    SessionThreads,
    SnapshotMailbox,
    TopCut,
)
from pypop.errors import (
    AuthFailed,
    DuplicateUid,
    MailboxLocked,
    NoSuchMessage,
    NoSuchUser,
    PermanentFailure,
    TemporaryFailure,
    UpdateFailed,
)
from pypop.wire import (
    files_unchanged,
    read_at_now,
    read_file_now,
    read_small_files,
    stuff,
    wire_header_is_ascii,
    wire_size,
)

from pypop_maildir import _store
from pypop_maildir._config import (
    MaildirConfig,
    UnsafeUser,
    expand_template,
    location_path,
    parse_options,
)
from pypop_maildir._lock import HeldLock, LockBusy, acquire

__all__ = ["BLOCK_SIZE", "LARGE_BLOCK", "MaildirBackend", "MaildirMailbox"]

log = logging.getLogger("pypop.maildir")
_delivery_counter = itertools.count(1)

# Read-ahead: the thread hop that reads a small message also reads the small messages
# after it (clients RETR in order), up to this many octets per session; they are served
# from memory if asked for within READ_AHEAD_TTL seconds.
READ_AHEAD_OCTETS = 256 * 1024
READ_AHEAD_MESSAGES = 64
READ_AHEAD_TTL = 2.0
# maildir_path() results kept (the cache starts over when full).
PATHS_CACHED = 10_000
# A message of BLOCK_SIZE or more (by its size in the listing) is read in blocks of
# this size: each block costs a thread hop, and one hop per MiB is worth the memory
# (this block and its stuffed copy, while a session streams one; TOP reads BLOCK_SIZE).
LARGE_BLOCK = 1024 * 1024
# The listing cache trusts a folder only if it last changed this long before the scan
# that cached it: a change within one tick of the file system's clock would not move
# its ctime (Dovecot's maildir sync keeps the same kind of margin).
SETTLE_NS = 2_000_000_000
_KEY = struct.Struct("=QqQq")
_STATS = struct.Struct("<QqQ")  # pypop.wire.files_unchanged's: size, mtime ns, inode
_SIZE = operator.attrgetter("size")


@dataclass(frozen=True, slots=True)
class _Listing:
    """A maildir as a scan left it: shared by the sessions that open it afterwards
    while cur/ and new/ are unchanged (read-only once made)."""

    key: bytes  # cur/ and new/: (inode, ctime ns) each, packed (one per cached maildir)
    entries: tuple[_store.Entry, ...]
    messages: tuple[MessageInfo, ...]
    # Entries whose size was counted from the content: their paths below the maildir,
    # each ended by a NUL, and (st_size, mtime ns, inode) as counted, packed (_STATS).
    # A file rewritten in place does not change its folder: these are checked again at
    # every open (pypop.wire.files_unchanged, one call without the GIL).
    counted_names: bytes
    counted_stats: bytes
    # Octet i is 1 for a message in cur/ without the Seen flag (what UPDATE may have to
    # rename): a byte each, where a set would cost some 30 times that.
    unseen: bytes


class _ListingCache:
    """The latest :class:`_Listing` of recently opened maildirs, at most ``limit``
    messages in all (least recently opened dropped first)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._listings: collections.OrderedDict[str, _Listing] = collections.OrderedDict()
        self._total = 0
        self._guard = threading.Lock()  # worker threads share it

    def get(self, maildir: str) -> _Listing | None:
        with self._guard:
            listing = self._listings.get(maildir)
            if listing is not None:
                self._listings.move_to_end(maildir)
            return listing

    def put(self, maildir: str, listing: _Listing | None) -> None:
        with self._guard:
            old = self._listings.pop(maildir, None)
            if old is not None:
                self._total -= max(1, len(old.entries))
            if listing is None or max(1, len(listing.entries)) > self.limit:
                return
            self._listings[maildir] = listing
            self._total += max(1, len(listing.entries))
            while self._total > self.limit:
                _, dropped = self._listings.popitem(last=False)
                self._total -= max(1, len(dropped.entries))


class MaildirBackend:
    """Maildrops as Maildir folders under ``config.root`` (see the package docs).

    Subclass it to change how users map to folders or which files are served; the
    documented hooks are :meth:`maildir_path` and :meth:`keep_message`, and
    :meth:`from_options` builds a subclass from the ``[backend]`` options::

        class Hashed(MaildirBackend):
            def maildir_path(self, user: str) -> str:
                ...

        def create(options):            # your entry point in pypop.backends
            return Hashed.from_options(options)
    """

    def __init__(self, config: MaildirConfig) -> None:
        self.config = config
        # RFC 2449 EXPIRE, enforced by the server at UPDATE (pypop.backend_kit).
        self.expire_days = config.expire_days
        self.threads = IOThreads(config.io_threads, timeout=config.io_timeout)
        # This process's sessions: checked before the on-disk lock, which other
        # processes (and Dovecot) see.
        self.locks = LockSet()
        # keep_message may change its mind without the folder changing: a subclass
        # that overrides it scans at every login.
        cacheable = type(self).keep_message is MaildirBackend.keep_message
        self._listings = _ListingCache(config.listing_cache) if cacheable else None
        if cacheable and config.listing_cache == 0:
            self._listings = None
        # maildir_path() by user: the template is expanded a character at a time.
        self._paths: dict[str, str] = {}

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> Self:
        """Validate ``options`` (an :class:`~pypop.backend_kit.OptionError` names the
        problem) and build the backend."""
        return cls(parse_options(options))

    def maildir_path(self, user: str) -> str:
        """Hook: the maildir of ``user``. Raise :class:`~pypop.errors.AuthFailed` for a
        name that must not be served (the default refuses names that would leave the
        root: ``..``, ``/``, NUL, control characters)."""
        path = self._paths.get(user)
        if path is not None:
            return path
        try:
            rel = expand_template(self.config.template, user)
        except UnsafeUser:
            raise AuthFailed("user name cannot be mapped to a maildir") from None
        path = os.path.join(self.config.root, rel)
        if len(self._paths) >= PATHS_CACHED:
            self._paths.clear()  # bounded: names come from logins, some of them made up
        self._paths[user] = path
        return path

    def keep_message(self, user: str, subdir: str, name: str) -> bool:
        """Hook: serve this file of ``user``'s maildir? ``subdir`` is ``new`` or ``cur``.

        Runs in a worker thread for every message at every login, so keep it cheap.
        A file left out is invisible to POP3: never listed, never deleted.
        """
        return True

    async def open_account(self, account: Account) -> MaildirMailbox:
        """pypop.backend.AccountBackend: the maildir the user database names
        (``userdb_mail=maildir:~/Maildir``, or the home + ``home_maildir``)."""
        if not account.located:
            return await self.open_mailbox(account.user)
        try:
            maildir = location_path(
                account.mail, account.home, account.user, self.config.home_maildir
            )
        except UnsafeUser:
            raise AuthFailed("user name cannot be mapped to a maildir") from None
        except ValueError as exc:
            raise PermanentFailure(f"cannot serve this mail location: {exc}") from None
        # Its folders must belong to the uid the user database gives: the location
        # is the user's to change (a home), and the server's user can read others'.
        return await self._open_at(account.user, maildir, account.uid)

    async def open_mailbox(self, user: str) -> MaildirMailbox:
        return await self._open_at(user, self.maildir_path(user))

    async def _open_at(self, user: str, maildir: str, owner: int | None = None) -> MaildirMailbox:
        if not self.locks.acquire(maildir):
            raise MailboxLocked("maildrop is locked by another session of this process")
        try:
            # One thread call that either returns a locked snapshot or releases the
            # lock: nothing awaits between taking the lock and handing it over.
            threads = self.threads.session()
            return await threads.run(self._open_sync, user, maildir, threads, owner)
        except BaseException:
            self.locks.release(maildir)
            raise

    def _create_maildir(self, maildir: str, owner: int | None = None) -> None:
        if not self.config.autocreate:
            raise PermanentFailure("maildir does not exist")
        if owner is not None and owner != os.geteuid():
            # It would belong to the server's user, and never be served to this one.
            raise PermanentFailure(f"{maildir} does not exist (not made for uid {owner})")
        try:
            for d in ("cur", "new", "tmp"):
                os.makedirs(os.path.join(maildir, d), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise TemporaryFailure("cannot create maildir") from exc

    def _open_sync(
        self, user: str, maildir: str, threads: SessionThreads, owner: int | None = None
    ) -> MaildirMailbox:
        cfg = self.config
        for attempt in (1, 2):
            try:
                lock = acquire(maildir, cfg.lock, cfg.lock_stale_timeout)
                break
            except LockBusy:
                raise MailboxLocked("maildrop is locked by another session") from None
            except FileNotFoundError as exc:
                if attempt == 2:
                    raise TemporaryFailure("cannot lock maildir") from exc
                self._create_maildir(maildir, owner)
            except OSError as exc:
                raise TemporaryFailure("cannot lock maildir") from exc
        try:
            listing = self._listing(user, maildir, owner)
        except BaseException as exc:
            lock.release()
            if isinstance(exc, _store.NotAFolder):
                raise PermanentFailure(f"not served: {exc}") from exc
            if isinstance(exc, OSError):
                raise TemporaryFailure("cannot read maildir") from exc
            raise
        return MaildirMailbox(self, maildir, listing, lock, threads)

    def _listing(self, user: str, maildir: str, owner: int | None = None) -> _Listing:
        """The snapshot: the cached listing if cur/ and new/ are unchanged, else a scan.
        With ``owner``, both folders must belong to that uid."""
        taken = time.time_ns()
        cur_dir, new_dir = f"{maildir}/cur", f"{maildir}/new"  # (os.path.join: slower)
        try:
            cur = os.lstat(cur_dir)
            new = os.lstat(new_dir)
        except FileNotFoundError:
            self._create_maildir(maildir, owner)
            cur = os.lstat(cur_dir)
            new = os.lstat(new_dir)
        # lstat: cur/ and new/ are never followed if links. The maildir's owner could
        # make them point at another user's folders, and the server's user can read
        # those: their mail would be listed, served, moved and deleted as this user's.
        # (The same checks as _store.open_folder's, which the scan makes again on the
        # descriptors it reads.)
        for path, st in ((cur_dir, cur), (new_dir, new)):
            if not stat.S_ISDIR(st.st_mode):
                raise _store.NotAFolder(f"{path} is a symbolic link or not a directory")
            if owner is not None and st.st_uid != owner:
                raise _store.NotAFolder(f"{path} does not belong to the user's uid {owner}")
        key = _KEY.pack(cur.st_ino, cur.st_ctime_ns, new.st_ino, new.st_ctime_ns)
        cache = self._listings
        if cache is not None:
            listing = cache.get(maildir)
            if listing is not None and listing.key == key and _counted_unchanged(maildir, listing):
                return listing
        listing, changed = self._scan(user, maildir, key, owner)
        if cache is not None:
            # Cached only if this scan changed nothing (its moves would make the next
            # open scan again anyway) and the folders had settled before it began.
            settled = max(cur.st_ctime_ns, new.st_ctime_ns) < taken - SETTLE_NS
            cache.put(maildir, listing if settled and not changed else None)
        return listing

    def _scan(
        self, user: str, maildir: str, key: bytes, owner: int | None = None
    ) -> tuple[_Listing, bool]:
        cfg = self.config
        keep = self.keep_message
        entries = [e for e in _store.list_messages(maildir, owner) if keep(user, e.subdir, e.name)]
        changed = False
        if cfg.flag_updates:
            changed = _store.move_new_to_cur(maildir, entries)
        entries = _store.fill_sizes(
            maildir, entries, filename_sizes=cfg.filename_sizes, use_cache=cfg.size_cache
        )
        _store.assign_uids(entries)
        if cfg.save_uidl:
            _store.apply_uidlist(maildir, entries, fsync=cfg.fsync)
        names: list[bytes] = []
        stats: list[bytes] = []
        for e in entries:
            if not cfg.filename_sizes or _store.filename_size(e.base) is None:
                try:
                    st = os.lstat(e.path(maildir))
                except FileNotFoundError:
                    continue
                names.append(os.fsencode(f"{e.subdir}/{e.name}\0"))
                stats.append(_STATS.pack(st.st_size, st.st_mtime_ns, st.st_ino))
        listing = _Listing(
            key,
            tuple(entries),
            tuple(MessageInfo(size=e.size, uid=e.uid) for e in entries),
            b"".join(names),
            b"".join(stats),
            bytes(e.subdir == "cur" and _store.with_seen_flag(e.name) is not None for e in entries),
        )
        return listing, changed

    async def deliver(
        self,
        user: str,
        message: bytes,
        *,
        uid: str | None = None,
        received: float | None = None,
    ) -> str:
        """pypop.backend.Deliverer: write tmp/NAME, fsync, link it into new/, fsync new/.

        The message counts as delivered only after the link; a crash before leaves a
        file in tmp/ that no session reads. ``uid`` becomes the file's base name (the
        UIDL this backend serves), so it must also be a safe file name, and a ``,W=``
        in it must be the message's POP3 size.
        """
        try:
            maildir = self.maildir_path(user)
        except AuthFailed:
            raise NoSuchUser("user name cannot be mapped to a maildir") from None
        if uid is not None and (
            not is_valid_uid(uid) or "/" in uid or ":" in uid or uid.startswith(".")
        ):
            raise ValueError(f"UIDL {uid!r} cannot be a maildir file name")
        if uid is not None:
            # A ",W=" in the name is the size LIST reports without reading the file:
            # kept only if true (a Dovecot name being migrated), never a sender's.
            named = _store.filename_size(uid)
            if named is not None and named != wire_size(message):
                raise ValueError(f"UIDL {uid!r} names a size (,W=) that is not the message's")
        return await self.threads.run(self._deliver_sync, maildir, bytes(message), uid, received)

    def _deliver_sync(
        self, maildir: str, data: bytes, uid: str | None, received: float | None
    ) -> str:
        cfg = self.config
        try:
            try:
                tmp_fd, new_fd = _delivery_folders(maildir)
            except FileNotFoundError:
                if not cfg.autocreate:
                    raise NoSuchUser("maildir does not exist") from None
                for d in ("cur", "new", "tmp"):
                    os.makedirs(os.path.join(maildir, d), mode=0o700, exist_ok=True)
                tmp_fd, new_fd = _delivery_folders(maildir)
            try:
                if uid is not None and _store.find_by_base(maildir, uid) is not None:
                    raise DuplicateUid(f"the maildir already has {uid!r}")
                when = time.time() if received is None else received
                if uid is None:
                    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
                    base = (
                        f"{int(when)}.M{int(when * 1e6) % 1_000_000}P{os.getpid()}"
                        f"Q{next(_delivery_counter)}.{host},S={len(data)},W={wire_size(data)}"
                    )
                else:
                    base = uid
                # Through the folders' descriptors: a link put in place of new/ or tmp/
                # cannot send this message into another user's maildir.
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                fd = os.open(base, flags, 0o600, dir_fd=tmp_fd)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    if cfg.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                try:
                    # Never replaces an existing message.
                    os.link(base, base, src_dir_fd=tmp_fd, dst_dir_fd=new_fd)
                finally:
                    os.unlink(base, dir_fd=tmp_fd)
                if received is not None:
                    os.utime(base, (received, received), dir_fd=new_fd)
                if cfg.fsync:
                    os.fsync(new_fd)
            finally:
                os.close(tmp_fd)
                os.close(new_fd)
        except _store.NotAFolder as exc:
            raise PermanentFailure(f"not delivered: {exc}") from exc
        except FileExistsError:
            if uid is not None:
                raise DuplicateUid(f"the maildir already has {uid!r}") from None
            raise TemporaryFailure("delivery name in use") from None
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                # The maildir path (the name within it is at most 70 octets or a
                # generated one): it never gets shorter, so bounce rather than retry.
                raise NoSuchUser("user name too long for a maildir") from None
            raise TemporaryFailure(f"cannot deliver: {exc.strerror or exc}") from exc
        return base if _store.valid_uid(base) else _store.mapped_uid(base)

    async def aclose(self) -> None:
        """Nothing to release: every mailbox releases its own lock."""


def _delivery_folders(maildir: str) -> tuple[int, int]:
    """Descriptors of the maildir's tmp/ and new/ (cur/ checked too), none of them
    through a link (:func:`_store.open_folder`)."""
    cur_fd, tmp_fd, new_fd = _store.open_folders(maildir, "cur", "tmp", "new")
    os.close(cur_fd)
    return tmp_fd, new_fd


def _listed_folders(maildir: str, key: bytes) -> dict[str, int]:
    """Descriptors of the maildir's cur/ and new/, never through a link, and only if
    they are still the directories whose inodes ``key`` (the listing's) holds."""
    cur_ino, _, new_ino, _ = _KEY.unpack(key)
    cur_fd, new_fd = _store.open_folders(maildir, "cur", "new")
    if (os.fstat(cur_fd).st_ino, os.fstat(new_fd).st_ino) != (cur_ino, new_ino):
        os.close(cur_fd)
        os.close(new_fd)
        raise _store.NotAFolder(f"{maildir}: cur/ or new/ is not the folder listed")
    return {"cur": cur_fd, "new": new_fd}


class _Folders:
    """Descriptors of the cur/ and new/ a session listed (checked by inode), opened in a
    worker thread at its first read and kept until its release: its reads and UPDATE go
    through them, so a link or another folder put at their paths since (another user's,
    which the server's user can read) reaches nothing.

    A thread using them holds a claim. A release while one is stuck (its thread left
    behind at io_timeout) leaves the closing to that thread, so no descriptor number is
    closed under it, and reused (for another user's folder), while it works."""

    __slots__ = ("_claims", "_closed", "_mutex", "fds")

    def __init__(self) -> None:
        self.fds: dict[str, int] | None = None
        self._claims = 0
        self._closed = False
        self._mutex = threading.Lock()  # never held across I/O: the event loop may take it

    def usable(self) -> dict[str, int] | None:
        """On the event loop: the descriptors, if opened already and not released."""
        return None if self._closed else self.fds

    def claim(self, maildir: str, key: bytes) -> dict[str, int]:
        """In a worker thread: the descriptors, opened now if not yet (:meth:`unclaim`
        after use). TemporaryFailure if cur/ or new/ is not the folder listed any more
        (nothing in another folder is read) or the mailbox was released."""
        with self._mutex:
            if self._closed:
                raise TemporaryFailure("mailbox released")
            self._claims += 1
            fds = self.fds
        if fds is not None:
            return fds
        try:
            fds = _listed_folders(maildir, key)
        except BaseException as exc:
            self.unclaim()
            if isinstance(exc, OSError | _store.NotAFolder):
                raise TemporaryFailure("cur/ or new/ is not the folder listed") from exc
            raise
        with self._mutex:
            if self.fds is None:
                self.fds = fds
                return fds
            held = self.fds
        _close_all(fds)  # another thread (one left behind) opened them meanwhile
        return held

    def unclaim(self) -> None:
        with self._mutex:
            self._claims -= 1
            last = self._closed and not self._claims
        if last:
            self._close_fds()

    def close(self) -> None:
        """At the release (closing a directory descriptor never waits); a claim still
        held closes them at its end."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            last = not self._claims
        if last:
            self._close_fds()

    def _close_fds(self) -> None:
        fds, self.fds = self.fds, None
        if fds is not None:
            _close_all(fds)


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)


def _counted_unchanged(maildir: str, listing: _Listing) -> bool:
    """Do the files whose sizes were counted still have their size, mtime and inode?
    (False for one that cannot be stat-ed: the scan that follows meets the error.)"""
    return not listing.counted_names or files_unchanged(
        maildir, listing.counted_names, listing.counted_stats
    )


class _Reader:
    """An open message file being streamed, from ``offset`` on: each block read in a
    worker thread, or on the event loop when the kernel has it in memory.

    :meth:`close` comes from the event loop and never waits: if a read is still
    running (a call that timed out and was abandoned), the reading thread closes the
    descriptor when it returns, so the number is never reused under it. ``left``
    counts down from the size the file had when it was opened: a read that reaches it
    is the last, with no read at end of file to find out. Reads are at explicit
    offsets (``pread``), so the two kinds can follow each other.
    """

    __slots__ = ("_closing", "_fd", "_guard", "_offset", "left")

    def __init__(self, fd: int, offset: int, left: int) -> None:
        self._fd = fd
        self._guard = threading.Lock()
        self._closing = False
        self._offset = offset
        self.left = left

    def read(self, size: int) -> bytes:
        """The next block (in a worker thread)."""
        with self._guard:
            try:
                if self._fd < 0:
                    raise OSError("message file is closed")
                data = _store.read_message(self._fd, size, self._offset)
                self._took(data, size)
                return data
            finally:
                if self._closing and self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1

    def read_now(self, size: int) -> bytes | None:
        """The next block if every octet of it is in the page cache (pypop.wire.read_at_now),
        read without waiting on the event loop; else None, and :meth:`read` reads it.
        Also None while an abandoned read still holds the file."""
        if not self._guard.acquire(blocking=False):
            return None
        try:
            if self._fd < 0 or self._closing or self.left <= 0:
                return None
            data = read_at_now(self._fd, self._offset, min(size, self.left))
            if data is not None:
                self._took(data, size)
            return data
        finally:
            self._guard.release()

    def _took(self, data: bytes, size: int) -> None:
        self._offset += len(data)
        self.left = 0 if len(data) < size else self.left - len(data)

    def close(self) -> None:
        self._closing = True
        if self._guard.acquire(blocking=False):
            try:
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
            finally:
                self._guard.release()


class MaildirMailbox(SnapshotMailbox):
    """One locked maildir snapshot (pypop.backend.Mailbox, and WireCache for messages
    already read ahead)."""

    __slots__ = (
        "_ahead",
        "_ahead_until",
        "_ahead_wire",
        "_backend",
        "_clock",
        "_entries",
        "_folders",
        "_found",
        "_held",
        "_lock",
        "_planned",
        "_retrieved",
        "_threads",
        "_unseen",
        "_wire_asked",
        "maildir",
    )

    def __init__(
        self,
        backend: MaildirBackend,
        maildir: str,
        listing: _Listing,
        lock: HeldLock,
        threads: SessionThreads,
    ) -> None:
        super().__init__(listing.messages)
        self._backend = backend
        self.maildir = maildir
        self._entries = listing.entries  # shared with the cache: never changed
        self._unseen = listing.unseen
        self._folders = listing.key  # the inodes of the cur/ and new/ it listed (shared)
        self._lock = lock
        self._threads = threads
        # Made on first use (an idle session holds only the above).
        self._found: dict[int, _store.Entry] | None = None  # renamed from outside
        self._held: _Folders | None = None  # the listed cur/ and new/, from the first read
        self._retrieved: set[int] | None = None
        self._planned: list[int] | None = None  # Seen flags commits_at_once found
        self._ahead: dict[int, bytes] | None = None
        self._ahead_until = 0.0
        # Messages read ahead for RETRs, in wire form (stuffed in the reading thread),
        # and whether the server asks for wire forms at all (an importer does not).
        self._ahead_wire: dict[int, bytes] | None = None
        self._wire_asked = False
        # The run's clock: its own method once the first read-ahead (on the event
        # loop) takes it (trio.current_time is three Python calls, one per message).
        self._clock: Callable[[], float] = trio.current_time

    def received(self, index: int) -> float | None:
        """pypop.backend.MessageTimes: the delivery time at the start of the Maildir
        name (``1700000000.M1P2.host``); None for a name without one (never expired
        by EXPIRE)."""
        return _store.delivery_time(self._entry(index).name)

    async def received_times(self) -> list[float | None]:
        """pypop.backend.MessageTimes: :meth:`received` of every message (names are
        in memory already: no I/O)."""
        return [self.received(i) for i in range(len(self._entries))]

    def _entry(self, index: int) -> _store.Entry:
        if not 0 <= index < len(self._entries):
            raise NoSuchMessage(f"no message at index {index}")
        found = self._found
        if found is not None and index in found:
            return found[index]
        return self._entries[index]

    def _mark_retrieved(self, index: int) -> None:
        if self._retrieved is None:
            self._retrieved = set()
        self._retrieved.add(index)

    def _from_ahead(self, index: int) -> bytes | None:
        """The stored octets of a message read ahead, or None. The caller drops it from
        ``_ahead`` once a RETR has taken it (a TOP leaves it for the RETR)."""
        ahead = self._ahead
        if ahead is None or self._expired():
            return None
        return ahead.get(index)

    def _expired(self) -> bool:
        """Past the read-ahead's time: both stores are dropped."""
        if self._clock() < self._ahead_until:
            return False
        self._ahead = self._ahead_wire = None
        return True

    def _take(self, index: int) -> None:
        """A RETR took message ``index`` from the read-ahead."""
        if self._ahead is not None:
            self._ahead.pop(index, None)

    def wire_message(self, index: int, top_lines: int | None = None) -> bytes | None:
        """pypop.backend.WireCache: a message read ahead, or a large one the kernel
        has in memory (a RETR), goes out without a thread hop or an async generator
        (stuffed here, in Rust); None for any other.

        A RETR of a message with an 8-bit header is left to ``retrieve``: the server
        may refuse it (RFC 6856), and only a message read to its end counts as
        retrieved (Seen at UPDATE); this answer cannot know whether it will be sent."""
        stuffed = self._ahead_wire
        if stuffed is not None and top_lines is None:
            # Read ahead for a RETR, stuffed in the reading thread (ASCII headers only):
            # the path of every RETR after the first, so _expired() and
            # _mark_retrieved() are inlined, and _wire_asked is set already.
            wire = stuffed.pop(index, None)
            if wire is not None:
                if self._clock() < self._ahead_until:
                    retrieved = self._retrieved
                    if retrieved is None:
                        retrieved = self._retrieved = set()
                    retrieved.add(index)
                    return wire
                self._ahead = self._ahead_wire = None  # past its time: both dropped
                return None
        self._wire_asked = True
        data = self._from_ahead(index)
        if data is None:
            return None if top_lines is not None else self._large_now(index)
        wire = stuff(data, top_lines)
        if top_lines is None:
            if not wire_header_is_ascii(wire):
                return None  # left in _ahead for retrieve(): no second read
            self._take(index)
            self._mark_retrieved(index)
        return wire

    def _large_now(self, index: int) -> bytes | None:
        """The wire form of a large message (BLOCK_SIZE octets to LARGE_BLOCK on disk)
        that the kernel has in memory, read and stuffed here, in the engine's call: no
        Retrieve event, no thread hop, no stream of blocks. None for any other, for
        one with an 8-bit header (retrieve() reads it again, from memory, for the
        server's check), and while a dotlock refresh is due (the hop does it)."""
        entries = self._entries
        if not 0 <= index < len(entries) or entries[index].size < BLOCK_SIZE:
            return None
        if self._lock.refresh_due():
            return None
        dirs = self._held.usable() if self._held is not None else None
        if dirs is None:
            return None  # the folders are opened (and checked) in retrieve()'s hop
        entry = self._entry(index)
        data = read_file_now(entry.name, LARGE_BLOCK + 1, dirs[entry.subdir])
        if data is None:
            return None
        wire = stuff(data)
        if not wire_header_is_ascii(wire):
            return None
        self._mark_retrieved(index)
        return wire

    # -- in worker threads --

    def _folders_held(self) -> _Folders:
        """On the event loop, before a hop that reads or commits: the holder of the
        folders' descriptors (made here, never in a thread that a release could leave
        behind; the descriptors are opened in the thread)."""
        held = self._held
        if held is None:
            held = self._held = _Folders()
        return held

    def _close_folders(self) -> None:
        if self._held is not None:
            self._held.close()

    def _open(self, index: int, dirs: Mapping[str, int]) -> int:
        """A descriptor of message ``index`` (found again if renamed from outside), in
        the listed folders ``dirs``."""
        entry = self._entry(index)
        try:
            return _store.open_message(entry.name, dirs[entry.subdir])
        except _store.NotAMessage:
            raise NoSuchMessage("message is not a regular file") from None
        except FileNotFoundError:
            pass
        # Renamed from outside (an IMAP client set a flag)? Find it by base name.
        found = _store.find_in(dirs, entry.base)
        if found is None:
            raise NoSuchMessage("message was removed") from None
        found.size, found.uid, found.others = entry.size, entry.uid, entry.others
        if self._found is None:
            self._found = {}
        self._found[index] = found
        try:
            return _store.open_message(found.name, dirs[found.subdir])
        except (FileNotFoundError, _store.NotAMessage):
            raise NoSuchMessage("message was removed") from None

    def _read_first(
        self, index: int, first: int, wire: bool
    ) -> tuple[_Reader | None, bytes, dict[int, bytes], dict[int, bytes]]:
        """Open message ``index`` and read up to ``first`` octets: (None, data, ahead,
        stuffed) when that was the whole file, with the whole of the small messages
        after it (within the read-ahead budget) in ``ahead`` as stored or, if ``wire``,
        in ``stuffed`` in wire form; else (reader, first block, {}, {})."""
        self._lock.refresh()
        held = self._held
        assert held is not None  # made by retrieve() before the hop
        dirs = held.claim(self.maildir, self._folders)
        try:
            return self._read_in(dirs, index, first, wire)
        finally:
            held.unclaim()

    def _read_in(
        self, dirs: Mapping[str, int], index: int, first: int, wire: bool
    ) -> tuple[_Reader | None, bytes, dict[int, bytes], dict[int, bytes]]:
        fd = self._open(index, dirs)
        try:
            left = os.fstat(fd).st_size
            block = _store.read_message(fd, first)
        except BaseException:
            os.close(fd)
            raise
        if len(block) == first and len(block) < left:
            return _Reader(fd, len(block), left - len(block)), block, {}, {}
        os.close(fd)
        if first > BLOCK_SIZE:
            return None, block, {}, {}  # a large message: nothing to read ahead
        names, fds = self._ahead_files(index + 1, READ_AHEAD_OCTETS - len(block), dirs)
        if not names:
            return None, block, {}, {}
        # One call for all of them (the GIL released once, not per system call); it
        # stops at the first that is gone, not a regular file, or grew past a block.
        if not wire:
            read = read_small_files(names, BLOCK_SIZE, dir_fds=fds)
            return None, block, dict(enumerate(read, index + 1)), {}
        read = read_small_files(names, BLOCK_SIZE, True, fds)
        ascii_header = list(map(wire_header_is_ascii, read))  # each header judged once
        if all(ascii_header):  # (the usual case: no loop in Python)
            return None, block, {}, dict(enumerate(read, index + 1))
        stuffed: dict[int, bytes] = {}
        eight_bit: list[int] = []
        for j, (data, is_ascii) in enumerate(zip(read, ascii_header, strict=True), index + 1):
            if is_ascii:
                stuffed[j] = data
            else:
                eight_bit.append(j)
        # The server may refuse a message with an 8-bit header (RFC 6856), so it goes
        # through retrieve() and the stored octets: read those again (page cache).
        ahead: dict[int, bytes] = {}
        if eight_bit:
            again = read_small_files(
                [names[j - index - 1] for j in eight_bit],
                BLOCK_SIZE,
                dir_fds=[fds[j - index - 1] for j in eight_bit],
            )
            ahead = dict(zip(eight_bit, again, strict=False))
        return None, block, ahead, stuffed

    def _ahead_files(
        self, start: int, budget: int, dirs: Mapping[str, int]
    ) -> tuple[list[str], list[int]]:
        """The names of the messages from ``start`` on that the read-ahead takes, and
        their folders' descriptors: at most READ_AHEAD_MESSAGES, each below a block,
        ``budget`` octets in all (by their POP3 sizes, never below the file sizes: line
        ends only grow)."""
        entries, found = self._entries, self._found
        window: Sequence[_store.Entry] = entries[start : start + READ_AHEAD_MESSAGES]
        if found is not None:  # renamed from outside: their new names
            window = [found.get(j, e) for j, e in enumerate(window, start)]
        sizes = list(map(_SIZE, window))
        # The first message too large for a block or past the budget ends it; found
        # by C iterators, not a loop in Python (it runs for every RETR that reads).
        count = bisect.bisect_right(list(itertools.accumulate(sizes)), budget)
        large = itertools.compress(itertools.count(), map(BLOCK_SIZE.__le__, sizes))
        count = min(count, next(large, count))
        taken = window[:count]
        return [e.name for e in taken], [dirs[e.subdir] for e in taken]

    # -- on the event loop --

    async def retrieve(self, index: int, *, top_lines: int | None = None) -> AsyncIterator[bytes]:
        """Stream the stored octets: a message below BLOCK_SIZE (and any TOP) from a
        first block of BLOCK_SIZE, a larger one in blocks of LARGE_BLOCK, each read in
        a worker thread. A message read ahead needs none, nor a large one of a single
        block that the kernel has in memory (pypop.wire.read_file_now).

        With ``top_lines`` it stops after the header and that many body lines (counting
        LF line ends, which never stops earlier than the server's TOP cut).
        """
        self._entry(index)  # NoSuchMessage before any I/O
        reader: _Reader | None = None
        block: bytes
        cached = self._from_ahead(index)
        if cached is not None:
            block = cached
            if top_lines is None:
                self._take(index)
        else:
            try:
                # One thread hop opens and reads the first block (a message that fits
                # in one block costs no other hop), and reads ahead.
                entry = self._entries[index]
                first = (
                    BLOCK_SIZE
                    if top_lines is not None or entry.size < BLOCK_SIZE
                    else (LARGE_BLOCK)
                )
                # Read ahead for a server's RETR: the next messages come stuffed (the
                # likely next commands are RETRs, served by wire_message); else as stored.
                wire = top_lines is None and self._wire_asked
                now = None
                dirs = self._folders_held().usable()
                if dirs is not None and first > BLOCK_SIZE and not self._lock.refresh_due():
                    # A large message (nothing to read ahead) that the kernel has in
                    # memory is read here, without the hop, in the folders held; else,
                    # or if it is larger than the block, the hop reads it (and opens
                    # the folders, the first time).
                    entry = self._entry(index)
                    now = read_file_now(entry.name, first + 1, dirs[entry.subdir])
                if now is not None:
                    reader, block = None, now
                    ahead: dict[int, bytes] = {}
                    stuffed: dict[int, bytes] = {}
                else:
                    reader, block, ahead, stuffed = await self._threads.run(
                        self._read_first, index, first, wire
                    )
            except OSError as exc:
                raise TemporaryFailure("cannot open message") from exc
            if ahead or stuffed:
                self._ahead = ahead
                self._ahead_wire = stuffed or None
                self._clock = trio.lowlevel.current_clock().current_time
                self._ahead_until = self._clock() + READ_AHEAD_TTL
        cutter = TopCut(top_lines) if top_lines is not None else None
        complete = False
        try:
            while True:
                last = reader is None or reader.left <= 0
                if cutter is not None:
                    block, stop = cutter.feed(block)
                    if block:
                        yield block
                    if stop:
                        break
                elif block:
                    yield block
                if last:
                    complete = True
                    break
                assert reader is not None
                try:
                    now = reader.read_now(LARGE_BLOCK)  # in memory: no hop
                    block = (
                        await self._threads.run(reader.read, LARGE_BLOCK) if now is None else now
                    )
                except OSError as exc:
                    raise TemporaryFailure("cannot read message") from exc
        finally:
            if reader is not None:
                reader.close()
        if complete and top_lines is None:
            self._mark_retrieved(index)

    def _to_flag(self, marked: Sequence[int]) -> list[int]:
        """Retrieved messages in cur/ that UPDATE marks Seen (none without flag_updates)."""
        retrieved = self._retrieved
        if not retrieved or not self._backend.config.flag_updates:
            return []
        unseen = self._unseen
        if self._found is None and not any(map(unseen.__getitem__, retrieved)):
            return []  # all of them Seen already (in C: no line of Python per message)
        done = set(marked)
        found = self._found or {}
        out = []
        for i in sorted(retrieved):
            if i in done:
                continue
            if i in found:  # renamed from outside: judge its new name
                entry = found[i]
                if entry.subdir == "cur" and _store.with_seen_flag(entry.name) is not None:
                    out.append(i)
            elif unseen[i]:
                out.append(i)
        return out

    async def update(self, deleted: Sequence[int]) -> None:
        """UPDATE: unlink exactly the marked files, set Seen flags, fsync the folders,
        and release the lock in the same thread hop. Nothing to change: no hop."""
        planned, self._planned = self._planned, None
        flag = planned if planned is not None and not deleted else self._to_flag(deleted)
        if deleted or flag:
            self._folders_held()
            await self._threads.run(self._commit_sync, deleted, flag)

    def commits_at_once(self, deleted: Sequence[int]) -> bool:
        """pypop.backend_kit.SnapshotMailbox: nothing to unlink or flag Seen (no thread
        hop), and a lock that ``release_now`` gives up. The flags found are kept for
        ``update``, which the server calls next, so it does not walk them again."""
        lock = self._lock
        if deleted or not (lock.released or lock.quick_release):
            return False
        self._planned = self._to_flag(())
        return not self._planned

    def _commit_sync(self, marked: Sequence[int], flag: Sequence[int]) -> None:
        try:
            self._commit_files(marked, flag)
        finally:
            self._lock.release()

    def _commit_files(self, marked: Sequence[int], flag: Sequence[int]) -> None:
        # Through descriptors of the very folders the session listed (by inode; those
        # its reads hold, else opened now): a link or another folder put in their place
        # since (another user's, which the server's user can reach) gets nothing
        # removed or renamed.
        held = self._held
        assert held is not None  # made by update() before the hop
        try:
            dirs = held.claim(self.maildir, self._folders)
        except TemporaryFailure as exc:
            raise UpdateFailed("cur/ or new/ is not the folder listed: nothing removed") from exc
        try:
            self._commit_in(dirs, marked, flag)
        finally:
            held.unclaim()

    def _commit_in(
        self, dirs: Mapping[str, int], marked: Sequence[int], flag: Sequence[int]
    ) -> None:
        cfg = self._backend.config
        failed = 0
        removed: set[str] = set()
        for i in marked:
            entry = self._entry(i)
            try:
                os.unlink(entry.name, dir_fd=dirs[entry.subdir])
            except FileNotFoundError:
                found = _store.find_in(dirs, entry.base)
                if found is not None:  # renamed from outside: remove it under its new name
                    try:
                        os.unlink(found.name, dir_fd=dirs[found.subdir])
                    except FileNotFoundError:
                        pass
                    except OSError:
                        failed += 1
                        continue
            except OSError:
                failed += 1
                continue
            for other in entry.others:  # the same file's other names (a crash left them)
                sub, _, name = other.partition("/")
                try:
                    os.unlink(name, dir_fd=dirs[sub])
                except FileNotFoundError:
                    pass
                except OSError:
                    failed += 1
            removed.add(entry.base)
        renamed = False
        cur = dirs["cur"]
        for i in flag:
            # Dovecot (pop3_no_flag_updates = no) marks RETR-ed messages \Seen.
            entry = self._entry(i)
            target = _store.with_seen_flag(entry.name)
            if target is None:
                continue
            with contextlib.suppress(OSError):
                if _store.name_taken(target, cur):
                    continue
                os.rename(entry.name, target, src_dir_fd=dirs[entry.subdir], dst_dir_fd=cur)
                renamed = True
        synced = True
        if cfg.fsync and (marked or renamed):
            for fd in dirs.values():
                try:
                    os.fsync(fd)
                except OSError:
                    synced = False
        if cfg.save_uidl and removed:
            with contextlib.suppress(OSError):
                _store.drop_from_uidlist(self.maildir, removed, fsync=cfg.fsync)
        if failed:
            raise UpdateFailed(f"{failed} of {len(marked)} marked messages could not be removed")
        if not synced:
            raise UpdateFailed("removals could not be made durable (fsync failed)")

    def release_now(self) -> bool:
        """pypop.backend_kit.SnapshotMailbox: an fcntl lock on a local file system is
        one close(), which waits for no disk and no network (cheaper than the thread
        hop); so is a lock that UPDATE's thread hop released already."""
        lock = self._lock
        if not (lock.released or lock.quick_release):
            return False
        self._close_folders()
        try:
            lock.release()  # (nothing if released already)
        finally:
            self._backend.locks.release(self.maildir)
        return True

    async def release(self) -> None:
        if self.release_now():
            return
        self._close_folders()
        lock = self._lock  # held, and not releasable without waiting
        try:
            # Outside this session's thread bound: its own stuck calls must not keep
            # the lock. If even this does not finish, forget the lock here so this
            # process can take the maildir again (our pid in a dotlock that our
            # registry does not list reads as stale).
            try:
                await self._backend.threads.run(lock.release)
            except TemporaryFailure:
                lock.forget()
                log.warning("lock release of %s timed out: left to its thread", self.maildir)
        finally:
            self._backend.locks.release(self.maildir)
