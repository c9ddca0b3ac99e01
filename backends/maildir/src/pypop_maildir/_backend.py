"""The ``maildir`` backend: :class:`MaildirBackend` and its :class:`MaildirMailbox`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import BinaryIO, Self

import trio
from pypop.backend import Account, MessageInfo
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
    MailboxLocked,
    NoSuchMessage,
    PermanentFailure,
    TemporaryFailure,
    UpdateFailed,
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

__all__ = ["BLOCK_SIZE", "MaildirBackend", "MaildirMailbox"]

# Read-ahead: the thread hop that reads a small message also reads the small messages
# after it (clients RETR in order), up to this many octets per session; they are served
# from memory if asked for within READ_AHEAD_TTL seconds.
READ_AHEAD_OCTETS = 256 * 1024
READ_AHEAD_MESSAGES = 64
READ_AHEAD_TTL = 2.0


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

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> Self:
        """Validate ``options`` (an :class:`~pypop.backend_kit.OptionError` names the
        problem) and build the backend."""
        return cls(parse_options(options))

    def maildir_path(self, user: str) -> str:
        """Hook: the maildir of ``user``. Raise :class:`~pypop.errors.AuthFailed` for a
        name that must not be served (the default refuses names that would leave the
        root: ``..``, ``/``, NUL, control characters)."""
        try:
            rel = expand_template(self.config.template, user)
        except UnsafeUser:
            raise AuthFailed("user name cannot be mapped to a maildir") from None
        return os.path.join(self.config.root, rel)

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
        return await self._open_at(account.user, maildir)

    async def open_mailbox(self, user: str) -> MaildirMailbox:
        return await self._open_at(user, self.maildir_path(user))

    async def _open_at(self, user: str, maildir: str) -> MaildirMailbox:
        if not self.locks.acquire(maildir):
            raise MailboxLocked("maildrop is locked by another session of this process")
        try:
            # One thread call that either returns a locked snapshot or releases the
            # lock: nothing awaits between taking the lock and handing it over.
            threads = self.threads.session()
            return await threads.run(self._open_sync, user, maildir, threads)
        except BaseException:
            self.locks.release(maildir)
            raise

    def _open_sync(self, user: str, maildir: str, threads: SessionThreads) -> MaildirMailbox:
        cfg = self.config
        if not all(os.path.isdir(os.path.join(maildir, d)) for d in ("cur", "new", "tmp")):
            if not cfg.autocreate:
                raise PermanentFailure("maildir does not exist")
            try:
                for d in ("cur", "new", "tmp"):
                    os.makedirs(os.path.join(maildir, d), mode=0o700, exist_ok=True)
            except OSError as exc:
                raise TemporaryFailure("cannot create maildir") from exc
        try:
            lock = acquire(maildir, cfg.lock, cfg.lock_stale_timeout)
        except LockBusy:
            raise MailboxLocked("maildrop is locked by another session") from None
        except OSError as exc:
            raise TemporaryFailure("cannot lock maildir") from exc
        try:
            keep = self.keep_message
            entries = [e for e in _store.list_messages(maildir) if keep(user, e.subdir, e.name)]
            if cfg.flag_updates:
                _store.move_new_to_cur(maildir, entries)
            _store.fill_sizes(
                maildir, entries, filename_sizes=cfg.filename_sizes, use_cache=cfg.size_cache
            )
            _store.assign_uids(entries)
            if cfg.save_uidl:
                _store.apply_uidlist(maildir, entries, fsync=cfg.fsync)
        except BaseException as exc:
            lock.release()
            if isinstance(exc, OSError):
                raise TemporaryFailure("cannot read maildir") from exc
            raise
        return MaildirMailbox(self, maildir, entries, lock, threads)

    async def aclose(self) -> None:
        """Nothing to release: every mailbox releases its own lock."""


class MaildirMailbox(SnapshotMailbox):
    """One locked maildir snapshot (pypop.backend.Mailbox)."""

    def __init__(
        self,
        backend: MaildirBackend,
        maildir: str,
        entries: list[_store.Entry],
        lock: HeldLock,
        threads: SessionThreads,
    ) -> None:
        super().__init__(tuple(MessageInfo(size=e.size, uid=e.uid) for e in entries))
        self._backend = backend
        self.maildir = maildir
        self._entries = entries
        self._lock: HeldLock | None = lock
        self._threads = threads
        self._ahead: dict[int, bytes] = {}
        self._ahead_until = 0.0

    def received(self, index: int) -> float | None:
        """pypop.backend.MessageTimes: the delivery time at the start of the Maildir
        name (``1700000000.M1P2.host``); None for a name without one (never expired
        by EXPIRE)."""
        return _store.delivery_time(self._entry(index).name)

    def _entry(self, index: int) -> _store.Entry:
        if not 0 <= index < len(self._entries):
            raise NoSuchMessage(f"no message at index {index}")
        return self._entries[index]

    def _open_and_read(self, entry: _store.Entry) -> tuple[BinaryIO | None, bytes]:
        """Open and read the first block; (None, data) when that was the whole file."""
        f = self._open_file(entry)
        try:
            block = f.read(BLOCK_SIZE)
        except BaseException:
            f.close()
            raise
        if len(block) < BLOCK_SIZE:
            f.close()
            return None, block
        return f, block

    def _read_with_ahead(self, index: int) -> tuple[BinaryIO | None, bytes, dict[int, bytes]]:
        """Message ``index`` as :meth:`_open_and_read` gives it, and, if it was small,
        the whole of the small messages after it (within the read-ahead budget)."""
        f, block = self._open_and_read(self._entries[index])
        ahead: dict[int, bytes] = {}
        if f is not None:
            return f, block, ahead
        budget = READ_AHEAD_OCTETS - len(block)
        for j in range(index + 1, min(len(self._entries), index + 1 + READ_AHEAD_MESSAGES)):
            entry = self._entries[j]
            # The POP3 size is never below the file size (line ends only grow).
            if entry.size >= BLOCK_SIZE or entry.size > budget:
                break
            try:
                g, data = self._open_and_read(entry)
            except (OSError, NoSuchMessage):
                break
            if g is not None:  # grew since the snapshot
                g.close()
                break
            ahead[j] = data
            budget -= len(data)
        return None, block, ahead

    def _open_file(self, entry: _store.Entry) -> BinaryIO:
        lock = self._lock
        if lock is not None:
            lock.refresh()
        try:
            return open(entry.path(self.maildir), "rb")
        except FileNotFoundError:
            pass
        # Renamed from outside (an IMAP client set a flag)? Find it by base name.
        found = _store.find_by_base(self.maildir, entry.base)
        if found is None:
            raise NoSuchMessage("message was removed") from None
        entry.subdir, entry.name = found.subdir, found.name
        try:
            return open(entry.path(self.maildir), "rb")
        except FileNotFoundError:
            raise NoSuchMessage("message was removed") from None

    async def retrieve(self, index: int, *, top_lines: int | None = None) -> AsyncIterator[bytes]:
        """Stream the stored octets in 64 KiB blocks, each read in a worker thread.

        With ``top_lines`` it stops after the header and that many body lines (counting
        LF line ends, which never stops earlier than the server's TOP cut).
        """
        entry = self._entry(index)
        now = trio.current_time()
        data = self._ahead.pop(index, None) if now < self._ahead_until else None
        if data is not None:
            f: BinaryIO | None = None
            block = data
        else:
            try:
                # One thread hop opens and reads the first block (a message that fits
                # in one block costs no other hop), and reads ahead.
                f, block, ahead = await self._threads.run(self._read_with_ahead, index)
            except OSError as exc:
                raise TemporaryFailure("cannot open message") from exc
            self._ahead = ahead
            self._ahead_until = now + READ_AHEAD_TTL
        cutter = TopCut(top_lines) if top_lines is not None else None
        complete = False
        try:
            while True:
                last = f is None or len(block) < BLOCK_SIZE  # a short read is EOF
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
                assert f is not None
                try:
                    block = await self._threads.run(f.read, BLOCK_SIZE)
                except OSError as exc:
                    raise TemporaryFailure("cannot read message") from exc
        finally:
            if f is not None:
                f.close()
        if complete and top_lines is None:
            entry.retrieved = True
        lock = self._lock
        if lock is not None:
            lock.refresh()

    async def update(self, deleted: Sequence[int]) -> None:
        """UPDATE: unlink exactly the marked files, set Seen flags, fsync the folders."""
        await self._threads.run(self._commit_sync, deleted)

    def _commit_sync(self, marked: Sequence[int]) -> None:
        cfg = self._backend.config
        failed = 0
        removed: set[str] = set()
        for i in marked:
            entry = self._entries[i]
            try:
                os.unlink(entry.path(self.maildir))
            except FileNotFoundError:
                found = _store.find_by_base(self.maildir, entry.base)
                if found is not None:  # renamed from outside: remove it under its new name
                    try:
                        os.unlink(found.path(self.maildir))
                    except FileNotFoundError:
                        pass
                    except OSError:
                        failed += 1
                        continue
            except OSError:
                failed += 1
                continue
            removed.add(entry.base)
        renamed = False
        if cfg.flag_updates:
            # Dovecot (pop3_no_flag_updates = no) marks RETR-ed messages \Seen.
            done = set(marked)
            for i, entry in enumerate(self._entries):
                if i in done or not entry.retrieved or entry.subdir != "cur":
                    continue
                target = _store.with_seen_flag(entry.name)
                if target is None:
                    continue
                dst = os.path.join(self.maildir, "cur", target)
                with contextlib.suppress(OSError):
                    if not os.path.exists(dst):
                        os.rename(entry.path(self.maildir), dst)
                        renamed = True
        synced = True
        if cfg.fsync and (marked or renamed):
            for sub in ("cur", "new"):
                try:
                    _store.fsync_dir(os.path.join(self.maildir, sub))
                except OSError:
                    synced = False
        if cfg.save_uidl and removed:
            with contextlib.suppress(OSError):
                _store.drop_from_uidlist(self.maildir, removed, fsync=cfg.fsync)
        if failed:
            raise UpdateFailed(f"{failed} of {len(marked)} marked messages could not be removed")
        if not synced:
            raise UpdateFailed("removals could not be made durable (fsync failed)")

    async def release(self) -> None:
        lock, self._lock = self._lock, None
        try:
            if lock is not None:
                await self._threads.run(lock.release)
        finally:
            self._backend.locks.release(self.maildir)
