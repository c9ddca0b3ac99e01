"""The backend plugin contract.

A backend is found by name in the entry-point group ``pypop.backends``. The entry
point names a :data:`BackendFactory`: a callable that takes the ``[backend]`` options
from the config file and returns a :class:`Backend`.

Rules every backend follows (``pypop.testing`` checks them):

- ``Backend.open_mailbox`` takes the exclusive maildrop lock (RFC 1939 §4) before it
  returns, and raises :class:`MailboxLocked` at once if another session holds it.
- ``Mailbox.messages`` is a snapshot taken at open time: message *n* is
  ``messages[n - 1]`` for the whole session, mail that arrives later is not in it.
- ``MessageInfo.size`` is the POP3 size (RFC 1939 §11), ``pypop.wire.wire_size`` of
  what ``retrieve`` yields: the message as stored with every line end made CRLF (a
  bare CR too, counting 2). The CRLF the server adds before the terminator to a
  message without a final line end is not counted, as in Dovecot and IMAP's
  RFC822.SIZE; a client that unstuffs RETR gets 2 octets more for such a message.
- ``MessageInfo.uid`` is 1-70 octets in 0x21-0x7E, unique in the maildrop and the same
  in every session (RFC 1939 §7).
- ``Mailbox.retrieve`` yields the stored octets (any line-end convention); the server
  does the stuffing, CRLF conversion and the TOP cut.
- ``Mailbox.commit`` is called only from UPDATE (a QUIT in TRANSACTION state). It
  removes exactly the listed messages and releases the lock. ``Mailbox.aclose``
  releases the lock without removing anything; it is called on every other way out
  (dropped connection, timeout, shutdown) and after ``commit``; it is idempotent.
- Each failure has one exception type, from :mod:`pypop.errors` (re-exported here).
  Anything else a backend raises is a bug: the server ends that session with
  ``-ERR [SYS/TEMP]`` and logs it.

Optional abilities (looked up with ``getattr``, so a backend without them works):

- :class:`SelfAuthenticating`: a backend that checks the client's credentials itself
  (a passthrough to another server) instead of the server's credential store.
- :class:`AccountBackend`: ``open_account(account)`` opens the maildrop where the
  user database says it is (Dovecot's home and ``userdb_mail``). A user with such a
  location on a backend without it is refused (``-ERR [SYS/PERM]``, logged): serving
  some other maildrop instead would be wrong.
- :class:`MessageTimes`: ``received_times()`` tells when each message arrived, so the
  server can enforce EXPIRE (RFC 2449 §6.7) at UPDATE for every backend alike.
- :class:`WireCache`: messages ready for the wire.
- an ``expire_days`` attribute (int or None): the backend's EXPIRE policy (its
  ``expire_days`` option, :meth:`pypop.backend_kit.Options.expire_days`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from pypop.errors import (
    AuthFailed,
    BackendError,
    DuplicateUid,
    MailboxLocked,
    NoSuchMessage,
    NoSuchUser,
    PermanentFailure,
    TemporaryFailure,
    UpdateFailed,
)

__all__ = [
    "Account",
    "AccountBackend",
    "AuthFailed",
    "Backend",
    "BackendError",
    "BackendFactory",
    "CredentialKind",
    "Credentials",
    "Deliverer",
    "DuplicateUid",
    "Mailbox",
    "MailboxLocked",
    "MessageInfo",
    "MessageTimes",
    "NoSuchMessage",
    "NoSuchUser",
    "PermanentFailure",
    "SelfAuthenticating",
    "TemporaryFailure",
    "UpdateFailed",
    "WireCache",
    "is_valid_uid",
]


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One message of a maildrop snapshot."""

    size: int
    """POP3 size in octets, CRLF counted (RFC 1939 §11)."""
    uid: str
    """Unique id for UIDL: 1-70 characters in 0x21-0x7E (RFC 1939 §7)."""


def is_valid_uid(uid: str) -> bool:
    """True if ``uid`` is a legal UIDL unique-id (RFC 1939 §7)."""
    return 1 <= len(uid) <= 70 and all("\x21" <= c <= "\x7e" for c in uid)


@runtime_checkable
class Mailbox(Protocol):
    """One user's locked maildrop, for one session."""

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The snapshot taken at open time; index 0 is message 1."""
        ...

    def retrieve(self, index: int, *, top_lines: int | None = None) -> AsyncIterator[bytes]:
        """Yield the stored octets of ``messages[index]`` in blocks (64 KiB or so).

        ``top_lines`` is a hint for TOP: a backend may stop early once it has sent the
        header and that many body lines, or ignore it; the server cuts anyway.
        Raises :class:`NoSuchMessage` if the message has vanished.
        """
        ...

    async def commit(self, deleted: Sequence[int]) -> None:
        """UPDATE: remove the messages at these indices, then release the lock.

        Raises :class:`UpdateFailed` if some could not be removed.
        """
        ...

    async def aclose(self) -> None:
        """Release the lock without removing anything. Idempotent."""
        ...


@runtime_checkable
class Backend(Protocol):
    """A store of maildrops.

    A backend whose mail or locks live in its own process (nothing another process
    could see) sets a class attribute ``process_local = True``: ``pypop serve`` then
    runs one process only, and refuses ``--workers`` above 1 (pypop.server.workers).
    """

    async def open_mailbox(self, user: str) -> Mailbox:
        """Lock and snapshot ``user``'s maildrop.

        Raises :class:`MailboxLocked`, :class:`TemporaryFailure` or
        :class:`PermanentFailure`.
        """
        ...

    async def aclose(self) -> None:
        """Release resources at server shutdown."""
        ...


@runtime_checkable
class WireCache(Protocol):
    """Optional: a mailbox that holds messages in memory, ready for the wire.

    For RETR (``top_lines`` None) and TOP a session first calls
    ``wire_message(index, top_lines)``; a non-None answer must be exactly what the
    server would send after the "+OK" line, i.e. ``pypop.wire.stuff(message,
    top_lines)``: dot-stuffed, CRLF line ends, the TOP cut, the terminator. It must not
    block (no I/O). ``None`` means "use retrieve". The protocol engine calls it as it
    parses (``ServerConnection.serve_from``), so a pipelined batch of RETRs may ask for
    many messages in a row; an exception means "use retrieve" too, which reports it.
    An answer is not yet a retrieval: the server may still refuse the message (RFC
    6856: an 8-bit header to a client that has not sent UTF8), so a backend that
    records what was retrieved (Maildir's Seen flags) must not count it here unless
    its header is ASCII (``pypop.wire.wire_header_is_ascii``).
    """

    def wire_message(self, index: int, top_lines: int | None = None) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class Account:
    """Where the user database puts a user's mail (None: the backend's default)."""

    user: str
    home: str | None = None
    """The home directory (passwd-file field 6 or ``userdb_home``)."""
    mail: str | None = None
    """Dovecot's mail location (``userdb_mail``), e.g. ``maildir:~/Maildir``."""
    uid: int | None = None
    """The user's system uid (passwd-file field 3 or ``userdb_uid``), if the user
    database gives one: files at a per-user location should belong to it (Dovecot
    runs the session as that uid). A backend may refuse a location that does not."""

    @property
    def located(self) -> bool:
        return self.home is not None or self.mail is not None


@runtime_checkable
class AccountBackend(Protocol):
    """Optional: a backend that opens a maildrop at a per-user location."""

    async def open_account(self, account: Account) -> Mailbox:
        """Like :meth:`Backend.open_mailbox`, at ``account``'s location; raises
        :class:`PermanentFailure` for a location it cannot serve."""
        ...


@runtime_checkable
class MessageTimes(Protocol):
    """Optional: a mailbox that knows when each message arrived."""

    async def received_times(self) -> Sequence[float | None]:
        """For each of ``messages``, in order: seconds since the epoch when it
        arrived, None if unknown (such a message never expires). Asked once, at an
        UPDATE with EXPIRE in force, so a store may read the times only then."""
        ...


@runtime_checkable
class Deliverer(Protocol):
    """Optional: a backend that takes new mail (``pypop deliver``, ``pypop import``).

    ``deliver`` appends ``message`` to ``user``'s maildrop and returns its UIDL only
    once the message is durable: a crash after the return must not lose it, a crash
    before it must not leave half a message that a session could see. Open sessions do
    not see it (their snapshot is older). A backend may store another form of the
    octets (CRLF line ends, say) as long as RETR, TOP and the POP3 size come out
    exactly as for ``message``.

    - ``uid``: keep this UIDL (an import from another store, so that clients do not
      download everything again); ``ValueError`` if it is not a valid UIDL,
      :class:`DuplicateUid` if the maildrop already has it. ``None``: the backend
      makes a new one.
    - ``received``: the delivery time (POSIX seconds) to record, for an import;
      ``None`` is now.

    Raises :class:`NoSuchUser` if the user has no maildrop and the backend does not
    create one, :class:`TemporaryFailure` when the store cannot take mail now (the
    MTA keeps it and retries), :class:`PermanentFailure` otherwise.
    """

    async def deliver(
        self,
        user: str,
        message: bytes,
        *,
        uid: str | None = None,
        received: float | None = None,
    ) -> str: ...


CredentialKind = Literal["password", "bearer"]


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a client logged in with, as a :class:`SelfAuthenticating` backend gets it."""

    user: str
    """The login name (USER, the PLAIN/LOGIN authentication identity, the OAuth user)."""
    secret: str = field(repr=False)
    """The password, or the bearer token."""
    kind: CredentialKind = "password"
    mechanism: str = "USER"
    """How it came: ``USER`` (USER/PASS), ``PLAIN``, ``LOGIN``, ``XOAUTH2``, ``OAUTHBEARER``."""
    client: str | None = None
    """The client's address (for a backend that forwards it upstream), if known."""


@runtime_checkable
class SelfAuthenticating(Protocol):
    """Optional: a backend that authenticates the client itself, e.g. by logging in to
    an upstream server with the client's own password or token.

    When the backend has it, the server passes USER/PASS, SASL PLAIN and LOGIN
    passwords, and XOAUTH2/OAUTHBEARER tokens if ``credential_kinds`` has
    ``"bearer"``, to :meth:`authenticate` instead of checking them against its
    credential store. APOP, CRAM-MD5 and SCRAM never reveal the secret, so they are
    not offered (CAPA, AUTH and the greeting show only what can work). Penalties,
    per-client limits, ``[AUTH]`` replies and logging are the same as for logins the
    server checks itself.

    ``authenticate`` checks the credentials first and only then takes the maildrop
    lock, so that ``[IN-USE]`` is never shown to someone who does not know the secret.
    It returns the opened, locked mailbox (as :meth:`Backend.open_mailbox` would) or
    raises :class:`AuthFailed` (wrong credentials: ``-ERR [AUTH]``, counted as a
    failure), :class:`MailboxLocked`, :class:`TemporaryFailure` (the upstream is
    down: ``[SYS/TEMP]``) or :class:`PermanentFailure`.
    """

    @property
    def credential_kinds(self) -> Collection[CredentialKind]:
        """What it can check: ``"password"`` and/or ``"bearer"``."""
        ...

    async def authenticate(self, credentials: Credentials) -> Mailbox: ...


BackendFactory = Callable[[Mapping[str, object]], Backend]
"""What an entry point in ``pypop.backends`` names: options -> backend."""
