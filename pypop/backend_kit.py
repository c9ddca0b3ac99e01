"""What every backend needs, written once: options, locks, threads, the TOP cut.

A backend implements the :mod:`pypop.backend` contract; this kit saves it the parts
every backend would otherwise write again:

- :class:`Options`: typed access to the ``[backend]`` options. Values arrive as
  strings from ``pypop serve -o key=value`` and typed from a TOML file; both are
  accepted. A key nobody asked for is an error with a "did you mean".
- :class:`LockSet`: the RFC 1939 §4 exclusive lock, per process (what a backend
  without a shared store needs; a shared store adds its own lock on top).
- :class:`MaildropLocks`: the same lock as a pluggable service (entry-point group
  ``pypop.locks``), for backends whose store has no lock of its own (IMAP):
  :class:`LocalLocks` holds it in this process, a plugin can hold it across hosts.
- :class:`IOThreads`: blocking I/O in worker threads, bounded for the backend and for
  each session, with a timeout that frees the session even if the thread is stuck.
- :class:`TopCut`: where a TOP reply can stop reading the stored message.
- :class:`SnapshotMailbox`: a base class holding the snapshot, with idempotent
  ``aclose`` and ``commit`` built on two hooks (``remove`` and ``release``).

Where backend code runs: every ``async`` method runs on the server's Trio event loop,
so it must not block. Blocking calls (files, a database driver) go through
:meth:`IOThreads.run`.
"""

from __future__ import annotations

import collections
import contextlib
import difflib
import functools
import math
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from typing import Final, Protocol, TypeVar, runtime_checkable

import outcome
import trio

from pypop.backend import MessageInfo
from pypop.errors import TemporaryFailure, UpdateFailed

__all__ = [
    "BLOCK_SIZE",
    "IOThreads",
    "LocalLocks",
    "LockSet",
    "MaildropLocks",
    "OptionError",
    "Options",
    "SessionThreads",
    "SnapshotMailbox",
    "TopCut",
    "batch_policy",
    "blocks",
]

T = TypeVar("T")

BLOCK_SIZE: Final = 64 * 1024
"""The block size the server streams messages in."""


# ---------------------------------------------------------------------------- options


class OptionError(ValueError):
    """A backend option is missing or invalid; the message names the backend and key.

    A ``ValueError``: the registry turns it into a start-up error, exit status 2.
    """


_BOOL_WORDS: Final = {
    "1": True, "yes": True, "true": True, "on": True,
    "0": False, "no": False, "false": False, "off": False,
}  # fmt: skip


class Options:
    """Typed, checked access to one backend's options.

    ::

        opts = Options("maildir", options)
        root = opts.path("root", required=True)
        threads = opts.integer("io_threads", 16, minimum=1)
        opts.finish()          # any key not asked for: OptionError, with a suggestion
    """

    def __init__(self, backend: str, options: Mapping[str, object]) -> None:
        self.backend = backend
        self._options = dict(options)
        self._asked: set[str] = set()

    def error(self, message: str) -> OptionError:
        return OptionError(f"{self.backend} backend: {message}")

    def _get(self, name: str) -> object | None:
        self._asked.add(name)
        return self._options.get(name)

    def raw(self, name: str) -> object | None:
        """The value as given (e.g. a TOML table for a plugin's own options)."""
        return self._get(name)

    def has(self, name: str) -> bool:
        self._asked.add(name)
        return name in self._options

    def text(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        value = self._get(name)
        if value is None:
            if required or default is None:
                raise self.error(f"option {name!r} is required")
            return default
        if not isinstance(value, str):
            raise self.error(f"option {name!r} must be a string, got {value!r}")
        return value

    def optional_text(self, name: str) -> str | None:
        value = self._get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(f"option {name!r} must be a string, got {value!r}")
        return value

    def path(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        """An absolute path (relative ones are taken from the working directory)."""
        value = self._get(name)
        if value is None:
            if required or default is None:
                raise self.error(f"option {name!r} is required")
            value = default
        if not isinstance(value, str | os.PathLike):
            raise self.error(f"option {name!r} must be a path, got {value!r}")
        text = os.fspath(value)
        if not isinstance(text, str) or not text:
            raise self.error(f"option {name!r} must be a non-empty text path")
        return os.path.abspath(text)

    def flag(self, name: str, default: bool) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise self.error(f"option {name!r} must be a boolean, got {value!r}")

    def number(
        self,
        name: str,
        default: float,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise self.error(f"option {name!r} must be a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise self.error(f"option {name!r} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise self.error(f"option {name!r} must be a finite number, got {value!r}")
        if minimum is not None and number < minimum:
            raise self.error(f"option {name!r} must be >= {minimum:g}, got {value!r}")
        if maximum is not None and number > maximum:
            raise self.error(f"option {name!r} must be <= {maximum:g}, got {value!r}")
        return number

    def integer(
        self,
        name: str,
        default: int,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            number = int(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            raise self.error(f"option {name!r} must be an integer, got {value!r}")
        if minimum is not None and number < minimum:
            raise self.error(f"option {name!r} must be >= {minimum}, got {value!r}")
        if maximum is not None and number > maximum:
            raise self.error(f"option {name!r} must be <= {maximum}, got {value!r}")
        return number

    def choice(self, name: str, default: str, choices: Collection[str]) -> str:
        value = self.text(name, default)
        if value not in choices:
            listed = ", ".join(repr(c) for c in choices)
            raise self.error(f"option {name!r} must be one of {listed}, got {value!r}")
        return value

    def expire_days(self) -> int | None:
        """The ``expire_days`` option every shipped backend takes: remove messages
        older than this many days at UPDATE (0: those retrieved in the session),
        RFC 2449 §6.7 EXPIRE enforced. None when not set (mail is kept: NEVER).

        The server does the removing, for every backend alike: it reads the
        backend's ``expire_days`` attribute, announces ``EXPIRE n`` in CAPA, and at
        UPDATE adds the expired messages to those marked (message times come from
        :class:`pypop.backend.MessageTimes`), logging how many it removed."""
        if not self.has("expire_days"):
            return None
        return self.integer("expire_days", 0, minimum=0, maximum=36500)

    def finish(self) -> None:
        """Refuse every option that was not asked for (a misspelt key is an error)."""
        unknown = sorted(k for k in self._options if k not in self._asked)
        if not unknown:
            return
        known = sorted(self._asked)
        parts = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            parts.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        noun = "option" if len(unknown) == 1 else "options"
        raise self.error(f"unknown {noun} {', '.join(parts)}; known: {', '.join(known)}")


# ------------------------------------------------------------------------------ locks


class LockSet:
    """Keys locked by this process: the RFC 1939 §4 maildrop lock for one process.

    ``acquire`` never waits: a held key is ``False`` at once (the server answers
    ``[IN-USE]``, and may retry briefly on its own).
    """

    def __init__(self) -> None:
        self._held: set[str] = set()

    def acquire(self, key: str) -> bool:
        if key in self._held:
            return False
        self._held.add(key)
        return True

    def release(self, key: str) -> None:
        self._held.discard(key)

    def __contains__(self, key: object) -> bool:
        return key in self._held

    def __len__(self) -> int:
        return len(self._held)

    def clear(self) -> None:
        self._held.clear()


@runtime_checkable
class MaildropLocks(Protocol):
    """Where a backend's RFC 1939 §4 maildrop locks live.

    Keys are opaque strings that name one maildrop (the IMAP backend uses the upstream
    server, mailbox and user). ``acquire`` never waits: ``False`` at once if anyone
    holds the key (the server answers ``[IN-USE]``); it may raise
    :class:`~pypop.errors.TemporaryFailure` if the lock service is unreachable.
    ``release`` is called exactly once per successful ``acquire``.

    ``scope`` says how far the lock reaches, for the log and the docs: ``"process"``
    (:class:`LocalLocks`), ``"host"`` or ``"cluster"`` (a shared service, e.g.
    PostgreSQL advisory locks), registered in the entry-point group ``pypop.locks``
    as a factory ``options -> MaildropLocks``.
    """

    scope: str

    async def acquire(self, key: str) -> bool: ...

    async def release(self, key: str) -> None: ...


class LocalLocks:
    """:class:`MaildropLocks` held in this process only: two pypop processes (workers,
    hosts) serving the same upstream do not see each other's locks."""

    scope = "process"

    def __init__(self, options: Mapping[str, object] | None = None) -> None:
        Options("local lock", options or {}).finish()
        self._held = LockSet()

    async def acquire(self, key: str) -> bool:
        return self._held.acquire(key)

    async def release(self, key: str) -> None:
        self._held.release(key)

    def __contains__(self, key: object) -> bool:
        return key in self._held


# ---------------------------------------------------------------------------- threads


class _Call:
    """One blocking call: queued for a slot, running in a worker, or finished."""

    __slots__ = ("args", "deadline", "fn", "owner", "result", "state", "task", "token")

    def __init__(
        self,
        fn: Callable[..., object],
        args: tuple[object, ...],
        owner: SessionThreads | None,
        deadline: float,
    ) -> None:
        self.fn = fn
        self.args = args
        self.owner = owner
        self.deadline = deadline
        self.task = trio.lowlevel.current_task()
        self.token = trio.lowlevel.current_trio_token()
        self.result: outcome.Outcome[object] | None = None
        # "waiting" for a slot, "running" in a worker, "abandoned" (the caller gave up
        # while it ran: it keeps its slots until it returns), "done".
        self.state = "waiting"


class IOThreads:
    """Blocking calls in worker threads, bounded three ways.

    - At most ``threads`` calls run at once for the whole backend.
    - At most ``per_session`` of them for one session (:meth:`session`), so one user
      whose storage hangs cannot take every thread.
    - Each call gives up after ``timeout`` seconds (wall clock), waiting for a slot
      included: the caller gets :class:`~pypop.errors.TemporaryFailure` and its
      session can end and release its lock. The stuck thread is abandoned; it keeps
      its slots until the call returns, which is why the per-session bound matters.

    A call costs one queue hand-off to an idle worker and one wake-up of the event loop
    (``run_sync_soon``) when it returns: no thread is started per call, no cancel scope
    or capacity limiter is entered. Workers are started as needed, up to ``threads``,
    and stay, under ``SCHED_BATCH`` on Linux unless ``batch`` is false (a woken worker
    waits for the event loop to block instead of preempting it). A watchdog thread
    enforces the timeouts; it sleeps while nothing runs.
    """

    def __init__(
        self,
        threads: int = 16,
        *,
        per_session: int = 2,
        timeout: float | None = 30.0,
        batch: bool = True,
    ) -> None:
        if threads < 1 or per_session < 1:
            raise ValueError("thread limits must be at least 1")
        if timeout is not None and not timeout > 0:
            raise ValueError("the I/O timeout must be positive")
        self.threads = threads
        self.per_session = per_session
        self.timeout = timeout
        self.batch = batch
        self._jobs: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._workers = 0
        self._busy = 0  # calls running in a worker (abandoned ones included)
        self._waiting: collections.deque[_Call] = collections.deque()  # for a global slot
        self._active: dict[int, _Call] = {}  # every call not finished, by id: the watchdog's
        self._guard = threading.Lock()
        self._tick = 1.0 if timeout is None else min(1.0, timeout / 4)
        self._watchdog: threading.Thread | None = None
        self._watchdog_wake = threading.Event()

    @property
    def busy(self) -> int:
        """Calls running in worker threads now, abandoned ones included."""
        return self._busy

    def session(self) -> SessionThreads:
        """A handle for one session's calls (its own per-session bound)."""
        return SessionThreads(self)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in a worker thread, outside any session bound."""
        return await self._run(fn, args, None)

    async def _run(
        self, fn: Callable[..., T], args: tuple[object, ...], owner: SessionThreads | None
    ) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        timeout = self.timeout
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        call = _Call(fn, args, owner, deadline)
        if timeout is not None:
            self._active[id(call)] = call
            self._wake_watchdog()
        self._admit(call)
        # Rescheduled with the call's outcome, which the await unwraps.
        result: T = await trio.lowlevel.wait_task_rescheduled(functools.partial(self._abort, call))
        return result

    # -- on the event loop --

    def _admit(self, call: _Call) -> None:
        """Start ``call`` if both its slots are free, else queue it for the first."""
        owner = call.owner
        if owner is not None and owner._busy >= self.per_session:
            owner._queue().append(call)
        elif self._busy >= self.threads:
            self._waiting.append(call)
        else:
            self._start(call)

    def _start(self, call: _Call) -> None:
        call.state = "running"
        self._busy += 1
        if call.owner is not None:
            call.owner._busy += 1
        if self._busy > self._workers:
            try:
                threading.Thread(target=self._work, name="pypop-io", daemon=True).start()
                self._workers += 1
            except RuntimeError:  # no thread to be had: a running worker takes it later
                pass
        self._jobs.put(call)

    def _finished(self, call: _Call) -> None:
        """A worker returned ``call`` (run through ``run_sync_soon``)."""
        self._active.pop(id(call), None)
        self._busy -= 1
        owner = call.owner
        if owner is not None:
            owner._busy -= 1
        if call.state == "running":
            call.state = "done"
            assert call.result is not None
            trio.lowlevel.reschedule(call.task, call.result)
        call.result = None
        # Freed: a session slot (for that session's next call) and a global slot.
        if owner is not None and owner._waiting:
            nxt = owner._waiting.popleft()
            if self._busy >= self.threads:
                self._waiting.append(nxt)
            else:
                self._start(nxt)
        while self._waiting and self._busy < self.threads:
            nxt = self._waiting.popleft()
            o = nxt.owner
            if o is not None and o._busy >= self.per_session:
                o._queue().append(nxt)
                continue
            self._start(nxt)

    def _give_up(self, call: _Call, error: BaseException) -> None:
        if call.state == "waiting":
            self._unqueue(call)
            call.state = "done"
            self._active.pop(id(call), None)
        elif call.state == "running":
            call.state = "abandoned"
        else:
            return
        trio.lowlevel.reschedule(call.task, outcome.Error(error))

    def _expire(self, call: _Call) -> None:
        """The watchdog found ``call`` overdue (run through ``run_sync_soon``)."""
        if call.state in ("waiting", "running"):
            self._give_up(
                call, TemporaryFailure(f"blocking I/O did not finish within {self.timeout:g} s")
            )

    def _abort(self, call: _Call, _raise_cancel: object) -> trio.lowlevel.Abort:
        # Cancelled: like trio's abandon_on_cancel, the thread is left to finish.
        if call.state == "waiting":
            self._unqueue(call)
            call.state = "done"
            self._active.pop(id(call), None)
        elif call.state == "running":
            call.state = "abandoned"
        return trio.lowlevel.Abort.SUCCEEDED

    def _unqueue(self, call: _Call) -> None:
        owner = call.owner
        for q in (self._waiting, owner._waiting if owner is not None else None):
            if q is not None:
                with contextlib.suppress(ValueError):
                    q.remove(call)

    # -- in the workers --

    def _work(self) -> None:
        if self.batch:
            batch_policy()
        jobs = self._jobs
        while True:
            call = jobs.get()
            call.result = outcome.capture(call.fn, *call.args)
            call.fn = call.args = None  # type: ignore[assignment]  # free them now
            # try/except, not contextlib.suppress: six lines of Python less per call.
            try:  # noqa: SIM105
                call.token.run_sync_soon(self._finished, call)
            except trio.RunFinishedError:
                pass

    def _wake_watchdog(self) -> None:
        if self._watchdog is None:
            with self._guard:
                if self._watchdog is None:
                    self._watchdog = threading.Thread(
                        target=self._watch, name="pypop-io-watchdog", daemon=True
                    )
                    self._watchdog.start()
        if not self._watchdog_wake.is_set():
            self._watchdog_wake.set()

    def _watch(self) -> None:
        """Cancel overdue calls, measured on the wall clock.

        A Trio deadline would do, but Trio's clock is virtual under a test's
        ``autojump_clock``, where waiting for any thread jumps to the deadline at once.
        """
        while True:
            self._watchdog_wake.wait()
            time.sleep(self._tick)
            now = time.monotonic()
            calls = list(self._active.values())  # one C call: safe against the loop
            if not calls:
                self._watchdog_wake.clear()
                if self._active:  # raced with a new call
                    self._watchdog_wake.set()
                continue
            for call in calls:
                if call.deadline <= now and call.state in ("waiting", "running"):
                    with contextlib.suppress(trio.RunFinishedError):
                        call.token.run_sync_soon(self._expire, call)


def batch_policy() -> bool:
    """Put the calling thread under ``SCHED_BATCH`` (Linux); False where there is no
    such policy or it is refused (a sandbox), the default policy staying.

    A woken worker then does not preempt the event loop: it runs when the loop waits
    in ``epoll`` (the GIL free) or at the next tick, instead of taking the core at once,
    finding the GIL held, and switching back. On one busy core that was about two
    context switches per call (Maildir login: 3,300 involuntary switches a second of
    the loop's thread, 100 after); on an idle core a worker still runs at once, and
    the policy keeps its fair share of the CPU (only the wake-up preemption goes).
    """
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        return False
    return True


class SessionThreads:
    """One session's share of :class:`IOThreads` (small: one per logged-in session)."""

    __slots__ = ("_busy", "_pool", "_waiting_q")

    def __init__(self, pool: IOThreads) -> None:
        self._pool = pool
        self._busy = 0
        self._waiting_q: collections.deque[_Call] | None = None

    @property
    def _waiting(self) -> collections.deque[_Call]:
        return self._waiting_q if self._waiting_q is not None else _EMPTY

    def _queue(self) -> collections.deque[_Call]:
        if self._waiting_q is None:
            self._waiting_q = collections.deque()
        return self._waiting_q

    @property
    def busy(self) -> int:
        """This session's calls running in worker threads now, abandoned ones included."""
        return self._busy

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await self._pool._run(fn, args, self)


_EMPTY: collections.deque[_Call] = collections.deque(maxlen=0)


# ---------------------------------------------------------------------------- TOP cut


class TopCut:
    """Finds where a TOP reply can stop: the first empty line, then ``n`` more lines.

    Only LF is taken as a line end here. The wire rules (docs/wire.md) also end lines
    at a bare CR, so they count at least as many lines: stopping after ``n`` LF-lines
    never stops before the server's own cut, which is exact. Feed blocks in order;
    each call returns the part to pass on and whether to stop reading.
    """

    __slots__ = ("in_header", "line", "remaining")

    def __init__(self, n: int) -> None:
        self.remaining = n
        self.in_header = True
        self.line = b""  # the current header line so far, only while it is 0-1 octets

    def feed(self, block: bytes) -> tuple[bytes, bool]:
        pos = 0
        if self.in_header:
            while True:
                lf = block.find(b"\n", pos)
                if lf < 0:
                    tail = block[pos:]
                    self.line = (self.line + tail)[:2]
                    return block, False
                line = self.line + block[pos:lf]
                self.line = b""
                pos = lf + 1
                if line in (b"", b"\r"):
                    self.in_header = False
                    break
        # Body: count LF line ends.
        if self.remaining == 0:
            return block[:pos], True
        count = block.count(b"\n", pos)
        if count < self.remaining:
            self.remaining -= count
            return block, False
        for _ in range(self.remaining):
            pos = block.index(b"\n", pos) + 1
        self.remaining = 0
        return block[:pos], True


def blocks(data: bytes, size: int = BLOCK_SIZE) -> Iterator[bytes]:
    """``data`` in blocks of at most ``size`` octets (one block, uncopied, if it fits)."""
    if len(data) <= size:
        yield data
        return
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield bytes(view[start : start + size])


# -------------------------------------------------------------------------- mailboxes


class SnapshotMailbox:
    """A base :class:`~pypop.backend.Mailbox`: the snapshot, ``commit`` and ``aclose``.

    Subclasses implement :meth:`retrieve`, :meth:`update` (the UPDATE state: delete
    exactly the given messages, which may be none; raise
    :class:`~pypop.errors.UpdateFailed` if some could not be removed) and, if they
    hold a lock, :meth:`release` (and :meth:`release_now` where giving it up needs no
    waiting, and :meth:`commits_at_once` where a whole UPDATE can need none). The base
    class guarantees that ``update`` runs at most once, only from ``commit``, and that
    the lock is given up exactly once (by ``release_now``, or else by ``release`` under
    a shield), whatever happens.
    """

    # Slotted so that a slotted subclass holds no __dict__ (one mailbox per logged-in
    # session); a subclass without __slots__ gets its __dict__ as usual.
    __slots__ = ("_closed", "_messages")

    def __init__(self, messages: Sequence[MessageInfo]) -> None:
        self._messages = messages
        self._closed = False

    @property
    def messages(self) -> Sequence[MessageInfo]:
        return self._messages

    @property
    def closed(self) -> bool:
        return self._closed

    def retrieve(self, index: int, *, top_lines: int | None = None) -> AsyncIterator[bytes]:
        raise NotImplementedError

    async def update(self, deleted: Sequence[int]) -> None:
        """RFC 1939 §6 UPDATE: delete the messages at ``deleted`` (sorted, distinct,
        in range, possibly empty), then return; the lock is released afterwards."""
        raise NotImplementedError

    async def release(self) -> None:
        """Give up the maildrop lock (called once, unless :meth:`release_now` did)."""

    def release_now(self) -> bool:
        """Give up the lock at once if that needs no waiting (no I/O that can block)
        and return True; False has :meth:`release` awaited instead, shielded from
        cancellation. The default: True where the subclass has no :meth:`release`
        of its own (nothing to give up)."""
        return type(self).release is SnapshotMailbox.release

    def commits_at_once(self, deleted: Sequence[int]) -> bool:
        """True if :meth:`commit` of ``deleted`` will reach no checkpoint: ``update``
        waits for nothing (no I/O that can block) and :meth:`release_now` gives the
        lock up. The server then runs UPDATE without its shield and time limit, which
        nothing could need (a Trio cancel scope costs about 45,000 instructions). A
        wrong True only loses those two. The default: False."""
        return False

    async def commit(self, deleted: Sequence[int]) -> None:
        try:
            if self._closed:
                raise UpdateFailed("mailbox is already closed")
            await self.update(sorted({i for i in deleted if 0 <= i < len(self._messages)}))
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            # What needs no waiting cannot be interrupted: no cancel scope for it
            # (entering and leaving one costs Trio about 45,000 instructions).
            if self.release_now():
                return
            with trio.CancelScope(shield=True):
                await self.release()
