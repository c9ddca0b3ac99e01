"""The Dovecot-compatible passwd-file store.

File format (Dovecot's ``passwd-file``), one user a line::

    user:{SCHEME}data:uid:gid:gecos:home:shell:extra fields

The first two fields are for authentication; the home field and the extra fields
(everything after the seventh ``:``, colons included) carry per-user policies
(:mod:`pypop.auth.userdb`: ``nologin`` and ``reason``, ``allow_nets``,
``userdb_mail``, ``login_delay``, ``expire``). Blank lines and lines starting with
``#`` are skipped; so is a line starting with ``:`` (no user name), as Dovecot does.
A password without a ``{SCHEME}`` prefix uses ``default_scheme``: ``CRYPT``,
Dovecot's default, which reads the crypt(3) formats ``$2a$/$2b$/$2y$`` (bcrypt),
``$5$``, ``$6$`` (SHA-crypt) and ``$1$`` (MD5-crypt). User names are prepared with
PRECIS (RFC 8265, :mod:`pypop.auth.prep`), as the names clients send are, so a
name written in decomposed Unicode still matches. A line with an empty password
field (``alice:``) is a user no password logs in (Kerberos only: GSSAPI). Malformed
lines (a name alone, an unknown scheme, a value the scheme can never verify, a user
name PRECIS refuses, a malformed policy field, a duplicate user) are logged with
their line number, never their content, and skipped: such users are unknown, and
take the dummy verification.

The file is re-read when its (mtime, size, inode, device) changes, checked at most
once a second on the next lookup. The new table replaces the old one in one
assignment. A reload that fails (unreadable file, or a file that lost every valid
entry, as when an editor truncates it before writing) keeps the old table, logs, and
is retried on the next check.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio

from pypop.auth import schemes
from pypop.auth.prep import try_username
from pypop.auth.store import StoredCredential, _VerifyingStore
from pypop.auth.userdb import DEFAULT, UserPolicy, parse_extra_fields
from pypop.backend_kit import Options

__all__ = ["PasswdFileStore", "create", "parse_passwd_file"]

log = logging.getLogger("pypop.auth")


@dataclass(frozen=True, slots=True)
class ParseResult:
    entries: dict[str, StoredCredential]
    errors: int
    policies: dict[str, UserPolicy] = field(default_factory=dict)
    """Users whose line sets a policy (users without one have the default)."""
    passwordless: frozenset[str] = frozenset()
    """Users with an empty password field: no password logs them in, but they exist
    for logins that prove the name another way (Kerberos, GSSAPI)."""


def parse_passwd_file(
    data: bytes, *, default_scheme: str = "CRYPT", source: str = "passwd-file"
) -> ParseResult:
    """Parse a passwd-file; malformed lines are logged and skipped."""
    entries: dict[str, StoredCredential] = {}
    policies: dict[str, UserPolicy] = {}
    seen: set[str] = set()
    passwordless: set[str] = set()
    errors = 0

    def bad(lineno: int, why: str) -> None:
        nonlocal errors
        errors += 1
        log.warning("%s line %d: %s; line ignored", source, lineno, why)

    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if not raw or raw.startswith((b"#", b":")):
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad(lineno, "not UTF-8")
            continue
        fields = line.split(":", 7)
        raw_user = fields[0]
        if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in raw_user):
            bad(lineno, "user name contains white space or control characters")
            continue
        user = try_username(raw_user)
        if user is None:
            bad(lineno, "user name is not a valid PRECIS user name (RFC 8265)")
            continue
        if user in seen:
            bad(lineno, f"user {user!r} exists more than once (the first line wins)")
            continue
        seen.add(user)
        if len(fields) < 2:
            bad(lineno, f"user {user!r} has no password field")
            continue
        password = fields[1]
        home = fields[5] if len(fields) > 5 else ""
        uid = fields[2] if len(fields) > 2 else ""
        try:
            policy = parse_extra_fields(fields[7] if len(fields) > 7 else "", home=home, uid=uid)
        except ValueError as exc:
            bad(lineno, f"user {user!r}: {exc}")
            continue
        if not password:
            # As in Dovecot's userdb: the user exists, only not for password logins.
            passwordless.add(user)
            if policy != DEFAULT:
                policies[user] = policy
            continue
        try:
            entries[user] = StoredCredential.parse(user, password, default_scheme)
        except schemes.UnknownSchemeError:
            bad(lineno, f"user {user!r} has an unknown password scheme")
            continue
        except ValueError:
            bad(lineno, f"user {user!r} has a malformed password for its scheme")
            continue
        if policy != DEFAULT:
            policies[user] = policy
    return ParseResult(entries, errors, policies, frozenset(passwordless))


class PasswdFileStore(_VerifyingStore):
    """A :class:`~pypop.auth.store.CredentialStore` backed by a Dovecot passwd-file.

    The constructor reads the file and raises ``OSError`` if it cannot (fail at
    start-up, not at the first login). Hash checks run in worker threads bounded by
    ``limiter`` (default: :func:`~pypop.auth.store.default_hash_limiter`).
    """

    reveals_secrets = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        default_scheme: str = "CRYPT",
        limiter: trio.CapacityLimiter | None = None,
        check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(limiter)
        schemes.is_heavy(default_scheme)  # UnknownSchemeError (a ValueError) if unknown
        self.path = Path(path)
        self.default_scheme = default_scheme
        self._check_interval = check_interval
        self._clock = clock
        self._signature: tuple[int, int, int, int] | None = None
        self._last_check = clock()
        self._policies: dict[str, UserPolicy] = {}
        self._passwordless: frozenset[str] = frozenset()
        self.per_user_capabilities: frozenset[str] = frozenset()
        self._load(initial=True)

    def _load(self, *, initial: bool = False) -> bool:
        """Read and swap in the file; False (old table kept) if that fails.

        At start-up (``initial``) an unreadable file raises ``OSError`` naming it."""
        try:
            with self.path.open("rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except OSError as exc:
            if initial:
                raise OSError(
                    exc.errno,
                    f"cannot read passwd-file {self.path}: {exc.strerror or type(exc).__name__}",
                ) from None
            log.error(
                "passwd-file %s: cannot read (%s); keeping the previous users",
                self.path,
                exc.strerror or type(exc).__name__,
            )
            return False
        result = parse_passwd_file(data, default_scheme=self.default_scheme, source=str(self.path))
        if not result.entries and not result.passwordless and self._entries:
            log.error(
                "passwd-file %s: no valid entries after reload; keeping the previous %d users",
                self.path,
                len(self._entries),
            )
            return False
        self._set_entries(result.entries)
        self._policies = result.policies
        self._passwordless = result.passwordless
        varying = set()
        for policy in result.policies.values():
            if policy.expire is not None:
                varying.add("EXPIRE")
            if policy.login_delay is not None:
                varying.add("LOGIN-DELAY")
        self.per_user_capabilities = frozenset(varying)
        self._signature = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
        if result.entries or result.passwordless:
            count = len(result.entries) + len(result.passwordless)
            log.info("passwd-file %s: %s loaded", self.path, _plural(count, "user"))
        else:
            log.warning(
                "passwd-file %s has NO valid users (%s): every login will fail",
                self.path,
                _plural(result.errors, "malformed line") if result.errors else "the file is empty",
            )
        return True

    def reload_if_changed(self) -> bool:
        """Synchronous: re-read the file if it changed. True if a new table was loaded."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            log.error(
                "passwd-file %s: cannot stat (%s); keeping the previous users",
                self.path,
                exc.strerror or type(exc).__name__,
            )
            return False
        if (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev) == self._signature:
            return False
        return self._load()

    async def user_policy(self, user: str) -> UserPolicy | None:
        """The user's policy from the extra fields (None: unknown user)."""
        await self._refresh()
        if user not in self._entries and user not in self._passwordless:
            return None
        return self._policies.get(user, DEFAULT)

    async def has_account(self, user: str) -> bool:
        """Is ``user`` a line of the file (with or without a password)?"""
        await self._refresh()
        return user in self._entries or user in self._passwordless

    async def _refresh(self) -> None:
        now = self._clock()
        if now - self._last_check < self._check_interval:
            return
        self._last_check = now  # set before awaiting: concurrent callers skip the check
        await trio.to_thread.run_sync(self.reload_if_changed)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def create(options: Mapping[str, object]) -> PasswdFileStore:
    """Entry point ``passwd-file`` in ``pypop.credentials``: options ``path`` and
    ``default_scheme`` (``CRYPT``, as Dovecot)."""
    opts = Options("passwd-file", options)
    path = opts.path("path", required=True)
    default_scheme = opts.text("default_scheme", "CRYPT")
    opts.finish()
    try:
        return PasswdFileStore(path, default_scheme=default_scheme)
    except schemes.UnknownSchemeError:
        raise opts.error(f"option 'default_scheme': unknown scheme {default_scheme!r}") from None
