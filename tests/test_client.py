"""pypop.client against pypop's own server (a real ``pypop serve`` process) over STLS
and implicit TLS with trustme certificates: every auth method, the TLS policy, typed
errors, CFPOP actions, the async client under asyncio and Trio, POP URLs, ~/.netrc."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from pypop.client import AsyncClient, Client, parse_url
from pypop.errors import (
    AuthError,
    InUseError,
    NoSuchMessageError,
    OperationTimeout,
    ProtocolError,
    TLSError,
    TLSRequiredError,
    UpdateError,
)
from pypop.wire import wire_size

from .fakeserver import FakeServer
from .popservers import PASSWORD, Certs, PopServer, corpus, long_token, pypop_server

CORPUS = corpus()
SIZES = [wire_size(m) for m in CORPUS]  # RFC 1939 §11: the final CRLF counts


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs.make(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[PopServer]:
    srv = pypop_server(
        tmp_path_factory.mktemp("pypop"), certs, {"alice": CORPUS, "bob": CORPUS[:3]}
    )
    yield srv
    srv.stop()


@pytest.fixture
def fresh(tmp_path: Path, certs: Certs) -> Iterator[PopServer]:
    """A server of one's own, for tests that delete."""
    srv = pypop_server(tmp_path / "srv", certs, {"carol": CORPUS[:5]})
    yield srv
    srv.stop()


def tls12(certs: Certs) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# ---- login ------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["USER", "+APOP", "PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"])
@pytest.mark.parametrize("implicit", [False, True])
def test_every_password_method_over_stls_and_implicit_tls(
    server: PopServer, certs: Certs, auth: str, implicit: bool
) -> None:
    with Client(
        server.url(tls=implicit), password=PASSWORD, auth=auth, cafile=certs.ca_file
    ) as pop:
        assert pop.tls_active
        assert pop.mechanism == auth
        assert pop.stat() == (len(CORPUS), sum(SIZES))


@pytest.mark.parametrize("auth", ["OAUTHBEARER", "XOAUTH2"])
def test_bearer_tokens(server: PopServer, certs: Certs, auth: str) -> None:
    with Client(server.url(), token="tok-alice-123", auth=auth, cafile=certs.ca_file) as pop:
        assert pop.mechanism == auth
        assert pop.stat()[0] == len(CORPUS)
    # A long token cannot go on the AUTH line: it goes after an empty challenge.
    with Client(server.url(), token=long_token("alice"), auth=auth, cafile=certs.ca_file) as pop:
        assert pop.stat()[0] == len(CORPUS)
    with pytest.raises(AuthError, match="token refused") as info:
        Client(server.url(), token="wrong", auth=auth, cafile=certs.ca_file).connect()
    assert info.value.code == "AUTH"


@pytest.mark.parametrize("implicit", [False, True])
def test_auto_picks_scram_plus_on_tls12_and_scram_on_tls13(
    server: PopServer, certs: Certs, implicit: bool
) -> None:
    with Client(server.url(tls=implicit), password=PASSWORD, ssl_context=tls12(certs)) as pop:
        assert pop.mechanism == "SCRAM-SHA-256-PLUS"
    with Client(server.url(tls=implicit), password=PASSWORD, cafile=certs.ca_file) as pop:
        assert pop.mechanism == "SCRAM-SHA-256"  # no tls-unique in TLS 1.3


def test_url_auth_parameter_and_wrong_password(server: PopServer, certs: Certs) -> None:
    with Client(server.url(auth="+APOP"), password=PASSWORD, cafile=certs.ca_file) as pop:
        assert pop.mechanism == "+APOP"
    with Client(server.url(auth="*"), password=PASSWORD, cafile=certs.ca_file) as pop:
        assert pop.mechanism == "SCRAM-SHA-256"
    with pytest.raises(AuthError) as info:
        Client(server.url(), password="nope", auth="PLAIN", cafile=certs.ca_file).connect()
    assert info.value.code == "AUTH"
    assert info.value.reply == "Authentication failed"
    assert "[AUTH] Authentication failed" in str(info.value)


def test_in_use_is_its_own_error(server: PopServer, certs: Certs) -> None:
    with Client(server.url("bob"), password=PASSWORD, cafile=certs.ca_file):
        with pytest.raises(InUseError) as info:
            Client(server.url("bob"), password=PASSWORD, cafile=certs.ca_file).connect()
        assert info.value.code == "IN-USE"


def test_certificates_are_verified(server: PopServer) -> None:
    with pytest.raises(TLSError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
        Client(server.url(tls=True), password=PASSWORD).connect()
    with pytest.raises(TLSError):  # STLS too
        Client(server.url(), password=PASSWORD, tls="require").connect()


def test_tls_require_refuses_cleartext_before_sending_a_secret() -> None:
    fake = FakeServer(
        {"CAPA": b"+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n", "STLS": b"-ERR no\r\n"},
        greeting=b"+OK ready <1.1@fake>\r\n",
    )
    try:
        with pytest.raises(TLSRequiredError, match="offers no TLS"):
            Client(f"pop://alice@127.0.0.1:{fake.port}", password="pw", tls="require").connect()
    finally:
        fake.close()
    assert fake.received == b"CAPA\r\n"  # not even STLS (not offered), no USER, no AUTH
    # The default for a remote host is "require"; loopback defaults to "auto".
    assert Client("pop://alice@mail.example.org", password="x").options.tls == "require"
    assert Client("pop://alice@127.0.0.1", password="x").options.tls == "auto"
    assert Client("pops://alice@mail.example.org", password="x").options.port == 995


def test_tls_auto_to_a_remote_host_never_sends_a_password_in_the_clear() -> None:
    fake = FakeServer({"CAPA": b"+OK\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"})
    try:
        client = Client(f"pop://alice@127.0.0.1:{fake.port}", password="pw", auth="PLAIN")
        client.options.tls = "auto"
        client.options.host = "127.0.0.1"
        # Pretend the host is remote: explicit plaintext choice over cleartext.
        from pypop.client import _core

        orig = _core.is_loopback
        _core.is_loopback = lambda host: False
        try:
            with pytest.raises(TLSRequiredError, match="in the clear"):
                client.connect()
        finally:
            _core.is_loopback = orig
    finally:
        fake.close()
    assert b"AUTH" not in fake.received
    assert b"pw" not in fake.received


def test_quit_without_ok_raises_update_error_and_timeouts() -> None:
    fake = FakeServer(
        {
            "CAPA": b"-ERR\r\n",
            "USER": b"+OK\r\n",
            "PASS": b"+OK\r\n",
            "DELE": b"+OK\r\n",
            "QUIT": b"-ERR [SYS/TEMP] Some deleted messages not removed\r\n",
        }
    )
    try:
        pop = Client(f"pop://u@127.0.0.1:{fake.port}", password="pw").connect()
        pop.dele(1)
        with pytest.raises(UpdateError) as info:
            pop.quit()
        assert info.value.code == "SYS/TEMP"
    finally:
        fake.close()
    mute = FakeServer({"CAPA": b"-ERR\r\n", "USER": b"+OK\r\n", "PASS": b"+OK\r\n", "QUIT": b""})
    try:
        pop = Client(f"pop://u@127.0.0.1:{mute.port}", password="pw").connect()
        with pytest.raises(UpdateError, match="no reply to QUIT"):
            pop.quit()  # the server hangs up without answering
    finally:
        mute.close()
    silent = FakeServer({"CAPA": b""})
    try:
        started = time.monotonic()
        with pytest.raises(OperationTimeout):
            Client(f"pop://u@127.0.0.1:{silent.port}", password="pw", timeout=0.5).connect()
        assert time.monotonic() - started < 5
    finally:
        silent.close()


def test_a_hostile_server_gets_protocol_error() -> None:
    fake = FakeServer({"CAPA": b"+OK\r\n" + b"X" * 70000})
    try:
        with pytest.raises(ProtocolError, match=r"without the '\.' line|over"):
            Client(f"pop://u@127.0.0.1:{fake.port}", password="pw").connect()
    finally:
        fake.close()


def test_endless_sasl_challenges_are_cut_off() -> None:
    """Each challenge is answered within the timeout, so only a bound on the rounds
    stops a server that keeps AUTH going (XOAUTH2 answers every error challenge)."""
    rounds = 0

    def challenge(line: bytes) -> bytes:
        nonlocal rounds
        rounds += 1
        return b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n" if rounds < 500 else b"-ERR [AUTH] no\r\n"

    capa = b"+OK\r\nSASL XOAUTH2\r\n.\r\n"
    fake = FakeServer({"CAPA": capa, "AUTH": challenge, "": challenge})
    try:
        client = Client(f"pop://u@127.0.0.1:{fake.port}", token="t", auth="XOAUTH2")
        with pytest.raises(ProtocolError, match="more than 16 SASL challenges"):
            client.connect()
    finally:
        fake.close()
    assert rounds == 17


# ---- poplib-style and CFPOP -------------------------------------------------------------


def test_poplib_style_commands(server: PopServer, certs: Certs) -> None:
    with Client(server.url(), password=PASSWORD, cafile=certs.ca_file) as pop:
        sizes = pop.list()
        assert sizes == dict(enumerate(SIZES, 1))
        assert pop.list(2) == {2: SIZES[1]}
        uids = pop.uidl()
        assert uids[1] == "0001"
        assert pop.uidl(3) == {3: "0003"}
        assert pop.retr(1) == CORPUS[0]
        assert pop.retr(10) == CORPUS[9]  # dot lines come back unstuffed
        assert pop.retr(9) == CORPUS[8] + b"\r\n"  # no final newline: CRLF added (§11)
        assert pop.top(8, 0) == CORPUS[7][: CORPUS[7].index(b"\r\n\r\n") + 4]
        got = dict(pop.retrieve([3, 1, 2]))
        assert got == {1: CORPUS[0], 2: CORPUS[1], 3: CORPUS[2]}
        with pytest.raises(NoSuchMessageError):
            pop.retr(99)
        pop.noop()
        pop.dele(1)
        pop.rset()


def test_get_header_only_selects_by_number_uid_and_rows(server: PopServer, certs: Certs) -> None:
    with Client(server.url(), password=PASSWORD, cafile=certs.ca_file) as pop:
        every = pop.get_header_only()
        assert [r.message_number for r in every] == list(range(1, len(CORPUS) + 1))
        assert all(r.body is None for r in every)
        some = pop.get_header_only(messages=[8, 99, 2, 0])
        assert [r.message_number for r in some] == [8, 2]
        assert some.unknown_messages == [99, 0]
        row = some[0]
        assert row.uid == "0008"
        assert row.subject == "Date in -0400"
        assert row.date is not None
        assert row.date.isoformat() == "2026-12-01T14:00:00+00:00"
        assert row.size == SIZES[7]
        by_uid = pop.get_header_only(messages=[1], uids=["0003", "nope", "0001"])
        assert [r.message_number for r in by_uid] == [3, 1]  # uids win
        assert by_uid.unknown_uids == ["nope"]
        window = pop.get_header_only(start_row=3, max_rows=2)
        assert [r.message_number for r in window] == [3, 4]


def test_get_all_saves_attachments_safely(server: PopServer, certs: Certs, tmp_path: Path) -> None:
    (tmp_path / "passwd").symlink_to("/etc/passwd")  # planted: must not be written through
    with Client(server.url(), password=PASSWORD, cafile=certs.ca_file) as pop:
        rows = pop.get_all(messages=[3, 4], attachment_path=tmp_path)
        hostile, nested = rows
        assert hostile.attachments == ["../../etc/passwd", "CON.txt", ".bashrc"]
        assert [Path(f).name for f in hostile.attachment_files] == [
            "passwd",
            "_CON.txt",
            "_bashrc",
        ]
        assert not (tmp_path / "passwd").is_symlink()
        assert (tmp_path / "passwd").read_bytes() == b"root:x:0:0:owned"
        assert nested.text_body == "Plain text version."  # the CRLF before a boundary is its own
        assert nested.html_body is not None
        assert "cid:logo@example.org" in nested.html_body
        assert nested.cids == {"logo@example.org": str(tmp_path / "logo.png")}
        assert "winmail.dat" in nested.attachments
        again = pop.get_all(messages=[3], attachment_path=tmp_path, generate_unique_filenames=True)
        assert [Path(f).name for f in again[0].attachment_files] == [
            "passwd_1",
            "_CON_1.txt",
            "_bashrc_1",
        ]
        assert again[0].attachments_string == "../../etc/passwd\tCON.txt\t.bashrc"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_one_message_the_mail_parser_raises_on_does_not_cost_the_others(
    tmp_path: Path, certs: Certs
) -> None:
    """Anyone can mail headers that make the stdlib parser raise; get_all and
    get_header_only still return a row for every message, hostile ones included."""
    from .test_client_rows import BARE_STAR_PARAM, NUL_CHARSET

    srv = pypop_server(tmp_path / "srv", certs, {"dave": [NUL_CHARSET, CORPUS[0], BARE_STAR_PARAM]})
    try:
        with Client(srv.url("dave"), password=PASSWORD, cafile=certs.ca_file) as pop:
            rows = pop.get_all(attachment_path=tmp_path / "att")
            assert [r.message_number for r in rows] == [1, 2, 3]
            assert [r.subject for r in rows][::2] == ["invoice", "invoice"]
            assert rows[0].body == "Pay now\n"
            assert rows[2].attachments == ["attachment-2.dat"]
            assert (tmp_path / "att" / "attachment-2.dat").read_bytes() == b"%PDF-"
            heads = pop.get_header_only()
            assert [r.subject for r in heads] == [r.subject for r in rows]
    finally:
        srv.stop()


def test_delete_confirms_quit(fresh: PopServer, certs: Certs) -> None:
    url = fresh.url("carol")
    with Client(url, password=PASSWORD, cafile=certs.ca_file) as pop:
        result = pop.delete(uids=["0002", "0004", "gone"])
        assert result.deleted == [2, 4]
        assert result.unknown_uids == ["gone"]
    with Client(url, password=PASSWORD, cafile=certs.ca_file) as pop:
        assert sorted(pop.uidl().values()) == ["0001", "0003", "0005"]
        pop.dele(1)

    # Leaving a block by an exception closes without QUIT: nothing is deleted.
    def dele_then_fail() -> None:
        with Client(url, password=PASSWORD, cafile=certs.ca_file) as pop:
            pop.dele(1)
            raise RuntimeError("after DELE")

    with pytest.raises(RuntimeError, match="after DELE"):
        dele_then_fail()
    with Client(url, password=PASSWORD, cafile=certs.ca_file) as pop:
        assert sorted(pop.uidl().values()) == ["0003", "0005"]


def test_headers_only_falls_back_to_retr_without_top() -> None:
    msg = b"Subject: hi\r\nFrom: a@b\r\n\r\nbody\r\n"
    fake = FakeServer(
        {
            "CAPA": b"+OK\r\nUSER\r\nUIDL\r\n.\r\n",
            "USER": b"+OK\r\n",
            "PASS": b"+OK\r\n",
            "LIST": b"+OK\r\n1 30\r\n.\r\n",
            "UIDL": b"+OK\r\n1 u1\r\n.\r\n",
            "RETR": b"+OK\r\n" + msg + b".\r\n",
            "QUIT": b"+OK\r\n",
        }
    )
    try:
        with Client(f"pop://u@127.0.0.1:{fake.port}", password="pw") as pop:
            [row] = pop.get_header_only()
            assert row.subject == "hi"
            assert row.uid == "u1"
            assert row.body is None
    finally:
        fake.close()
    assert b"TOP" not in fake.received
    assert b"RETR 1\r\n" in fake.received


# ---- async: asyncio and trio ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_client_under_both_event_loops(server: PopServer, certs: Certs, backend: str) -> None:
    async def main() -> None:
        for implicit in (False, True):
            async with AsyncClient(
                server.url(tls=implicit), password=PASSWORD, ssl_context=tls12(certs)
            ) as pop:
                assert pop.tls_active
                assert pop.mechanism == "SCRAM-SHA-256-PLUS"
                assert await pop.stat() == (len(CORPUS), sum(SIZES))
                assert await pop.retr(10) == CORPUS[9]
                rows = await pop.get_header_only(uids=["0008", "x"])
                assert [r.subject for r in rows] == ["Date in -0400"]
                assert rows.unknown_uids == ["x"]
                got = [n async for n, _ in pop.retrieve([1, 2, 3])]
                assert got == [1, 2, 3]
        with pytest.raises(AuthError):
            await AsyncClient(server.url(), password="bad", cafile=certs.ca_file).connect()

    anyio.run(main, backend=backend)


# ---- URLs, netrc, no server hash libraries ------------------------------------------------


def test_pop_urls() -> None:
    u = parse_url("pop://j%40example.com;AUTH=%2BAPOP@mail.example.org:1110")
    assert (u.user, u.auth, u.host, u.port, u.tls) == (
        "j@example.com",
        "+APOP",
        "mail.example.org",
        1110,
        None,
    )
    assert parse_url("pop://x;AUTH=*@h").auth == "auto"
    assert parse_url("pop://x;auth=scram-sha-256@h").auth == "SCRAM-SHA-256"
    s = parse_url("pops://[::1]")
    assert (s.host, s.port, s.tls, s.user) == ("::1", 995, "implicit", None)
    assert parse_url("pop://a:p%3Aw@h").password == "p:w"
    for bad in ("http://h", "pop://h/INBOX", "pop://u;X=1@h", "pop://h:99999", "pop://"):
        with pytest.raises(ValueError, match=r"."):
            parse_url(bad)


def test_netrc(server: PopServer, certs: Certs, tmp_path: Path) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text('machine 127.0.0.1\n  login alice\n  password "' + PASSWORD + '"\n')
    os.chmod(netrc, 0o600)
    with Client(f"pop://127.0.0.1:{server.port}", netrc=netrc, cafile=certs.ca_file) as pop:
        assert pop.options.user == "alice"
        assert pop.stat()[0] == len(CORPUS)


def test_client_does_not_import_the_server_hash_libraries(server: PopServer, certs: Certs) -> None:
    code = f"""
import sys
for name in ("bcrypt", "argon2", "passlib"):
    sys.modules[name] = None  # any import of them now fails
from pypop.client import Client
with Client({server.url()!r}, password={PASSWORD!r}, cafile={str(certs.ca_file)!r}) as pop:
    print(pop.mechanism, pop.stat()[0])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["SCRAM-SHA-256", str(len(CORPUS))]


def test_refused_connection_is_a_network_error() -> None:
    from pypop.errors import NetworkError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(NetworkError, match="cannot connect"):
        Client(f"pop://u@127.0.0.1:{port}", password="x").connect()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_timeout_and_typed_errors(backend: str) -> None:
    silent = FakeServer({"CAPA": b""})
    hostile = FakeServer({"CAPA": b"+OK caps\n"})

    async def main() -> None:
        with pytest.raises(OperationTimeout):
            await AsyncClient(
                f"pop://u@127.0.0.1:{silent.port}", password="pw", timeout=0.5
            ).connect()
        with pytest.raises(ProtocolError, match="bare LF"):
            await AsyncClient(f"pop://u@127.0.0.1:{hostile.port}", password="pw").connect()

    try:
        anyio.run(main, backend=backend)
    finally:
        silent.close()
        hostile.close()
