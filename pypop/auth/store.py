"""Credential stores: the small interface the server, SASL and APOP use.

A store answers two questions:

- ``verify_password(user, password)``: is this the password? Used by USER/PASS,
  PLAIN, LOGIN. Unknown users take a dummy verification of the same cost, so that
  timing does not tell which users exist.
- ``lookup(user)``: the stored secret, for mechanisms that need it (APOP, CRAM-MD5,
  SCRAM-SHA-256). ``None`` for unknown users, disabled users, and stores that cannot
  reveal secrets (an IMAP passthrough authenticates upstream instead).

A store may raise :class:`pypop.errors.TemporaryFailure` when it cannot answer now
(the session replies ``-ERR [SYS/TEMP]``; the server logs the exception's message
and cause). A store that can never reveal secrets may set ``reveals_secrets =
False``: :func:`pypop.auth.sasl.available_mechanisms` then leaves out CRAM-MD5 and
SCRAM. Two more optional attributes help it decide and hide users better:

- ``stored_schemes``: a frozenset of the schemes the entries use (SCRAM is offered
  only if some entries can serve it, CRAM-MD5 likewise);
- ``scram_profile()``: (iterations, salt length) of the typical SCRAM entry, which
  fake salts of unknown users copy.

Timing (DESIGN rule 13): an unknown user costs what the *typical* known user costs
(the most common scheme and cost parameters). With one scheme for every user that
hides who exists. With a mix, users of a less common scheme take a different time
than unknown users, so their existence can be told by timing: give every user the
same scheme (Dovecot's documentation says the same of its own stores).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import trio

from pypop import wire
from pypop.auth import schemes
from pypop.auth.prep import try_password, try_username
from pypop.auth.schemes import ScramKeys

__all__ = [
    "CredentialStore",
    "CredentialStoreFactory",
    "MemoryCredentialStore",
    "StoredCredential",
    "default_hash_limiter",
]

log = logging.getLogger("pypop.auth")


@runtime_checkable
class CredentialStore(Protocol):
    async def verify_password(self, user: str, password: str) -> bool:
        """True if ``password`` is right for ``user``; constant-ish time for unknown users."""
        ...

    async def lookup(self, user: str) -> StoredCredential | None:
        """The stored secret of ``user``, or None (unknown, disabled, or not revealable)."""
        ...


CredentialStoreFactory = Callable[[Mapping[str, object]], CredentialStore]
"""What an entry point in ``pypop.credentials`` names: options -> store."""


@dataclass(frozen=True, slots=True)
class StoredCredential:
    """One user's stored secret: ``scheme`` is canonical (``CLEARTEXT`` reads as ``PLAIN``)."""

    user: str
    scheme: str
    value: str = field(repr=False)

    @classmethod
    def parse(cls, user: str, stored: str, default_scheme: str = "CRYPT") -> StoredCredential:
        """From ``{SCHEME}data``; ``ValueError`` (incl. ``UnknownSchemeError``) if unusable."""
        scheme, value = schemes.parse_stored(stored, default_scheme)
        schemes.validate_value(scheme, value)
        if scheme == "PLAIN":
            # Compared with prepared passwords (APOP, CRAM-MD5 and SCRAM use it as
            # the password itself): RFC 6856 / RFC 8265 OpaqueString.
            value = try_password(value) or value
        return cls(user, scheme, value)

    def plaintext(self) -> str | None:
        """The password itself, for PLAIN/CLEARTEXT entries only."""
        return self.value if self.scheme == "PLAIN" else None

    def cram_md5_context(self) -> bytes | None:
        """The 32-octet HMAC-MD5 state for CRAM-MD5 (from a CRAM-MD5 or PLAIN entry)."""
        if self.scheme == "CRAM-MD5":
            return bytes.fromhex(self.value)
        if self.scheme == "PLAIN":
            return wire.cram_md5_context(self.value.encode("utf-8"))
        return None

    def scram_sha256_keys(self) -> ScramKeys | None:
        """Stored SCRAM-SHA-256 keys (a PLAIN entry gives None: derive with your own salt)."""
        if self.scheme == "SCRAM-SHA-256":
            return ScramKeys.parse(self.value)
        return None

    @property
    def heavy(self) -> bool:
        return schemes.is_heavy(self.scheme)

    def verify(self, password: str) -> bool:
        """Synchronous check (may be CPU-heavy: see :attr:`heavy`)."""
        return schemes.verify_scheme(self.scheme, self.value, password)


def default_hash_limiter() -> trio.CapacityLimiter:
    """A limiter for hash threads: at most ``min(8, cpus)`` (at least 2) at once."""
    return trio.CapacityLimiter(max(2, min(8, os.cpu_count() or 2)))


class _VerifyingStore:
    """Shared verification logic: the entries live in ``self._entries`` (set them
    with :meth:`_set_entries`)."""

    _entries: Mapping[str, StoredCredential]
    _dummy: StoredCredential
    stored_schemes: frozenset[str]

    def __init__(self, limiter: trio.CapacityLimiter | None) -> None:
        self._limiter = limiter
        self._set_entries({})

    def _set_entries(self, entries: Mapping[str, StoredCredential]) -> None:
        # One assignment each: a reload swaps the table, the dummy and the profile.
        self._entries = entries
        self._dummy = _make_dummy(entries)
        self.stored_schemes = frozenset(c.scheme for c in entries.values())
        self._scram_profile = _scram_profile(entries)

    def scram_profile(self) -> tuple[int, int] | None:
        """(iterations, salt length) of the most common SCRAM-capable entry."""
        return self._scram_profile

    @property
    def limiter(self) -> trio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = default_hash_limiter()
        return self._limiter

    async def _refresh(self) -> None:
        """Hook for stores that reload (passwd-file)."""

    async def verify_password(self, user: str, password: str) -> bool:
        await self._refresh()
        return await self._verify(self._entries.get(user), password)

    async def _verify(self, cred: StoredCredential | None, password: str) -> bool:
        """Check ``password`` against ``cred``; an unknown user (None) is checked
        against the dummy, at the same cost, and fails."""
        target = cred if cred is not None else self._dummy
        if target.heavy:
            ok = await trio.to_thread.run_sync(target.verify, password, limiter=self.limiter)
        else:
            ok = target.verify(password)
        return ok and cred is not None

    async def lookup(self, user: str) -> StoredCredential | None:
        await self._refresh()
        return self._entries.get(user)

    def users(self) -> list[str]:
        return sorted(self._entries)


def _make_dummy(entries: Mapping[str, StoredCredential]) -> StoredCredential:
    """A credential that costs what the typical real one does, and matches nothing useful.

    It is an existing entry of the most common cost class (scheme and cost parameters,
    :func:`pypop.auth.schemes.cost_class`), so an unknown user takes as long as most
    known ones; ties go to the heavier scheme. The result of verifying against it is
    thrown away. With no entries, a PLAIN credential of random text.
    """
    classes: dict[tuple[str, str], StoredCredential] = {}
    counts: Counter[tuple[str, str]] = Counter()
    for cred in entries.values():
        cls = schemes.cost_class(cred.scheme, cred.value)
        counts[cls] += 1
        classes.setdefault(cls, cred)
    if counts:
        typical = max(counts, key=lambda c: (counts[c], schemes.is_heavy(c[0])))
        sample = classes[typical]
        return StoredCredential("", sample.scheme, sample.value)
    return StoredCredential("", "PLAIN", secrets.token_urlsafe(24))


def _scram_profile(entries: Mapping[str, StoredCredential]) -> tuple[int, int] | None:
    """The (iterations, salt length) most SCRAM-capable entries show a client: stored
    SCRAM entries their own, PLAIN entries the derived default (4096, 16)."""
    counts: Counter[tuple[int, int]] = Counter()
    for cred in entries.values():
        keys = cred.scram_sha256_keys() if cred.scheme == "SCRAM-SHA-256" else None
        if keys is not None:
            counts[(keys.iterations, len(keys.salt))] += 1
        elif cred.scheme == "PLAIN":
            counts[(schemes.SCRAM_ITERATIONS, 16)] += 1
    return max(counts, key=lambda k: counts[k]) if counts else None


class MemoryCredentialStore(_VerifyingStore):
    """A store built from a mapping ``user -> "{SCHEME}data"`` (tests, small setups)."""

    reveals_secrets = True

    def __init__(
        self,
        entries: Mapping[str, str],
        *,
        default_scheme: str = "PLAIN",
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        super().__init__(limiter)
        prepared = {(try_username(u) or u): s for u, s in entries.items()}
        self._set_entries(
            {u: StoredCredential.parse(u, s, default_scheme) for u, s in prepared.items()}
        )
