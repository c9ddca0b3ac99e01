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
"""

from __future__ import annotations

__all__ = [
    "AuthFailed",
    "BackendError",
    "DuplicateUid",
    "MailboxLocked",
    "NoSuchMessage",
    "NoSuchUser",
    "PermanentFailure",
    "TemporaryFailure",
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
