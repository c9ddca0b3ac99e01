"""Bearer-token verification for OAUTHBEARER and XOAUTH2 (pluggable)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

from pypop import wire

__all__ = ["StaticTokenVerifier", "TokenVerifier"]

log = logging.getLogger("pypop.auth")


@runtime_checkable
class TokenVerifier(Protocol):
    async def verify(self, user: str, token: str) -> bool:
        """True if ``token`` is a valid bearer token for ``user`` right now.

        May raise :class:`pypop.errors.TemporaryFailure` (e.g. the token endpoint is
        down): the client then gets ``-ERR [SYS/TEMP]``.
        """
        ...


class StaticTokenVerifier:
    """Fixed tokens, from a mapping or a file of ``user:token`` lines (tests, small setups).

    A user may have several tokens (several lines). Blank lines and ``#`` comments are
    skipped. Tokens are compared as SHA-256 digests in constant time.
    """

    def __init__(self, tokens: Mapping[str, Iterable[str]]) -> None:
        self._tokens: dict[str, list[bytes]] = {
            user: [hashlib.sha256(t.encode("utf-8")).digest() for t in toks]
            for user, toks in tokens.items()
        }
        self._dummy = hashlib.sha256(os.urandom(32)).digest()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> StaticTokenVerifier:
        tokens: dict[str, list[str]] = {}
        with open(path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, start=1):
                line = raw.rstrip("\r\n")
                if not line.strip() or line.startswith("#"):
                    continue
                user, sep, token = line.partition(":")
                if not sep or not user or not token:
                    log.warning("token file %s line %d: malformed; line ignored", path, lineno)
                    continue
                tokens.setdefault(user, []).append(token)
        return cls(tokens)

    async def verify(self, user: str, token: str) -> bool:
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        ok = False
        for candidate in self._tokens.get(user, [self._dummy]):
            ok |= wire.constant_time_eq(candidate, digest)
        return ok and user in self._tokens
