"""A second SIGTERM while a worker is in UPDATE: UPDATE finishes (or nothing of it is
done), never half. The supervisor runs in this process; its workers are real
processes with a maildir backend whose UPDATE is made slow (a plugin registered
through an entry point in a temporary directory, as a third party's would be)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import trio

from pypop.config import ServerConfig
from pypop.server.workers import Supervisor

from .test_worker_hang import all_ready, until
from .test_workers import maildir

pytest.importorskip("pypop_maildir")

PAUSE = 8.0  # seconds the UPDATE waits between its first and second removal

PLUGIN = f"""
import time
from pypop_maildir import create as _create
from pypop_maildir._backend import MaildirMailbox

_commit_in = MaildirMailbox._commit_in


def _slow(self, dirs, marked, flag):
    # One removal, a pause, the rest: an UPDATE that takes {PAUSE} s.
    _commit_in(self, dirs, list(marked)[:1], flag)
    time.sleep({PAUSE})
    _commit_in(self, dirs, list(marked)[1:], ())


MaildirMailbox._commit_in = _slow
create = _create
"""


def files(root: Path) -> int:
    return sum(len(os.listdir(root / sub)) for sub in ("cur", "new"))


def session(port: int) -> socket.socket:
    """alice logs in, marks messages 1 and 2, and sends QUIT (UPDATE begins)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    f = s.makefile("rb")
    assert f.readline().startswith(b"+OK")
    for line, answer in [
        (b"USER alice", b"+OK"),
        (b"PASS wonderland", b"+OK"),
        (b"DELE 1", b"+OK"),
        (b"DELE 2", b"+OK"),
    ]:
        s.sendall(line + b"\r\n")
        assert f.readline().startswith(answer), line
    s.sendall(b"QUIT\r\n")
    f.close()
    return s


async def test_a_second_sigterm_does_not_cut_an_update_in_half(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    plugin = tmp_path / "plugin"
    (plugin / "slowmaildir-0.dist-info").mkdir(parents=True)
    (plugin / "slowmaildir.py").write_text(PLUGIN)
    (plugin / "slowmaildir-0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: slowmaildir\nVersion: 0\n"
    )
    (plugin / "slowmaildir-0.dist-info" / "entry_points.txt").write_text(
        "[pypop.backends]\nslowmaildir = slowmaildir:create\n"
    )
    monkeypatch.setenv("PYTHONPATH", f"{plugin}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    root = tmp_path / "mail"
    maildir(root, "alice", 3)
    (tmp_path / "passwd").write_text("alice:{PLAIN}wonderland\n")
    config = ServerConfig(
        listen=[("127.0.0.1", 0)],
        backend="slowmaildir",
        backend_options={"root": str(root)},
        passwd_file=tmp_path / "passwd",
        allow_plaintext=True,
        shutdown_timeout=1.0,
        log_target=str(tmp_path / "workers.log"),
    )
    sup = Supervisor(config, 1)
    caplog.set_level(logging.INFO, "pypop.supervisor")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await all_ready(sup)
        s = await trio.to_thread.run_sync(session, sup.addresses[0][1])
        try:
            await until(lambda: files(root / "alice") == 2, 10)  # the first removal
            await trio.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)
            await trio.sleep(0.2)
            os.kill(os.getpid(), signal.SIGTERM)  # the second: stop now
            started = time.monotonic()
            await until(lambda: sup.alive == 0, PAUSE + 30)
            assert time.monotonic() - started < PAUSE + 10
        finally:
            s.close()
        nursery.cancel_scope.cancel()
    assert sup.forced
    # Both marked messages are gone: UPDATE was let finish.
    assert files(root / "alice") == 1
