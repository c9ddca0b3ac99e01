"""Server-side SASL mechanisms, sans-I/O (RFC 4422 as profiled for POP3 by RFC 5034).

The protocol layer does the RFC 5034 framing (``AUTH mech [initial-response]``,
``+ base64`` challenges, ``*`` cancels, ``=`` is an empty initial response) and hands
each mechanism raw decoded bytes. A mechanism answers each :meth:`SaslMechanism.step`
with one of:

- :class:`SaslChallenge`: send ``+ base64(data)`` (``+ `` for empty data) and feed the
  client's next line to ``step``;
- :class:`SaslSuccess`: the user is authenticated. If ``data`` is not None it is the
  mechanism's additional data with success (SCRAM's ``v=``). POP3 has no way to carry
  it on the ``+OK`` (RFC 5034 §4, RFC 4422 §3.6), so the session sends it as a last
  ``+ base64`` challenge, waits for an empty client line, then replies ``+OK``;
- :class:`SaslFailure`: reply ``-ERR [code] text``.

``step`` never raises for anything a client sends: undecodable, truncated or
oversized payloads are failures. After a success or failure every further call is a
failure.

Mechanisms: PLAIN (RFC 4616), LOGIN, CRAM-MD5 (RFC 2195), SCRAM-SHA-256 and
SCRAM-SHA-256-PLUS (RFC 5802, RFC 7677), OAUTHBEARER (RFC 7628), XOAUTH2, and GSSAPI
(Kerberos V5, RFC 4752; :mod:`pypop.auth.kerberos`, with the ``gssapi`` extra).
"""

from __future__ import annotations

import abc
import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import trio

from pypop import wire
from pypop.auth.kerberos import GssapiAcceptor, GssapiError, GssapiSettings
from pypop.auth.prep import try_password, try_username
from pypop.auth.schemes import SCRAM_ITERATIONS, ScramKeys, scram_keys_from_password
from pypop.auth.store import CredentialStore
from pypop.auth.tokens import TokenVerifier
from pypop.errors import TemporaryFailure
from pypop.protocol.replies import Text

__all__ = [
    "ALL_MECHANISMS",
    "DEFAULT_MECHANISMS",
    "CramMd5",
    "Gssapi",
    "Login",
    "OAuthBearer",
    "Plain",
    "SaslChallenge",
    "SaslContext",
    "SaslFailure",
    "SaslMechanism",
    "SaslResult",
    "SaslSuccess",
    "ScramSha256",
    "ScramSha256Plus",
    "XOAuth2",
    "available_mechanisms",
    "create_mechanism",
]

log = logging.getLogger("pypop.auth")

T = TypeVar("T")

MAX_FIELD = 255
"""Longest user name, password, authzid or token part we take (RFC 4616 §2: at least 255)."""

MAX_TOKEN = 8192
"""Longest bearer token (JWTs are long; the protocol layer must allow such lines)."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class SaslChallenge:
    data: bytes


@dataclass(frozen=True, slots=True)
class SaslSuccess:
    user: str
    data: bytes | None = None


@dataclass(frozen=True, slots=True)
class SaslFailure:
    code: str = "AUTH"
    """RFC 3206 response code: ``AUTH`` (credentials) or ``SYS/TEMP`` (try later)."""
    text: Text = Text.AUTH_FAILED
    error: BaseException | None = field(default=None, compare=False)
    """For ``SYS/TEMP``: the store's failure, which the server logs (never sent)."""


SaslResult = SaslChallenge | SaslSuccess | SaslFailure


@dataclass(frozen=True, slots=True)
class SaslContext:
    store: CredentialStore
    hostname: str
    tls_active: bool
    token_verifier: TokenVerifier | None = None
    channel_binding: bytes | None = None
    """Channel-binding data of the TLS connection, enables SCRAM-SHA-256-PLUS."""
    channel_binding_type: str = "tls-unique"
    """Its RFC 5056 name: ``tls-unique`` (TLS 1.2) or ``tls-exporter`` (RFC 9266)."""
    hash_limiter: trio.CapacityLimiter | None = None
    """Bounds the threads SCRAM uses to derive keys from PLAIN entries (None: trio's)."""
    salt_key: bytes | None = None
    """The server secret SCRAM salts of PLAIN entries and of unknown users are keyed
    with (:func:`pypop.auth.secret.load_or_create`); it must outlive restarts, or the
    salts of unknown users change while real ones do not. None: a per-process key."""
    oauth_scope: str | None = None
    """Reported in the OAUTHBEARER/XOAUTH2 error JSON when set."""
    gssapi: GssapiSettings | None = None
    """The Kerberos service key (``auth.gssapi_keytab``); GSSAPI is offered only
    with it."""


class _Abort(Exception):
    """Internal: the client's message is malformed; fail the exchange."""


class SaslMechanism(abc.ABC):
    """One authentication exchange. Create one per ``AUTH`` command."""

    name: ClassVar[str]
    plaintext: ClassVar[bool]
    """True if the client's secret crosses the wire as it is (refused without TLS)."""

    def __init__(self, ctx: SaslContext) -> None:
        self.ctx = ctx
        self._finished = False
        self.attempted_user: str | None = None
        """The user this exchange tried to authenticate (for logs and penalties)."""
        self.attempted_secret: bytes | None = None
        """The password/token, where the mechanism sees it: for
        :meth:`pypop.auth.penalty.AuthPenalty.record_failure`; else None."""

    @property
    def finished(self) -> bool:
        return self._finished

    async def step(self, response: bytes | None) -> SaslResult:
        """Feed the client's (decoded) response; ``None`` = no initial response."""
        if self._finished:
            return SaslFailure()
        try:
            result = await self._step(response)
        except (_Abort, ValueError, UnicodeError, binascii.Error):
            result = SaslFailure()
        except TemporaryFailure as exc:
            result = SaslFailure("SYS/TEMP", Text.AUTH_TEMPORARY, exc)
        except Exception as exc:
            log.exception("SASL %s: internal error", self.name)
            error = TemporaryFailure(f"SASL {self.name}: internal error {type(exc).__name__}")
            error.__cause__ = exc
            result = SaslFailure("SYS/TEMP", Text.AUTH_TEMPORARY, error)
        if not isinstance(result, SaslChallenge):
            self._finished = True
        return result

    @abc.abstractmethod
    async def _step(self, response: bytes | None) -> SaslResult: ...


def _text(data: bytes, limit: int = MAX_FIELD) -> str:
    """Strict UTF-8 of a field: no NUL/control characters, at most ``limit`` octets."""
    if len(data) > limit:
        raise _Abort
    text = data.decode("utf-8")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise _Abort
    return text


def _name(text: str) -> str:
    """A user name as the store keys it (RFC 8265 UsernameCasePreserved); an empty
    name stays empty (the caller refuses it), one PRECIS refuses aborts."""
    if not text:
        return text
    name = try_username(text)
    if name is None:
        raise _Abort
    return name


async def _check_password(ctx: SaslContext, user: str, password: str) -> bool:
    prepared = try_password(password)
    if prepared is None:  # RFC 8265 OpaqueString refuses it: it matches nothing
        return False
    return await ctx.store.verify_password(user, prepared)


# --------------------------------------------------------------------------- PLAIN, LOGIN


class Plain(SaslMechanism):
    """RFC 4616: ``[authzid] NUL authcid NUL passwd``.

    The authorization identity must be empty or equal to the authentication identity
    (no proxy authorization).
    """

    name = "PLAIN"
    plaintext = True

    async def _step(self, response: bytes | None) -> SaslResult:
        if response is None:
            return SaslChallenge(b"")  # ask for the message
        parts = response.split(b"\0")
        if len(parts) != 3:
            return SaslFailure()
        raw_authzid, raw_authcid = _text(parts[0]), _text(parts[1])
        self.attempted_user = raw_authcid  # as sent, for the log
        authzid, authcid = _name(raw_authzid), _name(raw_authcid)
        if len(parts[2]) > MAX_FIELD or not parts[2] or not authcid:
            return SaslFailure()
        password = parts[2].decode("utf-8")
        if "\0" in password:
            return SaslFailure()
        self.attempted_user, self.attempted_secret = authcid, parts[2]
        if authzid and authzid != authcid:
            return SaslFailure()
        if await _check_password(self.ctx, authcid, password):
            return SaslSuccess(authcid)
        return SaslFailure()


class Login(SaslMechanism):
    """The obsolete but common LOGIN: ``Username:`` then ``Password:`` challenges.

    An initial response, if given, is the user name (as Outlook and curl send it).
    """

    name = "LOGIN"
    plaintext = True

    def __init__(self, ctx: SaslContext) -> None:
        super().__init__(ctx)
        self._stage = 0  # 0: start, 1: "Username:" sent, 2: "Password:" sent
        self._user = ""

    async def _step(self, response: bytes | None) -> SaslResult:
        if self._stage == 0 and response is None:
            self._stage = 1
            return SaslChallenge(b"Username:")
        if response is None:
            return SaslFailure()
        if self._stage < 2:
            self.attempted_user = _text(response)  # as sent, for the log
            self._user = _name(self.attempted_user)
            self.attempted_user = self._user
            self._stage = 2
            return SaslChallenge(b"Password:")
        if not response or len(response) > MAX_FIELD:
            return SaslFailure()
        password = response.decode("utf-8")
        self.attempted_secret = response
        if not self._user:
            return SaslFailure()
        if await _check_password(self.ctx, self._user, password):
            return SaslSuccess(self._user)
        return SaslFailure()


# --------------------------------------------------------------------------- CRAM-MD5


_HEX32 = re.compile(rb"[0-9a-fA-F]{32}")


class CramMd5(SaslMechanism):
    """RFC 2195: challenge ``<pid.n.random@host>``, response ``user SP hex-hmac``.

    Needs a PLAIN/CLEARTEXT or CRAM-MD5 (stored HMAC state) entry; anyone else gets the
    same work against a random state, then a failure.
    """

    name = "CRAM-MD5"
    plaintext = False

    def __init__(self, ctx: SaslContext) -> None:
        super().__init__(ctx)
        self._challenge: bytes | None = None

    async def _step(self, response: bytes | None) -> SaslResult:
        if self._challenge is None:
            if response is not None:
                return SaslFailure()  # server-first mechanism: no initial response
            try:
                challenge = wire.make_challenge(self.ctx.hostname)
            except ValueError:
                challenge = wire.make_challenge("localhost")
            self._challenge = challenge.encode("ascii")
            return SaslChallenge(self._challenge)
        if response is None:
            return SaslFailure()
        user_b, sep, digest = response.rpartition(b" ")
        if not sep or not _HEX32.fullmatch(digest):
            return SaslFailure()
        user = _name(_text(user_b))
        if not user:
            return SaslFailure()
        self.attempted_user = user
        cred = await self.ctx.store.lookup(user)
        context = cred.cram_md5_context() if cred is not None else None
        if context is None:
            wire.cram_md5_verify_context(secrets.token_bytes(32), self._challenge, digest)
            return SaslFailure()
        if wire.cram_md5_verify_context(context, self._challenge, digest):
            return SaslSuccess(user)
        return SaslFailure()


# --------------------------------------------------------------------------- SCRAM

_PROCESS_SALT_KEY = secrets.token_bytes(32)  # only without a server secret
_DUMMY_PASSWORD = secrets.token_urlsafe(24)  # derived and thrown away: the same work
MAX_NONCE = 255
"""Longest client nonce taken (RFC 5802 sets none; clients send 24-32 characters). The
server-first message echoes it, and must stay within a 512-octet line."""
_ATTR = re.compile(r"[A-Za-z]=")
_PRINTABLE_NONCE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # RFC 5802: printable except ","


def _decode_saslname(value: str) -> str:
    """RFC 5802 saslname: ``=2C`` is ``,`` and ``=3D`` is ``=``; any other ``=`` is bad."""
    if "," in value:
        raise _Abort
    out = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "=":
            code = value[i + 1 : i + 3]
            if code == "2C":
                out.append(",")
            elif code == "3D":
                out.append("=")
            else:
                raise _Abort
            i += 3
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _attrs(message: str) -> list[tuple[str, str]]:
    result = []
    for part in message.split(","):
        if not _ATTR.match(part):
            raise _Abort
        result.append((part[0], part[2:]))
    return result


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


class ScramSha256(SaslMechanism):
    """RFC 5802 with SHA-256 (RFC 7677). Server keys come from, in order:

    - a stored SCRAM-SHA-256 entry (Dovecot's ``iter,salt,StoredKey,ServerKey``);
    - a PLAIN/CLEARTEXT entry, derived with ``iterations`` and a salt that is a keyed
      hash of the user name (``ctx.salt_key``, the server secret: the same salt
      across restarts);
    - otherwise (unknown user, or a one-way hash) a fake salt made the same way, with
      the iteration count and salt length of the store's typical SCRAM entry, and the
      exchange fails at the proof, so that the server-first message does not tell
      whether the user exists.

    Every first step does one key derivation at ``iterations`` (for stored entries and
    fakes from a random password, thrown away), so known and unknown users cost the
    same. ``server_nonce`` and ``salt`` (for PLAIN entries and fakes) can be fixed for
    tests.
    """

    name = "SCRAM-SHA-256"
    plaintext = False
    _cbind_required: ClassVar[bool] = False

    def __init__(
        self,
        ctx: SaslContext,
        *,
        server_nonce: str | None = None,
        salt: bytes | None = None,
        iterations: int = SCRAM_ITERATIONS,
    ) -> None:
        super().__init__(ctx)
        self._server_nonce = server_nonce or secrets.token_urlsafe(18)
        self._fixed_salt = salt
        self._iterations = iterations
        self._state = 0
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._user = ""
        self._keys: ScramKeys | None = None
        self._known = False

    def _salt_for(self, user: str, length: int = 16) -> bytes:
        if self._fixed_salt is not None:
            return self._fixed_salt
        key = self.ctx.salt_key or _PROCESS_SALT_KEY
        name = user.encode("utf-8", "surrogatepass")
        out = b""
        block = 0
        while len(out) < length:
            msg = b"pypop scram salt\0" + bytes([block]) + name
            out += hmac.new(key, msg, hashlib.sha256).digest()
            block += 1
        return out[:length]

    async def _derive(self, password: str, salt: bytes) -> ScramKeys:
        return await trio.to_thread.run_sync(
            scram_keys_from_password,
            password,
            salt,
            self._iterations,
            limiter=self.ctx.hash_limiter,
        )

    def _check_cbind_flag(self, flag: str) -> None:
        plus_offered = self.ctx.channel_binding is not None
        if self._cbind_required:
            if flag != f"p={self.ctx.channel_binding_type}":
                raise _Abort
        elif flag == "y":
            if plus_offered:
                raise _Abort  # RFC 5802 §6: the client thinks we lack -PLUS: a downgrade
        elif flag != "n":
            raise _Abort  # "p=..." with the non-PLUS mechanism

    async def _keys_for(self, user: str) -> tuple[ScramKeys, bool]:
        store = self.ctx.store
        cred = await store.lookup(user)
        if cred is not None:
            stored = cred.scram_sha256_keys()
            if stored is not None:
                await self._derive(_DUMMY_PASSWORD, self._salt_for(user))  # same work
                return stored, True
            password = cred.plaintext()
            if password is not None:
                return await self._derive(password, self._salt_for(user)), True
        # Unknown, or a one-way hash: look like the store's typical SCRAM entry.
        profile = getattr(store, "scram_profile", None)
        typical = profile() if callable(profile) else None
        iterations, salt_len = typical if typical is not None else (self._iterations, 16)
        salt = self._salt_for(user, max(1, min(salt_len, 64)))
        dummy = await self._derive(_DUMMY_PASSWORD, salt)
        return ScramKeys(iterations, salt, dummy.stored_key, dummy.server_key), False

    async def _step(self, response: bytes | None) -> SaslResult:
        if self._state == 0:
            if response is None:
                return SaslChallenge(b"")  # client-first: ask for the message
            return await self._client_first(response)
        if response is None:
            return SaslFailure()
        return self._client_final(response)

    async def _client_first(self, response: bytes) -> SaslResult:
        message = response.decode("utf-8")
        parts = message.split(",", 2)
        if len(parts) != 3:
            return SaslFailure()
        flag, authzid_part, bare = parts
        self._check_cbind_flag(flag)
        attrs = _attrs(bare)
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r":
            return SaslFailure()  # includes a leading m= (RFC 5802 §5.1: must fail)
        user = _name(_decode_saslname(attrs[0][1]))
        nonce = attrs[1][1]
        if not user or len(user.encode()) > MAX_FIELD or len(nonce) > MAX_NONCE:
            return SaslFailure()
        if not _PRINTABLE_NONCE.fullmatch(nonce):
            return SaslFailure()
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in user):
            return SaslFailure()
        if authzid_part and (
            not authzid_part.startswith("a=") or _name(_decode_saslname(authzid_part[2:])) != user
        ):
            return SaslFailure()  # no proxy authorization
        self.attempted_user = user
        self._user = user
        self._gs2_header = flag + "," + authzid_part + ","
        self._client_first_bare = bare
        self._keys, self._known = await self._keys_for(user)
        self._nonce = nonce + self._server_nonce
        salt = base64.b64encode(self._keys.salt).decode("ascii")
        self._server_first = f"r={self._nonce},s={salt},i={self._keys.iterations}"
        self._state = 1
        return SaslChallenge(self._server_first.encode("ascii"))

    def _client_final(self, response: bytes) -> SaslResult:
        assert self._keys is not None
        message = response.decode("utf-8")
        cut = message.rfind(",p=")
        if cut < 0:
            return SaslFailure()
        without_proof, proof_b64 = message[:cut], message[cut + 3 :]
        attrs = _attrs(without_proof)
        if len(attrs) < 2 or attrs[0][0] != "c" or attrs[1][0] != "r":
            return SaslFailure()
        expected_cb = self._gs2_header.encode("utf-8")
        if self._gs2_header.startswith("p="):
            assert self.ctx.channel_binding is not None
            expected_cb += self.ctx.channel_binding
        cb = base64.b64decode(attrs[0][1], validate=True)
        if not hmac.compare_digest(cb, expected_cb):
            return SaslFailure()
        if attrs[1][1] != self._nonce:
            return SaslFailure()
        proof = base64.b64decode(proof_b64, validate=True)
        if len(proof) != 32:
            return SaslFailure()
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        client_signature = hmac.new(self._keys.stored_key, auth_message, hashlib.sha256).digest()
        client_key = _xor(proof, client_signature)
        ok = wire.constant_time_eq(hashlib.sha256(client_key).digest(), self._keys.stored_key)
        if not (ok and self._known):
            return SaslFailure()
        server_signature = hmac.new(self._keys.server_key, auth_message, hashlib.sha256).digest()
        return SaslSuccess(self._user, b"v=" + base64.b64encode(server_signature))


class ScramSha256Plus(ScramSha256):
    """SCRAM-SHA-256-PLUS: the same, bound to the TLS channel (``ctx.channel_binding``)."""

    name = "SCRAM-SHA-256-PLUS"
    _cbind_required = True


# --------------------------------------------------------------------------- OAuth


_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*)")
_KEY = re.compile(r"[A-Za-z]+")


def _kvpairs(data: bytes) -> dict[str, str]:
    """``key=value`` pairs each ended by 0x01, the list ended by another 0x01."""
    if not data.endswith(b"\x01\x01"):
        raise _Abort
    pairs: dict[str, str] = {}
    for item in data[:-2].split(b"\x01"):
        key, sep, value = item.decode("utf-8").partition("=")
        if not sep or not _KEY.fullmatch(key) or key in pairs:
            raise _Abort
        pairs[key] = value
    return pairs


def _bearer_token(value: str | None) -> str:
    if value is None or len(value) > MAX_TOKEN:
        raise _Abort
    match = _BEARER.fullmatch(value)
    if match is None:
        raise _Abort
    return match.group(1)


class _OAuthBase(SaslMechanism):
    plaintext = True  # a bearer token is as good as a password to whoever sees it

    def __init__(self, ctx: SaslContext) -> None:
        super().__init__(ctx)
        self._error_sent = False

    def _error_json(self, status: str) -> bytes:
        body: dict[str, str] = {"status": status, "schemes": "bearer"}
        if self.ctx.oauth_scope:
            body["scope"] = self.ctx.oauth_scope
        return json.dumps(body, separators=(",", ":")).encode("ascii")

    async def _verify(self, user: str, token: str) -> bool:
        self.attempted_user, self.attempted_secret = user, token.encode("ascii")
        verifier = self.ctx.token_verifier
        if verifier is None:
            return False
        return await verifier.verify(user, token)


class OAuthBearer(_OAuthBase):
    """RFC 7628: ``n,a=user,^Aauth=Bearer token^A^A`` (plus optional host=/port=).

    A rejected token gets the RFC 7628 §3.2.2 JSON error as a challenge; the client's
    answer (a single 0x01) then gets the failure. Malformed messages fail at once.
    """

    name = "OAUTHBEARER"

    async def _step(self, response: bytes | None) -> SaslResult:
        if self._error_sent:
            return SaslFailure()  # the client's 0x01 (or anything else) after the error
        if response is None:
            return SaslChallenge(b"")
        if len(response) > MAX_TOKEN + 1024:
            return SaslFailure()
        gs2, sep, rest = response.partition(b",\x01")
        if not sep:
            return SaslFailure()
        flag, comma, authzid = gs2.decode("utf-8").partition(",")
        if not comma or flag not in ("n", "y"):
            return SaslFailure()  # no channel binding with OAUTHBEARER
        if not authzid.startswith("a="):
            return SaslFailure()  # we need the user name to check the token against
        user = _name(_text(_decode_saslname(authzid[2:]).encode("utf-8")))
        if not user:
            return SaslFailure()
        pairs = _kvpairs(rest)
        token = _bearer_token(pairs.get("auth"))
        if await self._verify(user, token):
            return SaslSuccess(user)
        self._error_sent = True
        return SaslChallenge(self._error_json("invalid_token"))


class XOAuth2(_OAuthBase):
    """Google/Microsoft XOAUTH2: ``user=U^Aauth=Bearer T^A^A``.

    With an initial response: one step. Without one (Microsoft 365 clients): an empty
    challenge, then the same message on the next line. A rejected token gets a JSON
    error challenge; the client's (empty) answer then gets the failure.
    """

    name = "XOAUTH2"

    def __init__(self, ctx: SaslContext) -> None:
        super().__init__(ctx)
        self._asked = False

    async def _step(self, response: bytes | None) -> SaslResult:
        if self._error_sent:
            return SaslFailure()
        if not response:  # no initial response, or "=": the two-step form
            if self._asked:
                return SaslFailure()
            self._asked = True
            return SaslChallenge(b"")
        if len(response) > MAX_TOKEN + 1024:
            return SaslFailure()
        pairs = _kvpairs(response)
        user = _name(_text(pairs.get("user", "").encode("utf-8")))
        if not user:
            return SaslFailure()
        token = _bearer_token(pairs.get("auth"))
        if await self._verify(user, token):
            return SaslSuccess(user)
        self._error_sent = True
        return SaslChallenge(self._error_json("401"))


# --------------------------------------------------------------------------- GSSAPI


class Gssapi(SaslMechanism):
    """RFC 4752 (Kerberos V5) server side: the SASL framing around
    :class:`pypop.auth.kerberos.GssapiAcceptor`, whose GSS calls (keytab, replay
    cache) run in worker threads."""

    name = "GSSAPI"
    plaintext = False

    def __init__(self, ctx: SaslContext) -> None:
        super().__init__(ctx)
        self._stage = 0  # 0: context tokens; 1: final token sent; 2: layer offered
        self._asked = False
        self._acceptor: GssapiAcceptor | None = None

    async def _gss(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self.ctx.hash_limiter)

    async def _step(self, response: bytes | None) -> SaslResult:
        settings = self.ctx.gssapi
        if settings is None:
            return SaslFailure()
        try:
            return await self._gss_step(settings, response)
        except GssapiError as exc:
            log.info("GSSAPI: %s", exc)  # the client gets -ERR [AUTH], no details
            return SaslFailure()

    async def _gss_step(self, settings: GssapiSettings, response: bytes | None) -> SaslResult:
        if self._stage == 0:
            if not response:
                if self._asked:  # RFC 4752: the client sends the first token
                    return SaslFailure()
                self._asked = True
                return SaslChallenge(b"")
            if self._acceptor is None:
                self._acceptor = await self._gss(lambda: GssapiAcceptor(settings))
            acceptor = self._acceptor
            token = response
            out, established = await self._gss(lambda: acceptor.accept(token))
            if not established:
                return SaslChallenge(out)
            self.attempted_user = acceptor.principal
            if out:  # the last context token; the client answers it with nothing
                self._stage = 1
                return SaslChallenge(out)
            return await self._offer_layer(acceptor)
        established_acceptor = self._acceptor
        assert established_acceptor is not None
        if self._stage == 1:
            if response:
                return SaslFailure()
            return await self._offer_layer(established_acceptor)
        if response is None:
            return SaslFailure()
        answer = response
        user = await self._gss(lambda: established_acceptor.finish(answer))
        self.attempted_user = user
        # A valid ticket is not an account: as Dovecot's userdb lookup, the user must
        # be known to the credential store (a passwd-file line may have no password).
        has_account = getattr(self.ctx.store, "has_account", None)
        if has_account is not None:
            known: bool = await has_account(user)
        else:
            known = await self.ctx.store.lookup(user) is not None
        if not known:
            log.info("GSSAPI: %r has a ticket but no account here", user)
            return SaslFailure()
        return SaslSuccess(user)

    async def _offer_layer(self, acceptor: GssapiAcceptor) -> SaslResult:
        self._stage = 2
        return SaslChallenge(await self._gss(acceptor.offer_layer))


# --------------------------------------------------------------------------- registry


ALL_MECHANISMS: dict[str, type[SaslMechanism]] = {
    m.name: m
    for m in (Gssapi, ScramSha256Plus, ScramSha256, Plain, Login, CramMd5, OAuthBearer, XOAuth2)
}

DEFAULT_MECHANISMS: tuple[str, ...] = (
    "GSSAPI",
    "SCRAM-SHA-256-PLUS",
    "SCRAM-SHA-256",
    "PLAIN",
    "LOGIN",
    "OAUTHBEARER",
    "XOAUTH2",
)
"""Offered when the configuration names none (CRAM-MD5 is opt-in: it needs
plaintext-equivalent secrets on the server). OAuth ones only with a token verifier,
GSSAPI only with a keytab."""


_SCRAM_SCHEMES = frozenset({"PLAIN", "SCRAM-SHA-256"})
_CRAM_SCHEMES = frozenset({"PLAIN", "CRAM-MD5"})


def available_mechanisms(
    ctx: SaslContext,
    enabled: Sequence[str] | None = None,
    *,
    allow_plaintext: bool = False,
) -> list[str]:
    """The mechanisms usable on this connection now, in the configured order.

    - plaintext mechanisms (PLAIN, LOGIN, OAUTHBEARER, XOAUTH2) only when
      ``ctx.tls_active`` or ``allow_plaintext`` (the session decides that: loopback
      peers, or the admin's explicit consent; RFC 2595 §3);
    - OAUTHBEARER/XOAUTH2 only with ``ctx.token_verifier``;
    - SCRAM-SHA-256-PLUS only with ``ctx.channel_binding``;
    - GSSAPI only with ``ctx.gssapi`` (a keytab);
    - CRAM-MD5 and SCRAM only if the store can serve them: a store with
      ``reveals_secrets = False`` cannot; a store that says which password schemes it
      holds (``stored_schemes``, a frozenset) serves SCRAM-SHA-256 only if it holds
      PLAIN or SCRAM-SHA-256 entries, and CRAM-MD5 only if it holds PLAIN or CRAM-MD5
      entries. The decision is the store's as a whole, so it tells nothing about
      which users exist (a store of SHA512-CRYPT entries never offers SCRAM, whose
      exchange would fail for every user).
    """
    names = DEFAULT_MECHANISMS if enabled is None else enabled
    reveals = bool(getattr(ctx.store, "reveals_secrets", True))
    held: frozenset[str] | None = getattr(ctx.store, "stored_schemes", None)
    scram_ok = reveals and (held is None or bool(held & _SCRAM_SCHEMES))
    cram_ok = reveals and (held is None or bool(held & _CRAM_SCHEMES))
    result: list[str] = []
    for raw in names:
        name = raw.upper()
        cls = ALL_MECHANISMS.get(name)
        if cls is None or name in result:
            continue
        if cls.plaintext and not (ctx.tls_active or allow_plaintext):
            continue
        if issubclass(cls, _OAuthBase) and ctx.token_verifier is None:
            continue
        if cls is ScramSha256Plus and ctx.channel_binding is None:
            continue
        if cls is Gssapi and ctx.gssapi is None:
            continue
        if cls is CramMd5 and not cram_ok:
            continue
        if cls in (ScramSha256, ScramSha256Plus) and not scram_ok:
            continue
        result.append(name)
    return result


def create_mechanism(
    name: str,
    ctx: SaslContext,
    enabled: Sequence[str] | None = None,
    *,
    allow_plaintext: bool = False,
) -> SaslMechanism | None:
    """A new exchange for ``name`` (any case), or None if it is unknown or not usable now
    (same rules and arguments as :func:`available_mechanisms`)."""
    upper = name.upper()
    usable = available_mechanisms(ctx, enabled, allow_plaintext=allow_plaintext)
    if upper not in usable:
        return None
    if upper == ScramSha256.name and ScramSha256Plus.name not in usable:
        # RFC 5802 §6: "y" is a downgrade only if -PLUS was offered; a TLS channel
        # binding without -PLUS enabled offers nothing to bind with.
        ctx = dataclasses.replace(ctx, channel_binding=None)
    return ALL_MECHANISMS[upper](ctx)
