"""A worker that hangs (its event loop stops: a blocking call, a deadlock, SIGSTOP):
the supervisor notices it by its missing heartbeat, kills it and starts another, and a
graceful stop does not wait for it for ever. The supervisor runs in this process (so
that the time it waits can be short), its workers are real processes."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from pypop.config import ServerConfig
from pypop.server import workers
from pypop.server.workers import Supervisor

from .test_workers import maildir

pytest.importorskip("pypop_maildir")

HANG_AFTER = 2.0


def greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.recv(512)


async def until(condition: Callable[[], bool], within: float) -> None:
    """Poll the supervisor's state (set by its own tasks, with no event to wait on)."""
    with trio.fail_after(within):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.05)


async def all_ready(sup: Supervisor) -> None:
    await until(
        lambda: all(
            s.ready and s.process is not None and s.process.returncode is None for s in sup.slots
        ),
        30,
    )


async def test_a_hung_worker_is_replaced_and_cannot_hold_up_the_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(workers, "HANG_AFTER", HANG_AFTER)
    maildir(tmp_path / "mail", "alice", 1)
    (tmp_path / "passwd").write_text("alice:{PLAIN}wonderland\n")
    config = ServerConfig(
        listen=[("127.0.0.1", 0)],
        backend="maildir",
        backend_options={"root": str(tmp_path / "mail")},
        passwd_file=tmp_path / "passwd",
        shutdown_timeout=1.0,
        log_target=str(tmp_path / "workers.log"),
    )
    sup = Supervisor(config, 2)
    stopped: list[int] = []
    caplog.set_level(logging.INFO, "pypop.supervisor")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await all_ready(sup)
            port = sup.addresses[0][1]
            assert sup.slots[0].process is not None
            hung = sup.slots[0].process.pid
            os.kill(hung, signal.SIGSTOP)
            stopped.append(hung)
            started = time.monotonic()
            # Killed once silent for HANG_AFTER seconds, then replaced (0.5 s later).
            await until(lambda: sup.slots[0].restarts >= 1, HANG_AFTER + 15)
            assert time.monotonic() - started >= HANG_AFTER - 0.5
            await all_ready(sup)
            assert sup.slots[0].process is not None
            assert sup.slots[0].process.pid != hung
            assert await trio.to_thread.run_sync(greeting, port) == b"+OK POP3 server ready\r\n"
            messages = [r.getMessage() for r in caplog.records]
            assert f"worker 0 (pid {hung}) has not answered for {HANG_AFTER:g}s: killing it" in (
                messages
            )
            assert f"worker 0 (pid {hung}) killed by SIGKILL; restarting in 0.5s" in messages

            # SIGTERM with a hung worker: the stop ends, the hung one is killed.
            assert sup.slots[1].process is not None
            hung = sup.slots[1].process.pid
            os.kill(hung, signal.SIGSTOP)
            stopped.append(hung)
            started = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
            await until(lambda: sup.alive == 0, HANG_AFTER + 15)
            assert time.monotonic() - started < HANG_AFTER + 10  # not for ever
            messages = [r.getMessage() for r in caplog.records]
            assert f"worker 1 (pid {hung}) has not answered for {HANG_AFTER:g}s: killing it" in (
                messages
            )
            nursery.cancel_scope.cancel()
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_a_worker_stuck_before_it_serves_cannot_hold_up_the_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker still starting gets no signal (it would find no handler yet; it is
    told once ready). One that never gets ready (stuck in start-up) made a graceful
    stop wait for it for ever: it has no session to finish, so it is killed once the
    stop has waited HANG_AFTER seconds for it."""
    monkeypatch.setattr(workers, "HANG_AFTER", HANG_AFTER)
    maildir(tmp_path / "mail", "alice", 1)
    (tmp_path / "passwd").write_text("alice:{PLAIN}wonderland\n")
    config = ServerConfig(
        listen=[("127.0.0.1", 0)],
        backend="maildir",
        backend_options={"root": str(tmp_path / "mail")},
        passwd_file=tmp_path / "passwd",
        shutdown_timeout=1.0,
        log_target=str(tmp_path / "workers.log"),
    )
    sup = Supervisor(config, 1)
    stopped: list[int] = []
    caplog.set_level(logging.INFO, "pypop.supervisor")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await until(lambda: sup.slots[0].process is not None, 30)
            assert sup.slots[0].process is not None
            stuck = sup.slots[0].process.pid
            os.kill(stuck, signal.SIGSTOP)  # (a Python start-up takes far longer)
            stopped.append(stuck)
            await trio.sleep(0.3)
            assert not sup.slots[0].ready
            started = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
            await until(lambda: sup.alive == 0, HANG_AFTER + 15)
            assert time.monotonic() - started < HANG_AFTER + 10
            messages = [r.getMessage() for r in caplog.records]
            assert (
                f"worker 0 (pid {stuck}) did not start within {HANG_AFTER:g}s of the stop: "
                "killing it" in messages
            )
            nursery.cancel_scope.cancel()
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_a_stalled_supervisor_does_not_take_its_workers_for_hung(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When the supervisor itself did not run for a while (stopped, swapped out), its
    workers' heartbeats wait unread in the sockets: the watch must not kill every
    worker for a silence that was its own."""
    monkeypatch.setattr(workers, "HANG_AFTER", HANG_AFTER)
    maildir(tmp_path / "mail", "alice", 1)
    (tmp_path / "passwd").write_text("alice:{PLAIN}wonderland\n")
    config = ServerConfig(
        listen=[("127.0.0.1", 0)],
        backend="maildir",
        backend_options={"root": str(tmp_path / "mail")},
        passwd_file=tmp_path / "passwd",
        shutdown_timeout=1.0,
        log_target=str(tmp_path / "workers.log"),
    )
    sup = Supervisor(config, 2)
    caplog.set_level(logging.INFO, "pypop.supervisor")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await all_ready(sup)
        time.sleep(HANG_AFTER + 1.5)  # noqa: ASYNC251 (the supervisor's loop stands still)
        await trio.sleep(HANG_AFTER / 2)
        assert [s.restarts for s in sup.slots] == [0, 0]
        assert not [r for r in caplog.records if "killing it" in r.getMessage()]
        os.kill(os.getpid(), signal.SIGTERM)
        await until(lambda: sup.alive == 0, 30)
        nursery.cancel_scope.cancel()
