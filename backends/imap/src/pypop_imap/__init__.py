"""pypop3-imap: POP3 in front of an existing IMAP server.

Registered in the entry-point group ``pypop.backends`` as ``imap``. See README.md for
the options and how the two login modes work.
"""

from __future__ import annotations

from collections.abc import Mapping

from pypop_imap._backend import ImapBackend, ImapMailbox, ImapPassthroughBackend
from pypop_imap._config import ImapSettings, parse_options
from pypop_imap._uidl import DEFAULT_UIDL_FORMAT, UidlFormat

__all__ = [
    "DEFAULT_UIDL_FORMAT",
    "ImapBackend",
    "ImapMailbox",
    "ImapPassthroughBackend",
    "ImapSettings",
    "UidlFormat",
    "create",
]


def create(options: Mapping[str, object]) -> ImapBackend:
    """The entry point: options -> backend. Without ``master_user`` the client's own
    credentials log in upstream (passthrough); with it, pypop checks the user and logs
    in upstream as the master."""
    settings = parse_options(options)
    if settings.master_user is None:
        return ImapPassthroughBackend(settings)
    return ImapBackend(settings)
