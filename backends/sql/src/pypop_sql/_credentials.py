"""The ``sql`` credential store: users and passwords in the same database.

Table ``users (name, password, enabled)``; ``password`` holds ``{SCHEME}data`` in any
of Dovecot's schemes that :mod:`pypop.auth.schemes` reads (a value without a prefix
uses ``default_scheme``), like Dovecot's SQL passdb. One database then holds a whole
site: credentials, mailboxes and mail.

Each login costs one indexed lookup, for known and unknown users alike. An unknown
or disabled user is verified against a dummy entry of the most common (heaviest)
scheme in the table, as the passwd-file store does, so the reply comes at the same
cost; the dummy is taken from a sample of the table, refreshed every few minutes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import trio
from pypop.auth import schemes
from pypop.auth.store import StoredCredential, _make_dummy, _VerifyingStore
from pypop.backend_kit import IOThreads, Options

from pypop_sql._config import read_engine_options
from pypop_sql._engine import Engine, make_engine

__all__ = ["SqlCredentialStore", "create_credentials"]

log = logging.getLogger("pypop.auth")

DUMMY_SAMPLE = 100
DUMMY_REFRESH = 300.0


class SqlCredentialStore(_VerifyingStore):
    """A :class:`~pypop.auth.store.CredentialStore` reading the ``users`` table."""

    reveals_secrets = True

    def __init__(
        self,
        engine: Engine,
        *,
        default_scheme: str = "CRYPT",
        threads: IOThreads | None = None,
        limiter: trio.CapacityLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(limiter)
        schemes.is_heavy(default_scheme)  # UnknownSchemeError if unknown
        self.engine = engine
        self.default_scheme = default_scheme
        self.threads = threads if threads is not None else IOThreads(8, timeout=30.0)
        self._clock = clock
        self._dummy_at: float | None = None

    def _parse(self, user: str, stored: str) -> StoredCredential | None:
        try:
            return StoredCredential.parse(user, stored, self.default_scheme)
        except ValueError:
            return None

    def _sample(self) -> dict[str, StoredCredential]:
        sample: dict[str, StoredCredential] = {}
        for i, stored in enumerate(self.engine.sample_passwords(DUMMY_SAMPLE)):
            cred = self._parse("", stored)
            if cred is not None:
                sample[str(i)] = cred
        return sample

    async def _refresh(self) -> None:
        now = self._clock()
        if self._dummy_at is not None and now - self._dummy_at < DUMMY_REFRESH:
            return
        before, self._dummy_at = self._dummy_at, now  # concurrent logins skip it
        try:
            self._dummy = _make_dummy(await self.threads.run(self._sample))
        except BaseException:
            # Not for DUMMY_REFRESH seconds: until a sample works, the dummy may be the
            # start-up one (PLAIN, no cost), and timing would tell unknown users apart.
            self._dummy_at = before
            raise

    async def lookup(self, user: str) -> StoredCredential | None:
        await self._refresh()
        row = await self.threads.run(self.engine.password, user)
        if row is None or not row[1]:
            return None
        cred = self._parse(user, row[0])
        if cred is None:
            log.warning("sql credentials: user %r has an unusable password entry", user)
        return cred

    async def verify_password(self, user: str, password: str) -> bool:
        return await self._verify(await self.lookup(user), password)

    def users(self) -> list[str]:
        raise NotImplementedError("the sql store does not list users")

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):  # as SqlBackend.aclose
            await self.threads.run(self.engine.close)


def create_credentials(options: Mapping[str, object]) -> SqlCredentialStore:
    """Entry point ``sql`` in ``pypop.credentials``: options ``url`` (the same database
    as the backend, or another), ``default_scheme`` (``CRYPT``), and the engine
    options of the backend (``pool_size``, ``io_timeout``, ...)."""
    opts = Options("sql credentials", options)
    config = read_engine_options(opts)
    default_scheme = opts.text("default_scheme", "CRYPT")
    opts.finish()
    try:
        schemes.is_heavy(default_scheme)
    except schemes.UnknownSchemeError:
        raise opts.error(f"option 'default_scheme': unknown scheme {default_scheme!r}") from None
    engine = make_engine(config)
    engine.start()
    return SqlCredentialStore(
        engine,
        default_scheme=default_scheme,
        threads=IOThreads(
            config.io_threads, timeout=config.io_timeout, batch=config.batch_scheduling
        ),
    )
