"""SASL (RFC 5034), APOP and USER/PASS over real sockets: curl for every mechanism it
speaks, a SCRAM-SHA-256(-PLUS) client written here, raw exchanges for the XOAUTH2
two-step form, bare AUTH, cancellation, and [AUTH] on every credential failure."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme

from pypop.backends.memory import sample_message
from pypop.server import Server

from .conftest import ServerStarter
from .test_server import CURL, needs_curl, port_of
from .test_tls import MAILDROP_OK, SIZE, Client, client_context, stls_client, tls_server, write_cert

TOKEN = "ya29.alice-token-0123456789"
AUTH_FAILED = b"-ERR [AUTH] Authentication failed\r\n"
ALL = [
    "SCRAM-SHA-256-PLUS",
    "SCRAM-SHA-256",
    "PLAIN",
    "LOGIN",
    "CRAM-MD5",
    "OAUTHBEARER",
    "XOAUTH2",
]


def b64(data: bytes | str) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# user:token\nalice:{TOKEN}\n")
    return path


@pytest.fixture
async def server(start_server: ServerStarter, tokens_file: Path) -> Server:
    """Every mechanism enabled, APOP on, bearer tokens from a file."""
    return await start_server(
        mechanisms=ALL, tokens_file=tokens_file, apop=True, hostname="pop.test"
    )


async def greeted(port: int) -> tuple[Client, bytes]:
    c = await Client.connect(port)
    greeting = await c.line()
    assert greeting.startswith(b"+OK POP3 server ready")
    return c, greeting


# ---- curl, one mechanism at a time ---------------------------------------------------------


async def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    assert CURL is not None
    return await trio.run_process(
        [CURL, "-v", "-sS", "--max-time", "20", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


@needs_curl
@pytest.mark.parametrize(
    ("options", "sent"),
    [
        ("AUTH=PLAIN", b"> AUTH PLAIN"),
        ("AUTH=LOGIN", b"> AUTH LOGIN"),
        ("AUTH=CRAM-MD5", b"> AUTH CRAM-MD5"),
        ("AUTH=+APOP", b"> APOP alice "),
        ("", b"> AUTH SCRAM-SHA-256"),  # curl has no SCRAM: it must pick something else
    ],
)
async def test_curl_password_mechanisms(server: Server, options: str, sent: bytes) -> None:
    url = f"pop3://alice:wonderland@127.0.0.1:{port_of(server)}/3"
    args = ["--login-options", options] if options else []
    done = await curl(*args, url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == sample_message("alice", 3)
    if options:
        assert sent in done.stderr
        assert done.stderr.count(b"> AUTH") + done.stderr.count(b"> APOP") == 1
    else:
        assert sent not in done.stderr
    # Wrong password: refused (curl exit 67, "login denied"), with [AUTH].
    bad = await curl(*args, url.replace("wonderland", "looking-glass"))
    assert bad.returncode == 67, bad.stderr
    assert b"< -ERR [AUTH] Authentication failed" in bad.stderr


@needs_curl
@pytest.mark.parametrize("mech", ["XOAUTH2", "OAUTHBEARER"])
@pytest.mark.parametrize("sasl_ir", [False, True])
async def test_curl_bearer_mechanisms(
    start_server: ServerStarter, tokens_file: Path, mech: str, sasl_ir: bool
) -> None:
    # curl 7.x takes OAUTHBEARER whenever the server offers it, whatever AUTH= says
    # (curl/curl#10259), so each server here offers only the mechanism under test.
    server = await start_server(mechanisms=[mech], tokens_file=tokens_file)
    url = f"pop3://alice@127.0.0.1:{port_of(server)}/1"
    ir = ["--sasl-ir"] if sasl_ir else []
    done = await curl(*ir, "--login-options", f"AUTH={mech}", "--oauth2-bearer", TOKEN, url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == sample_message("alice", 1)
    sent = rb"> AUTH " + mech.encode()
    if sasl_ir:
        assert re.search(sent + rb" [A-Za-z0-9+/]{20,}=*\r?\n", done.stderr), done.stderr
    else:  # the two-step form (what Microsoft 365 clients send for XOAUTH2)
        assert re.search(sent + rb"\r?\n< \+ \r?\n> [A-Za-z0-9+/]{20,}", done.stderr), done.stderr
    bad = await curl(*ir, "--login-options", f"AUTH={mech}", "--oauth2-bearer", "nope", url)
    assert bad.returncode == 67, bad.stderr
    error = {"XOAUTH2": '{"status":"401","schemes":"bearer"}'}.get(
        mech, '{"status":"invalid_token","schemes":"bearer"}'
    )
    assert b"< + " + b64(error) + b"\r\n" in bad.stderr
    if mech == "OAUTHBEARER":  # RFC 7628 §3.2.3: the client answers 0x01, then -ERR [AUTH]
        assert b"> AQ==\r\n< -ERR [AUTH] Authentication failed" in bad.stderr
    # (curl hangs up on XOAUTH2's error challenge instead of sending the empty line;
    # the raw tests below cover the -ERR [AUTH] that follows it.)


# ---- SCRAM-SHA-256 (RFC 5802 / RFC 7677), a client written here ------------------------------


@dataclass
class Scram:
    """A SCRAM-SHA-256 client: ``first()``, then ``final(server_first)``."""

    user: str
    password: str
    gs2: str = "n,,"
    binding: bytes = b""
    nonce: str = ""

    def __post_init__(self) -> None:
        self.nonce = self.nonce or secrets.token_urlsafe(18)
        self.bare = f"n={self.user},r={self.nonce}"
        self.server_signature = b""

    def first(self) -> bytes:
        return (self.gs2 + self.bare).encode()

    def final(self, server_first: bytes, *, proof_ok: bool = True) -> bytes:
        text = server_first.decode()
        attrs = dict(kv.split("=", 1) for kv in text.split(","))
        assert attrs["r"].startswith(self.nonce)
        assert int(attrs["i"]) >= 4096  # RFC 5802 §5.1 / RFC 7677 §4: SHOULD be at least 4096
        salted = hashlib.pbkdf2_hmac(
            "sha256", self.password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
        )
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        cbind = base64.b64encode(self.gs2.encode() + self.binding).decode()
        without_proof = f"c={cbind},r={attrs['r']}"
        auth_message = f"{self.bare},{text},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        if not proof_ok:
            proof = bytes(32)
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self.server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


def challenge(line: bytes) -> bytes:
    assert line.startswith(b"+ "), line
    assert line.endswith(b"\r\n")
    return base64.b64decode(line[2:-2], validate=True)


async def scram_login(c: Client, client: Scram, mech: bytes = b"SCRAM-SHA-256") -> bytes:
    """Run the exchange; returns the server's reply to the client's empty last line."""
    server_first = challenge(await c.cmd(b"AUTH " + mech + b" " + b64(client.first()) + b"\r\n"))
    reply = await c.cmd(b64(client.final(server_first)) + b"\r\n")
    # RFC 5034 §4: no additional data with +OK, so the server signature comes as a
    # last challenge, answered with an empty line (RFC 5034 §6, DIGEST-MD5 example).
    assert challenge(reply) == b"v=" + base64.b64encode(client.server_signature)
    return await c.cmd(b"\r\n")


async def test_scram_sha256_end_to_end(server: Server) -> None:
    c, _ = await greeted(port_of(server))
    assert await scram_login(c, Scram("alice", "wonderland")) == MAILDROP_OK
    assert await c.cmd(b"STAT\r\n") == f"+OK 3 {3 * SIZE}\r\n".encode()
    await c.aclose()


async def test_scram_without_initial_response(server: Server) -> None:
    c, _ = await greeted(port_of(server))
    client = Scram("bob", "builder")
    assert await c.cmd(b"AUTH SCRAM-SHA-256\r\n") == b"+ \r\n"  # RFC 5034 §4: empty challenge
    server_first = challenge(await c.cmd(b64(client.first()) + b"\r\n"))
    v = challenge(await c.cmd(b64(client.final(server_first)) + b"\r\n"))
    assert v == b"v=" + base64.b64encode(client.server_signature)
    assert (await c.cmd(b"\r\n")).startswith(b"+OK maildrop has 1 messages")
    await c.aclose()


async def test_scram_final_line_must_be_empty(server: Server) -> None:
    c, _ = await greeted(port_of(server))
    client = Scram("alice", "wonderland")
    server_first = challenge(await c.cmd(b"AUTH SCRAM-SHA-256 " + b64(client.first()) + b"\r\n"))
    challenge(await c.cmd(b64(client.final(server_first)) + b"\r\n"))
    assert await c.cmd(b64("v=whatever") + b"\r\n") == AUTH_FAILED
    # A client that cannot verify v= cancels: -ERR, still AUTHORIZATION.
    client = Scram("alice", "wonderland")
    server_first = challenge(await c.cmd(b"AUTH SCRAM-SHA-256 " + b64(client.first()) + b"\r\n"))
    challenge(await c.cmd(b64(client.final(server_first)) + b"\r\n"))
    assert await c.cmd(b"*\r\n") == b"-ERR Authentication cancelled\r\n"
    assert await c.cmd(b"STAT\r\n") == b"-ERR Command not valid in this state\r\n"
    await c.aclose()


async def test_scram_wrong_password_and_unknown_user(server: Server) -> None:
    c, _ = await greeted(port_of(server))
    for user, password in (("alice", "nope"), ("nobody", "nope")):
        client = Scram(user, password)
        first = challenge(await c.cmd(b"AUTH SCRAM-SHA-256 " + b64(client.first()) + b"\r\n"))
        assert first.startswith(b"r=" + client.nonce.encode())  # unknown users get a salt too
        assert await c.cmd(b64(client.final(first)) + b"\r\n") == AUTH_FAILED
    await c.aclose()


async def test_scram_plus_over_tls12_tls_unique(
    start_server: ServerStarter, ca: trustme.CA, tmp_path: Path
) -> None:
    srv = await tls_server(start_server, write_cert(ca, tmp_path), mechanisms=ALL)
    ctx = client_context(ca, max_version=ssl.TLSVersion.TLSv1_2)
    c = await stls_client(port_of(srv), ctx)
    assert isinstance(c.stream, trio.SSLStream)
    assert c.stream.version() == "TLSv1.2"
    caps = await c.multiline(b"CAPA\r\n")
    assert b"SASL SCRAM-SHA-256-PLUS SCRAM-SHA-256 PLAIN LOGIN CRAM-MD5\r\n" in caps
    binding = c.stream.get_channel_binding("tls-unique")
    assert binding
    # "y": the client could bind but believes we cannot: a downgrade, refused (RFC 5802 §6).
    assert await scram_try(c, Scram("alice", "wonderland", gs2="y,,")) == AUTH_FAILED
    # A wrong binding fails too.
    bad = Scram("alice", "wonderland", gs2="p=tls-unique,,", binding=bytes(len(binding)))
    assert await scram_try(c, bad, b"SCRAM-SHA-256-PLUS") == AUTH_FAILED
    good = Scram("alice", "wonderland", gs2="p=tls-unique,,", binding=binding)
    assert await scram_login(c, good, b"SCRAM-SHA-256-PLUS") == MAILDROP_OK
    await c.aclose()


async def scram_try(c: Client, client: Scram, mech: bytes = b"SCRAM-SHA-256") -> bytes:
    reply = await c.cmd(b"AUTH " + mech + b" " + b64(client.first()) + b"\r\n")
    if not reply.startswith(b"+ "):
        return reply
    return await c.cmd(b64(client.final(challenge(reply))) + b"\r\n")


async def test_no_scram_plus_over_tls13(
    start_server: ServerStarter, ca: trustme.CA, tmp_path: Path
) -> None:
    srv = await tls_server(start_server, write_cert(ca, tmp_path), mechanisms=ALL)
    c = await stls_client(port_of(srv), client_context(ca))
    assert isinstance(c.stream, trio.SSLStream)
    assert c.stream.version() == "TLSv1.3"
    caps = await c.multiline(b"CAPA\r\n")
    assert b"SASL SCRAM-SHA-256 PLAIN LOGIN CRAM-MD5\r\n" in caps
    assert await c.cmd(b"AUTH SCRAM-SHA-256-PLUS\r\n") == (
        b"-ERR Unsupported authentication mechanism\r\n"
    )
    # A -PLUS capable client that sees no -PLUS says "y", which is fine here.
    assert await scram_login(c, Scram("alice", "wonderland", gs2="y,,")) == MAILDROP_OK
    await c.aclose()


async def test_scram_y_flag_over_tls12_when_plus_is_not_configured(
    start_server: ServerStarter, ca: trustme.CA, tmp_path: Path
) -> None:
    # TLS 1.2 has a channel binding, but the operator did not enable -PLUS: no -PLUS
    # was offered, so "y" (RFC 5802 §6: "thinks the server does not" bind) is the
    # truth, not a downgrade, and must not fail a right password.
    mechs = ["SCRAM-SHA-256", "PLAIN"]
    srv = await tls_server(start_server, write_cert(ca, tmp_path), mechanisms=mechs)
    ctx = client_context(ca, max_version=ssl.TLSVersion.TLSv1_2)
    c = await stls_client(port_of(srv), ctx)
    assert isinstance(c.stream, trio.SSLStream)
    assert c.stream.version() == "TLSv1.2"
    caps = await c.multiline(b"CAPA\r\n")
    assert b"SASL SCRAM-SHA-256 PLAIN\r\n" in caps
    assert await scram_login(c, Scram("alice", "wonderland", gs2="y,,")) == MAILDROP_OK
    await c.aclose()


# ---- raw exchanges ---------------------------------------------------------------------------


async def test_bare_auth_lists_usable_mechanisms(server: Server) -> None:
    c, _ = await greeted(port_of(server))
    assert await c.multiline(b"AUTH\r\n") == (
        b"+OK\r\nSCRAM-SHA-256\r\nPLAIN\r\nLOGIN\r\nCRAM-MD5\r\nOAUTHBEARER\r\nXOAUTH2\r\n.\r\n"
    )
    caps = await c.multiline(b"CAPA\r\n")
    assert b"SASL SCRAM-SHA-256 PLAIN LOGIN CRAM-MD5 OAUTHBEARER XOAUTH2\r\n" in caps
    await c.aclose()


async def test_xoauth2_two_step_microsoft_style(server: Server) -> None:
    c, _ = await greeted(port_of(server))
    assert await c.cmd(b"AUTH XOAUTH2\r\n") == b"+ \r\n"
    message = f"user=alice\x01auth=Bearer {TOKEN}\x01\x01"
    assert await c.cmd(b64(message) + b"\r\n") == MAILDROP_OK
    await c.aclose()


async def test_xoauth2_and_oauthbearer_error_challenges(server: Server) -> None:
    c, _ = await greeted(port_of(server))
    bad = b64("user=alice\x01auth=Bearer wrong\x01\x01")
    err = challenge(await c.cmd(b"AUTH XOAUTH2 " + bad + b"\r\n"))
    assert json.loads(err) == {"status": "401", "schemes": "bearer"}
    assert await c.cmd(b"\r\n") == AUTH_FAILED  # the client's empty answer, then -ERR
    # Two-step form, wrong token.
    assert await c.cmd(b"AUTH XOAUTH2\r\n") == b"+ \r\n"
    challenge(await c.cmd(bad + b"\r\n"))
    assert await c.cmd(b"\r\n") == AUTH_FAILED
    # RFC 7628 §3.2.2: JSON error, the client sends 0x01, then -ERR.
    bearer = b64(f"n,a=alice,\x01host=127.0.0.1\x01port={port_of(server)}\x01auth=Bearer x\x01\x01")
    err = challenge(await c.cmd(b"AUTH OAUTHBEARER " + bearer + b"\r\n"))
    assert json.loads(err) == {"status": "invalid_token", "schemes": "bearer"}
    assert await c.cmd(b64(b"\x01") + b"\r\n") == AUTH_FAILED
    good = b64(f"n,a=alice,\x01auth=Bearer {TOKEN}\x01\x01")
    assert await c.cmd(b"AUTH OAUTHBEARER " + good + b"\r\n") == MAILDROP_OK
    await c.aclose()


async def test_cancel_and_empty_initial_response(server: Server) -> None:
    c, _ = await greeted(port_of(server))
    assert await c.cmd(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert await c.cmd(b"*\r\n") == b"-ERR Authentication cancelled\r\n"  # RFC 5034 §4: MUST -ERR
    assert await c.cmd(b"AUTH PLAIN =\r\n") == AUTH_FAILED  # "=" is an empty response
    assert await c.cmd(b"AUTH LOGIN\r\n") == b"+ " + b64("Username:") + b"\r\n"
    assert await c.cmd(b64("alice") + b"\r\n") == b"+ " + b64("Password:") + b"\r\n"
    assert await c.cmd(b64("wonderland") + b"\r\n") == MAILDROP_OK
    assert await c.cmd(b"AUTH PLAIN\r\n") == b"-ERR Command not valid in this state\r\n"
    await c.aclose()


async def test_every_credential_failure_carries_auth_code(server: Server) -> None:
    """USER/PASS, APOP and each mechanism, for a wrong password and an unknown user:
    the same -ERR [AUTH] line (RFC 3206 AUTH-RESP-CODE), and never a hint which."""
    port = port_of(server)
    for user in ("alice", "nobody"):
        c, greeting = await greeted(port)
        stamp = re.search(rb"<[^>]+>", greeting)
        assert stamp is not None
        assert await c.cmd(f"USER {user}\r\n".encode()) == b"+OK\r\n"
        assert await c.cmd(b"PASS wrong\r\n") == AUTH_FAILED
        digest = hashlib.md5(stamp.group(0) + b"wrong").hexdigest()  # noqa: S324 (APOP)
        assert await c.cmd(f"APOP {user} {digest}\r\n".encode()) == AUTH_FAILED
        assert await c.cmd(b"AUTH PLAIN " + b64(f"\0{user}\0wrong") + b"\r\n") == AUTH_FAILED
        await c.aclose()

        c, _ = await greeted(port)
        assert (
            await c.cmd(b"AUTH LOGIN " + b64(user) + b"\r\n") == b"+ " + b64("Password:") + b"\r\n"
        )
        assert await c.cmd(b64("wrong") + b"\r\n") == AUTH_FAILED
        cram = challenge(await c.cmd(b"AUTH CRAM-MD5\r\n"))
        assert re.fullmatch(rb"<\d+\.\d+\.[0-9a-f]+@pop\.test>", cram)
        mac = hmac.new(b"wrong", cram, "md5").hexdigest()
        assert await c.cmd(b64(f"{user} {mac}") + b"\r\n") == AUTH_FAILED
        assert await scram_try(c, Scram(user, "wrong")) == AUTH_FAILED
        await c.aclose()

        c, _ = await greeted(port)
        xo = b64(f"user={user}\x01auth=Bearer wrong\x01\x01")
        challenge(await c.cmd(b"AUTH XOAUTH2 " + xo + b"\r\n"))
        assert await c.cmd(b"\r\n") == AUTH_FAILED
        ob = b64(f"n,a={user},\x01auth=Bearer wrong\x01\x01")
        challenge(await c.cmd(b"AUTH OAUTHBEARER " + ob + b"\r\n"))
        assert await c.cmd(b64(b"\x01") + b"\r\n") == AUTH_FAILED
        # Malformed messages are credential failures too.
        assert await c.cmd(b"AUTH PLAIN " + b64("no-nuls") + b"\r\n") == AUTH_FAILED
        await c.aclose()


async def test_right_credentials_each_way(server: Server) -> None:
    """The positive half of the test above, over raw sockets: each method logs in."""
    port = port_of(server)
    c, greeting = await greeted(port)
    stamp = re.search(rb"<[^>]+>", greeting)
    assert stamp is not None
    digest = hashlib.md5(stamp.group(0) + b"wonderland").hexdigest()  # noqa: S324 (APOP)
    assert await c.cmd(f"APOP alice {digest}\r\n".encode()) == MAILDROP_OK
    assert await c.cmd(b"QUIT\r\n") == b"+OK Logging out\r\n"
    await c.aclose()

    c, _ = await greeted(port)
    cram = challenge(await c.cmd(b"AUTH CRAM-MD5\r\n"))
    mac = hmac.new(b"wonderland", cram, "md5").hexdigest()
    assert await c.cmd(b64(f"alice {mac}") + b"\r\n") == MAILDROP_OK
    assert await c.cmd(b"QUIT\r\n") == b"+OK Logging out\r\n"
    await c.aclose()


# ---- mechanisms the store can serve (issue 9, admin experience 3) -------------------------


def pypop_passwd(scheme: str, password: str) -> str:
    """``pypop passwd -s SCHEME -p PASSWORD`` as a user runs it (a subprocess)."""
    result = subprocess.run(
        [sys.executable, "-m", "pypop", "passwd", "-s", scheme, "-p", password],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


def sasl_capability(capa: bytes) -> list[bytes]:
    line = next(ln for ln in capa.split(b"\r\n") if ln.startswith(b"SASL "))
    return line.split()[1:]


async def test_scram_is_not_offered_by_a_store_that_cannot_serve_it(
    start_server: ServerStarter, tmp_path: Path
) -> None:
    """A passwd-file of SHA512-CRYPT entries cannot do SCRAM (or CRAM-MD5) for anyone:
    they are not advertised, and asking for them is no failed login."""
    passwd = tmp_path / "passwd"
    entry = pypop_passwd("SHA512-CRYPT", "a long secret")
    passwd.write_text(f"alice:{entry}\nbob:{entry}\n")
    srv = await start_server(passwd_file=passwd, mechanisms=ALL, max_auth_failures=1)
    c, _ = await greeted(port_of(srv))
    assert sasl_capability(await c.multiline(b"CAPA\r\n")) == [b"PLAIN", b"LOGIN"]
    for mech in (b"SCRAM-SHA-256", b"CRAM-MD5"):
        unsupported = b"-ERR Unsupported authentication mechanism\r\n"
        assert await c.cmd(b"AUTH " + mech + b"\r\n") == unsupported
    assert srv.context.penalty.level("127.0.0.1") == 0
    assert await c.cmd(b"AUTH PLAIN " + b64("\0alice\0a long secret") + b"\r\n") == MAILDROP_OK
    await c.aclose()


async def test_pypop_passwd_scram_entry_logs_in_with_scram(
    start_server: ServerStarter, tmp_path: Path
) -> None:
    """The README's `pypop passwd -s SCRAM-SHA-256`, end to end: the entry makes the
    server offer SCRAM-SHA-256, and a SCRAM client logs in with it."""
    entry = pypop_passwd("SCRAM-SHA-256", "a long secret")
    assert entry.startswith("{SCRAM-SHA-256}4096,")
    passwd = tmp_path / "passwd"
    passwd.write_text(f"alice:{entry}\n")
    srv = await start_server(passwd_file=passwd)
    c, _ = await greeted(port_of(srv))
    assert sasl_capability(await c.multiline(b"CAPA\r\n"))[0] == b"SCRAM-SHA-256"
    assert await scram_login(c, Scram("alice", "a long secret")) == MAILDROP_OK
    await c.aclose()
    c, _ = await greeted(port_of(srv))
    assert await scram_try(c, Scram("alice", "wrong")) == AUTH_FAILED
    await c.aclose()
