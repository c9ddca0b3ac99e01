"""Shared helpers: real maildirs in tmp_path, no mocks."""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from pypop_maildir import MaildirBackend, create

# The hard cases of POP3 content (POP3-CHECKLIST "What real clients trip over").
HARD_CASES: dict[str, bytes] = {
    "lf": b"From: a@example.org\nSubject: LF only\n\nline one\nline two\n",
    "dots": b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nafter\r\n",
    "just-dot": b".",
    "dot-first": b".Subject: starts with a dot\r\n\r\nbody\r\n",
    "no-final-newline": b"Subject: x\r\n\r\nno newline at the end",
    "eight-bit": b"Subject: 8bit\r\n\r\n\xe4\xf6\xfc \xff\x80\x00 raw\r\nlatin1 \xe9\n",
    "folded": b"Subject: a folded\r\n header line\r\n\tand again\r\nTo: b\r\n\r\nbody\r\n",
    "bare-cr": b"Subject: cr\r\n\r\na\rb\r\r\nc\r",
    "empty": b"",
}


def make_maildir(path: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def deliver(maildir: Path, name: str, data: bytes, sub: str = "new") -> Path:
    tmp = maildir / "tmp" / name.split(":")[0]
    tmp.write_bytes(data)
    dest = maildir / sub / name
    os.rename(tmp, dest)
    return dest


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "mail"
    r.mkdir()
    return r


@pytest.fixture
def alice(root: Path) -> Path:
    return make_maildir(root / "alice")


BackendMaker = Callable[..., MaildirBackend]


@pytest.fixture
def backend_factory(root: Path) -> BackendMaker:
    def make(**options: object) -> MaildirBackend:
        return create({"root": str(root), **options})

    return make


def reads_without_waiting(directory: Path, implementation: str) -> bool:
    """Whether ``read_file_now`` can answer for a cached file in ``directory`` (else it
    says None everywhere): ``preadv2(RWF_NOWAIT)`` on this file system and, for the
    Rust codec, ``openat2(RESOLVE_CACHED)`` (Linux 5.12; not under valgrind 3.19).
    Probed with the system calls themselves, not with the code under test."""
    probe = directory / ".nowait-probe"
    probe.write_bytes(b"x")
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()
    if implementation != "rust":
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    how = struct.pack("=QQQ", os.O_RDONLY | os.O_CLOEXEC, 0, 0x20)  # RESOLVE_CACHED
    fd = libc.syscall(437, -100, os.fsencode(directory), how, len(how))  # openat2, AT_FDCWD
    if fd < 0:
        return False
    os.close(fd)
    return True
