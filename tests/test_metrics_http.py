"""The metrics endpoint (``GET /metrics``, ``GET /healthz``) against a hostile or
unlucky client, in process, on 127.0.0.1 port 0: a scrape that fails answers 500 and
the endpoint (and the server around it) stays up."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from pypop.server.metrics import MetricsServer, multiprocess_registry


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
