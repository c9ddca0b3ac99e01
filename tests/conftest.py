"""Shared fixtures: a real pypop server on 127.0.0.1, port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from pypop import wire
from pypop.auth import CredentialStore, MemoryCredentialStore
from pypop.backend import Backend
from pypop.backends.memory import MemoryBackend, sample_message
from pypop.config import ServerConfig
from pypop.server import Server, serve

PASSWORDS = {"alice": "wonderland", "bob": "builder"}


def pytest_report_header() -> str:
    return f"pypop wire codec: {wire.IMPLEMENTATION}"


@pytest.fixture
def memory_backend() -> MemoryBackend:
    backend = MemoryBackend()
    for n in range(1, 4):
        backend.deliver("alice", sample_message("alice", n), uid=f"alice-{n}")
    backend.deliver("bob", sample_message("bob", 1), uid="bob-1")
    return backend


@pytest.fixture
def passwd_file(tmp_path: Path) -> Path:
    path = tmp_path / "passwd"
    path.write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in PASSWORDS.items()))
    return path


class ServerStarter:
    """``await start_server(**config_overrides)`` -> a running :class:`Server`."""

    def __init__(self, nursery: trio.Nursery, backend: Backend) -> None:
        self.nursery = nursery
        self.backend = backend
        self.servers: list[Server] = []

    async def __call__(
        self,
        *,
        backend: Backend | None = None,
        store: CredentialStore | None = None,
        **overrides: object,
    ) -> Server:
        cfg = ServerConfig(
            listen=[("127.0.0.1", 0)],
            auth_failure_delay=0.0,
            auth_penalty_max=0.0,
            shutdown_timeout=2.0,
        )
        for key, value in overrides.items():
            if not hasattr(cfg, key):
                raise AttributeError(key)
            setattr(cfg, key, value)
        if store is None and cfg.passwd_file is None:
            store = MemoryCredentialStore(PASSWORDS)
        the_backend = backend if backend is not None else self.backend
        server: Server = await self.nursery.start(
            lambda task_status: serve(
                cfg, backend=the_backend, store=store, task_status=task_status
            )
        )
        self.servers.append(server)
        return server


@pytest.fixture
async def start_server(
    nursery: trio.Nursery, memory_backend: MemoryBackend
) -> AsyncIterator[ServerStarter]:
    starter = ServerStarter(nursery, memory_backend)
    yield starter
    for server in starter.servers:
        server.shutdown()
