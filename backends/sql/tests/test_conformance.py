"""pypop.testing.BackendConformance on both engines."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from pypop.backend import Backend
from pypop.testing import BackendConformance

from pypop_sql import SqlBackend, create


class SqlHarness:
    def __init__(self, url: str) -> None:
        self.url = url
        self.backends: list[SqlBackend] = []

    def make_backend(self) -> Backend:
        backend = create({"url": self.url})
        self.backends.append(backend)
        return backend

    async def deliver(self, backend: Backend, user: str, message: bytes) -> None:
        assert isinstance(backend, SqlBackend)
        await backend.deliver(user, message)


class TestSqlConformance(BackendConformance):
    @pytest.fixture
    def harness(self, db_url: str) -> SqlHarness:
        # Sync: the kit's own autouse fixture reads it.
        return SqlHarness(db_url)

    @pytest.fixture(autouse=True)
    async def _close_backends(self, harness: SqlHarness) -> AsyncIterator[None]:
        yield
        for backend in harness.backends:
            await backend.aclose()
