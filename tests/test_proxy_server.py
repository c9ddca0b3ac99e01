"""The PROXY protocol in a real server (``server.proxy_from``), over real sockets.

A trusted proxy must send a header, and its client's address is the one that limits,
penalties, logs and metrics use; anyone else sending one is cut off; everything the
proxy controls is bounded (time, length); v2's SSL TLV makes the session secure for
the cleartext rule only because the proxy is trusted.
"""

from __future__ import annotations

import logging
import ssl
import struct
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from pypop.server.metrics import REFUSED

from .conftest import ServerStarter
from .test_anvil import until
from .test_proxy_wire import SIG, ssl_tlv, tcp4, v2
from .test_server import port_of
from .test_tls import Client, capa_lines, client_context, tls_port, write_cert

AUTH_FAILED = b"-ERR [AUTH] Authentication failed\r\n"
GREETING = b"+OK POP3 server ready"
PLAINTEXT_REFUSED = (
    b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections\r\n"
)


def v1(client: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {client} 127.0.0.1 {port} 110\r\n".encode()


async def proxied(port: int, header: bytes) -> Client:
    c = await Client.connect(port)
    await c.send(header)
    assert (await c.line()).startswith(GREETING)
    return c


async def cut_off(c: Client) -> bytes:
    """Everything received until the server closes (EOF, or a reset: closing with
    unread input resets), within the client's time limit."""
    got = c.buf
    c.buf = b""
    with trio.fail_after(c.LIMIT):
        try:
            while chunk := await c.stream.receive_some(65536):
                got += chunk
        except trio.BrokenResourceError:
            pass
    return got


async def refused_count(reason: str) -> float:
    return float(REFUSED.labels(reason)._value.get())


async def test_the_header_names_the_client_for_logs_and_penalty(
    start_server: ServerStarter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = await start_server(proxy_from=["127.0.0.0/8"], allow_plaintext=True)
    port = port_of(server)
    headers = [v1("192.0.2.7"), v2(addresses=tcp4("192.0.2.7", "127.0.0.1", 4000, 110))]
    for n, header in enumerate(headers):
        c = await proxied(port, header)
        assert await c.cmd(b"USER alice\r\n") == b"+OK\r\n"
        assert await c.cmd(b"PASS wrong-%d\r\n" % n) == AUTH_FAILED
        assert await c.cmd(b"QUIT\r\n") == b"+OK Logging out\r\n"
        await c.aclose()
    assert server.context.penalty.level("192.0.2.7") == 2
    assert server.context.penalty.level("127.0.0.1") == 0
    await until(lambda: caplog.text.count("session peer=192.0.2.7 ") >= 2)
    failed = [r.getMessage() for r in caplog.records if r.name == "pypop.login"]
    assert failed == ["login failed: user=<alice> method=USER rip=192.0.2.7 reason=credentials"] * 2


async def test_per_ip_limits_count_the_real_client(start_server: ServerStarter) -> None:
    """The per-IP check runs after the header: one proxy carries many clients."""
    server = await start_server(proxy_from=["127.0.0.1"], max_connections_per_ip=2)
    port = port_of(server)
    held = [await proxied(port, v1(f"192.0.2.{n}")) for n in range(1, 6)]  # 5 via one proxy
    held += [await proxied(port, v1("192.0.2.1", 40001 + n)) for n in range(1)]
    third = await Client.connect(port)
    await third.send(v1("192.0.2.1", 40009))
    assert await cut_off(third) == b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    for c in [*held, third]:
        await c.aclose()


async def test_a_trusted_peer_without_a_header_is_closed(
    start_server: ServerStarter, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(proxy_from=["127.0.0.1/32"])
    before = await refused_count("proxy_header")
    c = await Client.connect(port_of(server))
    await c.send(b"CAPA\r\n")
    assert await cut_off(c) == b""  # not even a greeting
    await c.aclose()
    assert await refused_count("proxy_header") == before + 1
    assert "refused 127.0.0.1: not a PROXY protocol header" in caplog.text


async def test_a_silent_trusted_peer_is_closed_after_5_seconds(
    autojump_clock: trio.testing.MockClock, start_server: ServerStarter
) -> None:
    server = await start_server(proxy_from=["127.0.0.1/32"])
    c = await Client.connect(port_of(server))
    start = trio.current_time()
    c.LIMIT = 60
    await c.send(b"PROXY TCP4 192.0")  # a beginning, then nothing
    assert await cut_off(c) == b""
    assert trio.current_time() - start == pytest.approx(5, abs=0.1)
    await c.aclose()


async def test_an_overlong_header_is_refused(start_server: ServerStarter) -> None:
    server = await start_server(proxy_from=["127.0.0.1/32"])
    for data in (SIG + b"\x21\x11\xff\xff", b"PROXY UNKNOWN " + b"x" * 200):
        c = await Client.connect(port_of(server))
        await c.send(data)
        assert await cut_off(c) == b""
        await c.aclose()


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 110\r\n",
        SIG + b"\x21\x11\x00\x0c" + tcp4("192.0.2.7", "127.0.0.1", 1, 2),
    ],
    ids=["v1", "v2"],
)
async def test_a_header_from_an_untrusted_peer_closes_the_connection(
    start_server: ServerStarter, header: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = await start_server(proxy_from=["192.0.2.250/32"])
    c = await Client.connect(port_of(server))
    assert (await c.line()).startswith(GREETING)
    await c.send(header + b"USER alice\r\n")
    assert await cut_off(c) == b""  # no reply to anything
    await c.aclose()
    await until(lambda: "end=PROXY header from an untrusted peer" in caplog.text)
    assert "session peer=127.0.0.1 " in caplog.text


async def test_without_proxy_from_a_proxy_line_is_just_a_bad_command(
    start_server: ServerStarter,
) -> None:
    server = await start_server()
    c = await Client.connect(port_of(server))
    await c.line()
    assert await c.cmd(v1("192.0.2.7")) == b"-ERR Unknown command\r\n"
    await c.aclose()


async def test_ssl_tlv_makes_the_session_secure_only_from_a_trusted_proxy(
    start_server: ServerStarter,
) -> None:
    """TLS terminated at HAProxy: v2's SSL TLV says so. The client (192.0.2.7) is not
    on loopback and allow_plaintext is off: USER is refused without the TLV and
    allowed with it; CAPA does not offer STLS on what is already TLS to the client."""
    server = await start_server(proxy_from=["127.0.0.1/32"])
    port = port_of(server)
    addresses = tcp4("192.0.2.7", "10.0.0.1", 4000, 995)
    plain = await proxied(port, v2(addresses=addresses))
    assert await plain.cmd(b"USER alice\r\n") == PLAINTEXT_REFUSED
    await plain.aclose()
    secure = await proxied(port, v2(addresses=addresses, tlvs=ssl_tlv()))
    assert b"STLS" not in capa_lines(await secure.multiline(b"CAPA\r\n"))
    assert await secure.cmd(b"USER alice\r\n") == b"+OK\r\n"
    assert (await secure.cmd(b"PASS wonderland\r\n")).startswith(b"+OK maildrop has 3 ")
    await secure.aclose()
    # The client bit must be set: a TLV saying "not over SSL" is not secure.
    unset = await proxied(port, v2(addresses=addresses, tlvs=ssl_tlv(client=0)))
    assert await unset.cmd(b"USER alice\r\n") == PLAINTEXT_REFUSED
    await unset.aclose()


async def test_local_command_keeps_the_connection_address(start_server: ServerStarter) -> None:
    """A v2 LOCAL header (HAProxy's health checks) speaks for the proxy itself."""
    server = await start_server(proxy_from=["127.0.0.1/32"], allow_plaintext=True)
    c = await proxied(port_of(server), v2(cmd=0x20, fam=0x00))
    assert await c.cmd(b"USER alice\r\n") == b"+OK\r\n"
    assert await c.cmd(b"PASS wrong\r\n") == AUTH_FAILED
    assert server.context.penalty.level("127.0.0.1") == 1
    await c.aclose()


async def test_header_then_tls_passthrough(start_server: ServerStarter, tmp_path: Path) -> None:
    """HAProxy in TCP mode in front of 995: the header, then the client's ClientHello
    at once in the same segment; not one octet of it is lost."""
    ca = trustme.CA()
    chain, key = write_cert(ca, tmp_path)
    server = await start_server(
        proxy_from=["127.0.0.1/32"],
        listen_tls=[("127.0.0.1", 0)],
        tls_cert=chain,
        tls_key=key,
        hostname="pop.test",
    )
    stream = await trio.open_tcp_stream("127.0.0.1", tls_port(server))
    header = v2(addresses=tcp4("192.0.2.7", "127.0.0.1", 4000, 995))

    class Prefixed(trio.abc.Stream):
        """Sends the header glued to the first TLS record."""

        def __init__(self) -> None:
            self.first = True

        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            if self.first:
                self.first = False
                data = header + bytes(data)
            await stream.send_all(data)

        async def wait_send_all_might_not_block(self) -> None:
            await stream.wait_send_all_might_not_block()

        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            return await stream.receive_some(max_bytes)

        async def aclose(self) -> None:
            await stream.aclose()

    ctx = client_context(ca)
    tls = trio.SSLStream(Prefixed(), ctx, server_hostname="localhost")
    c = Client(tls)
    with trio.fail_after(10):
        await tls.do_handshake()
    assert (await c.line()).startswith(GREETING)
    assert await c.cmd(b"USER alice\r\n") == b"+OK\r\n"
    assert (await c.cmd(b"PASS wonderland\r\n")).startswith(b"+OK maildrop has 3 ")
    await c.aclose()
    assert isinstance(ctx, ssl.SSLContext)


def test_proxy_from_must_be_networks() -> None:
    from pypop.config import ConfigError, ServerConfig

    cfg = ServerConfig(proxy_from=["10.0.0.0/8", "::1", "192.0.2.10"])
    cfg.validate()
    with pytest.raises(ConfigError, match=r"server\.proxy_from: 'haproxy' is not a network"):
        ServerConfig(proxy_from=["haproxy"]).validate()


def test_v2_length_field_is_big_endian() -> None:
    assert v2(addresses=b"x" * 12)[14:16] == struct.pack(">H", 12)
