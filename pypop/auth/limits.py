"""Fair sharing of authentication work between clients.

The hash thread pool is bounded per store (a ``trio.CapacityLimiter``). On its own
that still lets one client fill every slot with parallel connections. A
:class:`PerClientLimiter` caps how many authentications one client (IPv4 address or
IPv6 /64, see :func:`pypop.auth.throttle.client_key`) runs at once; the others queue
in their own connection tasks and never touch the thread pool::

    async with per_client.slot(peer_ip):
        await trio.sleep(penalty.delay(peer_ip))
        ok = await store.verify_password(user, password)

Memory is bounded by the number of clients with an authentication in progress.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from pypop.auth.throttle import client_key

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

    @asynccontextmanager
    async def slot(self, ip: str) -> AsyncIterator[None]:
        key = client_key(ip)
        entry = self._slots.get(key)
        if entry is None:
            entry = (trio.Semaphore(self.per_client), [0])
            self._slots[key] = entry
        sem, users = entry
        users[0] += 1
        try:
            async with sem:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._slots[key]
