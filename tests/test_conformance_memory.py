"""The public conformance kit against the in-memory backend."""

from __future__ import annotations

import pytest

from pypop.backend import Backend
from pypop.backends.memory import MemoryBackend
from pypop.testing import BackendConformance


class MemoryHarness:
    def make_backend(self) -> Backend:
        return MemoryBackend()

    async def deliver(self, backend: Backend, user: str, message: bytes) -> None:
        assert isinstance(backend, MemoryBackend)
        backend.deliver(user, message)


class TestMemoryBackend(BackendConformance):
    @pytest.fixture
    def harness(self) -> MemoryHarness:
        return MemoryHarness()
