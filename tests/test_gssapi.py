"""Kerberos logins (SASL GSSAPI, RFC 4752 with RFC 5034) against a real MIT KDC.

The realm lives in a temporary directory (tests/kdc.py): kdb5_util, kadmin.local,
a service key for pop/localhost and pop/127.0.0.1 in a keytab, users with
passwords, kinit into private credential caches. The clients are pypop's own
(:class:`pypop.auth.kerberos.GssapiClient` over a socket) and curl's GSS-API. A
wrong principal, a wrong authorization identity, a ticket for another service, an
expired ticket and a security layer the server did not offer all end in ``-ERR
[AUTH]``.
"""

from __future__ import annotations

import base64
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.kdc import REALM, Realm, create_realm, missing_tools

REQUIRED = os.environ.get("PYPOP_REQUIRE_KERBEROS") == "1"  # scripts/test installed it
if REQUIRED:
    import gssapi
else:
    gssapi = pytest.importorskip("gssapi", reason="the gssapi extra is not installed")

from pypop.auth import MemoryCredentialStore  # noqa: E402
from pypop.auth.kerberos import GssapiClient, user_of_principal  # noqa: E402
from pypop.backends.memory import MemoryBackend, sample_message  # noqa: E402
from pypop.config import ConfigError, ServerConfig  # noqa: E402
from pypop.server import Server  # noqa: E402
from tests.conftest import ServerStarter  # noqa: E402
from tests.test_server import port_of  # noqa: E402
from tests.test_tls import Client  # noqa: E402

if missing_tools():
    if REQUIRED:
        pytest.fail(f"PYPOP_REQUIRE_KERBEROS=1 but {missing_tools()} missing", pytrace=False)
    pytest.skip(f"MIT Kerberos tools missing: {missing_tools()}", allow_module_level=True)

AUTH_FAILED = b"-ERR [AUTH] Authentication failed\r\n"
CURL = shutil.which("curl")


@pytest.fixture(scope="module")
def realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realm]:
    r = create_realm(tmp_path_factory.mktemp("realm"))
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def krb_env(realm: Realm, monkeypatch: pytest.MonkeyPatch) -> Realm:
    """The realm's environment for this process (the server and the in-process
    client both read it), with alice's credential cache."""
    for key, value in realm.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{realm.kinit('alice')}")
    return realm


@pytest.fixture
def backend() -> MemoryBackend:
    b = MemoryBackend()
    b.deliver("alice", sample_message("alice", 1), uid="a1")
    b.deliver("bob", sample_message("bob", 1), uid="b1")
    return b


@pytest.fixture
async def kserver(
    start_server: ServerStarter, krb_env: Realm, backend: MemoryBackend, tmp_path: Path
) -> Server:
    passwd = tmp_path / "passwd"
    passwd.write_text(
        "alice:{PLAIN}x\n"
        "bob:{PLAIN}y::::::nologin reason=Kerberos account frozen\n"
        "dora:\n"  # no password: Kerberos only
    )
    return await start_server(
        backend=backend,
        passwd_file=passwd,
        hostname="localhost",
        gssapi_keytab=krb_env.keytab,
    )


async def gssapi_login(
    port: int, *, host: str = "localhost", service: str = "pop", authzid: str = ""
) -> tuple[bytes, Client, GssapiClient]:
    """AUTH GSSAPI the way RFC 5034 clients do it: no initial response (an AP-REQ
    does not fit in a 255-octet command line), the token after "+ "."""
    c = await Client.connect(port)
    await c.line()
    gss = await trio.to_thread.run_sync(
        lambda: GssapiClient(host, service=service, authzid=authzid)
    )
    token = await trio.to_thread.run_sync(gss.initial)
    assert await c.cmd(b"AUTH GSSAPI\r\n") == b"+ \r\n"
    reply = await c.cmd(base64.b64encode(token) + b"\r\n")
    rounds = 0
    while reply.startswith(b"+ ") and rounds < 5:
        rounds += 1
        answer = await trio.to_thread.run_sync(gss.step, base64.b64decode(reply[2:].strip()))
        reply = await c.cmd(base64.b64encode(answer) + b"\r\n")
    return reply, c, gss


# ---- offered only with a keytab ------------------------------------------------------


async def test_offered_only_with_a_keytab(
    kserver: Server, start_server: ServerStarter, krb_env: Realm
) -> None:
    c = await Client.connect(port_of(kserver))
    await c.line()
    capa = await c.multiline(b"CAPA\r\n")
    assert b"\r\nSASL GSSAPI SCRAM-SHA-256 PLAIN LOGIN\r\n" in capa
    await c.aclose()
    plain = await start_server()
    c = await Client.connect(port_of(plain))
    await c.line()
    assert b"GSSAPI" not in await c.multiline(b"CAPA\r\n")
    assert await c.cmd(b"AUTH GSSAPI\r\n") == b"-ERR Unsupported authentication mechanism\r\n"
    await c.aclose()


def test_bad_keytab_stops_start_up(krb_env: Realm, tmp_path: Path) -> None:
    cfg = ServerConfig(
        listen=[("127.0.0.1", 0)], hostname="localhost", gssapi_keytab=tmp_path / "none"
    )
    with pytest.raises(ConfigError, match=r"auth.gssapi_keytab .*/none: "):
        Server(cfg, backend=MemoryBackend(), store=MemoryCredentialStore({}))
    cfg.gssapi_keytab = krb_env.keytab
    cfg.gssapi_hostname = "mail.example.org"  # no pop/mail.example.org key in it
    with pytest.raises(ConfigError, match=r"auth.gssapi_keytab "):
        Server(cfg, backend=MemoryBackend(), store=MemoryCredentialStore({}))


# ---- logging in ---------------------------------------------------------------------


@pytest.mark.parametrize("authzid", ["", "alice", f"alice@{REALM}"])
async def test_login(kserver: Server, authzid: str) -> None:
    reply, c, gss = await gssapi_login(port_of(kserver), authzid=authzid)
    assert reply == b"+OK maildrop has 1 messages (416 octets)\r\n"
    # RFC 4752 §3.1: no security layer offered, so a maximum size of 0
    assert gss.server_layer == b"\x01\x00\x00\x00"
    assert await c.cmd(b"UIDL 1\r\n") == b"+OK 1 a1\r\n"
    assert await c.cmd(b"QUIT\r\n") == b"+OK Logging out\r\n"
    await c.aclose()


async def test_initial_response_works_too(kserver: Server) -> None:
    c = await Client.connect(port_of(kserver))
    await c.line()
    gss = await trio.to_thread.run_sync(lambda: GssapiClient("localhost"))
    token = await trio.to_thread.run_sync(gss.initial)
    line = b"AUTH GSSAPI " + base64.b64encode(token) + b"\r\n"
    reply = await c.cmd(line)
    if len(line) > 255:
        assert reply == b"-ERR Line too long\r\n"  # RFC 5034 §4: it must not be sent so
    else:
        assert reply.startswith(b"+ ")
    await c.aclose()


async def test_wrong_authorization_identity(kserver: Server) -> None:
    reply, c, _ = await gssapi_login(port_of(kserver), authzid="bob")
    assert reply == AUTH_FAILED
    await c.aclose()


async def test_principal_with_an_instance(
    kserver: Server, krb_env: Realm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{krb_env.kinit('alice/admin')}")
    reply, c, _ = await gssapi_login(port_of(kserver), authzid="alice")
    assert reply == AUTH_FAILED
    await c.aclose()


async def test_principal_without_an_account(
    kserver: Server, krb_env: Realm, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A valid ticket of the realm is not an account (Dovecot's userdb lookup):
    # carol has no passwd-file line; dora has one without a password.
    for name in ("carol", "dora"):
        if name not in krb_env.passwords:
            krb_env.add_user(name, f"{name}-password")
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{krb_env.kinit('carol')}")
    reply, c, _ = await gssapi_login(port_of(kserver))
    assert reply == AUTH_FAILED
    await c.aclose()
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{krb_env.kinit('dora')}")
    reply, c, _ = await gssapi_login(port_of(kserver))
    assert reply == b"+OK maildrop has 0 messages (0 octets)\r\n"
    assert await c.cmd(b"QUIT\r\n") == b"+OK Logging out\r\n"
    await c.aclose()
    c = await Client.connect(port_of(kserver))
    await c.line()
    assert await c.cmd(b"USER dora\r\n") == b"+OK\r\n"
    assert await c.cmd(b"PASS dora-password\r\n") == AUTH_FAILED  # no password logs in
    await c.aclose()


async def test_ticket_for_another_service(kserver: Server) -> None:
    # imap/localhost exists in the realm but not in the server's keytab.
    reply, c, _ = await gssapi_login(port_of(kserver), service="imap")
    assert reply == AUTH_FAILED
    await c.aclose()


async def test_expired_ticket(
    kserver: Server, krb_env: Realm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{krb_env.kinit('alice', lifetime='3s')}")
    gss = await trio.to_thread.run_sync(lambda: GssapiClient("localhost"))
    token = await trio.to_thread.run_sync(gss.initial)  # the ticket is still valid here
    await trio.sleep(3 + 2 + 1.5)  # its lifetime, the realm's 2 s clock skew, a margin
    c = await Client.connect(port_of(kserver))
    await c.line()
    assert await c.cmd(b"AUTH GSSAPI\r\n") == b"+ \r\n"
    assert await c.cmd(base64.b64encode(token) + b"\r\n") == AUTH_FAILED
    await c.aclose()


async def test_client_must_not_choose_a_layer_we_did_not_offer(kserver: Server) -> None:
    c = await Client.connect(port_of(kserver))
    await c.line()
    target = gssapi.Name("pop@localhost", gssapi.NameType.hostbased_service)
    ctx = gssapi.SecurityContext(name=target, usage="initiate", mech=gssapi.MechType.kerberos)
    token = await trio.to_thread.run_sync(ctx.step)
    assert await c.cmd(b"AUTH GSSAPI\r\n") == b"+ \r\n"
    reply = await c.cmd(base64.b64encode(token) + b"\r\n")
    while not ctx.complete:
        ctx.step(base64.b64decode(reply[2:].strip()))
        reply = await c.cmd(b"\r\n")
    if ctx.complete and reply.startswith(b"+ ") and len(reply) > 4:
        layer = ctx.unwrap(base64.b64decode(reply[2:].strip())).message
        assert layer == b"\x01\x00\x00\x00"
    integrity = ctx.wrap(struct.pack("!I", (0x02 << 24) | 65536) + b"alice", False).message
    assert await c.cmd(base64.b64encode(integrity) + b"\r\n") == AUTH_FAILED
    await c.aclose()


async def test_user_policies_apply(
    kserver: Server, krb_env: Realm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{krb_env.kinit('bob')}")
    reply, c, _ = await gssapi_login(port_of(kserver))
    assert reply == b"-ERR [SYS/PERM] Kerberos account frozen\r\n"
    await c.aclose()


async def test_any_key_in_the_keytab(
    start_server: ServerStarter, krb_env: Realm, backend: MemoryBackend
) -> None:
    only_localhost = await start_server(
        backend=backend, hostname="localhost", gssapi_keytab=krb_env.keytab
    )
    reply, c, _ = await gssapi_login(port_of(only_localhost), host="127.0.0.1")
    assert reply == AUTH_FAILED
    await c.aclose()
    any_key = await start_server(
        backend=backend, hostname="localhost", gssapi_keytab=krb_env.keytab, gssapi_hostname="*"
    )
    reply, c, _ = await gssapi_login(port_of(any_key), host="127.0.0.1")
    assert reply.startswith(b"+OK maildrop has 1 messages")
    await c.aclose()


def test_principal_mapping() -> None:
    assert user_of_principal("alice@PYPOP.TEST", "PYPOP.TEST") == "alice"
    assert user_of_principal("alice@OTHER.TEST", "PYPOP.TEST") is None
    assert user_of_principal("alice/admin@PYPOP.TEST", "PYPOP.TEST") is None
    assert user_of_principal("@PYPOP.TEST", "PYPOP.TEST") is None
    assert user_of_principal("alice", "PYPOP.TEST") is None


# ---- curl's GSS-API -------------------------------------------------------------------


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
async def test_curl_logs_in_with_kerberos(kserver: Server, krb_env: Realm) -> None:
    assert CURL is not None
    version = await trio.run_process([CURL, "-V"], capture_stdout=True)
    if b"GSS-API" not in version.stdout:
        pytest.skip("this curl has no GSS-API")
    url = f"pop3://localhost:{port_of(kserver)}/1"
    result = await trio.run_process(
        [
            CURL,
            "-s",
            "-S",
            "--max-time",
            "20",
            "--login-options",
            "AUTH=GSSAPI",
            "-u",
            f"alice@{REALM}:",
            url,
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"From: Sender 1 <sender1@example.org>")


# ---- the pypop client and pypop fetch ----------------------------------------------


async def test_pypop_client_logs_in_with_kerberos(kserver: Server) -> None:
    from pypop.client import Client

    url = f"pop://localhost:{port_of(kserver)}"

    def run(auth: str, user: str | None) -> tuple[str | None, tuple[int, int]]:
        with Client(url, user=user, auth=auth, netrc=False) as pop:
            return pop.mechanism, pop.stat()

    # auto, no password: the caller's tickets
    assert await trio.to_thread.run_sync(run, "auto", None) == ("GSSAPI", (1, 416))
    assert await trio.to_thread.run_sync(run, "GSSAPI", "alice") == ("GSSAPI", (1, 416))

    def wrong_user() -> str:
        try:
            Client(url, user="bob", auth="GSSAPI", netrc=False).connect()
        except Exception as exc:
            return f"{type(exc).__name__} {getattr(exc, 'code', None)}"
        return "logged in"

    assert await trio.to_thread.run_sync(wrong_user) == "AuthError AUTH"


async def test_pypop_fetch_with_kerberos(kserver: Server, tmp_path: Path) -> None:
    url = f"pop://alice;AUTH=GSSAPI@localhost:{port_of(kserver)}"  # RFC 2384
    result = await trio.run_process(
        [sys.executable, "-m", "pypop", "fetch", url, "--state", str(tmp_path / "state")],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert b"Sample message 1 for alice" in result.stdout


# ---- the pypop client against Dovecot with GSSAPI -----------------------------------


def test_pypop_client_against_dovecot_gssapi(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other way round: Dovecot's GSSAPI (dovecot-gssapi) and pypop's client. Dovecot
    sends "no layer" with a maximum size of 0xFFFFFF (RFC 4752 wants 0): the client
    takes it. Dovecot needs a non-empty authorization identity: the user name."""
    import tempfile

    from tests.popservers import Certs, dovecot_missing, dovecot_server

    if dovecot_missing() is not None:
        pytest.skip(str(dovecot_missing()))
    if not any(Path(d, "libmech_gssapi.so").exists() for d in _dovecot_auth_dirs()):
        if REQUIRED:
            pytest.fail("PYPOP_REQUIRE_KERBEROS=1 but dovecot-gssapi is not installed")
        pytest.skip("dovecot-gssapi is not installed")
    from pypop.client import Client

    # Dovecot's auth process runs as its own user: everything it reads is 0755/0644.
    base = Path(tempfile.mkdtemp(prefix="pypop-krb-dovecot-"))
    os.chmod(base, 0o755)  # noqa: S103
    (base / "realm").mkdir()
    realm = create_realm(base / "realm")
    try:
        for path in [base / "realm", *(base / "realm").iterdir()]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        for key, value in realm.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("KRB5CCNAME", f"FILE:{realm.kinit('alice')}")
        certs = Certs.make(base / "certs")
        mail = [sample_message("alice", 1)]
        server = dovecot_server(
            base / "d",
            certs,
            {"alice": mail},
            mechanisms="gssapi plain",
            extra_config=(
                'auth_gssapi_hostname = "$ALL"\n'
                f"auth_krb5_keytab = {realm.keytab}\n"
                f"import_environment = TZ KRB5_CONFIG={realm.env['KRB5_CONFIG']} "
                "KRB5RCACHETYPE=none\n"
            ),
        )
        try:
            with Client(server.url(), auth="GSSAPI", cafile=certs.ca_file, netrc=False) as pop:
                assert pop.mechanism == "GSSAPI"
                assert pop.tls_active
                assert pop.stat()[0] == 1
                assert pop.retr(1) == mail[0]
        finally:
            server.stop()
    finally:
        realm.stop()
        shutil.rmtree(base, ignore_errors=True)


def _dovecot_auth_dirs() -> list[str]:
    return ["/usr/lib/dovecot/modules/auth", "/usr/lib/x86_64-linux-gnu/dovecot/modules/auth"]
