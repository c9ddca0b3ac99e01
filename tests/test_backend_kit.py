"""pypop.backend_kit: options, locks, bounded threads, the TOP cut, the mailbox base."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Sequence

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from pypop import wire
from pypop.backend import MessageInfo
from pypop.backend_kit import (
    IOThreads,
    LockSet,
    OptionError,
    Options,
    SnapshotMailbox,
    TopCut,
    blocks,
)
from pypop.backends.memory import MemoryBackend
from pypop.errors import TemporaryFailure, UpdateFailed

# ---- options ------------------------------------------------------------------------


def test_options_accept_cli_strings_and_toml_values() -> None:
    cli = Options("x", {"n": "4", "f": "2.5", "b": "yes", "s": "text", "c": "b"})
    toml = Options("x", {"n": 4, "f": 2.5, "b": True, "s": "text", "c": "b"})
    for opts in (cli, toml):
        assert opts.integer("n", 1, minimum=1) == 4
        assert opts.number("f", 1.0) == 2.5
        assert opts.flag("b", False) is True
        assert opts.text("s") == "text"
        assert opts.choice("c", "a", ("a", "b")) == "b"
        opts.finish()
    defaults = Options("x", {})
    assert defaults.integer("n", 7) == 7
    assert defaults.flag("b", True) is True
    assert defaults.optional_text("s") is None
    assert defaults.path("p", "rel").endswith("/rel")
    defaults.finish()


@pytest.mark.parametrize(
    ("options", "ask", "message"),
    [
        (
            {"n": "two"},
            lambda o: o.integer("n", 1),
            "x backend: option 'n' must be an integer, got 'two'",
        ),
        ({"n": 2.5}, lambda o: o.integer("n", 1), "option 'n' must be an integer, got 2.5"),
        ({"n": True}, lambda o: o.integer("n", 1), "option 'n' must be an integer, got True"),
        ({"n": "0"}, lambda o: o.integer("n", 1, minimum=1), "option 'n' must be >= 1, got '0'"),
        ({"f": "inf"}, lambda o: o.number("f", 1.0), "option 'f' must be a finite number"),
        ({"f": "x"}, lambda o: o.number("f", 1.0), "option 'f' must be a number, got 'x'"),
        ({"b": "maybe"}, lambda o: o.flag("b", False), "option 'b' must be a boolean, got 'maybe'"),
        ({"s": 3}, lambda o: o.text("s"), "option 's' must be a string, got 3"),
        ({}, lambda o: o.text("s"), "option 's' is required"),
        ({"c": "z"}, lambda o: o.choice("c", "a", ("a", "b")), "must be one of 'a', 'b', got 'z'"),
    ],
)
def test_option_errors_name_backend_and_key(
    options: dict[str, object], ask: object, message: str
) -> None:
    opts = Options("x", options)
    with pytest.raises(OptionError) as info:
        ask(opts)  # type: ignore[operator]
    assert message in str(info.value)
    assert str(info.value).startswith("x backend: ")
    assert isinstance(info.value, ValueError)  # the registry's start-up error path


def test_unknown_options_get_a_suggestion() -> None:
    opts = Options("maildir", {"root": "/", "tempalte": "%u", "colour": "blue"})
    opts.path("root")
    opts.text("template", "%u")
    with pytest.raises(OptionError) as info:
        opts.finish()
    assert str(info.value) == (
        "maildir backend: unknown options 'colour', 'tempalte' (did you mean 'template'?); "
        "known: root, template"
    )


# ---- locks ----------------------------------------------------------------------------


def test_lock_set() -> None:
    locks = LockSet()
    assert locks.acquire("alice")
    assert not locks.acquire("alice")
    assert locks.acquire("bob")
    assert "alice" in locks
    assert len(locks) == 2
    locks.release("alice")
    locks.release("alice")  # idempotent
    assert locks.acquire("alice")


# ---- threads --------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policy")
async def test_io_threads_workers_run_under_sched_batch() -> None:
    # A woken worker must not preempt the event loop's thread (which holds the GIL):
    # its calls run under SCHED_BATCH, the loop's thread keeps its own policy.
    pool = IOThreads(2, per_session=2, timeout=5)
    session = pool.session()
    assert await session.run(os.sched_getscheduler, 0) == os.SCHED_BATCH
    assert await pool.run(os.sched_getscheduler, 0) == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    # batch=False (a backend's option, e.g. pypop-sql's batch_scheduling = no).
    plain = IOThreads(1, timeout=5, batch=False)
    assert await plain.run(os.sched_getscheduler, 0) == os.SCHED_OTHER


async def test_io_threads_run_and_bound_per_session() -> None:
    pool = IOThreads(4, per_session=2, timeout=5)
    session = pool.session()
    running = 0
    peak = 0
    lock = threading.Lock()

    def work() -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return 7

    results: list[int] = []

    async def one() -> None:
        results.append(await session.run(work))

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(one)
    assert results == [7] * 6
    assert peak == 2  # one session never holds more than per_session threads


async def test_io_timeout_frees_the_caller_and_other_sessions_still_run() -> None:
    pool = IOThreads(2, per_session=1, timeout=0.2)
    stuck = threading.Event()
    try:
        started = time.monotonic()
        with pytest.raises(TemporaryFailure, match=r"did not finish within 0\.2 s"):
            await pool.session().run(stuck.wait)
        assert time.monotonic() - started < 5
        # The abandoned thread still holds one of the two slots; another user's
        # session gets the other.
        assert pool.busy == 1
        assert await pool.session().run(lambda: "ok") == "ok"
    finally:
        stuck.set()
    with trio.fail_after(5):
        # The abandoned thread signals nothing to Trio: poll until it returns its slot.
        while pool.busy:  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_io_threads_global_bound_across_sessions() -> None:
    pool = IOThreads(2, per_session=2, timeout=5)
    running = peak = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.03)
        with lock:
            running -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            session = pool.session()
            for _ in range(2):
                nursery.start_soon(session.run, work)
    assert peak == 2
    assert pool.busy == 0


async def test_io_threads_cancel_waiting_and_running_calls() -> None:
    pool = IOThreads(1, per_session=1, timeout=5)
    release = threading.Event()
    outcomes: list[str] = []

    async def call(name: str) -> None:
        with trio.move_on_after(0.1):
            await pool.run(release.wait)
            outcomes.append(name + " returned")
            return
        outcomes.append(name + " cancelled")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "running")
        nursery.start_soon(call, "waiting")  # no slot: queued, then cancelled
    assert sorted(outcomes) == ["running cancelled", "waiting cancelled"]
    assert pool.busy == 1  # the abandoned call keeps its slot until it returns
    release.set()
    with trio.fail_after(5):
        while pool.busy:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert await pool.run(lambda: "free again") == "free again"


async def test_io_timeout_covers_the_wait_for_a_slot() -> None:
    pool = IOThreads(1, per_session=1, timeout=0.2)
    stuck = threading.Event()
    try:
        with pytest.raises(TemporaryFailure):
            await pool.run(stuck.wait)
        with pytest.raises(TemporaryFailure):
            await pool.run(lambda: "never started")  # the only slot is held
    finally:
        stuck.set()


async def test_io_timeout_is_wall_clock_under_autojump(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The virtual clock jumps while a thread runs; the timeout must not fire.
    pool = IOThreads(1, timeout=1.0)

    def slow() -> str:
        time.sleep(0.1)
        return "done"

    assert await pool.run(slow) == "done"


# ---- TOP cut and blocks ---------------------------------------------------------------


@given(
    st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"")),
    st.integers(0, 5),
    st.integers(1, 40),
)
def test_top_cut_never_stops_before_the_wire_cut(message: bytes, n: int, chunk: int) -> None:
    cut = TopCut(n)
    kept = b""
    for start in range(0, max(len(message), 1), chunk):
        part, stop = cut.feed(message[start : start + chunk])
        kept += part
        if stop:
            break
    assert message.startswith(kept)
    assert wire.stuff(kept, n) == wire.stuff(message, n)


def test_blocks() -> None:
    data = bytes(range(256)) * 3
    assert list(blocks(data, 1000)) == [data]
    assert b"".join(blocks(data, 100)) == data
    assert [len(b) for b in blocks(data, 300)] == [300, 300, 168]


# ---- the mailbox base ---------------------------------------------------------------


class _Box(SnapshotMailbox):
    def __init__(self, fail: bool = False) -> None:
        super().__init__([MessageInfo(10, "a"), MessageInfo(20, "b"), MessageInfo(30, "c")])
        self.updates: list[list[int]] = []
        self.releases = 0
        self.fail = fail

    async def retrieve(self, index: int, *, top_lines: int | None = None) -> AsyncIterator[bytes]:
        yield b""

    async def update(self, deleted: Sequence[int]) -> None:
        self.updates.append(list(deleted))
        if self.fail:
            raise UpdateFailed("disk full")

    async def release(self) -> None:
        self.releases += 1


async def test_snapshot_mailbox_commit_and_close() -> None:
    box = _Box()
    await box.commit([2, 0, 2, 7, -1])
    assert box.updates == [[0, 2]]  # sorted, distinct, in range
    assert box.releases == 1
    await box.aclose()
    assert box.releases == 1
    with pytest.raises(UpdateFailed):
        await box.commit([0])
    assert box.updates == [[0, 2]]

    failing = _Box(fail=True)
    with pytest.raises(UpdateFailed):
        await failing.commit([1])
    assert failing.releases == 1  # the lock goes even when UPDATE fails

    dropped = _Box()
    await dropped.aclose()
    assert (dropped.updates, dropped.releases) == ([], 1)


class _SlowBox(_Box):
    """A release that waits (a network round trip)."""

    async def release(self) -> None:
        await trio.sleep(0.5)
        self.releases += 1


class _QuickBox(_Box):
    """A release that needs no waiting, given up by release_now."""

    def release_now(self) -> bool:
        self.releases += 1
        return True

    async def release(self) -> None:  # never called: release_now did it
        raise AssertionError("release() after release_now()")


async def test_release_runs_once_even_when_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """aclose() in a cancelled scope: a release that waits is shielded and finishes;
    one that needs no waiting (release_now) is done without a scope; either way
    exactly once, and the default release_now does nothing for a box with a
    release() of its own."""
    assert not _Box().release_now()
    for box in (_SlowBox(), _QuickBox()):
        with trio.CancelScope() as scope:
            scope.cancel()
            await box.aclose()
        assert box.releases == 1, box
        await box.aclose()
        assert box.releases == 1
    with trio.move_on_after(0.1):  # UPDATE's time limit passes during the release
        slow = _SlowBox()
        await slow.commit([0])
    assert (slow.updates, slow.releases) == ([[0]], 1)

    class _Nothing(SnapshotMailbox):  # no lock: nothing to release, no scope
        async def update(self, deleted: Sequence[int]) -> None:
            pass

    assert _Nothing([]).release_now()
    assert not _Nothing([]).commits_at_once([])  # the default: UPDATE keeps its scope


async def test_memory_mailbox_commits_at_once(memory_backend: MemoryBackend) -> None:
    """The memory store's UPDATE needs no cancel scope: it deletes and lets go
    without a checkpoint."""
    box = await memory_backend.open_mailbox("alice")
    assert isinstance(box, SnapshotMailbox)
    assert box.commits_at_once([0, 2])
    with trio.testing.assert_no_checkpoints():
        await box.commit([0, 2])
    again = await memory_backend.open_mailbox("alice")  # the lock went
    assert len(again.messages) == 1
    await again.aclose()
