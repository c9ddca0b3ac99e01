"""Connection limits: how many sessions the server, and each client, may hold.

One object answers for the whole server. Clients are counted by
:attr:`pypop.server.listeners.Peer.key` (an IPv4 address, or an IPv6 /64), the same
unit as the authentication penalty, so a host cannot multiply its share by walking
through the addresses of its /64.
"""

from __future__ import annotations

from collections import Counter

from pypop.server.listeners import Peer

__all__ = ["ConnectionLimits"]


class ConnectionLimits:
    def __init__(self, max_connections: int, max_per_client: int) -> None:
        if max_connections < 1 or max_per_client < 1:
            raise ValueError("connection limits must be at least 1")
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.active = 0
        self._per_client: Counter[str] = Counter()

    def try_open(self, peer: Peer) -> bool:
        """Count a new connection of ``peer``; False (and nothing counted) if a limit
        is reached."""
        key = peer.key
        if self.active >= self.max_connections or self._per_client[key] >= self.max_per_client:
            return False
        self.active += 1
        self._per_client[key] += 1
        return True

    def close(self, peer: Peer) -> None:
        """The end of a connection that :meth:`try_open` counted."""
        key = peer.key
        self.active -= 1
        self._per_client[key] -= 1
        if self._per_client[key] <= 0:
            del self._per_client[key]

    def of(self, peer: Peer) -> int:
        """Connections ``peer``'s client key holds now."""
        return self._per_client.get(peer.key, 0)
