"""Abuse control bookkeeping: failure penalties per client, LOGIN-DELAY per user.

Nothing here sleeps or does I/O: each object only answers "how long should this
client wait?" from its own records and an injectable clock (``time.monotonic`` by
default; pass ``trio.current_time`` to use Trio's clock, and so the autojump clock in
tests). The session does the waiting, in its own task, so one abusive client never
delays another.

How the session uses :class:`AuthPenalty` (Dovecot's anvil ``auth_penalty``)::

    await trio.sleep(penalty.delay(ip))        # before verifying anything from ip
    ok = await ...verify...
    if ok:
        penalty.record_success(ip)
    else:
        await trio.sleep(penalty.record_failure(ip, user, secret))  # then -ERR [AUTH]

The delay is applied *before* verification, so a client that opens many connections
and does not wait for the ``-ERR`` still cannot learn a result sooner. Combine it with
:class:`pypop.auth.concurrency.PerClientLimiter`, which caps how many authentications one
client runs at once.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pypop.netaddr import client_address

__all__ = ["AuthPenalty", "LoginDelay", "client_key"]


@functools.lru_cache(maxsize=65536)
def client_key(ip: str) -> str:
    """The unit of penalties: an IPv4 address, or the /64 of an IPv6 address.

    One IPv6 host usually owns a whole /64, and could otherwise dodge its penalty by
    changing addresses. IPv4-mapped IPv6 addresses count as IPv4. Anything that is not
    an address is used as it is.
    """
    addr = client_address(ip)
    if addr is None:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


@dataclass(slots=True)
class _Penalty:
    level: int
    last_failure: float
    fingerprints: list[bytes] = field(default_factory=list)


class AuthPenalty:
    """Failure delay per client, like Dovecot's anvil.

    - The first failure sets level 1; each further failure adds one. The delay before
      the next attempt is ``initial_delay * 2 ** (level - 1)``, capped at ``max_delay``
      (2, 4, 8, 15, 15, ... seconds with the defaults).
    - A failure with the same user and secret as one of the last ``fingerprints`` does
      not raise the level (a mail client retrying a stale password is not an attack).
      Only a keyed 16-octet BLAKE2b fingerprint of ``user NUL secret`` is kept, with a
      per-process random key: never the password.
    - A success clears the client. Without failures the level falls by one every
      ``decay_after`` seconds, and the client is forgotten at level 0.
    - At most ``max_clients`` clients are remembered; the least recently failed one is
      dropped first.
    """

    def __init__(
        self,
        *,
        initial_delay: float = 2.0,
        max_delay: float = 15.0,
        failure_delay: float = 2.0,
        decay_after: float = 300.0,
        fingerprints: int = 5,
        max_clients: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        key: bytes | None = None,
    ) -> None:
        if initial_delay < 0 or max_delay < initial_delay or decay_after <= 0:
            raise ValueError("bad AuthPenalty parameters")
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.failure_delay = failure_delay
        self.decay_after = decay_after
        self._max_fingerprints = fingerprints
        self._max_clients = max_clients
        self._clock = clock
        self._key = key if key is not None else secrets.token_bytes(32)
        self._clients: OrderedDict[str, _Penalty] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def fingerprint(self, user: str, secret: bytes | str) -> bytes:
        """The keyed fingerprint of an attempt (what :meth:`record_fingerprint` takes)."""
        if isinstance(secret, str):
            secret = secret.encode("utf-8", "surrogatepass")
        h = hashlib.blake2b(key=self._key, digest_size=16)
        h.update(user.encode("utf-8", "surrogatepass") + b"\0" + secret)
        return h.digest()

    def _current(self, key: str, now: float) -> _Penalty | None:
        entry = self._clients.get(key)
        if entry is None:
            return None
        steps = int((now - entry.last_failure) // self.decay_after)
        if steps > 0:
            entry.level -= steps
            entry.last_failure += steps * self.decay_after
            if entry.level <= 0:
                del self._clients[key]
                return None
        return entry

    def _delay_for(self, level: int) -> float:
        if level <= 0:
            return 0.0
        return min(self.max_delay, self.initial_delay * 2.0 ** min(level - 1, 62))

    def level(self, ip: str) -> int:
        entry = self._current(client_key(ip), self._clock())
        return 0 if entry is None else entry.level

    def delay(self, ip: str) -> float:
        """Seconds to wait before verifying an attempt from ``ip`` (0 for a clean client)."""
        return self._delay_for(self.level(ip))

    def record_failure(self, ip: str, user: str | None, secret: bytes | str | None) -> float:
        """Count a failed attempt; returns the seconds to wait before sending ``-ERR``.

        Pass the attempted user and password (or token) when the mechanism has them
        (USER/PASS, PLAIN, LOGIN, XOAUTH2, OAUTHBEARER) so that an identical retry does
        not raise the penalty; ``None`` otherwise (every failure then counts).
        """
        fp = None if secret is None else self.fingerprint(user or "", secret)
        return self.record_fingerprint(ip, fp)

    def record_fingerprint(self, ip: str, fp: bytes | None) -> float:
        """:meth:`record_failure` with the attempt's :meth:`fingerprint` (or None):
        the shared limits of several workers (pypop.server.anvil) send only that."""
        now = self._clock()
        key = client_key(ip)
        entry = self._current(key, now)
        if entry is None:
            entry = _Penalty(level=1, last_failure=now)
            self._clients[key] = entry
        elif fp is not None and fp in entry.fingerprints:
            entry.last_failure = now
        else:
            entry.level += 1
            entry.last_failure = now
        if fp is not None and fp not in entry.fingerprints:
            entry.fingerprints.append(fp)
            del entry.fingerprints[: -self._max_fingerprints]
        self._clients.move_to_end(key)
        while len(self._clients) > self._max_clients:
            self._clients.popitem(last=False)
        return self.failure_delay

    def record_success(self, ip: str) -> None:
        self._clients.pop(client_key(ip), None)


class LoginDelay:
    """RFC 2449 §6.5 LOGIN-DELAY: a minimum time between logins of one user.

    ``seconds`` applies to every user; ``per_user`` overrides it (the CAPA then says
    ``LOGIN-DELAY n USER``, see :attr:`varies_per_user`). Entries expire when their
    delay has passed; at most ``max_users`` are kept (the oldest logins go first).
    """

    def __init__(
        self,
        seconds: float,
        *,
        per_user: Mapping[str, float] | None = None,
        max_users: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if seconds < 0:
            raise ValueError("LOGIN-DELAY must not be negative")
        self.seconds = seconds
        self._per_user = dict(per_user or {})
        self._max_users = max_users
        self._clock = clock
        self._last: OrderedDict[str, float] = OrderedDict()
        self._longest_seen = 0.0

    @property
    def varies_per_user(self) -> bool:
        return bool(self._per_user)

    def seconds_for(self, user: str) -> float:
        """The delay of ``user`` (what CAPA shows in TRANSACTION state)."""
        return self._per_user.get(user, self.seconds)

    def remaining(self, user: str, seconds: float | None = None) -> float:
        """Seconds until ``user`` may log in again (0.0 = now); ``seconds``: the
        user's own delay (a user database's), else :meth:`seconds_for`."""
        last = self._last.get(user)
        if last is None:
            return 0.0
        delay = self.seconds_for(user) if seconds is None else seconds
        return max(0.0, last + delay - self._clock())

    def try_login(self, user: str, seconds: float | None = None) -> float:
        """Record a login of ``user`` if allowed and return 0.0; else the seconds left.

        Call it after the credentials were verified, before opening the mailbox; a
        positive result means ``-ERR [LOGIN-DELAY]`` and no login. ``seconds`` is
        the user's own delay, when a user database sets one (RFC 2449 §6.5 USER).
        """
        if seconds is not None and seconds > self._longest_seen:
            self._longest_seen = seconds
        delay = self.seconds_for(user) if seconds is None else seconds
        if delay <= 0:
            # Nothing to wait for and nothing to record (the default, LOGIN-DELAY 0):
            # a login made under a delay later counts from then.
            return 0.0
        left = self.remaining(user, delay)
        if left > 0:
            return left
        now = self._clock()
        self._last[user] = now
        self._last.move_to_end(user)
        self._prune(now)
        return 0.0

    def _prune(self, now: float) -> None:
        # Oldest logins are at the front; drop those whose delay has passed, then any
        # beyond the cap.
        longest = max([self.seconds, self._longest_seen, *self._per_user.values()])
        while self._last:
            user, when = next(iter(self._last.items()))
            if when + longest <= now or len(self._last) > self._max_users:
                del self._last[user]
            else:
                break

    def __len__(self) -> int:
        return len(self._last)
