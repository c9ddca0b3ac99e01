"""Client roles of the SASL mechanisms and APOP, sans-I/O.

The server's side of each mechanism is in :mod:`pypop.auth.sasl`; the wire helpers
(saslname decoding, SCRAM attribute lists, key derivation in
:func:`pypop.auth.schemes.scram_derive`, the APOP and CRAM-MD5 digests in
:mod:`pypop.wire`) are the same code for both roles.

A mechanism is created with the credentials; the driver sends
``AUTH name [initial]``, feeds each ``+`` challenge to :meth:`ClientMechanism.step`
and sends what it returns, then calls :meth:`ClientMechanism.finish` on ``+OK``
(SCRAM refuses a server that never proved it knows the password).

Nothing here imports the server's password-hash libraries.
"""

from __future__ import annotations

import abc
import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable, Sequence
from typing import ClassVar

from pypop import wire
from pypop.auth.kerberos import GssapiClient, GssapiError
from pypop.auth.sasl import _PRINTABLE_NONCE, _Abort, _attrs, _xor
from pypop.auth.schemes import scram_derive
from pypop.errors import AuthError, ProtocolError

__all__ = [
    "CLIENT_MECHANISMS",
    "PASSWORD_PREFERENCE",
    "TOKEN_PREFERENCE",
    "ClientCramMd5",
    "ClientGssapi",
    "ClientLogin",
    "ClientMechanism",
    "ClientOAuthBearer",
    "ClientPlain",
    "ClientScramSha256",
    "ClientScramSha256Plus",
    "ClientXOAuth2",
    "apop_digest",
    "choose_mechanism",
    "encode_saslname",
]

MAX_SCRAM_ITERATIONS = 1_000_000
"""A server may not make us spin longer than this (everything a peer controls is bounded)."""


def encode_saslname(name: str) -> str:
    """RFC 5802 saslname: ``,`` is ``=2C`` and ``=`` is ``=3D`` (the inverse of the
    server's decoder)."""
    return name.replace("=", "=3D").replace(",", "=2C")


def apop_digest(timestamp: bytes, password: str) -> bytes:
    """RFC 1939 §7: hex MD5 of the greeting's timestamp and the secret."""
    return wire.apop_digest(timestamp, password.encode("utf-8")).encode("ascii")


class ClientMechanism(abc.ABC):
    """One client-side authentication exchange."""

    name: ClassVar[str]
    plaintext: ClassVar[bool]
    """True if the secret crosses the wire as it is (refused without TLS by policy)."""
    uses_token: ClassVar[bool] = False

    def __init__(self, user: str, secret: str) -> None:
        self.user = user
        self.secret = secret

    def initial(self) -> bytes | None:
        """The initial response, or None for a server-first mechanism."""
        return None

    @abc.abstractmethod
    def step(self, challenge: bytes) -> bytes:
        """The answer to a server challenge. ``AuthError``/``ProtocolError`` if the
        server's message is wrong."""

    def finish(self) -> None:  # noqa: B027 - most mechanisms have nothing to check
        """The server said ``+OK``; raise if that is not credible."""

    def failure_detail(self) -> str | None:
        """What the server's last challenge said about a failure (OAuth JSON)."""
        return None


class ClientPlain(ClientMechanism):
    """RFC 4616: ``NUL user NUL password`` (empty authzid)."""

    name = "PLAIN"
    plaintext = True

    def initial(self) -> bytes:
        return b"\0" + self.user.encode() + b"\0" + self.secret.encode()

    def step(self, challenge: bytes) -> bytes:
        if challenge:
            raise ProtocolError("PLAIN: unexpected non-empty challenge")
        return self.initial()


class ClientLogin(ClientMechanism):
    """LOGIN: ``Username:`` then ``Password:`` (answered by order, not by text)."""

    name = "LOGIN"
    plaintext = True

    def __init__(self, user: str, secret: str) -> None:
        super().__init__(user, secret)
        self._stage = 0

    def step(self, challenge: bytes) -> bytes:
        self._stage += 1
        if self._stage == 1:
            return self.user.encode()
        if self._stage == 2:
            return self.secret.encode()
        raise ProtocolError("LOGIN: more than two challenges")


class ClientCramMd5(ClientMechanism):
    """RFC 2195: ``user SP hex(HMAC-MD5(password, challenge))``."""

    name = "CRAM-MD5"
    plaintext = False

    def step(self, challenge: bytes) -> bytes:
        if not challenge:
            raise ProtocolError("CRAM-MD5: empty challenge")
        digest = wire.cram_md5_digest(self.secret.encode("utf-8"), challenge)
        return self.user.encode() + b" " + digest.encode("ascii")


class ClientScramSha256(ClientMechanism):
    """RFC 5802 / RFC 7677 client. ``channel_binding`` is the TLS channel's binding
    data when TLS is active (it selects ``y`` over ``n`` without -PLUS)."""

    name = "SCRAM-SHA-256"
    plaintext = False
    _plus: ClassVar[bool] = False

    def __init__(
        self,
        user: str,
        secret: str,
        *,
        channel_binding: bytes | None = None,
        binding_type: str = "tls-unique",
        nonce: str | None = None,
    ) -> None:
        super().__init__(user, secret)
        if self._plus and channel_binding is None:
            raise ValueError("SCRAM-SHA-256-PLUS needs channel binding data")
        self._cb = channel_binding
        self._nonce = nonce or secrets.token_urlsafe(18)
        if self._plus:
            self._gs2 = f"p={binding_type},,"
        else:
            self._gs2 = "y,," if channel_binding is not None else "n,,"
        self._bare = f"n={encode_saslname(user)},r={self._nonce}"
        self._stage = 0
        self._server_signature = b""
        self._verified = False

    def initial(self) -> bytes:
        return (self._gs2 + self._bare).encode("utf-8")

    def step(self, challenge: bytes) -> bytes:
        self._stage += 1
        try:
            if self._stage == 1:
                return self._client_final(challenge.decode("utf-8"))
            if self._stage == 2:
                self._verify(challenge.decode("utf-8"))
                return b""
        except (_Abort, UnicodeError, ValueError, binascii.Error) as exc:
            if isinstance(exc, AuthError | ProtocolError):
                raise
            raise ProtocolError(f"{self.name}: malformed server message") from None
        raise ProtocolError(f"{self.name}: more challenges than the mechanism has")

    def _client_final(self, server_first: str) -> bytes:
        attrs = dict(_attrs(server_first))
        if server_first.startswith("m="):
            raise ProtocolError(f"{self.name}: unsupported mandatory extension")
        nonce, salt_b64, iters = attrs.get("r"), attrs.get("s"), attrs.get("i")
        if nonce is None or salt_b64 is None or iters is None:
            raise ProtocolError(f"{self.name}: server-first message incomplete")
        if not nonce.startswith(self._nonce) or len(nonce) <= len(self._nonce):
            raise ProtocolError(f"{self.name}: server nonce does not extend ours")
        if not _PRINTABLE_NONCE.fullmatch(nonce):
            raise ProtocolError(f"{self.name}: bad nonce characters")
        if not iters.isdigit() or not 1 <= int(iters) <= MAX_SCRAM_ITERATIONS:
            raise ProtocolError(f"{self.name}: iteration count out of range")
        salt = base64.b64decode(salt_b64, validate=True)
        if not salt:
            raise ProtocolError(f"{self.name}: empty salt")
        client_key, keys = scram_derive(self.secret, salt, int(iters))
        cbind = self._gs2.encode("utf-8") + (self._cb if self._plus and self._cb else b"")
        without_proof = f"c={base64.b64encode(cbind).decode('ascii')},r={nonce}"
        auth_message = f"{self._bare},{server_first},{without_proof}".encode()
        signature = hmac.new(keys.stored_key, auth_message, hashlib.sha256).digest()
        proof = base64.b64encode(_xor(client_key, signature)).decode("ascii")
        self._server_signature = hmac.new(keys.server_key, auth_message, hashlib.sha256).digest()
        return f"{without_proof},p={proof}".encode("ascii")

    def _verify(self, server_final: str) -> None:
        attrs = dict(_attrs(server_final))
        if "e" in attrs:
            raise AuthError(f"{self.name}: server error {attrs['e']}")
        verifier = base64.b64decode(attrs.get("v", ""), validate=True)
        if not wire.constant_time_eq(verifier, self._server_signature):
            raise AuthError(f"{self.name}: the server's signature is wrong (not the real server?)")
        self._verified = True

    def finish(self) -> None:
        if not self._verified:
            raise AuthError(f"{self.name}: the server accepted without proving itself")


class ClientScramSha256Plus(ClientScramSha256):
    """SCRAM-SHA-256-PLUS: bound to the TLS channel."""

    name = "SCRAM-SHA-256-PLUS"
    _plus = True


class _ClientOAuth(ClientMechanism):
    plaintext = True
    uses_token = True

    def __init__(self, user: str, secret: str) -> None:
        super().__init__(user, secret)
        self._error: str | None = None

    def _record_error(self, challenge: bytes) -> None:
        try:
            data = json.loads(challenge.decode("utf-8"))
            self._error = str(data.get("status")) if isinstance(data, dict) else None
        except (UnicodeError, ValueError):
            self._error = None

    def failure_detail(self) -> str | None:
        return f"token refused (status {self._error})" if self._error else None


class ClientOAuthBearer(_ClientOAuth):
    """RFC 7628: ``n,a=user,^Aauth=Bearer token^A^A``; an error challenge gets ``^A``."""

    name = "OAUTHBEARER"

    def __init__(self, user: str, secret: str) -> None:
        super().__init__(user, secret)
        self._sent = False

    def initial(self) -> bytes:
        return (f"n,a={encode_saslname(self.user)},\x01auth=Bearer {self.secret}\x01\x01").encode()

    def step(self, challenge: bytes) -> bytes:
        if not self._sent and not challenge:
            self._sent = True  # no initial response was sent (too long for the line)
            return self.initial()
        self._record_error(challenge)
        return b"\x01"


class ClientXOAuth2(_ClientOAuth):
    """XOAUTH2: ``user=U^Aauth=Bearer T^A^A``; an error challenge gets an empty line."""

    name = "XOAUTH2"

    def __init__(self, user: str, secret: str) -> None:
        super().__init__(user, secret)
        self._sent = False

    def initial(self) -> bytes:
        return f"user={self.user}\x01auth=Bearer {self.secret}\x01\x01".encode()

    def step(self, challenge: bytes) -> bytes:
        if not self._sent and not challenge:
            self._sent = True
            return self.initial()
        self._record_error(challenge)
        return b""


class ClientGssapi(ClientMechanism):
    """RFC 4752 GSSAPI (Kerberos V5) with the caller's credential cache
    (``KRB5CCNAME``): no password. ``user``, if given, is sent as the authorization
    identity (the server checks it against the principal); ``host`` names the
    service ``pop@host``. Needs the ``gssapi`` extra."""

    name = "GSSAPI"
    plaintext = False

    def __init__(self, user: str, secret: str = "", *, host: str = "localhost") -> None:
        super().__init__(user, secret)
        try:
            self._gss = GssapiClient(host, authzid=user)
        except ImportError:
            raise AuthError("GSSAPI needs python-gssapi: pip install 'pypop3[gssapi]'") from None
        except GssapiError as exc:
            raise AuthError(f"GSSAPI: {exc}") from None

    def initial(self) -> bytes:
        try:
            return self._gss.initial()
        except GssapiError as exc:
            raise AuthError(f"GSSAPI: {exc}") from None

    def step(self, challenge: bytes) -> bytes:
        try:
            return self._gss.step(challenge)
        except GssapiError as exc:
            raise AuthError(f"GSSAPI: {exc}") from None


CLIENT_MECHANISMS: dict[str, type[ClientMechanism]] = {
    m.name: m
    for m in (
        ClientGssapi,
        ClientScramSha256Plus,
        ClientScramSha256,
        ClientCramMd5,
        ClientPlain,
        ClientLogin,
        ClientOAuthBearer,
        ClientXOAuth2,
    )
}

PASSWORD_PREFERENCE: tuple[str, ...] = (
    "SCRAM-SHA-256-PLUS",
    "SCRAM-SHA-256",
    "CRAM-MD5",
    "+APOP",
    "PLAIN",
    "LOGIN",
    "USER",
)
"""``auth="auto"`` with a password: strongest first (mutual authentication, then no
secret on the wire, then the secret under TLS). ``+APOP`` and ``USER`` are not SASL."""

TOKEN_PREFERENCE: tuple[str, ...] = ("OAUTHBEARER", "XOAUTH2")


def choose_mechanism(
    offered_sasl: Iterable[str],
    *,
    apop: bool,
    user_command: bool,
    channel_binding: bool,
    token: bool,
    preference: Sequence[str] | None = None,
) -> str | None:
    """The strongest method the server offers: a SASL name, ``+APOP`` or ``USER``.

    ``offered_sasl`` is CAPA's SASL list; ``apop`` whether the greeting had a
    timestamp; ``user_command`` whether USER may be tried (CAPA lists it, or the
    server has no CAPA); ``channel_binding`` whether -PLUS is possible here.
    """
    offered = {m.upper() for m in offered_sasl}
    order = preference or (TOKEN_PREFERENCE if token else PASSWORD_PREFERENCE)
    for name in order:
        if name == "+APOP":
            if apop:
                return name
        elif name == "USER":
            if user_command:
                return name
        elif name in offered and name in CLIENT_MECHANISMS:
            if name == "SCRAM-SHA-256-PLUS" and not channel_binding:
                continue
            return name
    return None
