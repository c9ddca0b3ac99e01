"""Password schemes against real Dovecot hashes."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pypop.auth import hash_password
from pypop.auth.schemes import (
    SCHEMES,
    ScramKeys,
    UnknownSchemeError,
    parse_stored,
    saslprep,
    scram_keys_from_password,
    validate_value,
    verify_scheme,
)

# Made with Dovecot 2.3 `doveadm pw -s SCHEME -p PASSWORD` (Debian dovecot-core) and
# committed as fixed vectors: the tests never need Dovecot at run time.
DOVECOT_SECRET = [
    "{PLAIN}secret",
    "{CLEARTEXT}secret",
    "{CRAM-MD5}cd3ba7deaad6e5ca23448ba42e379747a9e0f7f1fbc00c8a81bbaac395731b56",
    "{SHA256-CRYPT}$5$rkQlbuAt3Da5dLHt$2uj2d000pphPD4892g6cKXSvOHA3FBB/6Qlj9voHiBD",
    "{SHA512-CRYPT}$6$yswgwnannU/P0JZR$0t2Anzv4A4QzFBgnGWmNhqs0wlu5pORlj7QXfQxg/675m05U2RX19r8tn"
    "OYPBiVsEu6mFU1XKRebQp3DR/VKM.",
    "{SHA512-CRYPT}$6$rounds=10000$u6HVKa4iox0drHGB$T6YZQRDvLh7XQhYgKwsBhE0zJP5LEb0MyNMQOBQKLwWok"
    "fxuZsgooOP9h7k9D/9sam6vfURX3pO5UZwsViyQX0",
    "{BLF-CRYPT}$2y$05$sh/3h3ZS5Xkc7Loe40asbOh1D8dCks52sMr3Vj6Q1sPFcvcoIBluC",
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$d1hcWWy5HwtjCP+6X4Nn0g$DuFq3SZTLAiqxXeO4Cmgn7ZYyAwp"
    "GIVAd0BT8Tt4er8",
    "{SSHA512}Wit7wzgp3Vt5fgVbOBe/aWvSmd3P6OEY69ApXWjstpLeNLxZC/Uj2o6txtLzo9Z2umFPuh8thudRKZBmKJMrLO92pj4=",
    "{SCRAM-SHA-256}4096,uX8R8bXuJ9gKKZVh5ouy8w==,4zXen8c6nupssDMTsa6e2x9lknkMeQmISj2GKqZczpg=,"
    "8nTWi4bm12vK6tQ5bFoUK1WDq3edSFuHvHxpbSea67E=",
    "{CRYPT}$2y$05$2nAAKQ.d4IyI7X12Qlt6welviUF3LAQtMyddKqQWK8d1.ZJO8Eg8i",
    "{MD5-CRYPT}$1$SbjhYXIk$1H1MPOI4u66Az02hmwNwg1",
]

UNICODE_PASSWORD = "pässwörd €"
DOVECOT_UNICODE = [
    "{SHA512-CRYPT}$6$eNe4M0gjvKbLI./n$pC04Qn5yA36acIwLCk7M1SpJrgD5pAaFRewvGkQ.F/WOG/y4KrLVnmTNW.x"
    "hm8k6Q2tIJ5.Qx.BNQtcPjYzcx0",
    "{BLF-CRYPT}$2y$05$KufzbeqmJA8uTxaaDrm.HOkfGwNOmoQ3dTf8vwtFHB0IrjlNf0G5W",
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$zjRD2sOHyS8tPlKL/ZO/CQ$Qp6l0j/B/Jp/iAU0Ap7q6xE70sdiz"
    "XRocWFkMCsk4+Y",
    "{SSHA512}SHuur1gMThabTV4x/cfitpImPEaZY8y5UBjV6ROXItwsnQIGOa10uovpVgpMKzBLl+JBpuKMkLOpzv/nkvgXXVkl+7w=",
    "{SCRAM-SHA-256}4096,qahi+DqbbR9r6615PGdV8w==,2nVQ4ccVDsO2V45QeSG/7gXZOAFu/3vbRd11xSlIr9c=,"
    "R0MMN/SDMazFcW9RHFVwmF4nmt5XYzXVJzdqn6xIhJ0=",
    "{SHA256-CRYPT}$5$gqOuHiP2pWxAMbW9$/2iM7zQ9aGJVc2BE3l2MZvL3Ktpm.DBrx2UVEADvPs9",
]

# Produced by this code's hash_password(), checked with doveadm pw -t when written.
OWN_HASHES = [
    "{SHA512-CRYPT}$6$TvTamLMIRHU1rWTX$CDHpv2.4g46pLpWB95aiUy1Hr36Q/o1ilSZpuhinh1s1umM1V16oticbsr"
    "dDEmXrUqAAijazjYGmWveOEbA4N/",
    "{BLF-CRYPT}$2y$10$/mdz0dGWbMZ59NWBEJ7LFObmXkQnMjba4uVozj6zlSCbbZMmSwima",
]

HASHABLE = [
    "PLAIN",
    "CLEARTEXT",
    "CRAM-MD5",
    "SHA256-CRYPT",
    "SHA512-CRYPT",
    "BLF-CRYPT",
    "ARGON2ID",
    "SSHA512",
    "SCRAM-SHA-256",
    "CRYPT",
]


@pytest.mark.parametrize("stored", DOVECOT_SECRET + OWN_HASHES)
def test_dovecot_vectors(stored: str) -> None:
    scheme, value = parse_stored(stored)
    validate_value(scheme, value)
    assert verify_scheme(scheme, value, "secret")
    assert not verify_scheme(scheme, value, "Secret")
    assert not verify_scheme(scheme, value, "")


@pytest.mark.parametrize("stored", DOVECOT_UNICODE)
def test_dovecot_vectors_non_ascii(stored: str) -> None:
    scheme, value = parse_stored(stored)
    assert verify_scheme(scheme, value, UNICODE_PASSWORD)
    assert not verify_scheme(scheme, value, "pässwörd")


def test_rfc2195_secret_as_dovecot_stores_it() -> None:
    from pypop import wire

    ctx = bytes.fromhex("d06d4e1b26fccaa4b0b61801132340a354b21152711fb604ca3e035e7015116b")
    assert wire.cram_md5_context(b"tanstaaftanstaaf") == ctx
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    assert wire.cram_md5_verify_context(ctx, challenge, b"b913a602c7eda7a495b4e6e7334d3890")


@pytest.mark.parametrize("scheme", HASHABLE)
def test_hash_password_round_trip(scheme: str) -> None:
    stored = hash_password(scheme, "correct horse")
    assert stored.startswith("{" + scheme + "}")
    parsed_scheme, value = parse_stored(stored)
    validate_value(parsed_scheme, value)
    assert verify_scheme(parsed_scheme, value, "correct horse")
    assert not verify_scheme(parsed_scheme, value, "correct horse ")


def test_hashes_are_salted() -> None:
    assert hash_password("SHA512-CRYPT", "x") != hash_password("SHA512-CRYPT", "x")
    assert hash_password("SSHA512", "x") != hash_password("SSHA512", "x")


def test_bcrypt_uses_72_octets_like_crypt() -> None:
    long = "a" * 100
    stored = hash_password("BLF-CRYPT", long)
    scheme, value = parse_stored(stored)
    assert verify_scheme(scheme, value, "a" * 72 + "different tail")


def test_unknown_and_malformed() -> None:
    with pytest.raises(UnknownSchemeError):
        hash_password("ROT13", "x")
    with pytest.raises(UnknownSchemeError):
        verify_scheme("ROT13", "x", "x")
    for scheme, value in [
        ("CRAM-MD5", "abc"),
        ("SCRAM-SHA-256", "4096,bad"),
        ("SSHA512", "c2hvcnQ="),
        ("CRYPT", "abDES.hash"),
        ("SHA512-CRYPT", "$5$x$y"),
        ("ARGON2ID", "$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA"),
    ]:
        with pytest.raises(ValueError):  # noqa: PT011
            validate_value(scheme, value)
    # A value that slips past validation but is broken still verifies as False.
    assert not verify_scheme("SHA512-CRYPT", "$6$salt$not-a-valid-checksum!", "x")
    assert not verify_scheme("ARGON2ID", "$argon2id$garbage", "x")
    assert not verify_scheme("BLF-CRYPT", "$2y$05$short", "x")


def test_parse_stored_default_scheme() -> None:
    assert parse_stored("$6$abc$def") == ("CRYPT", "$6$abc$def")
    assert parse_stored("secret", "plain") == ("PLAIN", "secret")
    assert parse_stored("{cleartext}x") == ("PLAIN", "x")
    with pytest.raises(ValueError):  # noqa: PT011
        parse_stored("{PLAIN")


def test_scram_keys_rfc7677() -> None:
    import base64

    keys = scram_keys_from_password("pencil", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096)
    assert ScramKeys.parse(keys.dovecot()) == keys
    assert "pencil" not in repr(keys)


def test_saslprep() -> None:
    # RFC 4013 §3 examples.
    assert saslprep("I\u00adX") == "IX"
    assert saslprep("user") == "user"
    assert saslprep("USER") == "USER"
    assert saslprep("\u00aa") == "a"
    assert saslprep("\u2168") == "IX"
    with pytest.raises(ValueError):  # noqa: PT011
        saslprep("\u0007")
    with pytest.raises(ValueError):  # noqa: PT011
        saslprep("\u0627\u0031")


def test_scheme_list_covers_the_issue() -> None:
    for name in [
        "PLAIN",
        "CRAM-MD5",
        "SHA256-CRYPT",
        "SHA512-CRYPT",
        "BLF-CRYPT",
        "ARGON2ID",
        "SSHA512",
        "SCRAM-SHA-256",
    ]:
        assert name in SCHEMES


DOVEADM = shutil.which("doveadm")


@pytest.mark.skipif(DOVEADM is None, reason="doveadm not installed")
@pytest.mark.parametrize("scheme", HASHABLE)
def test_doveadm_verifies_our_hashes(scheme: str) -> None:
    assert DOVEADM is not None
    stored = hash_password(scheme, "secret")
    run = subprocess.run(
        [DOVEADM, "pw", "-t", stored, "-p", "secret"], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    run = subprocess.run(
        [DOVEADM, "pw", "-t", stored, "-p", "wrong"], capture_output=True, text=True, check=False
    )
    assert run.returncode != 0


@pytest.mark.skipif(DOVEADM is None, reason="doveadm not installed")
@pytest.mark.parametrize("scheme", HASHABLE)
def test_we_verify_fresh_doveadm_hashes(scheme: str) -> None:
    assert DOVEADM is not None
    run = subprocess.run(
        [DOVEADM, "pw", "-s", scheme, "-p", "secret"], capture_output=True, text=True, check=True
    )
    parsed_scheme, value = parse_stored(run.stdout.strip())
    assert verify_scheme(parsed_scheme, value, "secret")
