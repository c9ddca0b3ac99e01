"""Options of the ``sql`` backend and credential store, checked once at start-up."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast

from pypop.backend_kit import Options

__all__ = ["Autocreate", "SqlConfig", "parse_options", "parse_url", "read_engine_options"]

Autocreate = Literal["yes", "no", "users"]
Engine = Literal["sqlite", "postgresql"]


@dataclass(frozen=True, slots=True)
class SqlConfig:
    engine: Engine
    url: str
    """The option as given (PostgreSQL: the libpq URI or conninfo string)."""
    path: str = ""
    """SQLite: the database file (absolute)."""
    autocreate: Autocreate = "yes"
    io_threads: int = 16
    io_timeout: float = 30.0
    pool_size: int = 64
    pool_timeout: float = 5.0
    connect_timeout: float = 5.0
    synchronous: Literal["full", "normal"] = "full"
    busy_timeout: float = 5.0
    mmap_size: int = 256 * 1024 * 1024
    """SQLite: bytes of the database read through mmap (0: through read(2))."""
    batch_scheduling: bool = True
    """Worker threads run SCHED_BATCH (pypop.backend_kit.IOThreads' default; the
    PostgreSQL reader threads too)."""
    expire_days: int | None = None
    """RFC 2449 EXPIRE enforced at UPDATE (``Options.expire_days``); None: never."""
    snapshot_cache: int = 100_000
    """Messages, over all mailboxes, whose login snapshot is kept for reuse (0: none)."""


def parse_url(opts: Options, url: str) -> tuple[Engine, str]:
    """(engine, SQLite path or PostgreSQL conninfo) from the ``url`` option.

    ``sqlite:///var/lib/pypop/mail.db`` is the absolute path /var/lib/pypop/mail.db,
    ``sqlite:mail.db`` a path relative to the working directory at start-up.
    ``postgresql://`` and ``postgres://`` URIs go to libpq as they are (so every libpq
    parameter and environment variable works: ``?host=/run/postgresql``, PGPASSFILE).
    """
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql", url
    if url.startswith("sqlite:"):
        rest = url.removeprefix("sqlite:")
        if rest.startswith("//"):
            rest = rest[2:]
            if not rest.startswith("/"):
                raise opts.error(
                    f"option 'url': {url!r} names a host; use sqlite:///absolute/path "
                    "or sqlite:relative/path"
                )
        if not rest or rest.endswith("/") or "?" in rest or "\0" in rest:
            raise opts.error(f"option 'url': {url!r} does not name a database file")
        return "sqlite", os.path.abspath(rest)
    raise opts.error(
        f"option 'url' must start with sqlite: or postgresql://, got {url.split(':', 1)[0]!r}"
    )


def parse_options(options: Mapping[str, object]) -> SqlConfig:
    """Validate the backend's options; :class:`OptionError` (a ``ValueError``) names the key."""
    opts = Options("sql", options)
    config = read_engine_options(opts)
    autocreate = opts.choice("autocreate", "yes", ("yes", "no", "users"))
    expire_days = opts.expire_days()
    snapshot_cache = opts.integer("snapshot_cache", 100_000, minimum=0)
    opts.finish()
    return dataclasses.replace(
        config,
        autocreate=cast(Autocreate, autocreate),
        expire_days=expire_days,
        snapshot_cache=snapshot_cache,
    )


def read_engine_options(opts: Options) -> SqlConfig:
    """The options every user of the database shares (backend and credential store);
    the caller asks for its own ones, then calls ``opts.finish()``."""
    url = opts.text("url", required=True) if opts.has("url") else None
    if url is None:
        raise opts.error(
            "option 'url' is required, e.g. url = \"sqlite:///var/lib/pypop/mail.db\" "
            'or url = "postgresql://pypop@db.example.org/mail"'
        )
    engine, target = parse_url(opts, url)
    config = SqlConfig(
        engine=engine,
        url=target if engine == "postgresql" else url,
        path=target if engine == "sqlite" else "",
        io_threads=opts.integer("io_threads", 16, minimum=1, maximum=1024),
        io_timeout=opts.number("io_timeout", 30.0, minimum=0.1),
        pool_size=opts.integer("pool_size", 64, minimum=2, maximum=100_000),
        pool_timeout=opts.number("pool_timeout", 5.0, minimum=0.1),
        connect_timeout=opts.number("connect_timeout", 5.0, minimum=1),
        synchronous=cast(
            Literal["full", "normal"], opts.choice("synchronous", "full", ("full", "normal"))
        ),
        busy_timeout=opts.number("busy_timeout", 5.0, minimum=0),
        mmap_size=opts.integer("mmap_size", 256 * 1024 * 1024, minimum=0, maximum=1 << 40),
        batch_scheduling=opts.flag("batch_scheduling", True),
    )
    if engine == "sqlite":
        folder = os.path.dirname(config.path)
        if not os.path.isdir(folder):
            raise opts.error(f"option 'url': folder {folder!r} of the database does not exist")
    return config
