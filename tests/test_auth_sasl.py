"""SASL mechanisms: RFC vectors, real exchanges, and garbage that must only fail."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pypop import wire
from pypop.auth import (
    MemoryCredentialStore,
    SaslChallenge,
    SaslContext,
    SaslFailure,
    SaslSuccess,
    StaticTokenVerifier,
    available_mechanisms,
    create_mechanism,
    hash_password,
    verify_apop,
)
from pypop.auth.sasl import (
    ALL_MECHANISMS,
    CramMd5,
    Login,
    OAuthBearer,
    Plain,
    SaslMechanism,
    ScramSha256,
    ScramSha256Plus,
    XOAuth2,
)
from pypop.backend import TemporaryFailure

from .strategies import octets

RFC7677_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC7677_SNONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
BEARER = "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="

USERS = {
    "user": "{PLAIN}pencil",
    "tim": "{PLAIN}tanstaaftanstaaf",
    "Kurt": "{PLAIN}xipj3plmq",
    "hashed": hash_password("SHA512-CRYPT", "secret"),
    # RFC 2195's secret as Dovecot stores it (doveadm pw -s CRAM-MD5).
    "cram": "{CRAM-MD5}d06d4e1b26fccaa4b0b61801132340a354b21152711fb604ca3e035e7015116b",
    # doveadm pw -s SCRAM-SHA-256 -p secret
    "scram": "{SCRAM-SHA-256}4096,uX8R8bXuJ9gKKZVh5ouy8w==,"
    "4zXen8c6nupssDMTsa6e2x9lknkMeQmISj2GKqZczpg=,8nTWi4bm12vK6tQ5bFoUK1WDq3edSFuHvHxpbSea67E=",
    "we,ird=": "{PLAIN}odd",
}
TOKENS = StaticTokenVerifier(
    {"user@example.com": [BEARER], "someuser@example.com": ["ya29.vF9dft4qmTc2Nvb3RlckBhbHRh"]}
)


def make_ctx(
    *, tls: bool = True, cb: bytes | None = None, users: dict[str, str] = USERS
) -> SaslContext:
    store = MemoryCredentialStore(users)
    return SaslContext(
        store=store,
        hostname="pop.example.org",
        tls_active=tls,
        token_verifier=TOKENS,
        channel_binding=cb,
        oauth_scope="mail",
    )


# --------------------------------------------------------------------------- PLAIN / LOGIN


async def test_plain_rfc4616_examples() -> None:
    ctx = make_ctx()
    assert await Plain(ctx).step(b"\0tim\0tanstaaftanstaaf") == SaslSuccess("tim")
    # Authorization identity "Ursel" differs from "Kurt": no proxy login.
    assert await Plain(ctx).step(b"Ursel\0Kurt\0xipj3plmq") == SaslFailure()
    assert await Plain(ctx).step(b"Kurt\0Kurt\0xipj3plmq") == SaslSuccess("Kurt")
    assert await Plain(ctx).step(b"\0tim\0wrong") == SaslFailure("AUTH")
    assert await Plain(ctx).step(b"\0nobody\0tanstaaftanstaaf") == SaslFailure()


async def test_plain_two_step_and_limits() -> None:
    mech = Plain(make_ctx())
    assert await mech.step(None) == SaslChallenge(b"")
    assert await mech.step(b"\0tim\0tanstaaftanstaaf") == SaslSuccess("tim")
    assert mech.finished
    assert await mech.step(b"\0tim\0tanstaaftanstaaf") == SaslFailure()  # no second go
    for bad in [
        b"",
        b"tim tanstaaftanstaaf",
        b"\0tim",
        b"\0tim\0",
        b"\0\0pw",
        b"\0tim\0pw\0extra",
        b"\0t\xffim\0pw",
        b"\0tim\0\xff\xfe",
        b"\0tim\x01\0pw",
        b"\0" + b"u" * 256 + b"\0pw",
        b"\0tim\0" + b"p" * 256,
    ]:
        assert await Plain(make_ctx()).step(bad) == SaslFailure(), bad


async def test_plain_records_attempt_for_penalties() -> None:
    mech = Plain(make_ctx())
    await mech.step(b"\0tim\0guess")
    assert mech.attempted_user == "tim"
    assert mech.attempted_secret == b"guess"


async def test_login() -> None:
    mech = Login(make_ctx())
    assert await mech.step(None) == SaslChallenge(b"Username:")
    assert await mech.step(b"tim") == SaslChallenge(b"Password:")
    assert await mech.step(b"tanstaaftanstaaf") == SaslSuccess("tim")
    # Initial response = the user name.
    mech = Login(make_ctx())
    assert await mech.step(b"tim") == SaslChallenge(b"Password:")
    assert await mech.step(b"nope") == SaslFailure()
    mech = Login(make_ctx())
    assert await mech.step(b"") == SaslChallenge(b"Password:")
    assert await mech.step(b"x") == SaslFailure()
    mech = Login(make_ctx())
    await mech.step(None)
    assert await mech.step(b"\xff") == SaslFailure()


# --------------------------------------------------------------------------- CRAM-MD5


async def test_cram_md5_rfc2195_digest_with_stored_context() -> None:
    # RFC 2195's example exchange, against Dovecot's stored HMAC state for the secret.
    mech = CramMd5(make_ctx())
    challenge = await mech.step(None)
    assert isinstance(challenge, SaslChallenge)
    assert challenge.data.startswith(b"<")
    assert challenge.data.endswith(b"@pop.example.org>")
    mech._challenge = b"<1896.697170952@postoffice.reston.mci.net>"  # the RFC's challenge
    assert await mech.step(b"cram b913a602c7eda7a495b4e6e7334d3890") == SaslSuccess("cram")


@pytest.mark.parametrize("user", ["tim", "cram"])
async def test_cram_md5_exchange(user: str) -> None:
    mech = CramMd5(make_ctx())
    challenge = await mech.step(None)
    assert isinstance(challenge, SaslChallenge)
    digest = wire.cram_md5_digest(b"tanstaaftanstaaf", challenge.data)
    assert await mech.step(f"{user} {digest.upper()}".encode()) == SaslSuccess(user)


@pytest.mark.parametrize(
    "response",
    [
        b"tim",
        b"tim 1234",
        b" b913a602c7eda7a495b4e6e7334d3890",
        b"tim b913a602c7eda7a495b4e6e7334d389g",
        b"hashed b913a602c7eda7a495b4e6e7334d3890",  # one-way hash: cannot do CRAM-MD5
        b"nobody b913a602c7eda7a495b4e6e7334d3890",
        b"\xff b913a602c7eda7a495b4e6e7334d3890",
    ],
)
async def test_cram_md5_failures(response: bytes) -> None:
    mech = CramMd5(make_ctx())
    await mech.step(None)
    assert await mech.step(response) == SaslFailure()


async def test_cram_md5_refuses_initial_response() -> None:
    assert await CramMd5(make_ctx()).step(b"tim abc") == SaslFailure()


async def test_challenges_are_unique() -> None:
    a = await CramMd5(make_ctx()).step(None)
    b = await CramMd5(make_ctx()).step(None)
    assert a != b


# --------------------------------------------------------------------------- SCRAM


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


class ScramClient:
    """A minimal RFC 5802 client, to drive the server with any password."""

    def __init__(self, user: str, password: str, nonce: str, gs2: str = "n,,", cb: bytes = b""):
        self.user, self.password, self.nonce, self.gs2, self.cb = user, password, nonce, gs2, cb

    def first(self) -> bytes:
        name = self.user.replace("=", "=3D").replace(",", "=2C")
        self.bare = f"n={name},r={self.nonce}"
        return (self.gs2 + self.bare).encode()

    def final(self, server_first: bytes) -> bytes:
        self.server_first = server_first.decode()
        attrs = dict(a.split("=", 1) for a in self.server_first.split(","))
        salted = hashlib.pbkdf2_hmac(
            "sha256", self.password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
        )
        client_key = _hmac(salted, b"Client Key")
        c = base64.b64encode(self.gs2.encode() + self.cb).decode()
        self.without_proof = f"c={c},r={attrs['r']}"
        auth = f"{self.bare},{self.server_first},{self.without_proof}".encode()
        sig = _hmac(hashlib.sha256(client_key).digest(), auth)
        proof = bytes(x ^ y for x, y in zip(client_key, sig, strict=True))
        self.server_sig = _hmac(_hmac(salted, b"Server Key"), auth)
        return f"{self.without_proof},p={base64.b64encode(proof).decode()}".encode()


async def test_scram_sha256_rfc7677_vector() -> None:
    mech = ScramSha256(make_ctx(), server_nonce=RFC7677_SNONCE, salt=RFC7677_SALT)
    first = await mech.step(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
    assert first == SaslChallenge(
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    final = await mech.step(
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    assert final == SaslSuccess("user", b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


async def test_scram_rfc7677_vector_from_stored_keys() -> None:
    from pypop.auth.schemes import scram_keys_from_password

    keys = scram_keys_from_password("pencil", RFC7677_SALT, 4096)
    store = MemoryCredentialStore({"user": "{SCRAM-SHA-256}" + keys.dovecot()})
    ctx = SaslContext(store=store, hostname="h", tls_active=False, token_verifier=None)
    mech = ScramSha256(ctx, server_nonce=RFC7677_SNONCE)  # salt comes from the store
    await mech.step(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
    final = await mech.step(
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    assert final == SaslSuccess("user", b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


@pytest.mark.parametrize(
    ("user", "password", "ok"),
    [
        ("scram", "secret", True),  # Dovecot-stored keys
        ("scram", "wrong", False),
        ("user", "pencil", True),  # derived from PLAIN
        ("we,ird=", "odd", True),  # saslname escaping
        ("hashed", "secret", False),  # one-way hash: SCRAM impossible
        ("nobody", "pencil", False),
    ],
)
async def test_scram_exchange(user: str, password: str, ok: bool) -> None:
    mech = ScramSha256(make_ctx())
    client = ScramClient(user, password, "fyko+d2lbbFgONRv9qkxdawL")
    server_first = await mech.step(None)
    assert server_first == SaslChallenge(b"")
    server_first = await mech.step(client.first())
    assert isinstance(server_first, SaslChallenge)
    assert server_first.data.startswith(b"r=fyko+d2lbbFgONRv9qkxdawL")
    result = await mech.step(client.final(server_first.data))
    if ok:
        assert result == SaslSuccess(user, b"v=" + base64.b64encode(client.server_sig))
    else:
        assert result == SaslFailure()


async def test_scram_unknown_user_looks_like_a_known_one() -> None:
    async def salt_of(user: str) -> tuple[bytes, str]:
        mech = ScramSha256(make_ctx())
        first = await mech.step(f"n,,n={user},r=abc".encode())
        assert isinstance(first, SaslChallenge)
        attrs = dict(a.split("=", 1) for a in first.data.decode().split(","))
        return base64.b64decode(attrs["s"]), attrs["i"]

    # Stable per user, 16 octets, 4096 iterations, for known and unknown alike.
    assert await salt_of("nobody") == await salt_of("nobody")
    assert await salt_of("user") == await salt_of("user")
    assert len((await salt_of("nobody"))[0]) == len((await salt_of("user"))[0]) == 16
    assert (await salt_of("nobody"))[1] == "4096"


@pytest.mark.parametrize(
    "first",
    [
        b"n,,m=ext,n=user,r=abc",  # mandatory extension: must fail
        b"p=tls-unique,,n=user,r=abc",  # binding asked of the non-PLUS mechanism
        b"x,,n=user,r=abc",
        b"n,a=other,n=user,r=abc",  # proxy authorization
        b"n,b=user,n=user,r=abc",
        b"n,,n=us=2Xer,r=abc",  # bad saslname escape
        b"n,,n=,r=abc",
        b"n,,r=abc,n=user",
        b"n,,n=user",
        b"n,,n=user,r=",
        b"n,,n=user,r=a\x7fb",
        b"n,,n=user,r=abc,bogus",
        b"n,n=user,r=abc",
        b"n,,n=\xff,r=abc",
        b"",
    ],
)
async def test_scram_bad_client_first(first: bytes) -> None:
    assert await ScramSha256(make_ctx()).step(first) == SaslFailure()


async def test_scram_y_flag_is_a_downgrade_when_plus_is_offered() -> None:
    first = b"y,,n=user,r=abc"
    assert isinstance(await ScramSha256(make_ctx()).step(first), SaslChallenge)
    assert await ScramSha256(make_ctx(cb=b"cbdata")).step(first) == SaslFailure()


@pytest.mark.parametrize(
    "mangle",
    [
        lambda m: m.replace(b"r=fyko", b"r=XXko"),  # wrong nonce
        lambda m: m.replace(b"c=biws", b"c=eSws"),  # "y,," instead of "n,,"
        lambda m: m.replace(b"c=biws", b"c=!!!!"),  # bad base64
        lambda m: m[: m.rindex(b",p=")],  # no proof
        lambda m: m[: m.rindex(b",p=") + 3] + b"c2hvcnQ=",  # short proof
        lambda m: m + b"=",
        lambda m: b"r=x," + m,
        lambda m: m.replace(b"c=biws,", b""),
        lambda m: m + b"\xff",
    ],
)
async def test_scram_bad_client_final(mangle: object) -> None:
    mech = ScramSha256(make_ctx())
    client = ScramClient("user", "pencil", "fyko+d2lbbFgONRv9qkxdawL")
    first = await mech.step(client.first())
    assert isinstance(first, SaslChallenge)
    final = client.final(first.data)
    assert callable(mangle)
    assert await mech.step(mangle(final)) == SaslFailure()


async def test_scram_plus_channel_binding() -> None:
    ctx = make_ctx(cb=b"\x01\x02tls-unique-data")
    assert "SCRAM-SHA-256-PLUS" in available_mechanisms(
        make_ctx(cb=b"\x01\x02tls-unique-data", users=SCRAM_CAPABLE)
    )
    mech = ScramSha256Plus(ctx)
    client = ScramClient(
        "user", "pencil", "abc", gs2="p=tls-unique,,", cb=b"\x01\x02tls-unique-data"
    )
    first = await mech.step(client.first())
    assert isinstance(first, SaslChallenge)
    assert isinstance(await mech.step(client.final(first.data)), SaslSuccess)
    # Other binding data (a MITM's TLS session) fails.
    mech = ScramSha256Plus(ctx)
    client = ScramClient("user", "pencil", "abc", gs2="p=tls-unique,,", cb=b"other")
    first = await mech.step(client.first())
    assert isinstance(first, SaslChallenge)
    assert await mech.step(client.final(first.data)) == SaslFailure()
    # The PLUS mechanism insists on binding, of the type we have.
    assert await ScramSha256Plus(ctx).step(b"n,,n=user,r=abc") == SaslFailure()
    assert await ScramSha256Plus(ctx).step(b"p=tls-exporter,,n=user,r=abc") == SaslFailure()


# --------------------------------------------------------------------------- OAuth

RFC7628_MESSAGE = (
    b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer "
    + BEARER.encode()
    + b"\x01\x01"
)


async def test_oauthbearer_rfc7628_example() -> None:
    assert await OAuthBearer(make_ctx()).step(RFC7628_MESSAGE) == SaslSuccess("user@example.com")


async def test_oauthbearer_failure_sends_json_then_fails() -> None:
    mech = OAuthBearer(make_ctx())
    result = await mech.step(RFC7628_MESSAGE.replace(b"vF9", b"xx9"))
    assert isinstance(result, SaslChallenge)
    body = json.loads(result.data)
    assert body["status"] == "invalid_token"
    assert body["scope"] == "mail"
    assert await mech.step(b"\x01") == SaslFailure("AUTH")
    assert mech.attempted_user == "user@example.com"


async def test_oauthbearer_without_initial_response() -> None:
    mech = OAuthBearer(make_ctx())
    assert await mech.step(None) == SaslChallenge(b"")
    assert await mech.step(RFC7628_MESSAGE) == SaslSuccess("user@example.com")


@pytest.mark.parametrize(
    "message",
    [
        b"n,,\x01auth=Bearer abc\x01\x01",  # no user
        b"p=tls-unique,a=user@example.com,\x01auth=Bearer abc\x01\x01",
        b"n,a=user@example.com,\x01auth=Bearer abc\x01",  # unterminated
        b"n,a=user@example.com,\x01auth=Basic abc\x01\x01",
        b"n,a=user@example.com,\x01auth=Bearer a b\x01\x01",
        b"n,a=user@example.com,\x01host=x\x01\x01",  # no auth
        b"n,a=user@example.com,\x01auth=Bearer a\x01auth=Bearer b\x01\x01",
        b"n,a=user@example.com,\x01=x\x01auth=Bearer a\x01\x01",
        b"n,a=us\xffer,\x01auth=Bearer abc\x01\x01",
        b"garbage",
    ],
)
async def test_oauthbearer_malformed(message: bytes) -> None:
    assert await OAuthBearer(make_ctx()).step(message) == SaslFailure()


XOAUTH2_MESSAGE = (
    b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhbHRh\x01\x01"
)


async def test_xoauth2_one_step() -> None:
    assert await XOAuth2(make_ctx()).step(XOAUTH2_MESSAGE) == SaslSuccess("someuser@example.com")


@pytest.mark.parametrize("initial", [None, b""])
async def test_xoauth2_two_step_microsoft_form(initial: bytes | None) -> None:
    mech = XOAuth2(make_ctx())
    assert await mech.step(initial) == SaslChallenge(b"")
    assert await mech.step(XOAUTH2_MESSAGE) == SaslSuccess("someuser@example.com")


async def test_xoauth2_failure_json_then_empty_line() -> None:
    mech = XOAuth2(make_ctx())
    result = await mech.step(XOAUTH2_MESSAGE.replace(b"ya29", b"ya30"))
    assert isinstance(result, SaslChallenge)
    assert json.loads(result.data)["status"] == "401"
    assert await mech.step(b"") == SaslFailure("AUTH")


async def test_xoauth2_malformed() -> None:
    for bad in [b"user=x\x01\x01", b"auth=Bearer a\x01\x01", b"user=x\x01auth=Bearer a", b"\x01"]:
        assert await XOAuth2(make_ctx()).step(bad) == SaslFailure()
    mech = XOAuth2(make_ctx())
    await mech.step(None)
    assert await mech.step(b"") == SaslFailure()  # asked once, got nothing


async def test_static_token_file(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    path = tmp_path / "tokens"
    path.write_text("# comment\nalice:tok1\nalice:tok2\nbroken\n", encoding="utf-8")
    verifier = StaticTokenVerifier.from_file(path)
    assert await verifier.verify("alice", "tok1")
    assert await verifier.verify("alice", "tok2")
    assert not await verifier.verify("alice", "tok3")
    assert not await verifier.verify("bob", "tok1")


# --------------------------------------------------------------------------- registry


SCRAM_CAPABLE = {u: v for u, v in USERS.items() if v.startswith(("{PLAIN}", "{SCRAM"))}
CRAM_CAPABLE = {u: v for u, v in USERS.items() if v.startswith(("{PLAIN}", "{CRAM"))}


def test_available_mechanisms_policy() -> None:
    tls = make_ctx(tls=True, users=SCRAM_CAPABLE)
    plain = make_ctx(tls=False, users=SCRAM_CAPABLE)
    assert available_mechanisms(tls) == [
        "SCRAM-SHA-256",
        "PLAIN",
        "LOGIN",
        "OAUTHBEARER",
        "XOAUTH2",
    ]
    # RFC 2595 §3: no plaintext mechanisms without TLS unless the session allows them.
    assert available_mechanisms(plain) == ["SCRAM-SHA-256"]
    assert "PLAIN" in available_mechanisms(plain, allow_plaintext=True)
    cram = make_ctx(tls=True, users=CRAM_CAPABLE)
    assert available_mechanisms(cram, ["cram-md5", "PLAIN", "BOGUS", "PLAIN"]) == [
        "CRAM-MD5",
        "PLAIN",
    ]
    no_tokens = SaslContext(store=tls.store, hostname="h", tls_active=True, token_verifier=None)
    assert "XOAUTH2" not in available_mechanisms(no_tokens)

    class Passthrough(MemoryCredentialStore):
        reveals_secrets = False

    upstream = SaslContext(
        store=Passthrough({}), hostname="h", tls_active=True, token_verifier=None
    )
    assert available_mechanisms(upstream, ["CRAM-MD5", "SCRAM-SHA-256", "PLAIN"]) == ["PLAIN"]


def test_mechanisms_only_when_the_store_can_serve_them() -> None:
    """Issue 9 (admin 3): SCRAM needs PLAIN or SCRAM-SHA-256 entries, CRAM-MD5 needs
    PLAIN or CRAM-MD5 entries; the decision is the store's, never the user's."""
    everything = ["SCRAM-SHA-256", "CRAM-MD5", "PLAIN"]

    def offered(users: dict[str, str]) -> list[str]:
        return available_mechanisms(make_ctx(users=users), everything)

    sha512 = {"a": USERS["hashed"], "b": hash_password("SHA512-CRYPT", "x")}
    assert offered(sha512) == ["PLAIN"]
    assert offered(USERS) == everything  # a mix: each user logs in the way it can
    assert offered({"user": USERS["user"]}) == everything
    assert offered({"scram": USERS["scram"], **sha512}) == ["SCRAM-SHA-256", "PLAIN"]
    assert offered({"cram": USERS["cram"], **sha512}) == ["CRAM-MD5", "PLAIN"]
    assert offered({}) == ["PLAIN"]


def test_create_mechanism() -> None:
    ctx = make_ctx(tls=False, users=SCRAM_CAPABLE)
    assert isinstance(create_mechanism("scram-sha-256", ctx), ScramSha256)
    assert create_mechanism("PLAIN", ctx) is None  # not usable without TLS
    assert isinstance(create_mechanism("plain", ctx, allow_plaintext=True), Plain)
    assert create_mechanism("GSSAPI", ctx) is None
    assert create_mechanism("SCRAM-SHA-256-PLUS", ctx) is None


# --------------------------------------------------------------------------- robustness


class FailingStore(MemoryCredentialStore):
    async def verify_password(self, user: str, password: str) -> bool:
        raise TemporaryFailure("down")

    async def lookup(self, user: str) -> None:
        raise TemporaryFailure("down")


async def test_store_outage_is_sys_temp() -> None:
    ctx = SaslContext(store=FailingStore({}), hostname="h", tls_active=True, token_verifier=None)
    assert (await Plain(ctx).step(b"\0u\0p")).code == "SYS/TEMP"  # type: ignore[union-attr]
    assert (await ScramSha256(ctx).step(b"n,,n=u,r=abc")).code == "SYS/TEMP"  # type: ignore[union-attr]


MECHS: list[type[SaslMechanism]] = list(ALL_MECHANISMS.values())


@settings(max_examples=150, deadline=None)
@given(
    mech_index=st.integers(0, len(MECHS) - 1),
    steps=st.lists(st.one_of(st.none(), octets(max_size=300)), min_size=1, max_size=4),
)
async def test_garbage_never_raises(mech_index: int, steps: list[bytes | None]) -> None:
    mech = MECHS[mech_index](make_ctx(cb=b"cb"))
    for data in steps:
        result = await mech.step(data)
        assert isinstance(result, SaslChallenge | SaslSuccess | SaslFailure)
        assert not isinstance(result, SaslSuccess)
        # SYS/TEMP here could only come from an internal error caught in step().
        assert not (isinstance(result, SaslFailure) and result.code != "AUTH")


# --------------------------------------------------------------------------- APOP


async def test_apop_rfc1939_example() -> None:
    store = MemoryCredentialStore({"mrose": "{PLAIN}tanstaaf", "h": hash_password("SSHA512", "x")})
    stamp = b"<1896.697170952@dbc.mtview.ca.us>"
    digest = b"c4c9334bac560ecc979e58001b3e22fb"
    assert await verify_apop(store, "mrose", stamp, digest)
    assert await verify_apop(store, "mrose", stamp, digest.upper())
    assert not await verify_apop(store, "mrose", stamp, b"c4c9334bac560ecc979e58001b3e22fc")
    assert not await verify_apop(store, "mrose", b"<other@x>", digest)
    assert not await verify_apop(store, "h", stamp, digest)  # no plaintext secret
    assert not await verify_apop(store, "nobody", stamp, digest)
    assert not await verify_apop(store, "mrose", stamp, b"\xff")
