"""Reading a maildir: listing, delivery order, UIDLs, POP3 sizes and their cache.

Everything here blocks and runs in a worker thread.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TextIO

from pypop.backend import is_valid_uid
from pypop.wire import SizeCounter

__all__ = [
    "SIZE_CACHE_NAME",
    "UIDLIST_NAME",
    "Entry",
    "NotAFolder",
    "NotAMessage",
    "base_name",
    "count_size",
    "delivery_key",
    "find_by_base",
    "find_in",
    "list_messages",
    "mapped_uid",
    "name_taken",
    "open_folder",
    "open_folders",
    "open_message",
    "read_message",
    "write_atomically",
]

SIZE_CACHE_NAME = "pypop-sizes"
UIDLIST_NAME = "pypop-uidlist"
# Version 2: sizes no longer count the CRLF added to a last line without one (Dovecot's
# rule). A cache of another version is ignored as a whole and rewritten: its sizes were
# counted under another rule, and a stat() match says nothing about that.
_SIZE_CACHE_MAGIC = "pypop-sizes 2"
_UIDLIST_MAGIC = "pypop-uidlist 1"
COUNT_BLOCK = 256 * 1024
# Never follow a link to a message, never block opening one (a FIFO would).
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotAMessage(Exception):
    """The name is not a regular file (any more): a symlink, a FIFO, a directory."""


@dataclass(slots=True)
class Entry:
    """One message of the snapshot."""

    subdir: str  # "new" or "cur"
    name: str
    base: str
    size: int = 0
    uid: str = ""
    # Other names of the same file ("sub/name"), left by a crash between link() and
    # unlink() (ours before rename(), or another tool's): removed with the message.
    others: tuple[str, ...] = ()

    def path(self, maildir: str) -> str:
        # (os.path.join is Python code; a name never holds a slash, a subdir is
        # "cur" or "new")
        return f"{maildir}/{self.subdir}/{self.name}"


def open_message(path: str, dir_fd: int | None = None) -> int:
    """A descriptor of the message file at ``path`` (with ``dir_fd``: the name in that
    folder's descriptor, never reached through the folder's path), which must be a
    regular file.

    ``O_NOFOLLOW``: a symlink is refused, never followed (a maildir's owner must not
    read /etc/shadow through it). ``O_NONBLOCK``: opening a FIFO returns at once
    instead of hanging a thread; the type is then checked on the descriptor, so a
    file swapped after any earlier check is caught too. Raises FileNotFoundError if
    it is gone, :class:`NotAMessage` if it is not a regular file.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENOTDIR):
            raise NotAMessage(path) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotAMessage(path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_message(fd: int, limit: int, offset: int | None = None) -> bytes:
    """Up to ``limit`` octets from ``fd`` (at ``offset``, by ``pread``, if given);
    fewer only at end of file."""
    data = os.read(fd, limit) if offset is None else os.pread(fd, limit, offset)
    if len(data) == limit or not data:
        return data
    parts = [data]
    got = len(data)
    while got < limit:  # a short read that is not EOF (rare: network file systems)
        more = (
            os.read(fd, limit - got) if offset is None else os.pread(fd, limit - got, offset + got)
        )
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def base_name(name: str) -> str:
    """The part of a file name before the first ':' (the info separator).

    This is what Dovecot's ``pop3_uidl_format = %f`` gives: it keeps ``,S=``/``,W=``
    fields, which are part of the base name; only the ``:2,FLAGS`` info is cut.
    """
    return name.split(":", 1)[0]


_TIME_RE = re.compile(r"(\d+)(?:\.|$)")
_USEC_RE = re.compile(r"M(\d+)")
_W_RE = re.compile(r",W=(\d+)(?=,|$)")


def delivery_key(name: str) -> tuple[int, int, int, str]:
    """Sort key for delivery order.

    Maildir names start with the delivery time in seconds (``1700000000.M123P45.host``);
    Dovecot's and Postfix's names carry microseconds as ``M<usec>`` in the second
    field. Order: names with a time prefix by (seconds, microseconds, name), then names
    without one by name.
    """
    m = _TIME_RE.match(name)
    if m is None:
        return (1, 0, 0, name)
    usec = 0
    parts = name.split(".", 2)
    if len(parts) > 1:
        mu = _USEC_RE.search(parts[1])
        if mu is not None:
            usec = int(mu.group(1))
    return (0, int(m.group(1)), usec, name)


def delivery_time(name: str) -> float | None:
    """The delivery time (seconds) a Maildir name starts with, or None."""
    m = _TIME_RE.match(name)
    return float(m.group(1)) if m is not None else None


def valid_uid(uid: str) -> bool:
    """``pypop.backend.is_valid_uid`` with str methods (hot on 100,000 names)."""
    return 1 <= len(uid) <= 70 and uid.isascii() and uid.isprintable() and " " not in uid


def mapped_uid(key: str) -> str:
    """A stable valid UIDL for a base name that is not one.

    ``pypop/`` + 43 characters of base64url(SHA-256). A file name cannot contain '/',
    so a mapped UIDL can never equal a real base name.
    """
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return "pypop/" + base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def filename_size(base: str) -> int | None:
    """The ``,W=<n>`` virtual (CRLF) size in the base name, if any."""
    m = _W_RE.search(base)
    return int(m.group(1)) if m else None


class NotAFolder(Exception):
    """cur/, new/ or tmp/ is not a directory: a symbolic link, or anything else."""


def open_folder(maildir: str, sub: str, owner: int | None = None) -> int:
    """A descriptor of the maildir's ``sub`` folder, never through a symbolic link: the
    maildir's owner could point cur/ or new/ at another user's folders, which the
    server's user can read. With ``owner``, the folder must belong to that uid. Raises
    :class:`NotAFolder` for a link, a non-directory or another owner, OSError
    (FileNotFoundError) otherwise."""
    path = f"{maildir}/{sub}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotAFolder(f"{path} is a symbolic link or not a directory") from None
        raise
    if owner is not None and os.fstat(fd).st_uid != owner:
        os.close(fd)
        raise NotAFolder(f"{path} does not belong to the user's uid {owner}")
    return fd


def open_folders(maildir: str, *subs: str) -> tuple[int, ...]:
    """:func:`open_folder` of each of ``subs``, in order; none left open if one fails."""
    fds: list[int] = []
    try:
        for sub in subs:
            fds.append(open_folder(maildir, sub))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return tuple(fds)


def name_taken(name: str, dir_fd: int) -> bool:
    """Whether ``name`` exists in the folder open at ``dir_fd`` (a link counts)."""
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def list_messages(maildir: str, owner: int | None = None) -> list[Entry]:
    """Regular files of new/ and cur/ (not dot-files), in delivery order.

    Symlinks, FIFOs and everything else that is not a regular file are left out (the
    directory entry's type, no link followed). Several names of one file, which a
    crash between ``link()`` and ``unlink()`` leaves, are one message: the cur/ name
    is listed and the others are kept in :attr:`Entry.others`. Different files that
    share a base name (a copy) stay separate messages.
    """
    entries: list[Entry] = []
    by_base: dict[str, Entry] = {}
    shared: list[tuple[Entry, Entry]] = []
    for sub in ("cur", "new"):  # cur/ first: the name a duplicate is listed under
        fd = open_folder(maildir, sub, owner)
        try:  # (os.scandir(fd) leaves the descriptor open)
            with os.scandir(fd) as it:
                for de in it:
                    name = de.name
                    if name.startswith("."):
                        continue
                    try:
                        if not de.is_file(follow_symlinks=False):
                            continue
                    except OSError:
                        continue
                    entry = Entry(sub, name, base_name(name))
                    first = by_base.setdefault(entry.base, entry)
                    if first is not entry:
                        shared.append((first, entry))
                    entries.append(entry)
        finally:
            os.close(fd)
    if shared:
        _merge_links(maildir, entries, shared)
    entries.sort(key=lambda e: delivery_key(e.name))
    return entries


def _merge_links(maildir: str, entries: list[Entry], shared: list[tuple[Entry, Entry]]) -> None:
    """Fold names that are hard links of one file into one entry (rare: a base name
    seen twice costs two lstat calls)."""
    dropped: set[int] = set()
    for first, entry in shared:
        try:
            a = os.lstat(first.path(maildir))
            b = os.lstat(entry.path(maildir))
        except OSError:
            continue
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
            first.others += (f"{entry.subdir}/{entry.name}",)
            dropped.add(id(entry))
    if dropped:
        entries[:] = [e for e in entries if id(e) not in dropped]


def find_by_base(maildir: str, base: str) -> Entry | None:
    """Find a message again after an outside rename (flag change, new/ -> cur/)."""
    dirs: dict[str, int] = {}
    try:
        for sub in ("cur", "new"):
            with contextlib.suppress(OSError, NotAFolder):
                dirs[sub] = open_folder(maildir, sub)
        return find_in(dirs, base)
    finally:
        for fd in dirs.values():
            os.close(fd)


def find_in(dirs: Mapping[str, int], base: str) -> Entry | None:
    """:func:`find_by_base` in the folders held by ``dirs`` (``{"cur": fd, "new": fd}``)."""
    for sub, fd in dirs.items():
        with contextlib.suppress(OSError), os.scandir(fd) as it:
            for de in it:
                name = de.name
                if name.startswith(".") or base_name(name) != base:
                    continue
                with contextlib.suppress(OSError):
                    if de.is_file(follow_symlinks=False):
                        return Entry(sub, name, base)
    return None


def count_size(path: str) -> tuple[int, os.stat_result]:
    """The POP3 size of a message file, streamed through SizeCounter (never read
    whole), and the file's stat. Raises like :func:`open_message`."""
    fd = open_message(path)
    try:
        st = os.fstat(fd)
        counter = SizeCounter()
        while block := os.read(fd, COUNT_BLOCK):
            counter.feed(block)
        return counter.finish(), st
    finally:
        os.close(fd)


def write_atomically(path: str, lines: Iterable[str], *, fsync: bool) -> None:
    """Write a text file through a temporary name and ``rename``."""
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        # "x" (O_EXCL): never through a name someone made in its place, link or file.
        with open(tmp, "x", encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            for line in lines:
                f.write(line)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _cacheable(name: str) -> bool:
    return not any(c in name for c in "\t\n\r")


def _open_own(path: str) -> TextIO:
    """One of our own files (the size cache, the UIDL list) for reading, as text. Never
    through a symbolic link, and never a FIFO or a device (which could hang the
    reading thread, or feed ``readline`` without end): such a name reads as absent
    (FileNotFoundError), and the next write replaces it with a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileNotFoundError(errno.ENOENT, "a symbolic link", path) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileNotFoundError(errno.ENOENT, "not a regular file", path)
        return open(fd, encoding="utf-8", errors="surrogateescape", newline="\n")
    except BaseException:
        os.close(fd)
        raise


# ---------------------------------------------------------------- size cache


def read_size_cache(path: str) -> dict[str, tuple[int, int, int, int]]:
    """base -> (st_size, st_mtime_ns, st_ino, pop3 size). Bad content is ignored."""
    cache: dict[str, tuple[int, int, int, int]] = {}
    try:
        with _open_own(path) as f:
            if f.readline().rstrip("\n") != _SIZE_CACHE_MAGIC:
                return {}
            for line in f:
                fields = line.rstrip("\n").split("\t")
                if len(fields) != 5:
                    continue
                try:
                    st_size, mtime_ns, ino, size = (int(x) for x in fields[1:])
                except ValueError:
                    continue
                cache[fields[0]] = (st_size, mtime_ns, ino, size)
    except (OSError, UnicodeError):
        return {}
    return cache


def size_cache_lines(cache: dict[str, tuple[int, int, int, int]]) -> Iterable[str]:
    yield _SIZE_CACHE_MAGIC + "\n"
    for base, (st_size, mtime_ns, ino, size) in cache.items():
        yield f"{base}\t{st_size}\t{mtime_ns}\t{ino}\t{size}\n"


def fill_sizes(
    maildir: str, entries: list[Entry], *, filename_sizes: bool, use_cache: bool
) -> list[Entry]:
    """Set ``Entry.size`` for every entry: ``,W=``, else a valid cache entry, else count.

    A cache entry is used only if the file's size, mtime (ns) and inode all match; a
    flag rename keeps all three, a rewrite changes at least one. The cache is
    rewritten (atomically) only when it changed. Returns the entries that are still
    messages: one removed or swapped for a non-regular file since the listing is left
    out (it is not a message of this snapshot), never followed or waited for.
    """
    cache_path = os.path.join(maildir, SIZE_CACHE_NAME)
    old = read_size_cache(cache_path) if use_cache else {}
    new: dict[str, tuple[int, int, int, int]] = {}
    kept: list[Entry] = []
    for e in entries:
        if filename_sizes:
            w = filename_size(e.base)
            if w is not None:
                e.size = w
                kept.append(e)
                continue
        path = e.path(maildir)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            hit = old.get(e.base)
            if hit is not None and hit[:3] == (st.st_size, st.st_mtime_ns, st.st_ino):
                e.size = hit[3]
            else:
                e.size, st = count_size(path)
        except (FileNotFoundError, NotAMessage):
            continue
        kept.append(e)
        if use_cache and _cacheable(e.base):
            new[e.base] = (st.st_size, st.st_mtime_ns, st.st_ino, e.size)
    if use_cache and new != old:
        with contextlib.suppress(OSError):  # the cache is an optimisation only
            write_atomically(cache_path, size_cache_lines(new), fsync=False)
    return kept


# ---------------------------------------------------------------- UIDLs


def assign_uids(entries: list[Entry]) -> None:
    """UIDL = base name if valid, else :func:`mapped_uid`; duplicates disambiguated.

    A second file with the same base name (a crash between link and unlink, a copy)
    gets ``mapped_uid(base + "\\0" + subdir/name)`` so UIDLs stay unique.
    """
    seen: set[str] = set()
    for e in entries:
        uid = e.base if valid_uid(e.base) else mapped_uid(e.base)
        if uid in seen:
            uid = mapped_uid(f"{e.base}\0{e.subdir}/{e.name}")
        seen.add(uid)
        e.uid = uid


def apply_uidlist(maildir: str, entries: list[Entry], *, fsync: bool) -> None:
    """``save_uidl``: keep the UIDL a message was first given, across renames.

    ``pypop-uidlist`` maps base name -> (UIDL, inode, mtime). A message whose base name
    is listed keeps its UIDL; one whose base name changed (a rename by another tool)
    is recognised by inode and mtime (a rename keeps both) and keeps its UIDL too.
    New messages get the UIDL :func:`assign_uids` gave them. Entries of vanished
    files are dropped. The file is rewritten atomically when it changed.
    """
    path = os.path.join(maildir, UIDLIST_NAME)
    old: dict[str, tuple[str, int, int]] = {}
    try:
        with _open_own(path) as f:
            if f.readline().rstrip("\n") == _UIDLIST_MAGIC:
                for line in f:
                    fields = line.rstrip("\n").split("\t")
                    if len(fields) == 4 and is_valid_uid(fields[1]):
                        with contextlib.suppress(ValueError):
                            old[fields[0]] = (fields[1], int(fields[2]), int(fields[3]))
    except FileNotFoundError:
        pass
    by_inode = {(ino, mtime): (base, uid) for base, (uid, ino, mtime) in old.items()}
    present = {e.base for e in entries}
    new: dict[str, tuple[str, int, int]] = {}
    used: set[str] = set()
    for e in entries:
        st = os.lstat(e.path(maildir))
        ident = (st.st_ino, st.st_mtime_ns)
        rec = old.get(e.base)
        uid: str | None = None
        if rec is not None:
            uid = rec[0]
        elif ident in by_inode and by_inode[ident][0] not in present:
            uid = by_inode[ident][1]
        if uid is None or uid in used:
            uid = e.uid if e.uid not in used else mapped_uid(f"{e.base}\0{e.subdir}/{e.name}")
        e.uid = uid
        used.add(uid)
        if _cacheable(e.base):
            new[e.base] = (uid, st.st_ino, st.st_mtime_ns)
    if new != old:
        write_atomically(
            path,
            [_UIDLIST_MAGIC + "\n"] + [f"{b}\t{u}\t{i}\t{m}\n" for b, (u, i, m) in new.items()],
            fsync=fsync,
        )


def drop_from_uidlist(maildir: str, bases: set[str], *, fsync: bool) -> None:
    """Forget UIDLs of messages removed in UPDATE (best effort)."""
    path = os.path.join(maildir, UIDLIST_NAME)
    try:
        with _open_own(path) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return
    kept = [ln for i, ln in enumerate(lines) if i == 0 or ln.split("\t", 1)[0] not in bases]
    if len(kept) != len(lines):
        write_atomically(path, kept, fsync=fsync)


# ---------------------------------------------------------------- flags


def with_seen_flag(name: str) -> str | None:
    """The name with the ``S`` flag added (``:2,`` info kept sorted), or None if set."""
    base, sep, info = name.partition(":")
    if not sep:
        return name + ":2,S"
    if not info.startswith("2,"):
        return None  # experimental "1," info: leave it alone
    flags = info[2:]
    if "S" in flags:
        return None
    return f"{base}:2,{''.join(sorted(flags + 'S'))}"


def move_new_to_cur(maildir: str, entries: list[Entry]) -> bool:
    """Move new/ messages to cur/ with an empty ``:2,`` info, as Dovecot does.

    One ``rename()`` each: atomic, so a crash leaves the message under one name or the
    other, never both (``link()`` + ``unlink()`` left both, and the message was listed
    twice). A name already taken in cur/ is never overwritten: that message stays in
    new/, where it is still served. Names of the same file left by an earlier crash
    (:attr:`Entry.others` in new/) are removed: the cur/ name keeps the file. Returns
    whether anything was renamed or removed.
    """
    if not any(e.subdir == "new" or e.others for e in entries):
        return False
    changed = False
    # Through descriptors of the two folders: a link put in place of either while
    # this runs cannot send a message into another user's maildir.
    new_fd, cur_fd = open_folders(maildir, "new", "cur")
    try:
        for e in entries:
            if e.others and e.subdir == "cur":
                for other in e.others:
                    if other.startswith("new/"):
                        with contextlib.suppress(OSError):
                            os.unlink(other[4:], dir_fd=new_fd)
                            e.others = tuple(o for o in e.others if o != other)
                            changed = True
            if e.subdir != "new":
                continue
            target = e.name if ":" in e.name else e.name + ":2,"
            try:
                # Another writer could take the name between this check and the rename:
                # only a deliverer reusing a unique name could, which Maildir rules out.
                if name_taken(target, cur_fd):
                    continue
                os.rename(e.name, target, src_dir_fd=new_fd, dst_dir_fd=cur_fd)
            except OSError:
                continue
            e.subdir, e.name = "cur", target
            changed = True
    finally:
        os.close(cur_fd)
        os.close(new_fd)
    return changed
