"""POP3 maildrops served from an upstream IMAP mailbox.

Two backends share the machinery:

- :class:`ImapPassthroughBackend` (no ``master_user``): the client's own password or
  bearer token logs in upstream (:class:`pypop.backend.SelfAuthenticating`).
- :class:`ImapBackend` with ``master_user``: pypop checks the user with its own
  credential store (any mechanism), then logs in upstream as that user with the
  master secret (``AUTHENTICATE PLAIN`` with an authorization identity, or Dovecot's
  ``user*master`` form).

Per session: log in (or reuse a pooled connection), take the maildrop lock, EXAMINE
the mailbox (read-only: nothing changes upstream until UPDATE), fetch UID and
RFC822.SIZE of every message. RETR is ``UID FETCH uid (BODY.PEEK[])``, streamed;
TOP is ``BODY.PEEK[HEADER]`` plus a partial ``BODY.PEEK[TEXT]<0.n>``. UPDATE selects
the mailbox read-write, checks UIDVALIDITY, marks the messages ``\\Deleted`` and
expunges exactly them.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Final

import trio
from pypop.backend import (
    AuthFailed,
    CredentialKind,
    Credentials,
    MailboxLocked,
    MessageInfo,
    NoSuchMessage,
    PermanentFailure,
    TemporaryFailure,
    UpdateFailed,
)
from pypop.backend_kit import SnapshotMailbox, blocks

from pypop_imap._config import ImapSettings
from pypop_imap._connection import CommandFailed, ImapConnection, UpstreamError, uid_set
from pypop_imap._protocol import Status

__all__ = ["ImapBackend", "ImapMailbox", "ImapPassthroughBackend"]

log = logging.getLogger("pypop.imap")

SMALL: Final = 64 * 1024
"""Messages up to this size may be fetched ahead, several in one command."""
PREFETCH_BYTES: Final = 256 * 1024
PREFETCH_COUNT: Final = 32
PREFETCH_TTL: Final = 2.0
"""Seconds a message fetched ahead is served from memory (an expunge by another
client within this window is not seen, as if it came after the RETR)."""
TOP_FIRST: Final = 4096
TOP_MAX_STEP: Final = 1024 * 1024

MAX_NAME: Final = 255
MAX_SECRET: Final = 16384

# Response codes of a refused login that mean "try later" (RFC 5530).
_TEMPORARY_CODES: Final = frozenset({b"UNAVAILABLE", b"SERVERBUG", b"LIMIT", b"INUSE"})

Login = Callable[[ImapConnection], Awaitable[None]]


class _RateLimitedLog:
    """One warning per ``every`` seconds for a recurring upstream failure."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last = -1e9
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" ({self._suppressed} more since the last report)"
            self._suppressed = 0
        self._last = now
        log.warning(message, *args)


@dataclass(slots=True)
class _Idle:
    conn: ImapConnection
    digest: bytes | None
    born: float
    until: float


class _Pool:
    """Logged-in upstream connections kept after a session, one per user.

    A later login by the same user takes it instead of logging in again. With a
    passthrough login it is taken only for the same secret (kept as a keyed hash),
    and never past ``max_age`` seconds after the upstream login: a password changed
    upstream stops working here at most that long after.
    """

    def __init__(self, idle: float, max_age: float, size: int) -> None:
        self.idle = idle
        self.max_age = max_age
        self.size = size
        self._entries: OrderedDict[str, _Idle] = OrderedDict()
        self._dying: list[ImapConnection] = []

    @property
    def enabled(self) -> bool:
        return self.idle > 0 and self.max_age > 0 and self.size > 0

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, key: str, digest: bytes | None) -> tuple[ImapConnection, float] | None:
        self._expire()
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        if (entry.digest is not None or digest is not None) and (
            entry.digest is None or digest is None or not hmac.compare_digest(entry.digest, digest)
        ):
            self._dying.append(entry.conn)  # another secret: log in afresh
            return None
        return entry.conn, entry.born

    def put(self, key: str, conn: ImapConnection, digest: bytes | None, born: float) -> bool:
        now = time.monotonic()
        if not self.enabled or conn.broken or conn.busy or now - born >= self.max_age:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self._dying.append(old.conn)
        self._entries[key] = _Idle(conn, digest, born, min(now + self.idle, born + self.max_age))
        while len(self._entries) > self.size:
            _, entry = self._entries.popitem(last=False)
            self._dying.append(entry.conn)
        return True

    def _expire(self) -> None:
        now = time.monotonic()
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.until > now:
                break
            del self._entries[key]
            self._dying.append(entry.conn)

    async def reap(self) -> None:
        """Close what was dropped (plain TCP close: no LOGOUT round trip on a login)."""
        self._expire()
        dying, self._dying = self._dying, []
        for conn in dying:
            await conn.aclose()

    async def aclose(self) -> None:
        entries = list(self._entries.values())
        self._entries.clear()
        with trio.CancelScope(shield=True):
            for entry in entries:
                await entry.conn.logout()
            await self.reap()


class ImapBackend:
    """The imap backend; with ``master_user`` set it serves users pypop has checked.

    Without a master user only :class:`ImapPassthroughBackend` can log in upstream.
    """

    def __init__(self, settings: ImapSettings) -> None:
        self.settings = settings
        self._endpoint = settings.endpoint
        self._locks = settings.locks
        self._pool = _Pool(settings.reuse_idle, settings.reuse_max_age, settings.reuse_max)
        self._validity: OrderedDict[str, int] = OrderedDict()
        self._down_log = _RateLimitedLog()
        self._hash_key = secrets.token_bytes(32)
        endpoint = self._endpoint
        self._where = f"imap://{endpoint.host}:{endpoint.port}/{settings.mailbox}"

    # -- the contract --

    async def open_mailbox(self, user: str) -> ImapMailbox:
        settings = self.settings
        if settings.master_user is None or settings.master_password is None:
            raise PermanentFailure("the imap backend needs master_user to open a maildrop")
        master, password = settings.master_user, settings.master_password
        separator = settings.master_separator
        try:
            self._check(user, None)
        except AuthFailed:
            raise PermanentFailure("a user name the upstream cannot take") from None

        async def login(conn: ImapConnection) -> None:
            if separator:
                # Dovecot's form: the master's password for "user*master".
                await conn.authenticate_plain(f"{user}{separator}{master}", password)
            else:
                await conn.authenticate_plain(master, password, authzid=user)

        return await self._open(user, login, None, master=True)

    async def aclose(self) -> None:
        await self._pool.aclose()

    # -- opening --

    def _check(self, user: str, secret: str | None) -> None:
        """Refuse what cannot be passed on safely: a NUL would split a SASL PLAIN
        message differently upstream; control characters, huge names."""
        if (
            not user
            or len(user.encode("utf-8", "surrogatepass")) > MAX_NAME
            or any(ord(c) < 0x20 or ord(c) == 0x7F for c in user)
            or (self.settings.master_separator and self.settings.master_separator in user)
        ):
            raise AuthFailed("unusable user name")
        if secret is not None and (
            not secret or len(secret) > MAX_SECRET or any(c in secret for c in "\0\r\n")
        ):
            raise AuthFailed("unusable secret")

    def lock_key(self, user: str) -> str:
        """The maildrop lock's key: upstream, mailbox and user (case-folded: servers
        that fold case would otherwise give two sessions one maildrop)."""
        return f"{self._where}/{user.casefold()}"

    async def _open(
        self, user: str, login: Login, digest: bytes | None, *, master: bool = False
    ) -> ImapMailbox:
        key = self.lock_key(user)
        await self._pool.reap()
        pooled = self._pool.take(key, digest)
        if pooled is not None:
            conn, born = pooled
        else:
            conn, born = await self._login(user, login, master), time.monotonic()
        # The credentials are proven; only now may [IN-USE] be told.
        try:
            locked = await self._locks.acquire(key)
        except BaseException:
            await conn.logout()
            raise
        if not locked:
            if not self._pool.put(key, conn, digest, born):
                await conn.logout()
            raise MailboxLocked(f"{user}'s maildrop is in use")
        try:
            try:
                messages, uids, validity = await self._snapshot(conn, user)
            except (UpstreamError, CommandFailed) as exc:
                if pooled is None:
                    raise
                # A pooled connection that went stale (closed upstream): log in again.
                log.debug("reused connection for %s failed (%s); logging in again", user, exc)
                await conn.aclose()
                conn, born = await self._login(user, login, master), time.monotonic()
                messages, uids, validity = await self._snapshot(conn, user)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await self._locks.release(key)
                await conn.logout()
            if isinstance(exc, CommandFailed):
                log.warning(
                    "%s: cannot open %s for %s: %s", self._where, self.settings.mailbox, user, exc
                )
                raise PermanentFailure("the mailbox cannot be opened") from None
            if isinstance(exc, UpstreamError):
                self._down_log.warning("%s: %s", self._where, exc)
                raise TemporaryFailure("upstream failure") from None
            raise
        return ImapMailbox(self, key, conn, born, digest, messages, uids, validity)

    async def _login(self, user: str, login: Login, master: bool) -> ImapConnection:
        try:
            conn = await ImapConnection.open(self._endpoint)
        except UpstreamError as exc:
            self._down_log.warning("upstream unavailable: %s", exc)
            raise TemporaryFailure("upstream unavailable") from None
        try:
            await login(conn)
        except CommandFailed as exc:
            await conn.logout()
            raise self._refused(user, exc, master) from None
        except UpstreamError as exc:
            await conn.aclose()
            self._down_log.warning("upstream failed during login: %s", exc)
            raise TemporaryFailure("upstream failure") from None
        except BaseException:
            await conn.aclose()
            raise
        return conn

    def _refused(self, user: str, exc: CommandFailed, master: bool) -> Exception:
        status = exc.status
        if status.condition == b"BAD" or status.code in _TEMPORARY_CODES:
            log.warning("%s refused the login of %s for now: %s", self._where, user, exc)
            return TemporaryFailure("upstream refused the login for now")
        if master:
            # pypop checked the user: a refusal means the master secret is wrong or
            # the user has no mailbox upstream. Either way the admin must look.
            log.error(
                "%s refused master user %r for %s (check master_user, "
                "master_password_file and that the user exists upstream): %s",
                self._where,
                self.settings.master_user,
                user,
                exc,
            )
            return TemporaryFailure("master login refused")
        return AuthFailed("upstream refused the credentials")

    async def _snapshot(
        self, conn: ImapConnection, user: str
    ) -> tuple[list[MessageInfo], list[int], int]:
        guid = self.settings.uidl.needs_guid
        selected, rows, expunged = await conn.open_snapshot(
            self.settings.mailbox_arg, read_only=not self.settings.mark_seen, guid=guid
        )
        self._note_validity(user, selected.uidvalidity)
        for _ in range(3):
            if not expunged:
                break
            rows, expunged = await conn.sizes(guid=guid)  # changed meanwhile: again
        uidl, validity = self.settings.uidl, selected.uidvalidity
        try:
            messages = [MessageInfo(size, uidl(uid, validity, guid)) for uid, size, guid in rows]
        except ValueError as exc:
            raise UpstreamError(str(exc)) from None
        return messages, [uid for uid, _, _ in rows], validity

    def _note_validity(self, user: str, validity: int) -> None:
        key = user.casefold()
        before = self._validity.pop(key, None)
        self._validity[key] = validity
        if len(self._validity) > 100_000:
            self._validity.popitem(last=False)
        if before is not None and before != validity:
            log.warning(
                "%s: UIDVALIDITY of %s's %s changed from %d to %d: every UIDL changes, "
                "so POP3 clients will download all of its messages again",
                self._where,
                user,
                self.settings.mailbox,
                before,
                validity,
            )

    def _digest(self, credentials: Credentials) -> bytes:
        data = "\0".join((credentials.kind, credentials.user, credentials.secret))
        return hmac.new(
            self._hash_key, data.encode("utf-8", "surrogatepass"), hashlib.sha256
        ).digest()

    @property
    def pooled(self) -> int:
        """Idle upstream connections kept for reuse (for tests and metrics)."""
        return len(self._pool)


class ImapPassthroughBackend(ImapBackend):
    """The imap backend without a master user: the client's own credentials log in
    upstream (:class:`pypop.backend.SelfAuthenticating`)."""

    credential_kinds: Collection[CredentialKind] = frozenset({"password", "bearer"})

    async def open_mailbox(self, user: str) -> ImapMailbox:
        # Only reached through a server that does not know SelfAuthenticating.
        raise PermanentFailure("the imap backend without master_user needs the user's password")

    async def authenticate(self, credentials: Credentials) -> ImapMailbox:
        user, secret, client = credentials.user, credentials.secret, credentials.client
        self._check(user, secret)
        if credentials.kind == "bearer":
            mechanism = "OAUTHBEARER" if credentials.mechanism == "OAUTHBEARER" else "XOAUTH2"

            async def login(conn: ImapConnection) -> None:
                if client and self.settings.forward_client:
                    await conn.send_id(client)
                offered = [
                    m
                    for m in ("XOAUTH2", "OAUTHBEARER")
                    if b"AUTH=" + m.encode() in conn.capabilities
                ]
                if not offered:
                    log.warning(
                        "%s takes no bearer tokens (no AUTH=XOAUTH2 or OAUTHBEARER)", self._where
                    )
                    raise CommandFailed("AUTHENTICATE", Status(None, b"NO", text=b"no token login"))
                await conn.authenticate_bearer(
                    mechanism if mechanism in offered else offered[0], user, secret
                )
        else:

            async def login(conn: ImapConnection) -> None:
                if client and self.settings.forward_client:
                    await conn.send_id(client)
                await conn.authenticate_plain(user, secret)

        return await self._open(user, login, self._digest(credentials))


class ImapMailbox(SnapshotMailbox):
    """One session's view of the upstream mailbox."""

    def __init__(
        self,
        backend: ImapBackend,
        key: str,
        conn: ImapConnection,
        born: float,
        digest: bytes | None,
        messages: Sequence[MessageInfo],
        uids: list[int],
        uidvalidity: int,
    ) -> None:
        super().__init__(messages)
        self._backend = backend
        self._key = key
        self._conn = conn
        self._born = born
        self._digest = digest
        self._uids = uids
        self.uidvalidity = uidvalidity
        settings = backend.settings
        self._section = b"BODY[]" if settings.mark_seen else b"BODY.PEEK[]"
        self._prefetch = not settings.mark_seen
        self._cache: dict[int, bytes] = {}
        self._cache_until = 0.0
        self._last = -2
        self._size_warned = False

    @property
    def uids(self) -> Sequence[int]:
        """The IMAP UIDs of the snapshot's messages."""
        return self._uids

    # -- RETR / TOP --

    def retrieve(self, index: int, *, top_lines: int | None = None) -> AsyncIterator[bytes]:
        if top_lines is None:
            return self._retr(index)
        return self._top(index, top_lines)

    async def _retr(self, index: int) -> AsyncIterator[bytes]:
        sequential = index == self._last + 1
        self._last = index
        cached = self._cache.pop(index, None)
        if cached is not None and time.monotonic() < self._cache_until:
            for block in blocks(cached):
                yield block
            return
        conn = self._conn
        uid = self._uids[index]
        if sequential and self._prefetch and self._messages[index].size <= SMALL:
            batch = self._batch(index)
            if len(batch) > 1:
                with _mapped(self._backend):
                    got = await conn.bodies([self._uids[i] for i in batch], self._section)
                self._cache = {i: got[self._uids[i]] for i in batch[1:] if self._uids[i] in got}
                self._cache_until = time.monotonic() + PREFETCH_TTL
                body = got.get(uid)
                if body is None:
                    raise NoSuchMessage(f"UID {uid} is gone")
                self._check_size(index, len(body))
                for block in blocks(body):
                    yield block
                return
        total = 0
        found = False
        with _mapped(self._backend):
            async with aclosing(conn.stream(uid, [self._section])) as pieces:
                async for _, data in pieces:
                    if data is None:
                        continue
                    found = True
                    total += len(data)
                    yield data
        if not found:
            raise NoSuchMessage(f"UID {uid} is gone")
        self._check_size(index, total)

    def _batch(self, index: int) -> list[int]:
        batch: list[int] = []
        total = 0
        for i in range(index, len(self._messages)):
            size = self._messages[i].size
            if size > SMALL or total + size > PREFETCH_BYTES or len(batch) >= PREFETCH_COUNT:
                break
            batch.append(i)
            total += size
        return batch

    def _check_size(self, index: int, octets: int) -> None:
        # Sizes come from RFC822.SIZE; a server whose figure is wrong would make
        # LIST disagree with RETR. Say so once per session.
        if octets != self._messages[index].size and not self._size_warned:
            self._size_warned = True
            log.warning(
                "%s: RFC822.SIZE %d of UID %d differs from the %d octets fetched",
                self._backend._where,
                self._messages[index].size,
                self._uids[index],
                octets,
            )

    async def _top(self, index: int, lines: int) -> AsyncIterator[bytes]:
        """Header plus at least ``lines`` body lines (the server cuts exactly): a
        partial fetch, doubled until enough LF-ended lines came or the body ended."""
        conn = self._conn
        uid = self._uids[index]
        header_seen = False
        body_lines = 0
        offset = 0
        asked = min(TOP_FIRST + 128 * lines, TOP_MAX_STEP)
        sections = [b"BODY.PEEK[HEADER]"]
        if lines > 0:
            sections.append(b"BODY.PEEK[TEXT]<0.%d>" % asked)
        with _mapped(self._backend):
            held: list[bytes] = []  # body octets that came before the header
            got = 0
            async with aclosing(conn.stream(uid, sections)) as pieces:
                async for item, data in pieces:
                    if item == b"BODY[HEADER]":
                        header_seen = True
                        if data:
                            yield data
                        continue
                    if data is None:
                        continue
                    got += len(data)
                    if got > asked:
                        # More than a partial fetch may return (RFC 3501 §6.4.5), and
                        # text before the header is held: refuse, do not buffer it.
                        raise UpstreamError(f"UID {uid}: more text than asked for")
                    body_lines += data.count(b"\n")
                    if header_seen:
                        for part in held:
                            yield part
                        held.clear()
                        yield data
                    else:
                        held.append(data)
            if not header_seen:
                raise NoSuchMessage(f"UID {uid} is gone")
            for part in held:
                yield part
            offset = got
            # The text is part of the message: a server that keeps sending more than
            # its RFC822.SIZE would otherwise be asked again for ever.
            size = self._messages[index].size
            while lines > 0 and body_lines < lines and got == asked and offset < size:
                asked = min(asked * 2, TOP_MAX_STEP)
                got = 0
                section = b"BODY.PEEK[TEXT]<%d.%d>" % (offset, asked)
                async with aclosing(conn.stream(uid, [section])) as pieces:
                    async for _, data in pieces:
                        if data:
                            got += len(data)
                            if got > asked:
                                raise UpstreamError(f"UID {uid}: more text than asked for")
                            body_lines += data.count(b"\n")
                            yield data
                offset += got

    # -- UPDATE --

    async def update(self, deleted: Sequence[int]) -> None:
        if not deleted:
            return
        conn = self._conn
        uids = [self._uids[i] for i in deleted]
        try:
            selected = conn.selected
            if selected is None or selected.read_only:
                selected = await conn.select(self._backend.settings.mailbox_arg, read_only=False)
            if selected.uidvalidity != self.uidvalidity:
                # The UIDs now name other messages: deleting by them could remove mail
                # that was never marked.
                log.error(
                    "%s: UIDVALIDITY changed during the session (%d -> %d): nothing deleted",
                    self._backend._where,
                    self.uidvalidity,
                    selected.uidvalidity,
                )
                raise UpdateFailed("UIDVALIDITY changed")
            await conn.store_deleted(uids)
            if b"UIDPLUS" in conn.capabilities:
                await conn.uid_expunge(uids)  # RFC 4315: exactly these
            else:
                await self._expunge_only(conn, uids)
            left: list[int] = []
            for part in uid_set(uids):
                left += await conn.search_uids(b"UID " + part)
        except (UpstreamError, CommandFailed) as exc:
            log.warning("%s: UPDATE failed: %s", self._backend._where, exc)
            raise UpdateFailed("upstream failure during UPDATE") from None
        if left:
            raise UpdateFailed(f"{len(left)} marked messages were not removed")

    async def _expunge_only(self, conn: ImapConnection, ours: list[int]) -> None:
        """EXPUNGE without UIDPLUS removes every \\Deleted message, so others' marks are
        lifted for the moment and put back (a client marking a message in between
        would see it expunged: a narrow race, logged if it is seen)."""
        mine = set(ours)
        others = [u for u in await conn.search_uids(b"DELETED") if u not in mine]
        if others:
            await conn.store_deleted(others, add=False)
        try:
            await conn.expunge()
        finally:
            if others:
                with trio.CancelScope(shield=True):
                    await conn.store_deleted(others, add=True)

    # -- the end --

    async def release(self) -> None:
        conn, backend = self._conn, self._backend
        self._cache.clear()
        try:
            await backend._locks.release(self._key)
        except Exception:
            log.exception("releasing the maildrop lock %s failed", self._key)
        if not backend._pool.put(self._key, conn, self._digest, self._born):
            await conn.logout()


@contextlib.contextmanager
def _mapped(backend: ImapBackend) -> Iterator[None]:
    """Upstream failures as the contract's exceptions."""
    try:
        yield
    except UpstreamError as exc:
        backend._down_log.warning("%s: %s", backend._where, exc)
        raise TemporaryFailure("upstream failure") from None
    except CommandFailed as exc:
        if exc.code in (b"EXPUNGEISSUED", b"NONEXISTENT"):
            raise NoSuchMessage("the message is gone") from None
        log.warning("%s: %s", backend._where, exc)
        raise TemporaryFailure("upstream refused a FETCH") from None
