"""Connection limits: how many sessions the server, and each client, may hold.

One object answers for the whole server. Clients are counted by
:attr:`pypop.server.listeners.Peer.key` (an IPv4 address, or an IPv6 /64), the same
unit as the authentication penalty, so a host cannot multiply its share by walking
through the addresses of its /64.

:func:`ensure_open_files` checks, at start-up, that the process may open a
descriptor for every connection ``max_connections`` allows.
"""

from __future__ import annotations

import logging
import resource
from collections import Counter
from typing import Final

from pypop.server.listeners import Peer

__all__ = [
    "FDS_PER_CONNECTION",
    "RESERVED_FDS",
    "ConnectionLimits",
    "OpenFilesError",
    "ensure_open_files",
]

log = logging.getLogger("pypop.server")

FDS_PER_CONNECTION: Final = 5
"""Descriptors one session may hold: its socket and, with the Maildir backend, its lock
file, the ``cur/`` and ``new/`` it listed (held from its first read, so a folder
swapped in later is never read) and a message file."""
RESERVED_FDS: Final = 64
"""For the listeners, the passwd-file, logs and the event loop itself."""


class OpenFilesError(ValueError):
    """``max_connections`` cannot be served under the hard open-file limit."""


def ensure_open_files(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``FDS_PER_CONNECTION * max_connections +
    RESERVED_FDS``, as far as the hard limit allows; return the soft limit now.

    Raises :class:`OpenFilesError` (a ``ValueError``: a configuration error) if not
    even one descriptor per connection is possible: with fewer, new connections
    would wait unanswered in the listen queue (accept fails with EMFILE). Between one
    and ``FDS_PER_CONNECTION`` per connection the server starts, with a warning.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FDS_PER_CONNECTION * max_connections + RESERVED_FDS
    needed = max_connections + RESERVED_FDS
    unlimited = resource.RLIM_INFINITY
    if soft != unlimited and soft < wanted:
        new = wanted if hard == unlimited else min(hard, wanted)
        if new > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            except (OSError, ValueError) as exc:
                log.warning("cannot raise the open-file limit from %d to %d: %s", soft, new, exc)
            else:
                log.info("open-file limit raised from %d to %d", soft, new)
                soft = new
    if soft != unlimited and soft < needed:
        raise OpenFilesError(
            f"limits.max_connections = {max_connections} needs at least {needed} open "
            f"files (one per connection plus {RESERVED_FDS}), but the open-file limit is "
            f"{soft} (hard limit {'unlimited' if hard == unlimited else hard}): lower "
            f"limits.max_connections or raise the limit (ulimit -n, systemd LimitNOFILE=)"
        )
    if soft != unlimited and soft < wanted:
        log.warning(
            "the open-file limit (%d) leaves less than %d descriptors per connection at "
            "limits.max_connections = %d: under full load message files may fail to open",
            soft,
            FDS_PER_CONNECTION,
            max_connections,
        )
    return soft


class ConnectionLimits:
    def __init__(self, max_connections: int, max_per_client: int) -> None:
        if max_connections < 1 or max_per_client < 1:
            raise ValueError("connection limits must be at least 1")
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.active = 0
        self._per_client: Counter[str] = Counter()

    def admit(self, key: str) -> str | None:
        """Count a new connection of the client ``key`` (:attr:`Peer.key`); None, or
        the limit that refuses it (nothing counted then): ``max_connections`` or
        ``max_connections_per_ip``."""
        if self.active >= self.max_connections:
            return "max_connections"
        if self._per_client[key] >= self.max_per_client:
            return "max_connections_per_ip"
        self.active += 1
        self._per_client[key] += 1
        return None

    def release(self, key: str) -> None:
        """The end of a connection that :meth:`admit` counted."""
        self.active -= 1
        self._per_client[key] -= 1
        if self._per_client[key] <= 0:
            del self._per_client[key]

    def try_open(self, peer: Peer) -> bool:
        """Count a new connection of ``peer``; False (and nothing counted) if a limit
        is reached."""
        return self.admit(peer.key) is None

    def close(self, peer: Peer) -> None:
        """The end of a connection that :meth:`try_open` counted."""
        self.release(peer.key)

    def of(self, peer: Peer) -> int:
        """Connections ``peer``'s client key holds now."""
        return self.of_key(peer.key)

    def of_key(self, key: str) -> int:
        return self._per_client.get(key, 0)
