"""Every metric of issue 13 counts what really happened, in a real server over real
sockets: bytes sent (exactly what the client received), RETR latency (RETR, not TOP),
backend errors by type (and their cause in the server's log, never to the client),
TLS handshake failures (implicit TLS and STLS), refused connections by reason.

Sessions open/total, logins by mechanism and result, commands by verb, login latency
and penalties: tests/test_logs_metrics.py (one process), tests/test_workers.py (four
workers, aggregated) and tests/test_haproxy.py (behind HAProxy).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import ClassVar

import pytest
import trio
import trustme
from prometheus_client import REGISTRY, CollectorRegistry, Histogram

from pypop.backend import Mailbox, MessageInfo
from pypop.backends.memory import MemoryBackend
from pypop.errors import TemporaryFailure, UpdateFailed
from pypop.server.metrics import HistogramBatch

from .conftest import ServerStarter
from .test_anvil import until
from .test_server import port_of, talk
from .test_tls import Client, tls_port, write_cert

TOO_MANY = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def counted(name: str, before: float, delta: float, **labels: str) -> None:
    """A session's figures are added when it ends: wait for them, then exactly."""
    await until(lambda: value(name, **labels) >= before + delta)
    assert value(name, **labels) == before + delta


async def test_bytes_sent_and_retr_latency(start_server: ServerStarter) -> None:
    server = await start_server()
    sent = value("pypop_sent_bytes_total")
    retr = value("pypop_retr_duration_seconds_count")
    quit_ = value("pypop_commands_total", verb="QUIT")
    out = await talk(
        port_of(server),
        b"USER alice\r\nPASS wonderland\r\nRETR 1\r\nTOP 2 0\r\nRETR 3\r\nQUIT\r\n",
    )
    assert out.count(b"\r\n.\r\n") == 3
    assert out.endswith(b"+OK Logging out\r\n")
    await counted("pypop_commands_total", quit_, 1, verb="QUIT")
    assert value("pypop_sent_bytes_total") == sent + len(out)
    assert value("pypop_retr_duration_seconds_count") == retr + 2  # TOP is not a RETR


def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for m in registry.collect()
        for s in m.samples
        if not s.name.endswith("_created")
    ]


def test_a_session_batch_adds_what_observe_adds() -> None:
    """The RETR histogram is filled per session (HistogramBatch, through the
    histogram's own values): the same samples as one observe per RETR, bounds
    included (a value equal to a bound counts in that bucket)."""
    amounts = [0.0, 0.001, 0.0011, 0.05, 0.1, 0.5, 1.0, 3.0, 0.0005, 0.1]
    one, batched = CollectorRegistry(), CollectorRegistry()
    bounds = (0.001, 0.01, 0.1, 1.0)
    direct = Histogram("h", "h", buckets=bounds, registry=one)
    batch = HistogramBatch(Histogram("h", "h", buckets=bounds, registry=batched))
    for amount in amounts:
        direct.observe(amount)
        batch.observe(amount)
    assert samples(batched) != samples(one)  # nothing until the session ends
    batch.flush()
    batch.flush()  # a second flush adds nothing
    assert samples(batched) == samples(one)
    assert ("h_bucket", {"le": "0.001"}, 3.0) in samples(one)
    # Many equal observations at once (RETRs the engine answered itself).
    for _ in range(5):
        direct.observe(0.0)
    batch.observe_many(0.0, 5)
    batch.observe_many(0.0, 0)
    batch.flush()
    assert samples(batched) == samples(one)
    assert ("h_bucket", {"le": "0.001"}, 8.0) in samples(one)


class FailingBox:
    def __init__(self, real: Mailbox, fault: BaseException) -> None:
        self.real = real
        self.fault = fault

    @property
    def messages(self) -> Sequence[MessageInfo]:
        return self.real.messages

    async def retrieve(self, index: int, *, top_lines: int | None = None) -> AsyncIterator[bytes]:
        if top_lines is None:
            raise self.fault
        yield b""

    async def commit(self, deleted: Sequence[int]) -> None:
        raise UpdateFailed("unlink failed: Read-only file system: /srv/mail/alice/cur/1")

    async def aclose(self) -> None:
        await self.real.aclose()


class Failing:
    """alice's messages cannot be read, and UPDATE fails (injected faults)."""

    box: type[FailingBox] = FailingBox  # the mailbox wrapper; subclasses swap it

    def __init__(self, real: MemoryBackend, fault: BaseException) -> None:
        self.real = real
        self.fault = fault

    async def open_mailbox(self, user: str) -> Mailbox:
        return self.box(await self.real.open_mailbox(user), self.fault)

    async def aclose(self) -> None:
        await self.real.aclose()


async def test_backend_errors_by_type_and_their_cause_in_the_log(
    start_server: ServerStarter, memory_backend: MemoryBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    try:
        raise OSError(5, "Input/output error", "/srv/mail/alice/cur/1")
    except OSError as exc:
        try:
            raise TemporaryFailure("cannot read message") from exc
        except TemporaryFailure as temporary:
            fault = temporary
    server = await start_server(backend=Failing(memory_backend, fault))
    temp = value("pypop_backend_errors_total", type="TemporaryFailure")
    update = value("pypop_backend_errors_total", type="UpdateFailed")
    out = await talk(port_of(server), b"USER alice\r\nPASS wonderland\r\nRETR 1\r\n")
    assert out.endswith(b" octets)\r\n-ERR [SYS/TEMP] Message temporarily unavailable\r\n")
    out = await talk(port_of(server), b"USER alice\r\nPASS wonderland\r\nDELE 1\r\nQUIT\r\n")
    assert out.endswith(b"-ERR [SYS/TEMP] Some deleted messages not removed\r\n")
    assert b"/srv" not in out
    assert value("pypop_backend_errors_total", type="TemporaryFailure") == temp + 1
    assert value("pypop_backend_errors_total", type="UpdateFailed") == update + 1
    # The server's log has each cause in one line, without a traceback.
    lines = [r.getMessage() for r in caplog.records if r.name == "pypop.session"]
    assert (
        'backend failed to read message 1 of alice: "cannot read message: Input/output '
        'error: /srv/mail/alice/cur/1"' in lines
    ), lines
    assert (
        'UPDATE for alice failed: "unlink failed: Read-only file system: '
        '/srv/mail/alice/cur/1"' in lines
    ), lines
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


class HangingBox(FailingBox):
    async def commit(self, deleted: Sequence[int]) -> None:
        await trio.sleep_forever()


class Hanging(Failing):
    box = HangingBox


async def test_update_that_hangs_ends_with_sys_temp(
    start_server: ServerStarter, memory_backend: MemoryBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit that never returns: after update_timeout the client gets [SYS/TEMP],
    nothing was removed, the session ends and the maildrop is free again."""
    caplog.set_level(logging.INFO)
    server = await start_server(backend=Hanging(memory_backend, RuntimeError("unused")))
    server.context.update_timeout = 0.3
    errors = value("pypop_backend_errors_total", type="TooSlowError")
    with trio.fail_after(10):
        out = await talk(port_of(server), b"USER alice\r\nPASS wonderland\r\nDELE 1\r\nQUIT\r\n")
    assert out.endswith(b"-ERR [SYS/TEMP] Some deleted messages not removed\r\n")
    assert value("pypop_backend_errors_total", type="TooSlowError") == errors + 1
    # Nothing was deleted, and the lock went with the session: the next login gets
    # the maildrop, whole (its QUIT hangs in the same way).
    with trio.fail_after(10):
        again = await talk(port_of(server), b"USER alice\r\nPASS wonderland\r\nSTAT\r\nQUIT\r\n")
    assert again.split(b"\r\n")[3].startswith(b"+OK 3 "), again
    assert any("backend failed in UPDATE for alice" in r.getMessage() for r in caplog.records)


class SlowBox(FailingBox):
    """UPDATE takes most of its time limit, then the release takes longer than is left
    (an unshielded await, as a third-party backend's may be)."""

    async def commit(self, deleted: Sequence[int]) -> None:
        await trio.sleep(0.5)

    async def aclose(self) -> None:
        await trio.sleep(0.8)
        await self.real.aclose()


class Slow(Failing):
    box = SlowBox


async def test_release_is_not_cut_by_updates_time_limit(
    start_server: ServerStarter, memory_backend: MemoryBackend
) -> None:
    """UPDATE's time limit bounds the commit, not the release after it: the maildrop
    is let go, and the next login gets it."""
    server = await start_server(backend=Slow(memory_backend, RuntimeError("unused")))
    server.context.update_timeout = 1.0
    with trio.fail_after(10):
        out = await talk(port_of(server), b"USER alice\r\nPASS wonderland\r\nQUIT\r\n")
    assert out.split(b"\r\n")[3].startswith(b"+OK"), out
    with trio.fail_after(10):
        again = await talk(port_of(server), b"USER alice\r\nPASS wonderland\r\nSTAT\r\n")
    assert again.split(b"\r\n")[3].startswith(b"+OK 3 "), again


class AtOnceFailingBox(FailingBox):
    """Says its UPDATE needs no waiting, and fails it."""

    def commits_at_once(self, deleted: Sequence[int]) -> bool:
        return True


class AtOnceFailing(Failing):
    box = AtOnceFailingBox


async def test_update_at_once_that_fails_ends_with_sys_temp(
    start_server: ServerStarter, memory_backend: MemoryBackend
) -> None:
    """UPDATE without its cancel scope (the mailbox says nothing in it waits) reports a
    failure as the scoped one does, and the maildrop is free again."""
    server = await start_server(backend=AtOnceFailing(memory_backend, RuntimeError("unused")))
    with trio.fail_after(10):
        out = await talk(port_of(server), b"USER alice\r\nPASS wonderland\r\nDELE 1\r\nQUIT\r\n")
    assert out.endswith(b"-ERR [SYS/TEMP] Some deleted messages not removed\r\n")
    with trio.fail_after(10):
        again = await talk(port_of(server), b"USER alice\r\nPASS wonderland\r\nSTAT\r\nQUIT\r\n")
    assert again.split(b"\r\n")[3].startswith(b"+OK 3 "), again


class TimedBox(FailingBox):
    """Commits for real, noting the deadline it ran under; ``at_once`` is its answer
    to commits_at_once."""

    at_once = False
    seen: ClassVar[list[float]] = []

    def commits_at_once(self, deleted: Sequence[int]) -> bool:
        return self.at_once

    async def commit(self, deleted: Sequence[int]) -> None:
        TimedBox.seen.append(trio.current_effective_deadline() - trio.current_time())
        await self.real.commit(deleted)


class AtOnceTimedBox(TimedBox):
    at_once = True


class BrokenAtOnceBox(TimedBox):
    def commits_at_once(self, deleted: Sequence[int]) -> bool:
        raise RuntimeError("a bug in the backend")


@pytest.mark.parametrize(
    ("box", "expire", "scoped"),
    [
        (TimedBox, None, True),
        (AtOnceTimedBox, None, False),
        (AtOnceTimedBox, 0, True),
        (BrokenAtOnceBox, None, True),  # its bug is logged; UPDATE keeps its scope
    ],
)
async def test_update_scope_only_where_update_can_wait(
    start_server: ServerStarter,
    memory_backend: MemoryBackend,
    box: type[TimedBox],
    expire: int | None,
    scoped: bool,
) -> None:
    """UPDATE runs under its own time limit unless the mailbox says nothing in it
    waits (then under the session's idle deadline) and no EXPIRE is enforced (which
    may read arrival times); either way the message goes."""

    class Timed(Failing):
        pass

    Timed.box = box
    server = await start_server(backend=Timed(memory_backend, RuntimeError("unused")))
    server.context.update_timeout = 7.0
    server.context.expire_days = expire
    TimedBox.seen.clear()
    with trio.fail_after(10):
        out = await talk(port_of(server), b"USER alice\r\nPASS wonderland\r\nDELE 1\r\nQUIT\r\n")
    assert out.split(b"\r\n")[3:5] == [b"+OK Marked to be deleted", b"+OK Logging out"], out
    (left,) = TimedBox.seen
    assert (left <= 7.0) == scoped, left
    with trio.fail_after(10):
        again = await talk(port_of(server), b"USER alice\r\nPASS wonderland\r\nSTAT\r\nQUIT\r\n")
    assert again.split(b"\r\n")[3].startswith(b"+OK 2 "), again


async def test_tls_handshake_failures(start_server: ServerStarter, tmp_path: Path) -> None:
    chain, key = write_cert(trustme.CA(), tmp_path)
    server = await start_server(
        listen_tls=[("127.0.0.1", 0)], tls_cert=chain, tls_key=key, hostname="pop.test"
    )
    implicit = value("pypop_tls_handshake_failures_total", kind="implicit")
    stls = value("pypop_tls_handshake_failures_total", kind="stls")
    # Implicit TLS: a client that speaks POP3 instead of TLS.
    assert await talk(tls_port(server), b"USER alice\r\n" * 10) == b""
    await until(lambda: value("pypop_tls_handshake_failures_total", kind="implicit") > implicit)
    # STLS, then no ClientHello but garbage.
    c = await Client.connect(port_of(server))
    assert (await c.line()).startswith(b"+OK POP3 server ready")
    assert await c.cmd(b"STLS\r\n") == b"+OK Begin TLS negotiation\r\n"
    await c.send(b"\x16\x03\x01\x00\x05hello" + b"\0" * 64)
    await until(lambda: value("pypop_tls_handshake_failures_total", kind="stls") > stls)
    await c.aclose()
    assert value("pypop_tls_handshake_failures_total", kind="implicit") == implicit + 1
    assert value("pypop_tls_handshake_failures_total", kind="stls") == stls + 1


async def test_refused_connections_by_reason(start_server: ServerStarter) -> None:
    server = await start_server(max_connections=2, max_connections_per_ip=1)
    per_ip = value("pypop_connections_refused_total", reason="max_connections_per_ip")
    total = value("pypop_connections_refused_total", reason="max_connections")
    port = port_of(server)
    held = await Client.connect(port)
    assert (await held.line()).startswith(b"+OK")
    for _ in range(3):
        assert await talk(port, b"") == TOO_MANY
    assert value("pypop_connections_refused_total", reason="max_connections_per_ip") == per_ip + 3
    # From another address the per-IP cap does not apply, the server-wide one does.
    other = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
    async with other:
        assert (await other.receive_some(100)).startswith(b"+OK")
        assert await talk(port, b"") == TOO_MANY
    assert value("pypop_connections_refused_total", reason="max_connections") == total + 1
    await held.aclose()


class WireRaisingBox(FailingBox):
    """A WireCache whose wire_message fails (a bug): retrieve must answer instead."""

    def wire_message(self, index: int, top_lines: int | None = None) -> bytes | None:
        raise RuntimeError("wire cache bug")

    async def retrieve(self, index: int, *, top_lines: int | None = None) -> AsyncIterator[bytes]:
        blocks = self.real.retrieve(index, top_lines=top_lines)
        async with contextlib.aclosing(blocks):  # type: ignore[type-var]
            async for block in blocks:
                yield block

    async def commit(self, deleted: Sequence[int]) -> None:
        await self.real.commit(deleted)


class WireRaising(Failing):
    box = WireRaisingBox


async def test_a_failing_wire_cache_falls_back_to_retrieve(
    start_server: ServerStarter, memory_backend: MemoryBackend
) -> None:
    """The engine and the session both ask the wire cache; when it raises, the message
    still goes out, whole, through retrieve, and the session goes on."""
    server = await start_server(backend=WireRaising(memory_backend, RuntimeError("unused")))
    plain = await start_server()
    script = b"USER alice\r\nPASS wonderland\r\nRETR 2\r\nTOP 1 0\r\nRETR 3\r\nQUIT\r\n"
    out = await talk(port_of(server), script)
    assert b"RuntimeError" not in out
    assert b"wire cache bug" not in out
    # Byte for byte what the memory backend's own wire cache sends.
    assert out == await talk(port_of(plain), script)
    assert out.count(b"\r\n.\r\n") == 3
