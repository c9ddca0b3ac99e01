"""A session's bookkeeping in batches: its log line (``pypop.session``) and its metrics.

Logging a record costs about 8 µs when the logging code runs again and again, and
about four times that once per session among everything else a session runs: at
2,000 logins a second the line was 8 % of the server's time; a session's dozen metric
updates (each a lock, in multiprocess mode a memory-mapped write) about 6 % more. So
what a session leaves goes out at once when sessions are rare (nothing went out in
the last :data:`INTERVAL`), and otherwise waits, at most :data:`INTERVAL`, for a task
of the run that handles everything waiting together: metric amounts added up per
value (:meth:`Batch.add`, pypop.server.metrics), lines written in one go per handler.

Each line keeps the time its session ended (``created``), so the log still says when
it happened; under load it may follow a line logged after it by up to
:data:`INTERVAL`. At most :data:`MAX_PENDING` lines wait (then they go out at once),
and the run's end emits what is left (a graceful shutdown loses none; a process
killed outright may lose the last tenth of a second of these lines and counts). A
scrape of ``/metrics`` flushes first (:func:`flush`), so one process's metrics are
exact; with several workers the supervisor's sum may lag by up to :data:`INTERVAL`.
"""

from __future__ import annotations

import logging
import logging.handlers
import time
from typing import Any, Final, Protocol

import trio

__all__ = ["INTERVAL", "MAX_PENDING", "Amount", "Batch", "batch", "flush", "session_line"]

log = logging.getLogger("pypop.session")

INTERVAL: Final = 0.1
MAX_PENDING: Final = 1024
LINE: Final = (
    "session peer=%s user=%s commands=%d retrieved=%d octets=%d deleted=%d duration=%.3f end=%s"
)


class Amount(Protocol):
    """A metric's value object (prometheus_client's ``_value``, a histogram's ``_sum``
    and buckets): what :meth:`Batch.add` adds to."""

    def inc(self, amount: float) -> None: ...


class Batch:
    """One run's waiting lines and metric amounts (a RunVar: each trio.run, each
    worker, has its own)."""

    __slots__ = ("amounts", "last", "lines", "waiting", "wake")

    def __init__(self) -> None:
        self.lines: list[tuple[float, tuple[object, ...]]] = []
        self.amounts: dict[Amount, float] = {}
        self.last = -INTERVAL  # (trio's clock) when a batch last went out
        self.waiting = False  # something was queued since
        self.wake: trio.Event | None = None  # while the emitter waits for that

    def add(self, value: Amount, amount: float) -> None:
        amounts = self.amounts
        amounts[value] = amounts.get(value, 0) + amount

    def due(self) -> None:
        """Something was queued: out at once when the last batch left an interval
        ago or more, else by the emitter when that interval is over."""
        if self.waiting:
            return
        self.waiting = True
        if trio.current_time() >= self.last + INTERVAL:
            self.emit()
        elif self.wake is not None:
            self.wake.set()

    def emit(self) -> None:
        self.waiting = False
        self.last = trio.current_time()
        if self.amounts:
            amounts, self.amounts = self.amounts, {}
            try:
                for value, amount in amounts.items():
                    if amount:
                        value.inc(amount)
            except Exception:
                # (A full disk under the workers' metric files.) Those counts are
                # lost; the server, the lines and the next batches are not.
                logging.getLogger("pypop.metrics").exception("could not update the metrics")
        if not self.lines:
            return
        lines, self.lines = self.lines, []
        if not log.isEnabledFor(logging.INFO):
            return
        records = []
        for created, args in lines:
            record = log.makeRecord(log.name, logging.INFO, "(unknown file)", 0, LINE, args, None)
            # The session's end, not this moment.
            record.relativeCreated -= (record.created - created) * 1000
            record.created = created
            record.msecs = (created - int(created)) * 1000
            records.append(record)
        _handle(records)

    async def emitter(self) -> None:
        try:
            while True:
                if not self.waiting:
                    self.wake = trio.Event()
                    await self.wake.wait()
                    self.wake = None
                await trio.sleep_until(self.last + INTERVAL)
                self.emit()
        finally:
            self.wake = None
            self.emit()


# Handlers that write a record as its formatted text and a terminator, and flush: a
# batch goes to one of these in one write (their subclasses may do anything else).
_PLAIN: Final = (logging.StreamHandler, logging.FileHandler, logging.handlers.WatchedFileHandler)


def _handle(records: list[logging.LogRecord]) -> None:
    """``log.handle`` for each record; where every handler they reach is a plain
    stream or file handler, each gets all of them in one write and one flush (a
    line-buffered stderr writes each line apart otherwise)."""
    handlers: list[logging.StreamHandler[Any]] = []
    logger: logging.Logger | None = log
    plain = not log.disabled and not log.filters
    while plain and logger is not None:
        for handler in logger.handlers:
            if type(handler) not in _PLAIN or handler.filters:
                plain = False
                break
            if handler.level <= logging.INFO:
                handlers.append(handler)  # type: ignore[arg-type]
        if not logger.propagate:
            break
        logger = logger.parent
    if not plain or not handlers:
        for record in records:
            log.handle(record)  # filters, other handlers, or logging's last resort
        return
    for handler in handlers:
        handler.acquire()
        try:
            if isinstance(handler, logging.handlers.WatchedFileHandler):
                handler.reopenIfNeeded()  # (what its emit does first)
            stream = handler.stream
            if stream is None:  # a FileHandler that opens on its first record
                for record in records:
                    handler.emit(record)
                continue
            text = []
            for record in records:
                try:
                    text.append(handler.format(record) + handler.terminator)
                except RecursionError:
                    raise
                except Exception:
                    handler.handleError(record)
            stream.write("".join(text))
            handler.flush()
        except RecursionError:
            raise
        except Exception:
            handler.handleError(records[-1])
        finally:
            handler.release()


_BATCH: trio.lowlevel.RunVar[Batch] = trio.lowlevel.RunVar("pypop_session_batch")


def batch() -> Batch:
    """This run's batch (its emitter starts with it); call it on the event loop."""
    try:
        return _BATCH.get()
    except LookupError:
        b = Batch()
        _BATCH.set(b)
        trio.lowlevel.spawn_system_task(b.emitter, name="pypop session batch")
        return b


def session_line(args: tuple[object, ...]) -> None:
    """Log a session's line (the values of :data:`LINE`), and let what the session
    queued go out (:meth:`Batch.due`); call it on the event loop."""
    if log.isEnabledFor(logging.INFO):
        b = batch()
        lines = b.lines
        lines.append((time.time(), args))
        if len(lines) >= MAX_PENDING:
            b.emit()  # a full batch: at once
            return
    else:
        try:
            b = _BATCH.get()
        except LookupError:
            return  # nothing was queued in this run
    b.due()


def flush() -> None:
    """Emit this run's waiting lines and amounts now (a server that stops logs them
    before its last line; a scrape of /metrics sees them)."""
    try:
        b = _BATCH.get()
    except LookupError:
        return
    if b.waiting or b.lines or b.amounts:
        b.emit()
