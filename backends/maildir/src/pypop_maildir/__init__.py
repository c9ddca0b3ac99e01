"""pypop3-maildir: serve existing Maildir folders over POP3 with pypop.

Registered in the ``pypop.backends`` entry-point group as ``maildir``; the server
calls :func:`create` with the ``[backend]`` options. See README.md for the options
and the documented behaviour (folder mapping, order, UIDLs, sizes, locks, UPDATE).
"""

from __future__ import annotations

from collections.abc import Mapping

from pypop.backend_kit import OptionError

from pypop_maildir._backend import BLOCK_SIZE, MaildirBackend, MaildirMailbox
from pypop_maildir._config import MaildirConfig

__all__ = [
    "BLOCK_SIZE",
    "MaildirBackend",
    "MaildirConfig",
    "MaildirMailbox",
    "OptionError",
    "create",
]


def create(options: Mapping[str, object]) -> MaildirBackend:
    """The entry point (``pypop.backend.BackendFactory``).

    Raises :class:`~pypop.backend_kit.OptionError` (a ``ValueError``) with a readable
    message if an option is missing or invalid, so the server stops at start-up.
    """
    return MaildirBackend.from_options(options)
