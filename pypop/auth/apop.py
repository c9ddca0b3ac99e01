"""APOP (RFC 1939 §7): ``APOP name digest`` against the greeting's timestamp.

Only users whose store entry is a plaintext-equivalent secret (PLAIN/CLEARTEXT) can
use APOP. For everyone else, and for unknown users, the same digest work is done
against a random secret and the answer is no, so timing does not tell them apart.
"""

from __future__ import annotations

import secrets

from pypop import wire
from pypop.auth.store import CredentialStore

__all__ = ["verify_apop"]

_DUMMY_SECRET = secrets.token_bytes(16)


async def verify_apop(store: CredentialStore, user: str, timestamp: bytes, digest: bytes) -> bool:
    """True if ``digest`` is MD5(timestamp + password) for ``user`` (hex, either case).

    ``timestamp`` is the ``<...>`` msg-id sent in the greeting, brackets included. The
    store's :class:`pypop.errors.TemporaryFailure` propagates (``-ERR [SYS/TEMP]``).
    """
    cred = await store.lookup(user)
    password = cred.plaintext() if cred is not None else None
    if password is None:
        wire.apop_verify(timestamp, _DUMMY_SECRET, digest)
        return False
    return wire.apop_verify(timestamp, password.encode("utf-8"), digest)
