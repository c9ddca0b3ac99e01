"""The password-hash libraries (bcrypt, argon2-cffi, libpass) are the optional
``pypop3[hashes]`` extra: nothing imports them until an entry needs them, every other
scheme works without them, and an entry that needs one names the extra to install.

A missing library is simulated by fault injection: ``None`` in ``sys.modules`` makes
every ``import`` of that module fail with ImportError, as when it is not installed."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pypop.auth import schemes
from pypop.auth.schemes import MissingHashLibraryError, hash_password, verify_scheme

from .conftest import ServerStarter
from .test_sasl_e2e import Scram, challenge, scram_login
from .test_server import port_of
from .test_tls import Client

HASH_MODULES = ("bcrypt", "argon2", "argon2.exceptions", "passlib", "passlib.hash")
NEEDS = {
    "BLF-CRYPT": "bcrypt",
    "CRYPT": "bcrypt",  # new CRYPT hashes are bcrypt ($2y$), as doveadm's
    "SHA256-CRYPT": "libpass",
    "SHA512-CRYPT": "libpass",
    "MD5-CRYPT": "libpass",
    "ARGON2ID": "argon2-cffi",
    "ARGON2I": "argon2-cffi",
}
LIBRARY_FREE = ["PLAIN", "CRAM-MD5", "SSHA512", "SCRAM-SHA-256"]
PASSWORD = "correct horse battery"


def missing(scheme: str) -> str:
    return (
        f"{{{scheme}}} passwords need the {NEEDS[scheme]} library, which is not "
        "installed: pip install 'pypop3[hashes]'"
    )


@pytest.fixture
def without_hash_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in HASH_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(schemes, "_reported_missing", set())


def test_importing_pypop_imports_no_hash_library() -> None:
    code = (
        "import sys\n"
        "import pypop, pypop.auth, pypop.auth.passwd, pypop.server, pypop.cli\n"
        "import pypop.registry, pypop.testing, pypop.backends.memory\n"
        f"print(sorted(m for m in {HASH_MODULES!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout == "[]\n", done.stderr


@pytest.mark.usefixtures("without_hash_libraries")
@pytest.mark.parametrize("scheme", LIBRARY_FREE)
def test_other_schemes_hash_and_verify_without_them(scheme: str) -> None:
    stored = hash_password(scheme, PASSWORD)
    value = stored.split("}", 1)[1]
    assert verify_scheme(scheme, value, PASSWORD)
    assert not verify_scheme(scheme, value, PASSWORD + "!")


@pytest.mark.parametrize("scheme", sorted(NEEDS))
def test_schemes_that_need_one_name_the_extra(scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = hash_password(scheme, PASSWORD)  # with the library (the test venv has it)
    value = stored.split("}", 1)[1]
    for name in HASH_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(schemes, "_reported_missing", set())
    for attempt in (
        lambda: hash_password(scheme, PASSWORD),
        lambda: verify_scheme(scheme, value, PASSWORD),
        lambda: schemes.validate_value(scheme, value),
    ):
        with pytest.raises(MissingHashLibraryError) as info:
            attempt()
        assert str(info.value) == missing(scheme if scheme != "CRYPT" else "BLF-CRYPT")
        assert isinstance(info.value, ValueError)  # callers that catch ValueError still do


def cram_md5(user: str, password: str, server_challenge: bytes) -> bytes:
    digest = hmac.new(password.encode(), server_challenge, hashlib.md5).hexdigest()
    return base64.b64encode(f"{user} {digest}".encode())


@pytest.mark.usefixtures("without_hash_libraries")
async def test_server_without_them(
    start_server: ServerStarter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A passwd-file mixing every kind of entry: the library-free ones log in, the
    others are skipped at load with one error per scheme naming the extra."""
    passwd = tmp_path / "passwd"
    passwd.write_text(
        f"plain:{hash_password('PLAIN', PASSWORD)}\n"
        f"salted:{hash_password('SSHA512', PASSWORD)}\n"
        f"cram:{hash_password('CRAM-MD5', PASSWORD)}\n"
        f"scram:{hash_password('SCRAM-SHA-256', PASSWORD)}\n"
        "sha:{SHA512-CRYPT}$6$saltsalt$FQoXXMqzFxIF2ZCgTKeEFdGFNhvIzYpfCfWrc0rXnaKdTbtHI0/SDAE4zTxBP3RlH3bqfzqu82Hnu/PShtBYl/\n"
        "blf:{CRYPT}$2y$10$5ZLXFXrTLlNpMLIHkpg2IuhBStuKCl1NXHIlBRmbRmCQvHtyE8VHO\n"
        "argon:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo\n"
    )
    caplog.set_level(logging.WARNING, logger="pypop")
    server = await start_server(
        passwd_file=passwd, mechanisms=["SCRAM-SHA-256", "PLAIN", "CRAM-MD5"]
    )
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [missing("SHA512-CRYPT"), missing("BLF-CRYPT"), missing("ARGON2ID")]

    async def user_pass(user: str) -> bytes:
        c = await Client.connect(port_of(server))
        await c.line()
        try:
            assert await c.cmd(f"USER {user}\r\n".encode()) == b"+OK\r\n"
            return await c.cmd(f"PASS {PASSWORD}\r\n".encode())
        finally:
            await c.aclose()

    assert (await user_pass("plain")).startswith(b"+OK")
    assert (await user_pass("salted")).startswith(b"+OK")
    for skipped in ("sha", "blf", "argon"):
        assert await user_pass(skipped) == b"-ERR [AUTH] Authentication failed\r\n"

    c = await Client.connect(port_of(server))
    await c.line()
    server_challenge = challenge(await c.cmd(b"AUTH CRAM-MD5\r\n"))
    assert (await c.cmd(cram_md5("cram", PASSWORD, server_challenge) + b"\r\n")).startswith(b"+OK")
    await c.aclose()

    c = await Client.connect(port_of(server))
    await c.line()
    assert (await scram_login(c, Scram("scram", PASSWORD))).startswith(b"+OK")
    await c.aclose()
