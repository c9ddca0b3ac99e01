"""Fixtures: an SQLite database in a temporary directory, and a real PostgreSQL.

One PostgreSQL server per test session (initdb + pg_ctl in a temporary directory,
on a free port); each test that wants one gets a fresh database in it. Without the
PostgreSQL binaries the PostgreSQL tests are skipped with the reason, except in CI
(``CI`` set), where that is a failure: scripts/test installs them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pypop_sql.testing import PgServer, pg_unavailable_reason

ENGINES = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    reason = pg_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {reason}")
        pytest.skip(reason)
    with PgServer() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    return pg_server.create_database()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path / 'mail.db'}"


@pytest.fixture(params=ENGINES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'mail.db'}"
    server: PgServer = request.getfixturevalue("pg_server")
    return server.create_database()
