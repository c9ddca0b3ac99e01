"""Logins checked by a :class:`~pypop.backend.SelfAuthenticating` backend.

One :class:`Passthrough` per session stands where the credential store and the token
verifier stand for other backends: USER/PASS, SASL PLAIN and LOGIN call
``verify_password``, XOAUTH2 and OAUTHBEARER call ``verify``, so every login path,
with its penalties, per-client slots and ``[AUTH]`` replies, stays the one the session
already has. The difference: a successful check has already opened the maildrop
(the backend logged in upstream and took the lock), so the session takes that mailbox
(:meth:`Passthrough.take`) instead of calling ``open_mailbox``.

``reveals_secrets = False`` keeps CRAM-MD5 and SCRAM out of CAPA and AUTH
(:func:`pypop.auth.sasl.available_mechanisms`).
"""

from __future__ import annotations

import logging

import trio

from pypop.auth.store import StoredCredential
from pypop.backend import CredentialKind, Credentials, Mailbox, SelfAuthenticating
from pypop.errors import AuthFailed, MailboxLocked, PermanentFailure

__all__ = ["NO_STORE", "NoCredentialStore", "Passthrough"]

log = logging.getLogger("pypop.session")


class Passthrough:
    """One session's credential checks, done by the backend (see the module docstring)."""

    reveals_secrets = False

    def __init__(self, backend: SelfAuthenticating, client: str | None) -> None:
        self._backend = backend
        self._client = client
        self._pending: tuple[str, Mailbox | MailboxLocked | PermanentFailure] | None = None
        self._credentials: Credentials | None = None  # to open again while a lock is held
        self.mechanism = "USER"
        """Set by the session before each check: how the credentials came (for logs)."""

    @property
    def bearer(self) -> bool:
        """Whether the backend takes bearer tokens (XOAUTH2, OAUTHBEARER)."""
        return "bearer" in self._backend.credential_kinds

    # CredentialStore
    async def verify_password(self, user: str, password: str) -> bool:
        return await self._check(user, password, "password")

    async def lookup(self, user: str) -> StoredCredential | None:
        return None  # a passthrough never has the secret

    # TokenVerifier
    async def verify(self, user: str, token: str) -> bool:
        return await self._check(user, token, "bearer")

    async def _check(self, user: str, secret: str, kind: CredentialKind) -> bool:
        await self.discard()
        credentials = Credentials(user, secret, kind, self.mechanism, self._client)
        try:
            mailbox = await self._backend.authenticate(credentials)
        except AuthFailed:
            return False
        except (MailboxLocked, PermanentFailure) as exc:
            # The credentials were right; the maildrop cannot be had. The session
            # gives the matching reply when it takes it (after waiting for a lock).
            self._pending = (user, exc)
            self._credentials = credentials
            return True
        # TemporaryFailure goes up: the session replies [SYS/TEMP].
        self._pending = (user, mailbox)
        self._credentials = credentials
        return True

    # The session opens the maildrop through pypop.server.logins.MaildropHolders, which
    # retries while another session of this server holds the lock: the first try
    # takes what the check opened, later ones check the same credentials again.
    async def open_mailbox(self, user: str) -> Mailbox:
        if self._pending is not None:
            return await self.take(user)
        credentials = self._credentials
        if credentials is None or credentials.user != user:
            raise AuthFailed("no passthrough login for this user")
        mailbox = await self._backend.authenticate(credentials)
        self._credentials = None
        return mailbox

    async def aclose(self) -> None:
        self._credentials = None

    async def take(self, user: str) -> Mailbox:
        """The mailbox the last successful check opened for ``user`` (or its failure)."""
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != user:
            if pending is not None and isinstance(pending[1], Mailbox):
                await _close(pending[1])
            raise AuthFailed("no passthrough login for this user")
        result = pending[1]
        if isinstance(result, MailboxLocked | PermanentFailure):
            raise result
        self._credentials = None
        return result

    async def discard(self) -> None:
        """Close a mailbox that was opened but not taken (a refused login, a dropped
        session); nothing is removed."""
        pending, self._pending = self._pending, None
        self._credentials = None
        if pending is not None and not isinstance(pending[1], BaseException):
            await _close(pending[1])


async def _close(mailbox: Mailbox) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(10):
        try:
            await mailbox.aclose()
        except Exception:
            log.exception("backend failed to release a maildrop")


class NoCredentialStore:
    """The store of a server whose backend authenticates: it knows nobody."""

    reveals_secrets = False

    async def verify_password(self, user: str, password: str) -> bool:
        return False

    async def lookup(self, user: str) -> StoredCredential | None:
        return None


NO_STORE = NoCredentialStore()
