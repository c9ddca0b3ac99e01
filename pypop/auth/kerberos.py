"""Kerberos V5 logins: the GSSAPI SASL mechanism (RFC 4752, as POP3 uses it, RFC 5034).

Both roles, sans-I/O, on MIT Kerberos through the ``gssapi`` package (python-gssapi),
an optional extra (``pip install 'pypop3[gssapi]'``): a plain install never imports
it and needs no libkrb5.

Server (:class:`GssapiAcceptor`, driven by :class:`pypop.auth.sasl.Gssapi`, offered
only with ``auth.gssapi_keytab``):

1. the client's context tokens go to ``accept_sec_context`` with credentials from
   the keytab (service ``pop``, host ``auth.gssapi_hostname`` or any key in the
   keytab); output tokens go back as challenges; a final output token is answered
   by the client with an empty response;
2. the security layer (RFC 4752 §3.1): the server wraps 4 octets, ``01 00 00 00``:
   "no security layer" is the only one it offers, so the maximum message size is 0
   (Dovecot sends ``01 FF FF FF``, which RFC 4752 forbids and strict clients
   refuse); the client's wrapped answer must select exactly that layer;
3. the authorization identity that follows must be one the principal may act as:
   empty, the principal itself, or its user name. A principal maps to a user only
   as ``name@REALM`` with the realm of the service key (no instances such as
   ``alice/admin``, no other realms); anything else fails with ``-ERR [AUTH]``.

The mechanism must be Kerberos V5 (not SPNEGO or another GSS mechanism). The
session then applies the user's policies (nologin, allow_nets ...) and opens the
maildrop, as for any login. GSS calls that read the keytab or the replay cache run
in worker threads.

Client (:class:`GssapiClient`): the caller's credential cache (``KRB5CCNAME``), a
target ``pop@HOST``, mutual authentication, the same security-layer rule.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Any, Final

from pypop.auth.prep import try_username

__all__ = [
    "NO_SECURITY_LAYER",
    "GssapiAcceptor",
    "GssapiClient",
    "GssapiError",
    "GssapiSettings",
    "available",
    "check_settings",
]

log = logging.getLogger("pypop.auth")

NO_SECURITY_LAYER: Final = 0x01
"""RFC 4752 §3.3 bit 1: no security layer (2 integrity, 4 confidentiality)."""
MAX_TOKEN: Final = 65536


class GssapiError(Exception):
    """A GSSAPI exchange failed (the message is for logs, never for the peer)."""


@dataclass(frozen=True, slots=True)
class GssapiSettings:
    """Server side: where the service key is."""

    keytab: str
    service: str = "pop"
    hostname: str | None = None
    """Accept only ``service@hostname`` (Dovecot's default); None: any key in the
    keytab (Dovecot's ``auth_gssapi_hostname = "$ALL"``)."""


def available() -> bool:
    """True if python-gssapi can be imported (the ``gssapi`` extra)."""
    try:
        import gssapi  # noqa: F401
    except ImportError:
        return False
    return True


def check_settings(settings: GssapiSettings) -> None:
    """Start-up check: the package, the keytab, a key for the service in it.
    Raises ``ValueError`` saying what is wrong."""
    try:
        import gssapi
    except ImportError:
        raise ValueError(
            "auth.gssapi_keytab needs python-gssapi: pip install 'pypop3[gssapi]' "
            "(and MIT Kerberos, e.g. Debian's libkrb5-dev to build it)"
        ) from None
    try:
        _acceptor_creds(gssapi, settings)
    except gssapi.raw.GSSError as exc:
        raise ValueError(f"auth.gssapi_keytab {settings.keytab}: {_describe(exc)}") from None


def _acceptor_creds(gssapi: Any, settings: GssapiSettings) -> Any:
    name = None
    if settings.hostname is not None:
        name = gssapi.Name(
            f"{settings.service}@{settings.hostname}", gssapi.NameType.hostbased_service
        )
    return gssapi.Credentials(name=name, usage="accept", store={"keytab": settings.keytab})


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300]


def _layer_token(data: bytes) -> tuple[int, int, bytes]:
    """(layers, max size, rest) of a 4-octet RFC 4752 security-layer message."""
    if len(data) < 4:
        raise GssapiError("security layer message shorter than 4 octets")
    (word,) = struct.unpack("!I", data[:4])
    return word >> 24, word & 0xFFFFFF, data[4:]


def user_of_principal(principal: str, realm: str | None) -> str | None:
    """``alice@REALM`` -> ``alice`` when REALM is the service's realm; None for an
    instance (``alice/admin``), another realm, or a name that cannot be a user."""
    name, sep, princ_realm = principal.rpartition("@")
    if not sep or not name or (realm is not None and princ_realm != realm):
        return None
    if "/" in name or "\\" in name:
        return None
    return try_username(name)


# --------------------------------------------------------------------------- server


class GssapiAcceptor:
    """The server's GSS work for one exchange, blocking (run it in a thread); the
    SASL framing is :class:`pypop.auth.sasl.Gssapi`'s."""

    def __init__(self, settings: GssapiSettings) -> None:
        import gssapi

        self._gssapi = gssapi
        self._settings = settings
        self._ctx: Any = None
        self.principal: str | None = None
        self.realm: str | None = None

    def accept(self, token: bytes) -> tuple[bytes, bool]:
        """Feed a context token: (output token, established?)."""
        gssapi = self._gssapi
        try:
            if self._ctx is None:
                creds = _acceptor_creds(gssapi, self._settings)
                self._ctx = gssapi.SecurityContext(creds=creds, usage="accept")
            out = self._ctx.step(token)
            if not self._ctx.complete:
                return out or b"", False
            if self._ctx.mech != gssapi.MechType.kerberos:
                raise GssapiError("the GSS mechanism is not Kerberos V5")
            self.principal = str(self._ctx.initiator_name)
            self.realm = str(self._ctx.target_name).rpartition("@")[2] or None
        except gssapi.raw.GSSError as exc:
            raise GssapiError(_describe(exc)) from None
        return out or b"", True

    def offer_layer(self) -> bytes:
        """The wrapped security-layer message: no layer, so a maximum size of 0."""
        plain = struct.pack("!I", NO_SECURITY_LAYER << 24)
        try:
            wrapped: bytes = self._ctx.wrap(plain, encrypt=False).message
        except self._gssapi.raw.GSSError as exc:
            raise GssapiError(_describe(exc)) from None
        return wrapped

    def finish(self, token: bytes) -> str:
        """Unwrap the client's choice; the user it may log in as, or GssapiError."""
        try:
            data: bytes = self._ctx.unwrap(token).message
        except self._gssapi.raw.GSSError as exc:
            raise GssapiError(_describe(exc)) from None
        layers, _size, authz_raw = _layer_token(data)
        if layers != NO_SECURITY_LAYER:
            raise GssapiError(f"the client chose security layer {layers:#x}, not 'none'")
        principal = self.principal or ""
        user = user_of_principal(principal, self.realm)
        if user is None:
            raise GssapiError(f"principal {principal[:100]!r} does not map to a user")
        try:
            authz = authz_raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GssapiError("the authorization identity is not UTF-8") from None
        if authz and authz not in (user, principal) and try_username(authz) != user:
            raise GssapiError(f"{principal[:100]!r} may not act as {authz[:100]!r}")
        return user


# --------------------------------------------------------------------------- client


class GssapiClient:
    """RFC 4752 client side, sans-I/O: feed each server challenge (decoded) to
    :meth:`step`, send what it returns. Uses the caller's credential cache."""

    def __init__(self, host: str, *, service: str = "pop", authzid: str = "") -> None:
        import gssapi

        self._gssapi = gssapi
        self.authzid = authzid
        target = gssapi.Name(f"{service}@{host}", gssapi.NameType.hostbased_service)
        flags = gssapi.RequirementFlag.mutual_authentication
        try:
            self._ctx = gssapi.SecurityContext(
                name=target, usage="initiate", mech=gssapi.MechType.kerberos, flags=flags
            )
        except gssapi.raw.GSSError as exc:
            raise GssapiError(_describe(exc)) from None
        self._layer_done = False
        self.server_layer: bytes | None = None
        """The server's unwrapped security-layer message (for inspection)."""

    def initial(self) -> bytes:
        """The first context token (the AUTH initial response)."""
        try:
            token: bytes = self._ctx.step()
        except self._gssapi.raw.GSSError as exc:
            raise GssapiError(_describe(exc)) from None
        return token

    def step(self, challenge: bytes) -> bytes:
        """The answer to a server challenge."""
        gss = self._gssapi
        try:
            if not self._ctx.complete:
                out = self._ctx.step(challenge)
                return out or b""
            if not challenge:
                return b""
            if self._layer_done:
                raise GssapiError("unexpected challenge after the security layer")
            self.server_layer = self._ctx.unwrap(challenge).message
            layers, size, rest = _layer_token(self.server_layer)
            if rest:
                raise GssapiError("security layer message longer than 4 octets")
            if not layers & NO_SECURITY_LAYER:
                raise GssapiError("the server requires a security layer")
            if layers == NO_SECURITY_LAYER and size != 0:
                # RFC 4752 §3.1; Dovecot sends 0xFFFFFF: tolerated, logged.
                log.debug("GSSAPI: server offers no layer but a size of %d", size)
            self._layer_done = True
            answer = struct.pack("!I", NO_SECURITY_LAYER << 24) + self.authzid.encode("utf-8")
            wrapped: bytes = self._ctx.wrap(answer, encrypt=False).message
            return wrapped
        except gss.raw.GSSError as exc:
            raise GssapiError(_describe(exc)) from None
