"""The passwd-file store: parsing, reload, unknown users, the hash thread pool."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from pypop.auth import (
    CredentialStore,
    MemoryCredentialStore,
    PasswdFileStore,
    StoredCredential,
    UnknownSchemeError,
    hash_password,
)
from pypop.auth.passwd import parse_passwd_file

SHA512 = (
    "{SHA512-CRYPT}$6$yswgwnannU/P0JZR$0t2Anzv4A4QzFBgnGWmNhqs0wlu5pORlj7QXfQxg/675m05U2RX19r8tn"
    "OYPBiVsEu6mFU1XKRebQp3DR/VKM."
)  # "secret", from doveadm
BCRYPT_NO_PREFIX = "$2y$05$2nAAKQ.d4IyI7X12Qlt6welviUF3LAQtMyddKqQWK8d1.ZJO8Eg8i"  # "secret"
CRAM = "{CRAM-MD5}cd3ba7deaad6e5ca23448ba42e379747a9e0f7f1fbc00c8a81bbaac395731b56"  # "secret"

FILE = f"""\
# comment line
alice:{{PLAIN}}wonderland:1000:1000::/home/alice::
bob:{SHA512}:1001:1001:Bob:/home/bob:/bin/false:
carol:{BCRYPT_NO_PREFIX}
dave:{CRAM}
:{{PLAIN}}no-user
eve:{{PLAIN}}blocked::::::nologin

mallory:{{ROT13}}frperg
trent:{{CRAM-MD5}}tooshort
peggy
victor:
alice:{{PLAIN}}second-alice
walter:{{PLAIN}}w\r
"""


def write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def remove(path: Path) -> None:
    path.unlink()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def passwd(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(FILE, encoding="utf-8")
    return path


def test_parse(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "pypop.auth")
    result = parse_passwd_file(FILE.encode())
    # eve has nologin: her entry stays, with the policy (the session refuses her login
    # after the password verifies, with the reason; pypop.auth.userdb)
    assert sorted(result.entries) == ["alice", "bob", "carol", "dave", "eve", "walter"]
    assert result.policies["eve"].nologin
    assert sorted(result.policies) == ["alice", "bob", "eve"]  # alice, bob: a home
    assert result.entries["alice"] == StoredCredential("alice", "PLAIN", "wonderland")
    assert result.entries["carol"].scheme == "CRYPT"
    assert result.entries["walter"].value == "w"  # CRLF line end
    assert result.errors == 4  # mallory, trent, peggy (a name alone), duplicate alice
    # An empty password field: a user no password logs in (Kerberos only).
    assert result.passwordless == frozenset({"victor"})
    text = caplog.text
    assert "line 9" in text
    assert "unknown password scheme" in text
    assert "second-alice" not in text  # never log secrets
    assert "frperg" not in text
    assert "wonderland" not in repr(result.entries["alice"])


async def test_passwordless_users_exist_for_kerberos_only(passwd: Path) -> None:
    store = PasswdFileStore(passwd)
    assert await store.has_account("victor")
    assert await store.user_policy("victor") is not None  # the defaults
    assert await store.lookup("victor") is None
    assert not await store.verify_password("victor", "")
    assert not await store.has_account("nobody")
    assert await store.user_policy("nobody") is None


def test_parse_non_utf8_and_control_chars() -> None:
    result = parse_passwd_file(b"a\xff:{PLAIN}x\nb c:{PLAIN}y\nok:{PLAIN}z\n")
    assert list(result.entries) == ["ok"]
    assert result.errors == 2


async def test_verify_and_lookup(passwd: Path) -> None:
    store = PasswdFileStore(passwd)
    assert isinstance(store, CredentialStore)
    assert await store.verify_password("alice", "wonderland")
    assert not await store.verify_password("alice", "Wonderland")
    assert await store.verify_password("bob", "secret")
    assert not await store.verify_password("bob", "wonderland")
    assert await store.verify_password("carol", "secret")  # default scheme CRYPT
    assert await store.verify_password("dave", "secret")  # CRAM-MD5 state checks a password
    assert await store.verify_password("eve", "blocked")  # nologin: refused in the session
    policy = await store.user_policy("eve")
    assert policy is not None
    assert policy.nologin
    for user in ["mallory", "trent", "nobody", ""]:
        assert not await store.verify_password(user, "blocked")
        assert await store.lookup(user) is None
    alice = await store.lookup("alice")
    assert alice is not None
    assert alice.plaintext() == "wonderland"
    dave = await store.lookup("dave")
    assert dave is not None
    assert dave.plaintext() is None
    assert dave.cram_md5_context() == bytes.fromhex(CRAM[10:])
    bob = await store.lookup("bob")
    assert bob is not None
    assert bob.cram_md5_context() is None
    assert bob.scram_sha256_keys() is None


def test_missing_file_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(OSError):  # noqa: PT011
        PasswdFileStore(tmp_path / "nope")
    with pytest.raises(UnknownSchemeError):
        PasswdFileStore(tmp_path / "nope", default_scheme="ROT13")


async def test_unknown_user_takes_the_dummy_verification(
    passwd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PasswdFileStore(passwd)
    calls: list[tuple[str, str]] = []
    real = StoredCredential.verify

    def spy(self: StoredCredential, password: str) -> bool:
        calls.append((self.user, self.scheme))
        return real(self, password)

    monkeypatch.setattr(StoredCredential, "verify", spy)
    assert not await store.verify_password("nobody", "secret")
    # The dummy is a real entry of the most common cost class (here PLAIN: alice and
    # walter), so an unknown user costs what the typical known user costs.
    assert calls == [("", "PLAIN")]
    # Even the right password of the entry the dummy copies does not log in a stranger.
    assert not await store.verify_password("nobody", "secret")


async def test_dummy_without_entries() -> None:
    store = MemoryCredentialStore({})
    assert not await store.verify_password("x", "")
    assert not await store.verify_password("x", "anything")


async def test_heavy_hashes_run_in_the_bounded_pool(
    passwd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = trio.CapacityLimiter(1)
    store = PasswdFileStore(passwd, limiter=limiter, check_interval=1e9)
    seen: list[object] = []
    real = trio.to_thread.run_sync

    async def spy(fn: Callable[..., bool], *args: object, limiter: object = None) -> bool:
        seen.append(limiter)
        return await real(fn, *args, limiter=limiter)  # type: ignore[arg-type]

    monkeypatch.setattr(trio.to_thread, "run_sync", spy)
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(store.verify_password, "bob", "secret")
    assert seen == [limiter] * 3
    assert limiter.borrowed_tokens == 0


async def test_reload_on_change(passwd: Path) -> None:
    clock = Clock()
    store = PasswdFileStore(passwd, clock=clock)
    assert await store.verify_password("alice", "wonderland")
    write(passwd, "alice:{PLAIN}changed\nnewbie:{PLAIN}hi\n")
    os.utime(passwd, ns=(1, 1))  # a different mtime even on coarse file systems
    # Within a second of the last check: the old table is still used.
    clock.now = 0.5
    assert await store.verify_password("alice", "wonderland")
    clock.now = 1.5
    assert await store.verify_password("alice", "changed")
    assert await store.verify_password("newbie", "hi")
    assert not await store.verify_password("bob", "secret")


async def test_atomic_rename_is_seen(passwd: Path, tmp_path: Path) -> None:
    clock = Clock()
    store = PasswdFileStore(passwd, clock=clock)
    new = tmp_path / "users.new"
    write(new, "alice:{PLAIN}renamed\n")
    os.replace(new, passwd)
    clock.now = 2
    assert await store.verify_password("alice", "renamed")


async def test_broken_reload_keeps_old_data(passwd: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    store = PasswdFileStore(passwd, clock=clock)
    # Truncated (as an editor does before writing): no valid entries.
    write(passwd, "# nothing yet\n")
    clock.now = 2
    assert await store.verify_password("alice", "wonderland")
    assert "keeping the previous" in caplog.text
    # Deleted: still the old data.
    remove(passwd)
    clock.now = 4
    assert await store.verify_password("alice", "wonderland")
    # Back again: picked up (the failed reloads did not record a signature).
    write(passwd, "alice:{PLAIN}back\n")
    clock.now = 6
    assert await store.verify_password("alice", "back")


async def test_memory_store_hashes() -> None:
    store = MemoryCredentialStore({"a": hash_password("ARGON2ID", "pw"), "b": "plain-by-default"})
    assert await store.verify_password("a", "pw")
    assert not await store.verify_password("a", "pW")
    assert await store.verify_password("b", "plain-by-default")
    assert store.users() == ["a", "b"]
