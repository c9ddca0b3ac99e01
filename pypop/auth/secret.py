"""The server secret: a persistent key for what must look the same across restarts.

SCRAM-SHA-256 shows every client a salt before it proves anything. A known user's
salt never changes (stored with the entry, or derived from the user name for PLAIN
entries), so an unknown user's fake salt must not change either, or a restart tells
the two apart (issue 15 item 6). Both are keyed hashes of the user name under this
secret, which therefore lives in a file:

- 32 random octets, written as 64 hex digits and a newline;
- created on first start with mode 0600 (O_EXCL, then linked into place, so two
  servers starting at once end up with the same file);
- read with O_NOFOLLOW; a file that other users can read is used, with a warning.

Where the file lives is the configuration's choice (``auth.secret_file``); by
default it sits next to the passwd-file, whose user list it protects.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

__all__ = ["SECRET_OCTETS", "load_or_create"]

log = logging.getLogger("pypop.auth")

SECRET_OCTETS = 32


def _read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"server secret {path} is not a regular file")
        if st.st_mode & 0o077:
            log.warning(
                "server secret %s can be read by other users (mode %o): chmod 600 it",
                path,
                stat.S_IMODE(st.st_mode),
            )
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    text = data.decode("ascii", "replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != SECRET_OCTETS:
        raise ValueError(
            f"server secret {path} is malformed (expected {2 * SECRET_OCTETS} hex digits); "
            "remove it to have a new one made (the fake SCRAM salts change once)"
        )
    return key


def load_or_create(path: str | os.PathLike[str]) -> bytes:
    """The secret in ``path``, made first if the file does not exist.

    ``OSError`` if it can neither be read nor created; ``ValueError`` if the file is
    not a regular file or not a secret.
    """
    target = Path(path)
    try:
        return _read(target)
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(SECRET_OCTETS)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.write(fd, key.hex().encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, target)  # never replaces a secret another server just made
        except FileExistsError:
            return _read(target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("server secret %s created", target)
    return key
