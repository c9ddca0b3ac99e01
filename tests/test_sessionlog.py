"""A session's log line and metric amounts: at once when rare, in batches under load
(sessionlog)."""

from __future__ import annotations

import io
import logging
import logging.handlers
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, Counter

from pypop.server.logsetup import TextFormatter
from pypop.server.metrics import MetricsServer
from pypop.server.sessionlog import INTERVAL, MAX_PENDING, batch, flush, session_line


def _args(n: int) -> tuple[object, ...]:
    return ("127.0.0.1", f"user{n}", 3, 1, 100, 0, 0.0125, "quit")


def _lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "pypop.session"]


def test_a_rare_line_goes_out_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pypop.session")

    async def main() -> None:
        session_line(_args(1))
        assert [r.getMessage() for r in _lines(caplog)] == [
            "session peer=127.0.0.1 user=user1 commands=3 retrieved=1 octets=100 deleted=0 "
            "duration=0.013 end=quit"
        ]
        await trio.sleep(2 * INTERVAL)
        session_line(_args(2))  # the last went out an interval ago: at once again
        assert len(_lines(caplog)) == 2

    trio.run(main)


def test_lines_under_load_wait_at_most_an_interval_and_keep_their_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pypop.session")
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main() -> None:
        session_line(_args(0))  # at once
        await trio.sleep(INTERVAL / 4)
        before = time.time()
        session_line(_args(1))
        session_line(_args(2))
        after = time.time()
        assert len(_lines(caplog)) == 1  # these two wait
        await trio.sleep(INTERVAL * 3 / 4 - 0.001)
        assert len(_lines(caplog)) == 1
        await trio.sleep(0.002)  # an interval after the first line went out
        records = _lines(caplog)
        assert [r.getMessage().split()[2] for r in records] == [
            "user=user0",
            "user=user1",
            "user=user2",
        ]
        for r in records[1:]:
            assert before <= r.created <= after  # when the session ended, not later
            assert r.msecs == pytest.approx((r.created - int(r.created)) * 1000)

    trio.run(main, clock=clock)


def test_at_most_max_pending_lines_wait(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pypop.session")

    async def main() -> None:
        session_line(_args(0))
        for n in range(1, MAX_PENDING):
            session_line(_args(n))
        assert len(_lines(caplog)) == 1
        session_line(_args(MAX_PENDING))  # the 1024th waiting line: all go out now
        assert len(_lines(caplog)) == MAX_PENDING + 1

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_end_of_the_run_emits_what_waits(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pypop.session")

    async def main() -> None:
        before = len(_lines(caplog))
        for n in range(3):
            session_line(_args(n))
        assert len(_lines(caplog)) == before + 1

    trio.run(main)
    assert [r.getMessage().split()[2] for r in _lines(caplog)] == [
        "user=user0",
        "user=user1",
        "user=user2",
    ]
    trio.run(main)  # a new run has its own batch and emitter
    assert len(_lines(caplog)) == 6


def test_nothing_when_the_level_is_off(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="pypop.session")
    spawned: list[object] = []
    monkeypatch.setattr(trio.lowlevel, "spawn_system_task", lambda *a, **k: spawned.append(a))

    async def main() -> None:
        for n in range(3):
            session_line(_args(n))

    trio.run(main)
    assert _lines(caplog) == []
    assert spawned == []  # no task for a line that is never logged


def test_flush_emits_the_waiting_lines_now(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pypop.session")

    async def main() -> None:
        flush()  # nothing waits: nothing happens
        for n in range(3):
            session_line(_args(n))
        assert len(_lines(caplog)) == 1
        flush()
        assert [r.getMessage().split()[2] for r in _lines(caplog)] == [
            "user=user0",
            "user=user1",
            "user=user2",
        ]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


class Recorded:
    """An Amount that records each ``inc`` (the metric value a batch adds to)."""

    def __init__(self) -> None:
        self.incs: list[float] = []

    def inc(self, amount: float) -> None:
        self.incs.append(amount)


def test_a_sessions_amounts_go_out_with_its_line_and_add_up_under_load(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pypop.session")
    sessions, octets = Recorded(), Recorded()

    async def main() -> None:
        b = batch()
        b.add(sessions, 1)
        b.add(octets, 100)
        session_line(_args(0))  # a rare session: its line and amounts at once
        assert (sessions.incs, octets.incs, len(_lines(caplog))) == ([1], [100], 1)
        await trio.sleep(INTERVAL / 4)
        for n in (1, 2, 3):
            b.add(sessions, 1)
            b.add(octets, n)
            session_line(_args(n))
        assert (sessions.incs, octets.incs, len(_lines(caplog))) == ([1], [100], 1)
        await trio.sleep(INTERVAL * 3 / 4 + 0.001)
        # One addition per value for the three sessions, with their lines.
        assert (sessions.incs, octets.incs, len(_lines(caplog))) == ([1, 3], [100, 6], 4)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_amounts_alone_wait_at_most_an_interval_and_the_run_end_emits_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pypop.session")  # amounts without lines
    opened, logins, closed = Recorded(), Recorded(), Recorded()

    async def main() -> None:
        b = batch()
        b.add(opened, 1)
        b.due()
        assert opened.incs == [1]  # at once
        b.add(opened, 1)
        b.add(opened, -1)  # a gauge up and down within one batch: nothing to write
        b.due()
        b.add(logins, 1)
        session_line(_args(1))  # no line at WARNING, but the amounts still go
        assert (opened.incs, logins.incs) == ([1], [])
        await trio.sleep(INTERVAL + 0.001)
        assert (opened.incs, logins.incs) == ([1], [1])
        await trio.sleep(INTERVAL / 2)
        b.add(closed, 2)
        b.due()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert closed.incs == [2]  # waited for the emitter; the run's end emitted it
    assert _lines(caplog) == []


def test_flush_and_a_scrape_emit_waiting_amounts_now() -> None:
    registry = CollectorRegistry()
    counter = Counter("pypop_test_sessions", "test", registry=registry)
    server = MetricsServer("127.0.0.1:0", registry=registry)

    async def main() -> None:
        b = batch()
        b.add(counter._value, 1)
        b.due()  # at once
        b.add(counter._value, 2)
        b.due()  # waits
        assert registry.get_sample_value("pypop_test_sessions_total") == 1
        reply = await server._respond(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert b"\npypop_test_sessions_total 3.0\n" in reply  # one process: exact
        b.add(counter._value, 4)
        b.due()
        flush()
        assert registry.get_sample_value("pypop_test_sessions_total") == 7

    trio.run(main, clock=trio.testing.MockClock())  # time stands still


class Writes(io.StringIO):
    """A stream that records each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture
def session_logger() -> Iterator[logging.Logger]:
    """pypop.session at INFO, not propagating: a test sets its handlers."""
    logger = logging.getLogger("pypop.session")
    saved = (logger.level, logger.propagate, logger.handlers[:])
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger
    finally:
        logger.level, logger.propagate, logger.handlers[:] = saved


def _batch_of_three() -> None:
    async def main() -> None:
        for n in range(3):
            session_line(_args(n))  # the first at once, the others together

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_batch_is_one_write_of_what_logging_writes_line_by_line(
    session_logger: logging.Logger,
) -> None:
    stream = Writes()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    quiet = logging.StreamHandler(Writes())
    quiet.setLevel(logging.WARNING)  # a handler above INFO gets nothing
    session_logger.handlers[:] = [handler, quiet]  # (pytest's own too otherwise)
    _batch_of_three()
    assert len(stream.writes) == 2  # the first line at once, then the other two
    lines = stream.getvalue().splitlines()
    # Each line as logging writes one record: date, level, logger, message.
    assert [line.split(" ", 2)[2] for line in lines] == [
        f"INFO pypop.session: session peer=127.0.0.1 user=user{n} commands=3 retrieved=1 "
        "octets=100 deleted=0 duration=0.013 end=quit"
        for n in range(3)
    ]
    assert quiet.stream.getvalue() == ""


def test_a_filter_or_another_handler_gets_each_record_through_logging(
    session_logger: logging.Logger,
) -> None:
    stream = Writes()
    handler = logging.StreamHandler(stream)
    handler.addFilter(lambda r: "user1" not in r.getMessage())
    session_logger.handlers[:] = [handler]
    _batch_of_three()
    assert [line.split()[2] for line in stream.getvalue().splitlines()] == [
        "user=user0",
        "user=user2",
    ]
    assert len(stream.writes) == 2  # a write per record, as logging does


def test_a_watched_file_is_reopened_for_a_batch_after_rotation(
    session_logger: logging.Logger, tmp_path: Path
) -> None:
    path = tmp_path / "pypop.log"
    handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
    session_logger.handlers[:] = [handler]
    try:

        async def main() -> None:
            session_line(_args(0))  # at once, to pypop.log
            path.rename(tmp_path / "pypop.log.1")  # logrotate moves it away
            session_line(_args(1))
            session_line(_args(2))
            await trio.sleep(INTERVAL + 0.001)

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        handler.close()
    assert (tmp_path / "pypop.log.1").read_text().count("session peer=") == 1
    assert [line.split()[2] for line in path.read_text().splitlines()] == [
        "user=user1",
        "user=user2",
    ]


class Failing:
    """An Amount that cannot be written (a full disk under multiprocess files)."""

    def inc(self, amount: float) -> None:
        raise OSError(28, "No space left on device")


def test_a_metric_that_cannot_be_written_costs_its_counts_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    later = Recorded()

    async def main() -> None:
        b = batch()
        session_line(_args(0))
        b.add(Failing(), 1)
        session_line(_args(1))  # waits for the emitter, in the run's system task
        await trio.sleep(INTERVAL + 0.001)
        b.add(later, 1)
        session_line(_args(2))
        await trio.sleep(INTERVAL + 0.001)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))  # the run survives
    assert [r.getMessage().split()[2] for r in _lines(caplog)] == [
        "user=user0",
        "user=user1",
        "user=user2",
    ]
    assert later.incs == [1]
    (error,) = [r for r in caplog.records if r.name == "pypop.metrics"]
    assert error.getMessage() == "could not update the metrics"
    assert error.exc_info is not None
    assert isinstance(error.exc_info[1], OSError)
