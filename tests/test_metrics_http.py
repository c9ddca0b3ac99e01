"""The metrics endpoint (``GET /metrics``, ``GET /healthz``) against a hostile or
unlucky client, in process, on 127.0.0.1 port 0: a scrape that fails answers 500 and
the endpoint (and the server around it) stays up."""

from __future__ import annotations

import logging
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import trio

from pypop.server.metrics import MAX_CLIENTS, MetricsServer, multiprocess_registry

from .test_workers import free_port


async def exchange(address: tuple[str, int] | None, request: bytes) -> bytes:
    """Send ``request``, read the whole answer (the server closes after one)."""
    assert address is not None
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(request)
        answer = b""
        with trio.fail_after(10):
            while data := await stream.receive_some(65536):
                answer += data
    return answer


def reply(status: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.0 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


async def test_a_failing_scrape_answers_500_and_the_endpoint_stays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker's metric file exists but is still empty between its creation and its
    sizing (prometheus_client opens it, then truncates it to size): a scrape in that
    moment made the collector raise ``struct.error``, which ended the metrics server
    and with it the supervisor, hence every worker."""
    (tmp_path / "counter_4242.db").write_bytes(b"")
    server = MetricsServer("127.0.0.1:0", registry=multiprocess_registry(str(tmp_path)))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with caplog.at_level(logging.ERROR, "pypop.metrics"):
            got = await exchange(server.address, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert got == reply("500 Internal Server Error", b"metrics unavailable, see the log\n")
        # Logged once, as one line: what failed, no traceback.
        [record] = [r for r in caplog.records if r.name == "pypop.metrics"]
        assert record.getMessage().startswith("cannot collect the metrics: error: ")
        assert record.exc_info is None
        # Still serving.
        got = await exchange(server.address, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert got == reply("200 OK", b"ok\n")
        (tmp_path / "counter_4242.db").unlink()
        got = await exchange(server.address, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert got.startswith(b"HTTP/1.0 200 OK\r\n")
        nursery.cancel_scope.cancel()


def test_idle_metrics_connections_cannot_starve_pop3_of_descriptors(tmp_path: Path) -> None:
    """A client of the metrics address opens connections and sends nothing. Each one
    was accepted (serve_listeners has no cap), so a few hundred took every descriptor
    the process may open, and POP3 clients of the same process were refused with
    ``[SYS/TEMP]`` for as long as the flood went on. Now the endpoint holds at most
    ``MAX_CLIENTS`` at once; POP3 is served, and so is a scrape."""
    (tmp_path / "passwd").write_text("alice:{PLAIN}secret\n")
    (tmp_path / "pypop.toml").write_text("[limits]\nmax_connections = 32\n")
    port, metrics = free_port(), free_port()

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))

    proc = subprocess.Popen(
        [
            sys.executable, "-m", "pypop", "serve", "-c", str(tmp_path / "pypop.toml"),
            "--passwd-file", str(tmp_path / "passwd"), "--listen", f"127.0.0.1:{port}",
            "--metrics-listen", f"127.0.0.1:{metrics}", "-o", "sample_users=0",
        ],
        stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=few_files,
    )  # fmt: skip
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/healthz", timeout=5):
                    break
            except OSError:
                assert proc.poll() is None
                assert time.monotonic() < deadline
                time.sleep(0.05)
        for _ in range(200):
            idle.append(socket.create_connection(("127.0.0.1", metrics), timeout=10))
        time.sleep(0.5)  # the server accepts what it will
        pop = socket.create_connection(("127.0.0.1", port), timeout=10)
        with pop:
            assert pop.recv(512).startswith(b"+OK ")
        # A scrape is answered at once: the oldest idle connection gives way.
        started = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/healthz", timeout=30) as r:
            assert (r.status, r.read()) == (200, b"ok\n")
        assert time.monotonic() - started < 4
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        proc.wait(30)


async def test_at_the_cap_the_oldest_idle_connection_gives_way() -> None:
    """With MAX_CLIENTS connections open and silent, a new client is served at once
    and the longest-connected silent one is closed (a cap alone would make the
    scrapes and health checks wait behind them)."""
    server = MetricsServer("127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        assert server.address is not None
        idle = []
        for _ in range(MAX_CLIENTS):
            idle.append(await trio.open_tcp_stream(*server.address))
            await trio.sleep(0.01)  # accepted in this order
        got = await exchange(server.address, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert got == reply("200 OK", b"ok\n")
        with trio.fail_after(5):
            assert await idle[0].receive_some(100) == b""  # closed, nothing said
        # The others are still held: one of them may still ask.
        await idle[-1].send_all(b"GET /healthz HTTP/1.0\r\n\r\n")
        answer = b""
        with trio.fail_after(5):
            while data := await idle[-1].receive_some(65536):
                answer += data
        assert answer == reply("200 OK", b"ok\n")
        for stream in idle:
            await stream.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("request_head", "answer"),
    [
        (
            b"HEAD /nothing HTTP/1.0\r\n\r\n",
            reply("404 Not Found", b"not found: /metrics, /healthz\n"),
        ),
        (b"HEAD /healthz HTTP/1.0\r\n\r\n", reply("503 Service Unavailable", b"shutting down\n")),
        (
            b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            reply("503 Service Unavailable", b"shutting down\n"),
        ),
    ],
)
async def test_a_head_request_gets_no_body_whatever_the_status(
    request_head: bytes, answer: bytes
) -> None:
    """RFC 9110 §9.3.2: a reply to HEAD carries the headers of GET's, never content.
    Only 200 left the body out: a 404 or a draining server's 503 sent it after the
    head, where a client that knows HEAD has no content finds stray octets."""
    server = MetricsServer("127.0.0.1:0", healthy=lambda: "shutting down")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        head_only = answer[: answer.index(b"\r\n\r\n") + 4]
        assert await exchange(server.address, request_head) == head_only
        get = request_head.replace(b"HEAD ", b"GET ", 1)
        assert await exchange(server.address, get) == answer
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("request_head", "status", "extra", "body"),
    [
        (b"POST /metrics HTTP/1.0\r\n\r\n", "405 Method Not Allowed", "Allow: GET, HEAD\r\n",
         b"method not allowed\n"),
        (b"OPTIONS * HTTP/1.1\r\n\r\n", "405 Method Not Allowed", "Allow: GET, HEAD\r\n",
         b"method not allowed\n"),
        (b"GET\r\n\r\n", "400 Bad Request", "", b"bad request\n"),
        (b"\r\n\r\n", "400 Bad Request", "", b"bad request\n"),
    ],
)  # fmt: skip
async def test_refused_requests_get_the_status_http_names(
    request_head: bytes, status: str, extra: str, body: bytes
) -> None:
    """RFC 9110 §15.5.6: a 405 lists the methods that are allowed (``Allow``); a
    request line without a target is not a wrong method but a bad request (400)."""
    server = MetricsServer("127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        expected = (
            f"HTTP/1.0 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
        ).encode() + body
        assert await exchange(server.address, request_head) == expected
        nursery.cancel_scope.cancel()
