"""The POP3 client: :class:`Client` (blocking) and :class:`AsyncClient` (AnyIO: asyncio
or Trio), CFPOP-style actions returning :class:`Row` objects, POP URLs.

    from pypop.client import Client

    with Client("pops://alice@pop.example.org", password="...") as pop:
        for row in pop.get_header_only(max_rows=10):
            print(row.message_number, row.date, row.from_, row.subject)

Failures are the typed exceptions of :mod:`pypop.errors` (``AuthError``,
``InUseError``, ``TLSRequiredError``, ``ProtocolError``, ...).
"""

from pypop.client._async import AsyncClient
from pypop.client._core import Result, Target, is_loopback, make_ssl_context
from pypop.client._sync import Client
from pypop.client.attachments import safe_filename
from pypop.client.rows import Row, build_row
from pypop.client.url import PopURL, netrc_credentials, parse_url

__all__ = [
    "AsyncClient",
    "Client",
    "PopURL",
    "Result",
    "Row",
    "Target",
    "build_row",
    "is_loopback",
    "make_ssl_context",
    "netrc_credentials",
    "parse_url",
    "safe_filename",
]
