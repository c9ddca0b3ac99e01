"""The PROXY protocol (v1 and v2) from trusted load balancers (``server.proxy_from``).

HAProxy (``send-proxy-v2``) and other TCP proxies send one header before the client's
first octet, naming the client. A connection from a network in ``server.proxy_from``
must start with one; a connection from anywhere else must not (a PROXY line from an
untrusted peer closes it: it is someone trying to choose the address we log and
limit). The header is parsed by the wire codec (``pypop.wire.parse_proxy_header``,
Rust with a pure-Python twin, fuzzed) and read with ``MSG_PEEK``, so not one octet
after it is taken from the session (a TLS ClientHello may follow at once).

Bounds: the header must arrive within :data:`HEADER_TIMEOUT` seconds and be at most
``PROXY_HEADER_MAX`` octets (1024: v1 is at most 107; v2 TLVs from HAProxy take a
few dozen). Only trusted peers get here at all.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import trio

from pypop.netaddr import in_networks
from pypop.wire import PROXY_HEADER_MAX, parse_proxy_header

__all__ = ["HEADER_TIMEOUT", "ProxyHeader", "ProxyHeaderError", "TrustedProxies", "read_header"]

HEADER_TIMEOUT: Final = 5.0
_POLL: Final = 0.01  # a header split over segments: peek again after this long

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyHeaderError(Exception):
    """The trusted peer sent no usable header; ``reason`` is for logs and metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the proxy said. ``host`` is None when the header carries no address (a
    health check: v2 LOCAL, v1 UNKNOWN); the connection's own address stands then."""

    version: int
    host: str | None
    port: int
    ssl: bool  # v2 SSL TLV: the client reached the proxy over TLS


class TrustedProxies:
    """The networks of ``server.proxy_from``."""

    def __init__(self, networks: Iterable[str]) -> None:
        nets: list[_Network] = []
        for text in networks:
            try:
                nets.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                raise ValueError(
                    f"server.proxy_from: {text!r} is not a network (192.0.2.10, 10.0.0.0/8, ::1)"
                ) from None
        self.networks: tuple[_Network, ...] = tuple(nets)

    def __bool__(self) -> bool:
        return bool(self.networks)

    @functools.lru_cache(maxsize=1024)  # noqa: B019 (one instance per server)
    def trusts(self, host: str) -> bool:
        return in_networks(host, self.networks)


def _address(raw: bytes) -> str | None:
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
    if len(raw) == 16:
        addr = ipaddress.IPv6Address(raw)
        return str(addr.ipv4_mapped) if addr.ipv4_mapped is not None else str(addr)
    return None


async def read_header(
    sock: socket.socket, *, within: float = HEADER_TIMEOUT, max_len: int = PROXY_HEADER_MAX
) -> ProxyHeader:
    """Read the header at the start of ``sock``'s stream, and exactly that, within
    ``within`` seconds."""
    with trio.move_on_after(within):
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(max_len, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise ProxyHeaderError("closed", f"connection failed: {exc.strerror}") from None
            if not data:
                raise ProxyHeaderError("closed", "closed before a PROXY header")
            try:
                parsed = parse_proxy_header(data, max_len)
            except ValueError as exc:
                raise ProxyHeaderError("bad-header", str(exc)) from None
            if parsed is None:
                # A valid beginning; the socket stays readable until we consume, so
                # wait a little instead of spinning.
                await trio.sleep(_POLL)
                continue
            length, version, local, source, sport, _dst, _dport, ssl = parsed
            taken = sock.recv(length)  # what was peeked: it is there
            if len(taken) != length:
                raise ProxyHeaderError("closed", "PROXY header cut short")
            host = None if local else _address(source)
            return ProxyHeader(version, host, sport if host else 0, ssl)
    raise ProxyHeaderError("timeout", f"no PROXY header within {within:g}s")
