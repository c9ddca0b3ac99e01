"""Unknown users look like known ones (issue 15 items 6 and 7, DESIGN rule 13): the same
SCRAM work and parameters, salts keyed with a persistent server secret, and a dummy
verification that costs what the typical known user costs. The timing itself is
measured by ``benches/auth_timing.py`` (a benchmark, not a test)."""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from passlib.hash import sha512_crypt  # type: ignore[import-untyped]

from pypop.auth import MemoryCredentialStore, ScramKeys, StoredCredential, hash_password
from pypop.auth import sasl as sasl_module
from pypop.auth.sasl import SaslChallenge, SaslContext, ScramSha256
from pypop.auth.schemes import cost_class, scram_keys_from_password
from pypop.auth.secret import load_or_create
from pypop.config import ConfigError, ServerConfig
from pypop.server import Server

SHA512_5000 = hash_password("SHA512-CRYPT", "secret")
SHA512_9000 = "{SHA512-CRYPT}" + str(sha512_crypt.using(rounds=9000).hash("secret"))


def scram_entry(password: str, iterations: int, salt: bytes) -> str:
    return "{SCRAM-SHA-256}" + scram_keys_from_password(password, salt, iterations).dovecot()


def ctx(users: dict[str, str], key: bytes | None = b"k" * 32) -> SaslContext:
    return SaslContext(
        store=MemoryCredentialStore(users), hostname="h", tls_active=True, salt_key=key
    )


async def server_first(context: SaslContext, user: str) -> dict[str, str]:
    result = await ScramSha256(context).step(f"n,,n={user},r=abc".encode())
    assert isinstance(result, SaslChallenge)
    return dict(kv.split("=", 1) for kv in result.data.decode().split(","))


# ---- SCRAM: the same work and the same look ------------------------------------------


async def test_every_scram_first_step_costs_one_derivation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Known PLAIN users took a 4096-round PBKDF2 (0.92 ms), unknown users nothing
    (0.07 ms). Now everyone's first step derives once, at the same cost."""
    calls: list[int] = []
    real: Callable[[str, bytes, int], ScramKeys] = scram_keys_from_password

    def counting(password: str, salt: bytes, iterations: int) -> ScramKeys:
        calls.append(iterations)
        return real(password, salt, iterations)

    monkeypatch.setattr(sasl_module, "scram_keys_from_password", counting)
    users = {
        "plain": "{PLAIN}pencil",
        "stored": scram_entry("pencil", 4096, b"s" * 16),
        "hashed": SHA512_5000,
    }
    context = ctx(users)
    for user in ("plain", "stored", "hashed", "nobody"):
        calls.clear()
        await server_first(context, user)
        assert calls == [4096], user


async def test_fake_salts_are_keyed_with_the_server_secret() -> None:
    users = {"plain": "{PLAIN}pencil"}
    one, same, other = ctx(users), ctx(users), ctx(users, key=b"x" * 32)
    for user in ("plain", "nobody"):
        salt = (await server_first(one, user))["s"]
        assert (await server_first(same, user))["s"] == salt  # a restart, same secret
        assert (await server_first(other, user))["s"] != salt  # another secret
        assert len(base64.b64decode(salt)) == 16
    assert (await server_first(one, "plain"))["s"] != (await server_first(one, "nobody"))["s"]


async def test_unknown_users_copy_the_typical_scram_entry() -> None:
    """Stored SCRAM entries with 10,000 iterations and 24-octet salts: an unknown
    user's server-first message shows the same, not pypop's 4096 and 16."""
    users = {f"u{n}": scram_entry("pw", 10_000, bytes([n]) * 24) for n in range(3)}
    users["odd"] = scram_entry("pw", 4096, b"o" * 16)
    context = ctx(users)
    known = await server_first(context, "u1")
    unknown = await server_first(context, "nobody")
    assert known["i"] == unknown["i"] == "10000"
    assert len(base64.b64decode(known["s"])) == len(base64.b64decode(unknown["s"])) == 24


# ---- the dummy verification (item 7) ----------------------------------------------------


def dummy_of(users: dict[str, str]) -> tuple[str, str]:
    store = MemoryCredentialStore(users)
    dummy: StoredCredential = store._dummy
    return cost_class(dummy.scheme, dummy.value)


def test_dummy_copies_the_most_common_cost_class() -> None:
    """One PLAIN user among SHA512-CRYPT users used to make the dummy the heavy
    scheme whatever the counts; now it is the typical entry's scheme and cost."""
    plain = {f"p{n}": f"{{PLAIN}}pw{n}" for n in range(3)}
    sha = {f"s{n}": SHA512_5000 for n in range(2)}
    assert dummy_of({**plain, **sha}) == ("PLAIN", "")
    assert dummy_of({"p": "{PLAIN}x", **sha}) == ("SHA512-CRYPT", "")
    # The cost parameters count too: most users at rounds=9000.
    slow = {f"r{n}": SHA512_9000 for n in range(3)}
    assert dummy_of({**sha, **slow}) == ("SHA512-CRYPT", "rounds=9000")
    # A tie goes to the heavier scheme.
    assert dummy_of({"p": "{PLAIN}x", "s": SHA512_5000}) == ("SHA512-CRYPT", "")


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ("{BLF-CRYPT}$2y$05$2nAAKQ.d4IyI7X12Qlt6welviUF3LAQtMyddKqQWK8d1.ZJO8Eg8i", "05$"),
        ("$2y$05$2nAAKQ.d4IyI7X12Qlt6welviUF3LAQtMyddKqQWK8d1.ZJO8Eg8i", "05$"),
        ("{SCRAM-SHA-256}" + scram_keys_from_password("x", b"s" * 16, 4096).dovecot(), "4096"),
        ("{PLAIN}x", ""),
    ],
)
def test_cost_classes(stored: str, expected: str) -> None:
    cred = StoredCredential.parse("u", stored)
    assert cost_class(cred.scheme, cred.value)[1] == expected
    if stored.startswith("$2y$"):
        assert cost_class(cred.scheme, cred.value)[0] == "BLF-CRYPT"  # CRYPT of bcrypt


# ---- the server secret ---------------------------------------------------------------------


def test_secret_file_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    key = load_or_create(path)
    assert len(key) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create(path) == key
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]  # no temporary left


def test_secret_file_checks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad"
    bad.write_text("not hex\n")
    with pytest.raises(ValueError, match="malformed"):
        load_or_create(bad)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):  # noqa: PT011 (ELOOP: never followed)
        load_or_create(link)
    assert not (tmp_path / "elsewhere").exists()
    shared = tmp_path / "shared"
    load_or_create(shared)
    os.chmod(shared, 0o644)
    with caplog.at_level(logging.WARNING):
        load_or_create(shared)
    assert "can be read by other users" in caplog.text


def test_server_secret_location(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    passwd = tmp_path / "users"
    passwd.write_text("alice:{PLAIN}x\n")
    cfg = ServerConfig(listen=[("127.0.0.1", 0)], passwd_file=passwd)
    first = Server(cfg).context.salt_key
    assert first is not None
    assert (tmp_path / "users.secret").exists()  # next to the passwd-file
    assert Server(cfg).context.salt_key == first
    elsewhere = ServerConfig(
        listen=[("127.0.0.1", 0)], passwd_file=passwd, secret_file=tmp_path / "s2"
    )
    assert Server(elsewhere).context.salt_key not in (None, first)
    broken = ServerConfig(
        listen=[("127.0.0.1", 0)], passwd_file=passwd, secret_file=tmp_path / "no" / "dir"
    )
    with pytest.raises(ConfigError, match=r"auth\.secret_file"):
        Server(broken)
    # Without a passwd-file or a secret file: a per-process key, and a warning.
    with caplog.at_level(logging.WARNING):
        plugin = Server(
            ServerConfig(listen=[("127.0.0.1", 0)]), store=MemoryCredentialStore({"a": "x"})
        )
    assert plugin.context.salt_key is None
    assert "set auth.secret_file" in caplog.text
