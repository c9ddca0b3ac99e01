"""pypop.client against a real Dovecot POP3 service started here (STLS and implicit
TLS, trustme certificates): every password method Dovecot offers, CFPOP actions on the
hard-message corpus, delete, the async client under asyncio and Trio, pypop fetch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from pypop.client import AsyncClient, Client

from .popservers import PASSWORD, Certs, PopServer, corpus, dovecot_missing, dovecot_server

pytestmark = pytest.mark.skipif(dovecot_missing() is not None, reason=str(dovecot_missing()))

CORPUS = corpus()


@pytest.fixture(scope="module")
def dovecot() -> Iterator[PopServer]:
    # Not under pytest's tmp dir: that is 0700 and Dovecot's users must read the files.
    base = Path(tempfile.mkdtemp(prefix="pypop-dovecot-"))
    os.chmod(base, 0o755)  # noqa: S103
    try:
        certs = Certs.make(base / "certs")
        srv = dovecot_server(base / "d", certs, {"alice": CORPUS, "dave": CORPUS[:6]})
        yield srv
        srv.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("auth", ["USER", "+APOP", "PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"])
@pytest.mark.parametrize("implicit", [False, True])
def test_login_methods(dovecot: PopServer, auth: str, implicit: bool) -> None:
    with Client(
        dovecot.url(tls=implicit), password=PASSWORD, auth=auth, cafile=dovecot.certs.ca_file
    ) as pop:
        assert pop.tls_active
        assert pop.mechanism == auth
        assert pop.stat() == (len(CORPUS), sum(len(m) for m in CORPUS))  # Dovecot: file octets


def test_auto_and_cleartext_refused(dovecot: PopServer) -> None:
    with Client(dovecot.url(), password=PASSWORD, cafile=dovecot.certs.ca_file) as pop:
        assert pop.mechanism == "SCRAM-SHA-256"
        assert pop.capabilities is not None
        assert "PIPELINING" in pop.capabilities


def test_cfpop_rows_on_the_corpus(dovecot: PopServer, tmp_path: Path) -> None:
    with Client(dovecot.url(), password=PASSWORD, cafile=dovecot.certs.ca_file) as pop:
        uids = pop.uidl()
        heads = pop.get_header_only()
        assert [r.subject for r in heads][7] == "Date in -0400"
        assert heads[7].date is not None
        assert heads[7].date.isoformat() == "2026-12-01T14:00:00+00:00"
        assert heads[0].subject == "Große Grüße aus München 🌳 und mehr"
        rows = pop.get_all(uids=[uids[3], uids[11], "none"], attachment_path=tmp_path)
        assert rows.unknown_uids == ["none"]
        _hostile, charsets = rows
        assert sorted(p.name for p in tmp_path.iterdir()) == ["_CON.txt", "_bashrc", "passwd"]
        assert "unknown charset 'x-no-such-charset'" in charsets.defects
        assert pop.retr(10) == CORPUS[9]


def test_delete_confirms_quit(dovecot: PopServer) -> None:
    url = dovecot.url("dave")
    with Client(url, password=PASSWORD, cafile=dovecot.certs.ca_file) as pop:
        before = pop.uidl()
        result = pop.delete(messages=[1, 2, 77])
        assert result.deleted == [1, 2]
        assert result.unknown_messages == [77]
    with Client(url, password=PASSWORD, cafile=dovecot.certs.ca_file) as pop:
        assert sorted(pop.uidl().values()) == sorted(before[n] for n in (3, 4, 5, 6))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async(dovecot: PopServer, backend: str) -> None:
    async def main() -> None:
        for implicit in (False, True):
            async with AsyncClient(
                dovecot.url(tls=implicit), password=PASSWORD, cafile=dovecot.certs.ca_file
            ) as pop:
                assert (await pop.stat())[0] == len(CORPUS)
                got = [data async for _, data in pop.retrieve(range(1, len(CORPUS) + 1))]
                assert got[9] == CORPUS[9]
                rows = await pop.get_header_only(max_rows=2)
                assert len(rows) == 2

    anyio.run(main, backend=backend)


def test_fetch_into_maildir(dovecot: PopServer, tmp_path: Path) -> None:
    env = dict(os.environ, PYPOP_PASSWORD=PASSWORD)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pypop",
            "fetch",
            dovecot.url(tls=True),
            "--cafile",
            str(dovecot.certs.ca_file),
            "--deliver",
            f"maildir:{tmp_path / 'M'}",
            "--keep",
            "--new",
            "--state",
            str(tmp_path / "st"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "M" / "new").iterdir())) == len(CORPUS)


def test_no_utf8_with_dovecot(dovecot: PopServer) -> None:
    """Dovecot 2.3 offers no UTF8 (RFC 6856): the client does not send it, and gets
    the 8-bit header message as Dovecot stores it."""
    headers = [m.replace(b"\r\n", b"\n").split(b"\n\n")[0] for m in CORPUS]
    eight_bit = next(i for i, h in enumerate(headers, 1) if not h.isascii())
    with Client(dovecot.url(), password=PASSWORD, cafile=dovecot.certs.ca_file) as pop:
        assert pop.capabilities is not None
        assert "UTF8" not in pop.capabilities
        assert not pop.utf8
        assert pop.retr(eight_bit) == CORPUS[eight_bit - 1].replace(b"\r\n", b"\n").replace(
            b"\n", b"\r\n"
        )
