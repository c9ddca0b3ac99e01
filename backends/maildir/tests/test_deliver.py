"""MaildirBackend as a pypop.backend.Deliverer (pypop deliver / pypop import)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pypop.backend import Deliverer
from pypop.errors import DuplicateUid, NoSuchUser
from pypop.wire import wire_size

from pypop_maildir import create

from .conftest import HARD_CASES


async def _served(root: Path, user: str) -> list[tuple[str, int, bytes]]:
    backend = create({"root": str(root), "flag_updates": False})
    box = await backend.open_mailbox(user)
    try:
        out = []
        for i, m in enumerate(box.messages):
            out.append((m.uid, m.size, b"".join([b async for b in box.retrieve(i)])))
        return out
    finally:
        await box.aclose()


async def test_deliver_writes_new_and_keeps_bytes(tmp_path: Path) -> None:
    backend = create({"root": str(tmp_path)})
    assert isinstance(backend, Deliverer)
    uids = [await backend.deliver("alice", data) for data in HARD_CASES.values()]
    assert len(set(uids)) == len(uids)
    names = sorted(os.listdir(tmp_path / "alice" / "new"))
    assert len(names) == len(HARD_CASES)
    assert os.listdir(tmp_path / "alice" / "tmp") == []  # nothing left behind
    served = await _served(tmp_path, "alice")
    assert [u for u, _, _ in served] == uids  # delivery order, the UIDL deliver said
    assert [d for _, _, d in served] == list(HARD_CASES.values())
    assert [s for _, s, _ in served] == [wire_size(d) for d in HARD_CASES.values()]
    for name in names:  # Dovecot-style S= and W= sizes in the name
        data = (tmp_path / "alice" / "new" / name).read_bytes()
        assert f",S={len(data)},W={wire_size(data)}" in name


async def test_deliver_with_uid_and_time(tmp_path: Path) -> None:
    backend = create({"root": str(tmp_path)})
    assert await backend.deliver("bob", b"Subject: a\n\n", uid="kept.1", received=1.7e9) == "kept.1"
    assert (tmp_path / "bob" / "new" / "kept.1").stat().st_mtime == 1.7e9
    with pytest.raises(DuplicateUid):
        await backend.deliver("bob", b"again", uid="kept.1")
    with pytest.raises(ValueError, match="file name"):
        await backend.deliver("bob", b"x", uid="a/b")
    assert [u for u, _, _ in await _served(tmp_path, "bob")] == ["kept.1"]


async def test_deliver_unknown_or_unsafe_user(tmp_path: Path) -> None:
    backend = create({"root": str(tmp_path), "autocreate": False})
    with pytest.raises(NoSuchUser):
        await backend.deliver("nobody", b"x")
    with pytest.raises(NoSuchUser):
        await backend.deliver("../etc", b"x")
    assert os.listdir(tmp_path) == []


def test_pypop_deliver_into_maildir(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pypop", "deliver", "--backend", "maildir",
         "-o", f"root={tmp_path}", "-u", "carol", "-v"],
        input=b"Subject: via cli\n\nhello\n", capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    [name] = os.listdir(tmp_path / "carol" / "new")
    assert r.stdout.decode().strip() == name
    assert (tmp_path / "carol" / "new" / name).read_bytes() == b"Subject: via cli\n\nhello\n"
