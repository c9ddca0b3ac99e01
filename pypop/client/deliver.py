"""Local delivery for ``pypop fetch``: Maildir and mbox, and the per-account UIDL state.

The rule: a message is deleted on the server only after its local copy is fsynced and
renamed into place (Maildir) or appended and fsynced (mbox), and the state records a
UID only after that. So a crash or kill at any point loses nothing:

- Maildir file names carry a tag derived from the account and the UID
  (``...X<tag>.host``), so the Maildir itself says what was delivered: a run that
  was killed between the rename and the state update finds its messages there and
  delivers none twice. Only tags of UIDs the journal marks as begun count: an older
  tag may stand for another message under a reused UID (RFC 1939 only says SHOULD
  NOT reuse), which must be fetched, not deleted unseen.
- mbox cannot be tagged without changing the message, so each message is appended,
  fsynced and recorded before the next: a kill duplicates at most that one message.
- The state file is rewritten crash-safe (temporary file, fsync, rename, fsync of the
  directory); between rewrites, UIDs go to an append-only journal next to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import socket
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

__all__ = [
    "Deliverer",
    "Maildir",
    "Mbox",
    "StateFile",
    "open_deliverer",
    "recorded_uids",
    "uid_tag",
]


def uid_tag(account: str, uid: str) -> str:
    return hashlib.sha256(f"{account}\0{uid}".encode()).hexdigest()[:16]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Deliverer(Protocol):
    batch_safe: bool
    """True if a batch may be committed at once without risking duplicates."""

    def delivered(self, account: str, uids: Iterable[str]) -> set[str]: ...
    def deliver(self, items: Sequence[tuple[str, bytes]]) -> None: ...
    def close(self) -> None: ...


class Maildir:
    """Deliver into ``DIR/{tmp,new,cur}`` (created if missing)."""

    batch_safe = True
    _TAG = re.compile(r"X([0-9a-f]{16})\.")

    def __init__(self, path: Path, account: str) -> None:
        self.path = path
        self.account = account
        for sub in ("tmp", "new", "cur"):
            (path / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        self._n = 0
        self._pool = ThreadPoolExecutor(max_workers=16)
        directory = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
        self._tmp_fd = os.open(path / "tmp", directory)
        self._new_fd = os.open(path / "new", directory)
        self._clean_tmp()

    STALE_TMP = 36 * 3600
    """maildir(5): a tmp/ file untouched this long is a leftover. Younger ones may be
    another account's delivery in flight (each account has its own lock, not the
    Maildir)."""

    def _clean_tmp(self) -> None:
        # Our own leftovers from a killed run (never delivered, safe to drop).
        cutoff = time.time() - self.STALE_TMP
        for entry in os.scandir(self.path / "tmp"):
            if self._TAG.search(entry.name) and entry.name.endswith(self._host):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)

    def delivered(self, account: str, uids: Iterable[str]) -> set[str]:
        """The UIDs whose tagged copies are already in new/ or cur/."""
        present: set[str] = set()
        for sub in ("new", "cur"):
            for name in os.listdir(self.path / sub):
                match = self._TAG.search(name)
                if match:
                    present.add(match.group(1))
        return {uid for uid in uids if uid_tag(account, uid) in present}

    def _name(self, uid: str) -> str:
        self._n += 1
        now = time.time()
        usec = int((now % 1) * 1_000_000)
        return (
            f"{int(now)}.M{usec}P{os.getpid()}Q{self._n}X{uid_tag(self.account, uid)}.{self._host}"
        )

    def deliver(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Write each (LF line ends, as MUAs expect) to tmp/, fsync them in parallel
        (one journal commit), rename into new/, fsync new/."""
        names = [self._name(uid) for uid, _ in items]
        # Creating, writing and fsyncing run in parallel threads: each is mostly a wait
        # on the file system, and concurrent fsyncs share journal commits.
        list(self._pool.map(self._write, names, (data for _, data in items)))
        for name in names:
            os.rename(name, name, src_dir_fd=self._tmp_fd, dst_dir_fd=self._new_fd)
        os.fsync(self._new_fd)

    def _write(self, name: str, data: bytes) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        fd = os.open(name, flags, 0o600, dir_fd=self._tmp_fd)
        try:
            view = memoryview(data.replace(b"\r\n", b"\n"))  # local line ends
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._pool.shutdown()
        os.close(self._tmp_fd)
        os.close(self._new_fd)


class Mbox:
    """Append to an mbox file (mboxrd quoting of ``From `` lines), locked with flock."""

    batch_safe = False

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        _fsync_dir(path.parent)

    def delivered(self, account: str, uids: Iterable[str]) -> set[str]:
        return set()

    def deliver(self, items: Sequence[tuple[str, bytes]]) -> None:
        for _uid, data in items:
            body = data.replace(b"\r\n", b"\n")
            body = re.sub(rb"(?m)^(>*From )", rb">\1", body)
            if not body.endswith(b"\n"):
                body += b"\n"
            stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime())
            view = memoryview(f"From MAILER-DAEMON {stamp}\n".encode() + body + b"\n")
            start = os.lseek(self._fd, 0, os.SEEK_END)  # ours alone: we hold the flock
            try:
                while view:  # a full disk or quota writes part and returns its count
                    view = view[os.write(self._fd, view) :]
                os.fsync(self._fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)  # no torn message for readers
                raise

    def close(self) -> None:
        os.close(self._fd)


def open_deliverer(spec: str, account: str) -> Maildir | Mbox:
    kind, sep, where = spec.partition(":")
    if not sep or not where or kind not in ("maildir", "mbox"):
        raise ValueError("--deliver takes maildir:DIR or mbox:FILE")
    path = Path(where).expanduser()
    return Maildir(path, account) if kind == "maildir" else Mbox(path)


def _load(path: Path, journal: Path, uids: set[str], pending: set[str]) -> None:
    for p in (path, journal):
        with contextlib.suppress(FileNotFoundError):
            # A torn last journal line (killed mid-write) has no newline: ignore it.
            text = p.read_text("utf-8", "replace")
            for line in text.split("\n")[:-1]:
                if line.startswith(" "):
                    pending.add(line[1:])
                elif line and not line.startswith("# "):  # "#1" is a UID
                    uids.add(line)


def recorded_uids(path: Path) -> set[str]:
    """The UIDs a :class:`StateFile` at ``path`` holds, read without taking its lock."""
    uids: set[str] = set()
    _load(path, path.with_name(path.name + ".journal"), uids, set())
    return uids


class StateFile:
    """The UIDs delivered from one account: ``path`` (rewritten atomically) plus
    ``path.journal`` (appended as messages are delivered), under an exclusive lock."""

    HEADER = "# pypop fetch UIDL state v1\n"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.journal_path = path.with_name(path.name + ".journal")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise
        self.uids: set[str] = set()
        self.pending: set[str] = set()
        """UIDs whose delivery started after the last :meth:`save` (journal lines
        `` uid``: a UID has no space). Only these may be recovered from Maildir tags:
        an older tag may belong to a message a server gave the same UID since."""
        _load(path, self.journal_path, self.uids, self.pending)
        self._journal = open(self.journal_path, "a", encoding="utf-8")  # noqa: SIM115

    def begin(self, uids: Iterable[str]) -> None:
        """Note (durably) that these UIDs are about to be delivered."""
        lines = "".join(f" {u}\n" for u in uids)
        if lines:
            self._journal.write(lines)
            self._journal.flush()
            os.fsync(self._journal.fileno())
            self.pending.update(lines.split())

    def record(self, uids: Iterable[str]) -> None:
        lines = "".join(f"{u}\n" for u in uids)
        if lines:
            self._journal.write(lines)
            self._journal.flush()
            self.uids.update(lines.split())

    def save(self, keep: Iterable[str]) -> None:
        """Rewrite the state as ``keep`` (temporary file, fsync, rename), then drop the
        journal."""
        self.uids = set(keep)
        self.pending.clear()  # the journal that held them goes
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.HEADER + "".join(f"{u}\n" for u in sorted(self.uids)))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.path)
        _fsync_dir(self.path.parent)
        self._journal.close()
        os.unlink(self.journal_path)
        self._journal = open(self.journal_path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        self._journal.close()
        os.close(self._lock)
