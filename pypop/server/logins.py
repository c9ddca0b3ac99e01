"""Logins as the administrator sees them: one log line per failure, and the wait for a
maildrop lock that another session is letting go.

Failed logins (issue 9 "Admin experience" 4) are logged by the ``pypop.login`` logger
as one line each, in a shape fail2ban can match (``docs/fail2ban.conf``)::

    login failed: user=<alice> method=PLAIN rip=192.0.2.7 reason=credentials
    login failed: user=<bob> method=USER rip=2001:db8::1 reason=temporary cause=...

``user`` is what the peer sent, cleaned (see :func:`clean`); ``method`` is ``USER``
(USER/PASS), ``APOP`` or the SASL mechanism; ``reason`` is one of :data:`REASONS`;
``cause`` (server-side failures only) says why, for the administrator: the client
only ever gets ``[SYS/TEMP]`` or ``[SYS/PERM]``.
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from pypop.backend import Account, Backend, Mailbox
from pypop.errors import MailboxLocked, PermanentFailure

__all__ = ["REASONS", "Hold", "MaildropHolders", "clean", "describe", "log_failed_login"]

log = logging.getLogger("pypop.login")

MAX_LOGGED_NAME: Final = 64

REASONS: Final = {
    "credentials": "wrong password or unknown user (or a malformed SASL exchange)",
    "cancelled": 'the client cancelled a SASL exchange ("*")',
    "malformed": "bad base64 or an overlong line in a SASL exchange",
    "in-use": "the maildrop is locked by another session",
    "login-delay": "RFC 2449 LOGIN-DELAY not yet over",
    "network": "the user may not log in from this address (allow_nets)",
    "disabled": "the account has nologin (the reason goes to the client)",
    "temporary": "a server-side failure, -ERR [SYS/TEMP] (cause= says which)",
    "permanent": "the account cannot be served, -ERR [SYS/PERM] (cause= says why)",
}
"""Every ``reason=``; the first three are what an attacker produces (fail2ban bans on
them), the others are the server's or the account's business."""


def clean(text: str, limit: int = MAX_LOGGED_NAME) -> str:
    """Peer-controlled text made safe for one log line: printable, no spaces, no
    ``<``/``>``/``=``/``"`` (so it cannot forge another field or close ``user=<>``),
    at most ``limit`` characters (longer ones end with ``...``)."""
    out = "".join(
        c if c.isprintable() and not c.isspace() and c not in '<>="\\' else "?"
        for c in text[: limit + 1]
    )
    return out if len(out) <= limit else out[:limit] + "..."


def describe(exc: BaseException, limit: int = 300) -> str:
    """An exception and its causes as one quoted phrase for ``cause=``, e.g.
    ``"cannot create maildir: Not a directory: /var/mail/bob/cur"``."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(parts) < 4:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            text = current.strerror
            if current.filename is not None:
                text += f": {current.filename}"
        else:
            text = str(current) or type(current).__name__
        parts.append(text)
        current = current.__cause__ or current.__context__
    joined = ": ".join(parts)
    safe = "".join(c if c.isprintable() and c not in '"\\' else "?" for c in joined)
    if len(safe) > limit:
        safe = safe[:limit] + "..."
    return f'"{safe}"'


def log_failed_login(
    user: str | None, method: str, host: str, reason: str, cause: str | None = None
) -> None:
    """The one line per failed login (WARNING for what fail2ban counts, ERROR for
    server-side failures, INFO otherwise)."""
    if reason not in REASONS:
        raise ValueError(f"unknown login failure reason {reason!r}")
    line = "login failed: user=<%s> method=%s rip=%s reason=%s"
    args: list[object] = [clean(user or ""), clean(method, 32), host, reason]
    if cause is not None:
        line += " cause=%s"
        args.append(cause)
    if reason in ("credentials", "cancelled", "malformed"):
        level = logging.WARNING
    elif reason in ("temporary", "permanent"):
        level = logging.ERROR
    else:
        level = logging.INFO
    log.log(level, line, *args)


class Hold:
    """A session's hold on a maildrop. The event that wakes logins waiting for it is
    made by the first such login: an idle session keeps 40 octets, not an Event."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event: trio.Event | None = None


class MaildropHolders:
    """The maildrops this server's sessions hold, and a bounded wait for one.

    A client that drops its connection and logs in again at once can arrive before
    its old session has noticed the drop and released the lock (RFC 1939 §4). So a
    login that finds the maildrop locked retries ``open_mailbox`` for up to ``wait``
    seconds before answering ``[IN-USE]``: it wakes as soon as a session of this
    server that holds the same user's maildrop lets go, and otherwise polls
    (10 ms, doubling to 250 ms), which also covers holders the server cannot see
    (another process, a mapping of several users to one maildrop). It needs nothing
    from the backend but :class:`~pypop.errors.MailboxLocked`.
    """

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self._released: dict[str, Hold] = {}

    def hold(self, user: str) -> Hold:
        """Record that a session now holds ``user``'s maildrop; pass the returned
        :class:`Hold` to :meth:`let_go` when it is released."""
        hold = Hold()
        self._released[user] = hold
        return hold

    def let_go(self, user: str, hold: Hold) -> None:
        if hold.event is not None:
            hold.event.set()
        if self._released.get(user) is hold:
            del self._released[user]

    async def open(self, backend: Backend, user: str, account: Account | None = None) -> Mailbox:
        """``backend.open_mailbox(user)`` (``open_account(account)`` for a user with a
        location of their own), waiting up to ``wait`` seconds for a lock."""
        deadline = trio.current_time() + self.wait
        pause = 0.01
        opener = None
        if account is not None and account.located:
            opener = getattr(backend, "open_account", None)
            if opener is None:
                raise PermanentFailure(
                    f"{type(backend).__name__} cannot open per-user maildrop locations "
                    "(home, userdb_mail)"
                )
        while True:
            try:
                if opener is not None:
                    mailbox: Mailbox = await opener(account)
                    return mailbox
                return await backend.open_mailbox(user)
            except MailboxLocked:
                left = deadline - trio.current_time()
                if left <= 0:
                    raise
            held = self._released.get(user)
            with trio.move_on_after(min(pause, left)):
                if held is not None:
                    if held.event is None:
                        held.event = trio.Event()
                    await held.event.wait()
                else:
                    await trio.sleep_forever()
            pause = min(pause * 2, 0.25)
