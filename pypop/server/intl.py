"""RFC 6856: whether a message may go to a client that never sent UTF8.

A message whose header holds an octet above 0x7F (UTF-8 header fields, RFC 6532, or
raw 8-bit junk) is refused to such a client with ``-ERR [UTF8]`` unless the
operator chose to send it as stored (``policy.utf8_headers = "send"``). Why refuse
rather than downgrade (RFC 6857): a downgraded message has another size, and LIST
and STAT announce sizes at login, before anything is read; matching them would mean
reading and rewriting the header of every message at every login of every legacy
client, for the rare 8-bit message, and the downgrade still loses what ASCII cannot
carry (non-ASCII local parts). Refusing keeps sizes exact, costs nothing for ASCII
mail, and leaves the message intact on the server for a UTF8 client; the legacy
client can still DELE it.

The check looks at the header only: up to and including the first empty line, by
the same line rules as the wire (:class:`pypop.wire.DotStuffer` with ``top_lines=0``
finds it, so LF, CRLF and bare CR line ends all count as on the wire). A header
longer than :data:`HEADER_SCAN_LIMIT` is judged by its first part (MTAs cut headers
far shorter: Postfix at 100 KiB). The session puts this check in front of both ways
a message leaves, the backend's stream and its wire cache (:class:`WireCache`),
so no fast path can skip it.
"""

from __future__ import annotations

# The check of a message already in wire form is the codec's (one call, reading the
# header only); HeaderCheck below is its streaming form for stored blocks.
from pypop.wire import HEADER_SCAN_LIMIT, DotStuffer, wire_header_is_ascii

__all__ = ["HEADER_SCAN_LIMIT", "HeaderCheck", "wire_header_is_ascii"]


class HeaderCheck:
    """Feed stored blocks in order until :attr:`decided`; then :attr:`ascii` says."""

    __slots__ = ("_scan", "_seen", "ascii", "decided")

    def __init__(self) -> None:
        self._scan = DotStuffer(0)
        self._seen = 0
        self.ascii = True
        self.decided = False

    def feed(self, block: bytes) -> None:
        if self.decided:
            return
        if not self._scan.feed(block).isascii():
            self.ascii = False
            self.decided = True
            return
        self._seen += len(block)
        if self._scan.done or self._seen >= HEADER_SCAN_LIMIT:
            self.decided = True

    def finish(self) -> None:
        """The message ended (it may have no empty line: all header)."""
        if not self.decided:
            self.ascii = self._scan.finish().isascii()
            self.decided = True
