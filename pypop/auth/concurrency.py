"""Fair sharing of authentication work between clients.

The hash thread pool is bounded per store (a ``trio.CapacityLimiter``). On its own
that still lets one client fill every slot with parallel connections. A
:class:`PerClientLimiter` caps how many authentications one client (IPv4 address or
IPv6 /64, see :func:`pypop.auth.penalty.client_key`) runs at once; the others queue
in their own connection tasks and never touch the thread pool::

    async with per_client.slot(peer_ip):
        await trio.sleep(penalty.delay(peer_ip))
        ok = await store.verify_password(user, password)

Memory is bounded by the number of clients with an authentication in progress.
"""

from __future__ import annotations

import trio

from pypop.auth.penalty import client_key

__all__ = ["PerClientLimiter"]


class PerClientLimiter:
    def __init__(self, per_client: int = 2) -> None:
        if per_client < 1:
            raise ValueError("per_client must be at least 1")
        self.per_client = per_client
        self._slots: dict[str, tuple[trio.Semaphore, list[int]]] = {}

    def active(self, ip: str) -> int:
        """Authentications of this client that hold or wait for a slot."""
        entry = self._slots.get(client_key(ip))
        return 0 if entry is None else entry[1][0]

    def __len__(self) -> int:
        return len(self._slots)

    def slot(self, ip: str) -> _Slot:
        """``async with limiter.slot(ip):`` one authentication of ``ip``."""
        return _Slot(self, client_key(ip))


class _Slot:
    """The context manager of :meth:`PerClientLimiter.slot` (a class, not a generator:
    it runs on every login)."""

    __slots__ = ("_key", "_limiter", "_sem")

    def __init__(self, limiter: PerClientLimiter, key: str) -> None:
        self._limiter = limiter
        self._key = key

    async def __aenter__(self) -> None:
        slots = self._limiter._slots
        entry = slots.get(self._key)
        if entry is None:
            entry = slots[self._key] = (trio.Semaphore(self._limiter.per_client), [0])
        sem, users = entry
        users[0] += 1
        self._sem = sem
        try:
            await sem.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._sem.release()
        self._leave()

    def _leave(self) -> None:
        slots = self._limiter._slots
        entry = slots.get(self._key)
        if entry is not None:
            entry[1][0] -= 1
            if entry[1][0] == 0:
                del slots[self._key]
