"""Prometheus metrics (``prometheus_client``), one set for the whole server.

Every worker updates the metrics below; with ``--workers N`` the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` for them, so each worker's values live in memory-mapped
files there and the supervisor adds them up when scraped (prometheus_client's
multiprocess mode). A single process serves its own registry. Either way ``[metrics]
listen = "127.0.0.1:9110"`` serves ``/metrics`` and ``/healthz`` (docs/deploy.md says
what each metric means).

Label values are bounded: mechanisms are the ones pypop knows (anything else a client
names is ``other``), results are the login log's reasons, verbs are POP3's.
"""

from __future__ import annotations

import errno
import logging
import math
from bisect import bisect_left
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from pypop.auth.sasl import ALL_MECHANISMS
from pypop.config import parse_address
from pypop.server import sessionlog
from pypop.server.sessionlog import Amount

__all__ = ["MAX_CLIENTS", "HistogramBatch", "MetricsServer", "multiprocess_registry"]

log = logging.getLogger("pypop.metrics")

# Connections served at once (Prometheus and a few balancers' health checks need a
# handful); each holds a descriptor and, while collecting, a thread.
MAX_CLIENTS: Final = 16
_SHORTAGE: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

SESSIONS_OPEN: Final = Gauge(
    "pypop_sessions_open", "POP3 sessions open now", multiprocess_mode="livesum"
)
SESSIONS: Final = Counter("pypop_sessions", "POP3 sessions accepted (past the limits)")
LOGINS: Final = Counter(
    "pypop_logins", "Login attempts by mechanism and result", ["mechanism", "result"]
)
COMMANDS: Final = Counter(
    "pypop_commands", "Commands by verb (other: invalid ones, SASL lines)", ["verb"]
)
SENT: Final = Counter("pypop_sent_bytes", "POP3 octets sent (before TLS)")
RETR_SECONDS: Final = Histogram(
    "pypop_retr_duration_seconds",
    "RETR: from the command to the last octet handed to the socket",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LOGIN_SECONDS: Final = Histogram(
    "pypop_login_duration_seconds",
    "Login: from the login command to the answer (penalty included)",
    ["result"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20),
)
BACKEND_ERRORS: Final = Counter(
    "pypop_backend_errors", "Backend and credential store failures by type", ["type"]
)
PENALTIES: Final = Counter(
    "pypop_auth_penalties", "Authentications delayed by the per-client penalty"
)
PENALTY_SECONDS: Final = Counter(
    "pypop_auth_penalty_seconds", "Seconds of penalty served before verifying"
)
TLS_FAILURES: Final = Counter(
    "pypop_tls_handshake_failures", "TLS handshakes that failed or timed out", ["kind"]
)
REFUSED: Final = Counter("pypop_connections_refused", "Connections refused by reason", ["reason"])

_MECHANISMS: Final = frozenset({"USER", "APOP", *ALL_MECHANISMS})
_VERBS: dict[type, Amount] = {}  # the command counter's value by command class


def mechanism(method: str) -> str:
    method = method.upper()
    return method if method in _MECHANISMS else "other"


# Labelled children, by metric and label values: ``labels()`` validates its arguments
# and takes a lock on every call, about a tenth of a session's Python calls. A child
# stays its parent's for the life of the process (pypop never removes one).
_CHILDREN: dict[tuple[object, ...], Any] = {}
_M = TypeVar("_M", Counter, Histogram)


def _child(metric: _M, *values: str) -> _M:
    key = (metric, *values)
    child: _M | None = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*values)
    return child


def _value(metric: Counter | Gauge, *values: str) -> Amount:
    """The value object a counter, gauge or labelled child adds to (what
    ``inc`` itself ends in, past its checks and lock)."""
    key = ("value", metric, *values)
    value: Amount | None = _CHILDREN.get(key)
    if value is None:
        child = metric.labels(*values) if values else metric
        value = _CHILDREN[key] = child._value
    return value


# A session's metrics wait in the run's batch (pypop.server.sessionlog): at once when
# sessions are rare, added up and at most 0.1 s late under load, exact at a scrape.


_SESSIONS_VALUE: Final = _value(SESSIONS)
_OPEN_VALUE: Final = _value(SESSIONS_OPEN)
_SENT_VALUE: Final = _value(SENT)


def session_started() -> None:
    b = sessionlog.batch()
    b.add(_SESSIONS_VALUE, 1)
    b.add(_OPEN_VALUE, 1)
    b.due()


def session_closed() -> None:
    b = sessionlog.batch()
    b.add(_OPEN_VALUE, -1)
    b.due()


def login(method: str, result: str, seconds: float | None = None) -> None:
    b = sessionlog.batch()
    b.add(_value(LOGINS, mechanism(method), result), 1)
    if seconds is not None:
        histogram = _child(LOGIN_SECONDS, "ok" if result == "ok" else "failed")
        # As Histogram.observe: the first bucket whose bound is not below ``seconds``.
        b.add(histogram._buckets[bisect_left(_bounds(histogram), seconds)], 1)
        b.add(histogram._sum, seconds)
    b.due()


def session_done(verbs: Mapping[type, int], commands: int, sent: int) -> None:
    """One session's commands and octets, queued when it ends (one amount per verb
    used instead of an update per command); :func:`sessionlog.session_line`, right
    after, lets them go."""
    b = sessionlog.batch()
    counted = 0
    for kind, n in verbs.items():
        value = _VERBS.get(kind)
        if value is None:
            value = _VERBS[kind] = _value(COMMANDS, kind.__name__.upper())
        b.add(value, n)
        counted += n
    if commands > counted:
        b.add(_value(COMMANDS, "other"), commands - counted)
    if sent:
        b.add(_SENT_VALUE, sent)


_BOUNDS: dict[Histogram, tuple[float, ...]] = {}


def _bounds(histogram: Histogram) -> tuple[float, ...]:
    """The histogram's bucket bounds (ending with +Inf), read once per histogram."""
    bounds = _BOUNDS.get(histogram)
    if bounds is None:
        bounds = _BOUNDS[histogram] = tuple(histogram._upper_bounds)
    return bounds


class HistogramBatch:
    """One session's observations of ``histogram``, added to it when the session ends.

    ``Histogram.observe`` takes a lock and writes two values (in multiprocess mode,
    two memory-mapped files) per call: about 5 % of a pipelined RETR. Here an
    observation is one bisect and two additions; ``flush`` adds the counts to the
    histogram's own values, or to the run's batch, which does later
    (prometheus_client has no bulk observe; tests/test_metrics_counts.py checks
    that the result equals observe's). Bounded: one count per bucket, however many
    observations.
    """

    __slots__ = ("_bounds", "_counts", "_histogram", "_sum")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        # Shared by every batch of this histogram; the counts are made at the first
        # observation (an idle session holds neither).
        self._bounds = _bounds(histogram)
        self._counts: list[int] | None = None
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        counts = self._counts
        if counts is None:
            counts = self._counts = [0] * len(self._bounds)
        # Histogram.observe counts ``amount`` in the first bucket with amount <= bound.
        counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def observe_many(self, amount: float, n: int) -> None:
        """``n`` observations of ``amount``."""
        if n <= 0:
            return
        counts = self._counts
        if counts is None:
            counts = self._counts = [0] * len(self._bounds)
        counts[bisect_left(self._bounds, amount)] += n
        self._sum += amount * n

    def flush(self, into: sessionlog.Batch | None = None) -> None:
        """Add the counts to the histogram now, or to the run's batch ``into``."""
        counts = self._counts
        if counts is None:
            return
        histogram = self._histogram
        add = (lambda value, n: value.inc(n)) if into is None else into.add
        add(histogram._sum, self._sum)
        buckets = histogram._buckets
        for i, n in enumerate(counts):
            if n:
                add(buckets[i], n)
        self._counts = None
        self._sum = 0.0


def multiprocess_registry(path: str) -> CollectorRegistry:
    """A registry that adds up the workers' files in ``path`` (the supervisor's)."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return registry


class MetricsServer:
    """``GET /metrics`` and ``GET /healthz`` over HTTP/1.0 on a trusted address.

    ``healthy`` decides /healthz: 200 ``ok`` or 503 with its reason (HAProxy's
    ``option httpchk`` takes a 503 as down, so a draining server gets no new clients).
    Requests are bounded: 8 KiB of head, 5 s to send it, :data:`MAX_CLIENTS` at
    once. A failure to answer one (collecting raised) is a 500 and a log line, never
    the end of the server.
    """

    def __init__(
        self,
        listen: str,
        *,
        registry: CollectorRegistry = REGISTRY,
        healthy: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.host, self.port = parse_address(listen, 9110)
        self.registry = registry
        self.healthy = healthy
        self.address: tuple[str, int] | None = None
        self._slots = trio.Semaphore(MAX_CLIENTS)
        # Connections still reading their request, oldest first.
        self._reading: dict[trio.CancelScope, None] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        sock = listeners[0].socket
        name = sock.getsockname()
        self.address = (str(name[0]), int(name[1]))
        log.info("metrics on http://%s:%d/metrics", *self.address)
        task_status.started()
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """At most MAX_CLIENTS connections at once (trio.serve_listeners has no cap:
        idle ones took every descriptor POP3 needs in the same process). When a new
        client waits and all are taken, the longest-connected one that has not sent
        its request yet gives way: idle connections cannot lock out the scrapes and
        the health checks, whose requests follow their connect at once."""
        last_logged = -math.inf
        async with listener:
            while True:
                await trio.lowlevel.wait_readable(listener.socket)
                if self._slots.value == 0 and self._reading:
                    oldest = next(iter(self._reading))
                    del self._reading[oldest]
                    oldest.cancel()
                await self._slots.acquire()
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    self._slots.release()
                    if exc.errno not in _SHORTAGE:
                        raise
                    now = trio.current_time()
                    if now - last_logged >= 60:
                        last_logged = now
                        log.warning("metrics: accept failed: %s", exc.strerror or exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self._handle_in_slot, stream)

    async def _handle_in_slot(self, stream: trio.SocketStream) -> None:
        try:
            await self._handle(stream)
        finally:
            self._slots.release()

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(5):
                head = b""
                # Until the request is in, a newer client may take this one's place.
                with trio.CancelScope() as reading:
                    self._reading[reading] = None
                    try:
                        while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) < 8192:
                            data = await stream.receive_some(8192)
                            if not data:
                                return
                            head += data
                    finally:
                        self._reading.pop(reading, None)
                if reading.cancelled_caught:
                    return
                try:
                    answer = await self._respond(head)
                except Exception as exc:
                    # (A worker's metric file caught half made, a full disk.) One
                    # scrape fails; the endpoint, and the supervisor it runs in, stay.
                    log.error("cannot collect the metrics: %s: %s", type(exc).__name__, exc)
                    answer = _reply(500, b"metrics unavailable, see the log\n")
                await stream.send_all(answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _respond(self, head: bytes) -> bytes:
        line = head.split(b"\n", 1)[0].split()
        if len(line) < 2:
            return _reply(400, b"bad request\n")
        if line[0] not in (b"GET", b"HEAD"):
            # RFC 9110 §15.5.6: a 405 names the methods that are allowed.
            return _reply(405, b"method not allowed\n", extra="Allow: GET, HEAD\r\n")
        path = line[1].split(b"?", 1)[0]
        head_only = line[0] == b"HEAD"  # every status: a HEAD reply has no content
        if path == b"/healthz":
            problem = self.healthy()
            if problem is None:
                return _reply(200, b"ok\n", head=head_only)
            return _reply(503, problem.encode("utf-8", "replace") + b"\n", head=head_only)
        if path in (b"/metrics", b"/"):
            sessionlog.flush()  # this process's waiting amounts, so that it is exact
            body = await trio.to_thread.run_sync(generate_latest, self.registry)
            return _reply(200, body, CONTENT_TYPE_LATEST, head=head_only)
        return _reply(404, b"not found: /metrics, /healthz\n", head=head_only)


_STATUS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _reply(
    code: int,
    body: bytes,
    ctype: str = "text/plain; charset=utf-8",
    *,
    head: bool = False,
    extra: str = "",
) -> bytes:
    return (
        f"HTTP/1.0 {code} {_STATUS[code]}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    ).encode("ascii") + (b"" if head else body)
