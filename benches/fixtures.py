"""Benchmark fixtures: the same mail, laid out for every server under test.

One :class:`Fixture` holds several user sets (name prefix, users, messages each,
message size). For each set it writes

- ``eml/<user>/NNNN.eml``: seeds for pypop's memory backend;
- ``maildir-<server>/<user>/{cur,new,tmp}``: a private Maildir copy per server
  (servers write index files and flag renames, so none shares another's folders);
- ``passwd``: a Dovecot passwd-file (``user:{PLAIN}password``) read by both servers;
- ``users-<set>.tsv``: ``user<TAB>password`` lines for the load generator.

Messages are plain text with LF line ends (as Maildir stores them), exactly
``size`` octets on disk, with lines that start with "." to exercise stuffing.
File names carry Dovecot's ``S=`` (octets on disk) and ``W=`` (octets with CRLF
line ends, the POP3 size) as mail delivered by Dovecot's LDA has.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Fixture", "UserSet", "make_message", "wire_size"]


@dataclass(frozen=True)
class UserSet:
    name: str  # "small", "large", "idle"
    prefix: str  # user names are f"{prefix}{i}", passwords f"pw-{prefix}{i}"
    users: int
    messages: int
    size: int  # octets per message on disk

    def user_names(self) -> Iterator[tuple[str, str]]:
        for i in range(1, self.users + 1):
            yield f"{self.prefix}{i}", f"pw-{self.prefix}{i}"


_ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 ,;-"


def _text_pool(rng: random.Random, octets: int) -> tuple[bytes, list[int]]:
    """A block of text lines (some starting with ".") and its line-start offsets."""
    lines = []
    total = 0
    k = 0
    while total < octets:
        k += 1
        if k % 17 == 0:
            line = "." + "".join(rng.choices(_ALPHABET, k=40))  # stuffed on the wire
        elif k % 53 == 0:
            line = "."  # a lone dot: must not end the reply
        else:
            line = "".join(rng.choices(_ALPHABET, k=rng.randint(30, 76)))
        lines.append(line.encode() + b"\n")
        total += len(lines[-1])
    blob = b"".join(lines)
    starts = [0]
    for ln in lines[:-1]:
        starts.append(starts[-1] + len(ln))
    return blob, starts


_POOL: dict[int, tuple[bytes, list[int]]] = {}


def make_message(user: str, n: int, size: int, rng: random.Random) -> bytes:
    """A text message of exactly ``size`` octets (LF line ends, ends with LF)."""
    head = (
        f"Return-Path: <sender{n}@example.org>\n"
        f"From: Sender {n} <sender{n}@example.org>\n"
        f"To: {user} <{user}@example.org>\n"
        f"Subject: Benchmark message {n} for {user}\n"
        f"Date: Thu, 01 Jan 2026 00:{n % 60:02d}:00 +0000\n"
        f"Message-ID: <bench-{n}-{user}@example.org>\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "\n"
    ).encode()
    need = size - len(head)
    if need < 2:
        raise ValueError("message size too small for the headers")
    pool_size = max(2 * need, 64 * 1024)
    if pool_size not in _POOL:
        _POOL[pool_size] = _text_pool(random.Random(pool_size), pool_size)
    blob, starts = _POOL[pool_size]
    # A line-aligned slice at a random place: every message differs.
    limit = len(blob) - need
    first = starts[rng.randrange(0, max(1, sum(1 for x in starts[:2000] if x <= limit)))]
    body = bytearray(blob[first : first + need])
    body[-1:] = b"\n"
    if len(body) >= 2 and body[-2:-1] == b"\r":
        body[-2:-1] = b"x"
    msg = head + bytes(body)
    assert len(msg) == size
    return msg


def wire_size(msg: bytes) -> int:
    """POP3 size of an LF-terminated message (every line end CRLF)."""
    return len(msg) + msg.count(b"\n") - msg.count(b"\r\n")


@dataclass
class Fixture:
    root: Path
    sets: list[UserSet]
    maildir_copies: list[str] = field(default_factory=list)

    @property
    def eml(self) -> Path:
        return self.root / "eml"

    @property
    def passwd(self) -> Path:
        return self.root / "passwd"

    def maildir(self, server: str) -> Path:
        return self.root / f"maildir-{server}"

    def users_file(self, set_name: str) -> Path:
        return self.root / f"users-{set_name}.tsv"

    def get(self, name: str) -> UserSet:
        for s in self.sets:
            if s.name == name:
                return s
        raise KeyError(name)

    def build(self, copies: list[str]) -> None:
        """Write everything; ``copies`` names the servers that get a Maildir."""
        self.maildir_copies = list(copies)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # noqa: S103 - Dovecot\'s unprivileged users read it
        rng = random.Random(1939)
        passwd_lines = []
        for s in self.sets:
            lines = []
            # One message body per (set, index) shared by all users keeps
            # generation fast; headers still differ per user.
            for user, pw in s.user_names():
                passwd_lines.append(f"{user}:{{PLAIN}}{pw}::::::\n")
                lines.append(f"{user}\t{pw}\n")
                udir = self.eml / user
                udir.mkdir(parents=True, exist_ok=True)
                mdirs = [self.maildir(c) / user for c in copies]
                for m in mdirs:
                    for sub in ("cur", "new", "tmp"):
                        (m / sub).mkdir(parents=True, exist_ok=True)
                for n in range(1, s.messages + 1):
                    msg = make_message(user, n, s.size, rng)
                    (udir / f"{n:05d}.eml").write_bytes(msg)
                    name = f"{1767225600 + n}.M{n}P1.bench,S={len(msg)},W={wire_size(msg)}:2,"
                    for m in mdirs:
                        (m / "cur" / name).write_bytes(msg)
            self.users_file(s.name).write_text("".join(lines))
        self.passwd.write_text("".join(passwd_lines))
        for p in (self.passwd, *(self.users_file(s.name) for s in self.sets)):
            os.chmod(p, 0o644)
        for d in (self.eml, *(self.maildir(c) for c in copies)):
            for dirpath, _dirs, _files in os.walk(d):
                os.chmod(dirpath, 0o755)  # noqa: S103 - Dovecot\'s unprivileged users read it

    def chown_maildir(self, server: str, uid: int, gid: int) -> None:
        for dirpath, _dirs, files in os.walk(self.maildir(server)):
            os.chown(dirpath, uid, gid)
            for f in files:
                os.chown(os.path.join(dirpath, f), uid, gid)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
