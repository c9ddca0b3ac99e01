"""pypop-sql: POP3 maildrops in SQLite (embedded) or PostgreSQL (shared by many hosts).

Registered as ``sql`` in ``pypop.backends`` (:func:`create`) and in
``pypop.credentials`` (:func:`create_credentials`). README.md describes the options,
the schema, the locks and the operations.
"""

from __future__ import annotations

from collections.abc import Mapping

from pypop_sql._backend import SqlBackend, SqlMailbox
from pypop_sql._config import SqlConfig, parse_options
from pypop_sql._credentials import SqlCredentialStore, create_credentials
from pypop_sql._engine import CHUNK_SIZE, Engine, SchemaError, make_engine
from pypop_sql._schema import SCHEMA_VERSION

__all__ = [
    "CHUNK_SIZE",
    "SCHEMA_VERSION",
    "Engine",
    "SchemaError",
    "SqlBackend",
    "SqlConfig",
    "SqlCredentialStore",
    "SqlMailbox",
    "create",
    "create_credentials",
    "make_engine",
    "parse_options",
]


def create(options: Mapping[str, object]) -> SqlBackend:
    """The entry point (``pypop.backend.BackendFactory``).

    Raises an :class:`~pypop.backend_kit.OptionError` or :class:`SchemaError` (both
    ``ValueError``) for bad options or a database newer than this code, and
    :class:`~pypop.errors.TemporaryFailure` if the database cannot be reached.
    """
    return SqlBackend.from_options(options)
