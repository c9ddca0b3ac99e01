"""Client addresses as the server's policies see them.

One reading for every policy (penalties, ``allow_nets``, ``server.proxy_from``): an
IPv6 scope (``%eth0``) is dropped and an IPv4-mapped IPv6 address counts as the IPv4
address, so ``::ffff:192.0.2.1`` cannot slip past a rule written for ``192.0.2.1``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["IPAddress", "IPNetwork", "client_address", "in_networks"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(host: str) -> IPAddress | None:
    """``host`` as an address (scope dropped, IPv4-mapped unwrapped), or None."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def in_networks(host: str, networks: Iterable[IPNetwork]) -> bool:
    """True if ``host`` is an address inside one of ``networks`` (never for a name)."""
    addr = client_address(host)
    return addr is not None and any(addr in net for net in networks)
