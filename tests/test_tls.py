"""TLS over real sockets: STLS (RFC 2595) and implicit TLS (RFC 8314) with trustme
certificates, stdlib poplib and curl; the cleartext policy; STLS command injection;
close_notify; certificate reload (Server.reload_tls and SIGHUP through the CLI)."""

from __future__ import annotations

import os
import poplib
import re
import signal
import socket
import ssl
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from pypop.backends.memory import sample_message
from pypop.config import load_config
from pypop.server import Server

from .conftest import ServerStarter
from .test_server import CURL, needs_curl, port_of

SIZE = len(sample_message("alice", 1))
MAILDROP_OK = f"+OK maildrop has 3 messages ({3 * SIZE} octets)\r\n".encode()


# ---- certificates and a raw client ----------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(ca: trustme.CA, directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A server certificate for localhost and 127.0.0.1: (chain file, key file)."""
    cert = ca.issue_cert("localhost", "127.0.0.1")
    chain, key = directory / f"{name}.pem", directory / f"{name}.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    return chain, key


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    return write_cert(ca, tmp_path)


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def client_context(ca: trustme.CA, *, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def der_of(chain: Path) -> bytes:
    """The DER of the first (leaf) certificate in a PEM chain file."""
    pem = chain.read_text()
    first = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return ssl.PEM_cert_to_DER_cert(first)


class Client:
    """A line-oriented raw POP3 client over any trio stream (plain or TLS)."""

    LIMIT = 10.0  # seconds to wait for a line (tests on the autojump clock raise it)

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = b""

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def line(self) -> bytes:
        with trio.fail_after(self.LIMIT):
            while b"\r\n" not in self.buf:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise EOFError(self.buf)
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    async def cmd(self, data: bytes) -> bytes:
        await self.send(data)
        return await self.line()

    async def multiline(self, data: bytes) -> bytes:
        """Send a command whose +OK reply is multi-line; everything up to ".\\r\\n"."""
        await self.send(data)
        out = await self.line()
        if out.startswith(b"+OK"):
            while not out.endswith(b"\r\n.\r\n"):
                out += await self.line()
        return out

    async def quiet(self, seconds: float) -> bytes:
        """Whatever arrives within ``seconds`` (b"" if nothing does)."""
        got = self.buf
        self.buf = b""
        with trio.move_on_after(seconds):
            got += await self.stream.receive_some(65536)
        return bytes(got)

    async def eof(self) -> bool:
        """True once the peer closes (after draining anything left)."""
        with trio.fail_after(self.LIMIT):
            while await self.stream.receive_some(65536):
                pass
        return True

    async def starttls(
        self, ctx: ssl.SSLContext, hostname: str = "localhost"
    ) -> trio.SSLStream[trio.abc.Stream]:
        assert not self.buf, self.buf
        tls = trio.SSLStream(self.stream, ctx, server_hostname=hostname)
        with trio.fail_after(10):
            await tls.do_handshake()
        self.stream = tls
        return tls

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def stls_client(port: int, ctx: ssl.SSLContext) -> Client:
    """Connect, read the greeting, STLS, handshake."""
    c = await Client.connect(port)
    assert (await c.line()).startswith(b"+OK")
    assert await c.cmd(b"STLS\r\n") == b"+OK Begin TLS negotiation\r\n"
    await c.starttls(ctx)
    return c


async def tls_server(start_server: ServerStarter, files: tuple[Path, Path], **kw: Any) -> Server:
    chain, key = files
    return await start_server(
        listen_tls=[("127.0.0.1", 0)], tls_cert=chain, tls_key=key, hostname="pop.test", **kw
    )


def tls_port(server: Server) -> int:
    return server.tls_addresses[0][1]


def capa_lines(reply: bytes) -> list[bytes]:
    lines = reply.split(b"\r\n")
    assert lines[0] == b"+OK Capability list follows", reply
    assert lines[-2:] == [b".", b""], reply
    return lines[1:-2]


# ---- STLS and implicit TLS with stdlib poplib --------------------------------------------


async def test_poplib_stls_then_login(
    start_server: ServerStarter, cert_files: tuple[Path, Path], ca: trustme.CA
) -> None:
    server = await tls_server(start_server, cert_files)

    def client() -> tuple[dict[str, list[str]], dict[str, list[str]], tuple[int, int], bytes]:
        pop = poplib.POP3("127.0.0.1", port_of(server), timeout=10)
        before = pop.capa()
        pop.stls(client_context(ca))  # raises unless CAPA lists STLS
        after = pop.capa()
        pop.user("alice")
        pop.pass_("wonderland")
        stat = pop.stat()
        assert isinstance(pop.sock, ssl.SSLSocket)
        version = pop.sock.version()
        quit_reply = pop.quit()
        return before, after, stat, quit_reply + (version or "").encode()

    before, after, stat, tail = await trio.to_thread.run_sync(client)
    assert "STLS" in before
    assert "STLS" not in after  # RFC 2595 §4: not once TLS is active
    assert stat == (3, 3 * SIZE)
    assert tail == b"+OK Logging outTLSv1.3"


async def test_poplib_pop3_ssl_implicit_tls(
    start_server: ServerStarter, cert_files: tuple[Path, Path], ca: trustme.CA
) -> None:
    server = await tls_server(start_server, cert_files)

    def client() -> tuple[bytes, dict[str, list[str]], list[bytes]]:
        pop = poplib.POP3_SSL("127.0.0.1", tls_port(server), context=client_context(ca), timeout=10)
        welcome = pop.getwelcome()
        caps = pop.capa()
        pop.user("bob")
        pop.pass_("builder")
        lines = pop.retr(1)[1]
        pop.quit()
        return welcome, caps, lines

    welcome, caps, lines = await trio.to_thread.run_sync(client)
    assert welcome == b"+OK POP3 server ready"  # RFC 8314 §3.3: handshake first, then this
    assert "STLS" not in caps
    assert "USER" in caps
    assert b"\r\n".join(lines) + b"\r\n" == sample_message("bob", 1)


async def test_stls_refused_when_tls_active_or_not_configured(
    start_server: ServerStarter, cert_files: tuple[Path, Path], ca: trustme.CA
) -> None:
    server = await tls_server(start_server, cert_files)
    c = await stls_client(port_of(server), client_context(ca))
    assert await c.cmd(b"STLS\r\n") == b"-ERR TLS already active\r\n"
    await c.aclose()
    plain = await start_server()
    c = await Client.connect(port_of(plain))
    await c.line()
    assert await c.cmd(b"STLS\r\n") == b"-ERR STLS not available\r\n"
    assert b"STLS" not in await c.multiline(b"CAPA\r\n")
    await c.aclose()


# ---- curl ------------------------------------------------------------------------------


async def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    assert CURL is not None
    return await trio.run_process(
        [CURL, "-sS", "--max-time", "20", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


@needs_curl
async def test_curl_ssl_reqd_uses_stls(
    start_server: ServerStarter, cert_files: tuple[Path, Path], ca_file: Path
) -> None:
    # Cleartext logins are refused here (loopback treated as remote), so curl can only
    # log in after STLS.
    server = await tls_server(start_server, cert_files, loopback_is_secure=False)
    url = f"pop3://alice:wonderland@127.0.0.1:{port_of(server)}/2"
    done = await curl("-v", "--ssl-reqd", "--cacert", str(ca_file), url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == sample_message("alice", 2)
    assert b"> STLS" in done.stderr
    # Without a trusted CA curl refuses the certificate (it verifies, RFC 8314 §4.4).
    untrusted = await curl("--ssl-reqd", url)
    assert untrusted.returncode == 60, untrusted.stderr


@needs_curl
async def test_curl_pop3s_implicit_tls(
    start_server: ServerStarter, cert_files: tuple[Path, Path], ca_file: Path
) -> None:
    server = await tls_server(start_server, cert_files, loopback_is_secure=False)
    for host in ("127.0.0.1", "localhost"):
        url = f"pop3s://bob:builder@{host}:{tls_port(server)}/1"
        done = await curl("--cacert", str(ca_file), url)
        assert done.returncode == 0, done.stderr
        assert done.stdout == sample_message("bob", 1)


@needs_curl
async def test_curl_ssl_reqd_fails_without_stls(start_server: ServerStarter) -> None:
    server = await start_server()
    done = await curl("--ssl-reqd", f"pop3://alice:wonderland@127.0.0.1:{port_of(server)}/1")
    assert done.returncode == 64, done.stderr  # CURLE_USE_SSL_FAILED
    assert done.stdout == b""


# ---- versions ----------------------------------------------------------------------------


async def test_tls_1_1_client_is_refused(
    start_server: ServerStarter, cert_files: tuple[Path, Path], ca: trustme.CA
) -> None:
    server = await tls_server(start_server, cert_files)
    assert server.ssl_context is not None
    assert server.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2

    def handshake(version: ssl.TLSVersion) -> str:
        ctx = client_context(ca)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 is deprecated
            ctx.minimum_version = ctx.maximum_version = version
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
        with (
            socket.create_connection(("127.0.0.1", tls_port(server)), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            return str(tls.version())

    assert await trio.to_thread.run_sync(handshake, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    with pytest.raises(ssl.SSLError) as info:
        await trio.to_thread.run_sync(handshake, ssl.TLSVersion.TLSv1_1)
    # The server hung up on the TLS 1.1 ClientHello (trio drops the pending alert when
    # the handshake fails, so the client sees EOF); a client-side refusal would be
    # NO_PROTOCOLS_AVAILABLE before anything was sent.
    text = str(info.value)
    assert "NO_PROTOCOLS_AVAILABLE" not in text
    assert isinstance(info.value, ssl.SSLEOFError) or "PROTOCOL_VERSION" in text, text


# ---- cleartext policy (RFC 2595 §3, RFC 8314) -----------------------------------------------


async def test_cleartext_hidden_until_stls_when_loopback_is_not_secure(
    start_server: ServerStarter, cert_files: tuple[Path, Path], ca: trustme.CA
) -> None:
    server = await tls_server(start_server, cert_files, loopback_is_secure=False)
    c = await Client.connect(port_of(server))
    await c.line()
    assert capa_lines(await c.multiline(b"CAPA\r\n")) == [
        b"CAPA",
        b"TOP",
        b"UIDL",
        b"RESP-CODES",
        b"AUTH-RESP-CODE",
        b"PIPELINING",
        b"SASL SCRAM-SHA-256",
        b"STLS",
        b"EXPIRE NEVER",
        b"UTF8",
        b"LANG",
        b"IMPLEMENTATION pypop",
    ]
    refused = (
        b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections\r\n"
    )
    assert await c.cmd(b"USER alice\r\n") == refused
    assert await c.cmd(b"PASS wonderland\r\n") == refused
    assert await c.cmd(b"AUTH PLAIN AGFsaWNlAHdvbmRlcmxhbmQ=\r\n") == refused
    assert await c.cmd(b"AUTH LOGIN\r\n") == refused
    assert await c.cmd(b"AUTH\r\n") == b"+OK\r\n"
    assert await c.line() == b"SCRAM-SHA-256\r\n"
    assert await c.line() == b".\r\n"
    assert await c.cmd(b"STLS\r\n") == b"+OK Begin TLS negotiation\r\n"
    await c.starttls(client_context(ca))  # TLS 1.3: no tls-unique, so no -PLUS
    assert capa_lines(await c.multiline(b"CAPA\r\n")) == [
        b"CAPA",
        b"TOP",
        b"UIDL",
        b"RESP-CODES",
        b"AUTH-RESP-CODE",
        b"PIPELINING",
        b"USER",
        b"SASL SCRAM-SHA-256 PLAIN LOGIN",
        b"EXPIRE NEVER",
        b"UTF8 USER",
        b"LANG",
        b"IMPLEMENTATION pypop",
    ]
    assert await c.cmd(b"AUTH PLAIN AGFsaWNlAHdvbmRlcmxhbmQ=\r\n") == MAILDROP_OK
    assert await c.cmd(b"QUIT\r\n") == b"+OK Logging out\r\n"
    await c.aclose()


async def test_loopback_is_secure_by_default(start_server: ServerStarter) -> None:
    server = await start_server()
    c = await Client.connect(port_of(server))
    await c.line()
    caps = capa_lines(await c.multiline(b"CAPA\r\n"))
    assert b"USER" in caps
    assert b"SASL SCRAM-SHA-256 PLAIN LOGIN" in caps
    assert await c.cmd(b"USER alice\r\n") == b"+OK\r\n"
    assert await c.cmd(b"PASS wonderland\r\n") == MAILDROP_OK
    await c.aclose()


async def test_allow_plaintext_overrides_the_policy(start_server: ServerStarter) -> None:
    server = await start_server(loopback_is_secure=False, allow_plaintext=True)
    c = await Client.connect(port_of(server))
    await c.line()
    assert await c.cmd(b"USER alice\r\n") == b"+OK\r\n"
    assert await c.cmd(b"PASS wonderland\r\n") == MAILDROP_OK
    await c.aclose()


# ---- STLS command injection (CVE-2011-0411 class) ------------------------------------------


async def test_stls_pipelined_plaintext_is_discarded(
    start_server: ServerStarter, cert_files: tuple[Path, Path], ca: trustme.CA
) -> None:
    server = await tls_server(start_server, cert_files)
    c = await Client.connect(port_of(server))
    assert (await c.line()).startswith(b"+OK")
    await c.send(b"STLS\r\nCAPA\r\n")  # one write: CAPA rides behind STLS in plaintext
    assert await c.line() == b"+OK Begin TLS negotiation\r\n"
    assert c.buf == b""  # and nothing was answered in plaintext either
    await c.starttls(client_context(ca))
    # The injected CAPA must not be answered inside TLS: nothing arrives ...
    assert await c.quiet(1.0) == b""
    # ... until the client sends its own command, which gets exactly one reply.
    assert await c.cmd(b"NOOP\r\n") == b"-ERR Command not valid in this state\r\n"
    reply = await c.multiline(b"CAPA\r\n")
    assert reply.count(b"Capability list follows") == 1
    assert await c.quiet(0.3) == b""
    await c.aclose()


async def test_stls_discards_pending_user(
    start_server: ServerStarter, cert_files: tuple[Path, Path], ca: trustme.CA
) -> None:
    # A USER given in plaintext must not carry over into TLS (RFC 2595 §4: discard).
    server = await tls_server(start_server, cert_files)
    c = await Client.connect(port_of(server))
    await c.line()
    assert await c.cmd(b"USER alice\r\n") == b"+OK\r\n"
    assert await c.cmd(b"STLS\r\n") == b"+OK Begin TLS negotiation\r\n"
    await c.starttls(client_context(ca))
    assert await c.cmd(b"PASS wonderland\r\n") == b"-ERR No username given\r\n"
    await c.aclose()


# ---- RFC 8314 §3.2: close_notify ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["implicit", "stls"])
async def test_sessions_end_with_close_notify(
    start_server: ServerStarter, cert_files: tuple[Path, Path], ca: trustme.CA, mode: str
) -> None:
    server = await tls_server(start_server, cert_files)

    def client() -> tuple[bytes, bytes]:
        ctx = client_context(ca)
        port = tls_port(server) if mode == "implicit" else port_of(server)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            if mode == "stls":
                f = raw.makefile("rb")
                f.readline()
                raw.sendall(b"STLS\r\n")
                assert f.readline() == b"+OK Begin TLS negotiation\r\n"
                f.close()
            # suppress_ragged_eofs=False: a TCP close without close_notify raises
            # SSLEOFError instead of reading as a clean b"".
            with ctx.wrap_socket(
                raw, server_hostname="localhost", suppress_ragged_eofs=False
            ) as tls:
                tls.sendall(b"CAPA\r\nQUIT\r\n")
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
                return data, b"clean"

    data, how = await trio.to_thread.run_sync(client)
    assert data.endswith(b".\r\n+OK Logging out\r\n")
    assert how == b"clean"


# ---- certificate reload ----------------------------------------------------------------------


async def peer_cert(port: int, ca: trustme.CA, *, stls: bool = False) -> bytes:
    """The DER certificate the server presents now (implicit TLS or STLS)."""
    ctx = client_context(ca)
    if stls:
        c = await stls_client(port, ctx)
    else:
        c = Client(await trio.open_tcp_stream("127.0.0.1", port))
        await c.starttls(ctx)
        assert (await c.line()).startswith(b"+OK")
    assert isinstance(c.stream, trio.SSLStream)
    der = c.stream.getpeercert(binary_form=True)
    assert (await c.cmd(b"QUIT\r\n")) == b"+OK Logging out\r\n"
    await c.aclose()
    assert isinstance(der, bytes)
    return der


async def test_reload_tls_serves_the_new_certificate(
    start_server: ServerStarter, ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    chain, key = write_cert(ca, tmp_path, "live")
    first = der_of(chain)
    server = await tls_server(start_server, (chain, key))
    assert await peer_cert(tls_port(server), ca) == first
    # A session open across the reload keeps its connection working.
    old = Client(await trio.open_tcp_stream("127.0.0.1", tls_port(server)))
    await old.starttls(client_context(ca))
    await old.line()

    new_chain, new_key = write_cert(ca, tmp_path, "next")
    chain.write_bytes(new_chain.read_bytes())
    key.write_bytes(new_key.read_bytes())
    second = der_of(chain)
    assert second != first
    assert server.reload_tls() is True
    assert await peer_cert(tls_port(server), ca) == second
    assert await peer_cert(port_of(server), ca, stls=True) == second
    assert await old.cmd(b"NOOP\r\n") == b"-ERR Command not valid in this state\r\n"
    await old.aclose()

    # A broken pair keeps the current one, and says why.
    good_key = key.read_bytes()
    key.write_bytes(write_cert(ca, tmp_path, "other")[1].read_bytes())  # key of another cert
    assert server.reload_tls() is False
    chain.write_text("not a certificate\n")
    key.write_bytes(good_key)
    assert server.reload_tls() is False
    chain.unlink()
    assert server.reload_tls() is False
    assert await peer_cert(tls_port(server), ca) == second
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 3
    assert all(e.startswith("TLS reload failed, keeping the current certificate") for e in errors)


async def test_reload_tls_without_files(start_server: ServerStarter) -> None:
    server = await start_server()
    assert server.reload_tls() is False


@pytest.mark.skipif(sys.platform == "win32", reason="SIGHUP")
async def test_cli_sighup_reloads_certificate(
    ca: trustme.CA, tmp_path: Path, passwd_file: Path
) -> None:
    chain, key = write_cert(ca, tmp_path, "live")
    first = der_of(chain)
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "pypop",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--listen-tls",
            "127.0.0.1:0",
            "--tls-cert",
            str(chain),
            "--tls-key",
            str(key),
            "--passwd-file",
            str(passwd_file),
        ],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert proc.stderr is not None
    log = b""

    async def wait_for(pattern: bytes) -> re.Match[bytes]:
        nonlocal log
        assert proc.stderr is not None
        with trio.fail_after(30):
            while (m := re.search(pattern, log)) is None:
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, log
                log += chunk
        return m

    try:
        m = await wait_for(
            rb"listening on 127\.0\.0\.1:(\d+) \(plain\), 127\.0\.0\.1:(\d+) \(implicit TLS\)"
        )
        plain, implicit = int(m.group(1)), int(m.group(2))
        assert await peer_cert(implicit, ca) == first

        new_chain, new_key = write_cert(ca, tmp_path, "next")
        chain.write_bytes(new_chain.read_bytes())
        key.write_bytes(new_key.read_bytes())
        proc.send_signal(signal.SIGHUP)
        await wait_for(rb"TLS certificate and key reloaded")
        assert await peer_cert(implicit, ca) == der_of(chain)
        assert await peer_cert(plain, ca, stls=True) == der_of(chain)

        chain.write_text("garbage\n")
        proc.send_signal(signal.SIGHUP)
        await wait_for(rb"TLS reload failed, keeping the current certificate")
        assert await peer_cert(implicit, ca) == der_of(new_chain)
        assert proc.returncode is None  # still serving

        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_config_docstring_example_loads(tmp_path: Path) -> None:
    """pypop/config.py's example stays a valid file, TLS and auth keys included."""
    import pypop.config

    doc = pypop.config.__doc__
    assert doc is not None
    example = doc.split("::\n", 1)[1]
    lines = [line[4:] if line.startswith("    ") else line for line in example.splitlines()]
    path = tmp_path / "pypop.toml"
    path.write_text("\n".join(lines))
    cfg = load_config(path)
    assert cfg.loopback_is_secure is True
    assert cfg.allow_plaintext is False
    assert cfg.tls_cert == Path("/etc/pypop/cert.pem")
    assert cfg.tokens_file == Path("/etc/pypop/tokens")
    assert cfg.listen_tls == [("127.0.0.1", 995)]
    off = tmp_path / "off.toml"
    off.write_text("[auth]\nloopback_is_secure = false\n")
    assert load_config(off).loopback_is_secure is False
