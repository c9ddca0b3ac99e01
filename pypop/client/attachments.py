"""Saving attachments under a directory, and never anywhere else.

A file name from a message is hostile input. :func:`safe_filename` makes it harmless:
path parts stripped (``/`` and ``\\``), NUL and control characters dropped, Unicode
NFC, characters Windows forbids replaced, ``..`` and empty names refused, hidden
(leading ``.``) and Windows-reserved names (``CON``, ``NUL``, ``COM1`` ... with or
without an extension) prefixed with ``_``, capped at 255 octets of UTF-8 keeping the
extension. :func:`save` writes through a directory descriptor with ``O_NOFOLLOW``:
the data goes to a temporary file that is fsynced and then renamed (or linked, for
unique names) into place, so a symlink planted in the directory is replaced, never
followed, and a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import unicodedata
from pathlib import Path

__all__ = ["MAX_NAME", "safe_filename", "save"]

MAX_NAME = 255
"""Octets in a file name on every common file system."""

_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"COM{i}" for i in "123456789¹²³"]
    + [f"LPT{i}" for i in "123456789¹²³"]
)
_WINDOWS_BAD = re.compile(r'[<>:"|?*]')


def _cap(name: str, limit: int = MAX_NAME) -> str:
    if len(name.encode("utf-8")) <= limit:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext.encode("utf-8")) > 32:
        stem, ext = name, ""
    suffix = "." + ext if ext else ""
    room = limit - len(suffix.encode("utf-8"))
    out = stem.encode("utf-8")[:room].decode("utf-8", "ignore")
    return out + suffix


def safe_filename(name: str | None, default: str = "attachment") -> str:
    """A name that is safe to create in a directory; ``default`` if nothing is left."""
    text = unicodedata.normalize("NFC", name or "")
    text = re.split(r"[\\/]", text)[-1]  # path parts, both conventions
    text = "".join(c for c in text if unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp"))
    text = _WINDOWS_BAD.sub("_", text)
    text = text.strip().rstrip(". ")  # Windows drops trailing dots and spaces
    if text in ("", ".", ".."):
        text = default
    if text.startswith("."):
        text = "_" + text.lstrip(".") if text.strip(".") else default
    if text.split(".", 1)[0].strip().upper() in _RESERVED:
        text = "_" + text
    return _cap(text)


def _numbered(name: str, n: int) -> str:
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    suffix = f"_{n}" + ("." + ext if ext else "")
    room = MAX_NAME - len(suffix.encode("utf-8"))
    return stem.encode("utf-8")[:room].decode("utf-8", "ignore") + suffix


def save(directory: str | Path, name: str, data: bytes, *, unique: bool = False) -> Path:
    """Write ``data`` as ``directory/safe_filename(name)`` atomically; return the path.

    With ``unique`` an existing name is never replaced: ``name_1.ext``, ``name_2.ext``
    ... (CFPOP's ``generateUniqueFilenames``). Without it the file replaces what was
    there (a planted symlink is replaced, not followed).
    """
    final = safe_filename(name)
    os.makedirs(directory, exist_ok=True)
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    dir_fd = os.open(directory, flags)
    try:
        tmp = f".pypop-tmp-{secrets.token_hex(8)}"
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
            0o600,
            dir_fd=dir_fd,
        )
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if not unique:
                os.rename(tmp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            else:
                candidate, n = final, 0
                while True:
                    try:
                        os.link(
                            tmp,
                            candidate,
                            src_dir_fd=dir_fd,
                            dst_dir_fd=dir_fd,
                            follow_symlinks=False,
                        )
                        break
                    except FileExistsError:
                        n += 1
                        candidate = _numbered(final, n)
                os.unlink(tmp, dir_fd=dir_fd)
                final = candidate
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise IsADirectoryError(f"{final!r} is a directory in {directory}") from None
        raise
    finally:
        os.close(dir_fd)
    return Path(directory) / final
