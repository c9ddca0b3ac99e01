"""The one line per session (``pypop.session``), emitted in batches under load.

Logging a record costs about 8 µs when the logging code runs again and again, and
about four times that once per session among everything else a session runs: at
2,000 logins a second the line was 8 % of the server's time. So a line goes out at
once when lines are rare (none in the last :data:`INTERVAL`), and otherwise waits, at
most :data:`INTERVAL`, for a task of the run that emits the waiting lines together.

Each line keeps the time its session ended (``created``), so the log still says when
it happened; under load it may follow a line logged after it by up to
:data:`INTERVAL`. At most :data:`MAX_PENDING` lines wait (then they go out at once),
and the run's end emits what is left (a graceful shutdown loses none; a process
killed outright may lose the last tenth of a second of these lines).
"""

from __future__ import annotations

import logging
import time
from typing import Final

import trio

__all__ = ["INTERVAL", "MAX_PENDING", "flush", "session_line"]

log = logging.getLogger("pypop.session")

INTERVAL: Final = 0.1
MAX_PENDING: Final = 1024
LINE: Final = (
    "session peer=%s user=%s commands=%d retrieved=%d octets=%d deleted=%d duration=%.3f end=%s"
)


class _Batch:
    """One run's waiting lines (a RunVar: each trio.run, each worker, has its own)."""

    __slots__ = ("last", "pending", "wake")

    def __init__(self) -> None:
        self.pending: list[tuple[float, tuple[object, ...]]] = []
        self.last = -INTERVAL  # (trio's clock) when a line last went out
        self.wake: trio.Event | None = None  # while the emitter waits for a line

    def emit(self) -> None:
        pending, self.pending = self.pending, []
        self.last = trio.current_time()
        if not log.isEnabledFor(logging.INFO):
            return
        for created, args in pending:
            record = log.makeRecord(log.name, logging.INFO, "(unknown file)", 0, LINE, args, None)
            # The session's end, not this moment.
            record.relativeCreated -= (record.created - created) * 1000
            record.created = created
            record.msecs = (created - int(created)) * 1000
            log.handle(record)

    async def emitter(self) -> None:
        try:
            while True:
                if not self.pending:
                    self.wake = trio.Event()
                    await self.wake.wait()
                    self.wake = None
                await trio.sleep_until(self.last + INTERVAL)
                self.emit()
        finally:
            self.wake = None
            self.emit()


_BATCH: trio.lowlevel.RunVar[_Batch] = trio.lowlevel.RunVar("pypop_session_lines")


def session_line(args: tuple[object, ...]) -> None:
    """Log a session's line (the values of :data:`LINE`); call it on the event loop."""
    if not log.isEnabledFor(logging.INFO):
        return
    try:
        batch = _BATCH.get()
    except LookupError:
        batch = _Batch()
        _BATCH.set(batch)
        trio.lowlevel.spawn_system_task(batch.emitter, name="pypop session log")
    pending = batch.pending
    pending.append((time.time(), args))
    if len(pending) >= MAX_PENDING or (
        len(pending) == 1 and trio.current_time() >= batch.last + INTERVAL
    ):
        batch.emit()  # a full batch, or a rare line: at once
    elif batch.wake is not None:  # the emitter waits for a first line
        batch.wake.set()


def flush() -> None:
    """Emit this run's waiting lines now (a server that stops logs them before its
    last line)."""
    try:
        batch = _BATCH.get()
    except LookupError:
        return
    if batch.pending:
        batch.emit()
