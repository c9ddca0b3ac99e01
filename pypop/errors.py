"""Failure types shared by backends, credential stores, the server and the client.

Each failure has one type (DESIGN rule 6); the server maps them to response codes:

- :class:`NoSuchMessage`: ``-ERR`` for that message only.
- :class:`MailboxLocked`: ``-ERR [IN-USE]`` (RFC 2449 §8.1.2).
- :class:`AuthFailed`: ``-ERR [AUTH]`` (RFC 3206 §4), counted as a credential failure.
- :class:`TemporaryFailure`: ``-ERR [SYS/TEMP]`` (RFC 3206 §4).
- :class:`PermanentFailure`: ``-ERR [SYS/PERM]`` (RFC 3206 §4).
- :class:`UpdateFailed`: UPDATE removed some marked messages, never an unmarked one.

Delivery (``pypop deliver``, ``pypop import``) adds two permanent failures:
:class:`NoSuchUser` (no such maildrop, sysexits EX_NOUSER) and :class:`DuplicateUid`
(the maildrop already holds a message with the UIDL an import wants to keep).

The client (:mod:`pypop.client`) raises one :class:`ClientError` subclass per failure,
carrying the server's reply text and RFC 2449/3206 response code when there was one.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "AuthFailed",
    "BackendError",
    "ClientError",
    "CommandError",
    "DuplicateUid",
    "InUseError",
    "LoginDelayError",
    "MailboxLocked",
    "NetworkError",
    "NoSuchMessage",
    "NoSuchMessageError",
    "NoSuchUser",
    "OperationTimeout",
    "PermanentFailure",
    "ProtocolError",
    "ServerTemporaryError",
    "TLSError",
    "TLSRequiredError",
    "TemporaryFailure",
    "UpdateError",
    "UpdateFailed",
]


class BackendError(Exception):
    """Base class of every error a backend or credential store may raise."""


class NoSuchMessage(BackendError):
    """The message is gone (e.g. removed from outside during the session)."""


class MailboxLocked(BackendError):
    """Another session holds the maildrop lock: ``-ERR [IN-USE]``."""


class AuthFailed(BackendError):
    """The credentials were refused (a self-authenticating backend, an unsafe user
    name): ``-ERR [AUTH]``."""


class TemporaryFailure(BackendError):
    """Try again later: ``-ERR [SYS/TEMP]``. The message is for the server's log only."""


class PermanentFailure(BackendError):
    """The account cannot be served (disabled, corrupt): ``-ERR [SYS/PERM]``."""


class UpdateFailed(BackendError):
    """UPDATE could not remove some marked messages (RFC 1939 §6).

    It must never have removed a message that was not marked.
    """


class NoSuchUser(PermanentFailure):
    """Delivery: the user has no maildrop here and the backend will not create one."""


class DuplicateUid(PermanentFailure):
    """Delivery with a given UIDL: the maildrop already has a message with it."""


# --------------------------------------------------------------------------- client


class ClientError(Exception):
    """Base class of every failure the POP3 client reports.

    ``reply`` is the server's status text (without ``+OK``/``-ERR`` and the code) and
    ``code`` its response code (``"AUTH"``, ``"IN-USE"``, ``"SYS/TEMP"``, ...), when the
    failure came from a reply.
    """

    def __init__(self, message: str, *, reply: str | None = None, code: str | None = None):
        super().__init__(message)
        self.reply = reply
        self.code = code

    def __str__(self) -> str:
        text = super().__str__()
        if self.reply is None:
            return text
        code = f"[{self.code}] " if self.code else ""
        return f"{text}: server said -ERR {code}{self.reply}".rstrip()


class ProtocolError(ClientError):
    """The server broke the protocol (an overlong or malformed line, a bare CR or LF
    where CRLF is required, a body without its ``.`` line, data injected after STLS)."""


class NetworkError(ClientError):
    """The connection could not be made, or broke."""


class OperationTimeout(NetworkError, TimeoutError):
    """An operation did not finish within its timeout (also a builtin TimeoutError)."""


class TLSError(ClientError):
    """The TLS handshake failed (certificate not trusted, wrong host name, ...)."""


class TLSRequiredError(TLSError):
    """``tls="require"``: the server offers no TLS, so no password is sent in the clear."""


class AuthError(ClientError):
    """The server refused the credentials (``-ERR [AUTH]``, or no usable mechanism)."""


class InUseError(ClientError):
    """The maildrop is locked by another session (``-ERR [IN-USE]``)."""


class LoginDelayError(ClientError):
    """Logged in again too soon (``-ERR [LOGIN-DELAY]``)."""


class ServerTemporaryError(ClientError):
    """The server has a temporary problem (``-ERR [SYS/TEMP]``); try again later."""


class CommandError(ClientError):
    """A command got ``-ERR`` with no more specific meaning."""


class NoSuchMessageError(CommandError):
    """A message number the server does not know (or one already deleted)."""


class UpdateError(ClientError):
    """QUIT did not get ``+OK``: the server did not remove every deleted message."""
