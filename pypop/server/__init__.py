"""The Trio server: listeners, limits, sessions, graceful shutdown.

- :mod:`pypop.server.core`: :class:`Server` and :func:`serve`.
- :mod:`pypop.server.listeners`: listening sockets, streams, the :class:`Peer`.
- :mod:`pypop.server.limits`: connection limits per server and per client.
- :mod:`pypop.server.session`: one connection, the protocol engine driven over a stream.
"""

from pypop.server.core import Server, make_ssl_context, serve

__all__ = ["Server", "make_ssl_context", "serve"]
