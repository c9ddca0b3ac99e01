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
        self._slots: dict[str, _Client] = {}

    def active(self, ip: str) -> int:
        """Authentications of this client that hold or wait for a slot."""
        entry = self._slots.get(client_key(ip))
        return 0 if entry is None else entry.users

    def __len__(self) -> int:
        return len(self._slots)

    def slot(self, ip: str) -> _Slot:
        """``async with limiter.slot(ip):`` one authentication of ``ip``."""
        return _Slot(self, client_key(ip))


class _Client:
    """One client's slots: ``free`` of them, ``users`` holding or waiting, and the
    waiters, in order (a queue made only once some client waits)."""

    __slots__ = ("free", "lot", "users")

    def __init__(self, slots: int) -> None:
        self.free = slots
        self.users = 0
        self.lot: trio.lowlevel.ParkingLot | None = None


class _Slot:
    """The context manager of :meth:`PerClientLimiter.slot` (a class, not a generator:
    it runs on every login).

    A free slot is taken without yielding to the scheduler (a ``trio.Semaphore`` would,
    a round trip per login); a busy client's attempts wait in order, and a released
    slot goes straight to the first of them, as a semaphore's would.
    """

    __slots__ = ("_client", "_key", "_limiter")

    def __init__(self, limiter: PerClientLimiter, key: str) -> None:
        self._limiter = limiter
        self._key = key

    async def __aenter__(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        slots = self._limiter._slots
        client = slots.get(self._key)
        if client is None:
            client = slots[self._key] = _Client(self._limiter.per_client)
        client.users += 1
        self._client = client
        if client.free > 0:
            client.free -= 1
            return
        if client.lot is None:
            client.lot = trio.lowlevel.ParkingLot()
        try:
            await client.lot.park()  # woken by a release, which hands over its slot
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        client = self._client
        if client.lot:
            client.lot.unpark()  # the slot passes to the first waiter
        else:
            client.free += 1
        self._leave()

    def _leave(self) -> None:
        client = self._client
        client.users -= 1
        if client.users == 0:
            del self._limiter._slots[self._key]
