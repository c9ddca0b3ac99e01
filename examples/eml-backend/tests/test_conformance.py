"""The pypop conformance kit against the example backend."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from pypop_eml import create

from pypop.backend import Backend
from pypop.testing import BackendConformance

_names = itertools.count(1)


class EmlHarness:
    def __init__(self, root: Path) -> None:
        self.root = root

    def make_backend(self) -> Backend:
        return create({"root": str(self.root)})

    async def deliver(self, backend: Backend, user: str, message: bytes) -> None:
        folder = self.root / user
        folder.mkdir(exist_ok=True)
        (folder / f"{next(_names):08d}.eml").write_bytes(message)


class TestEmlBackend(BackendConformance):
    @pytest.fixture
    def harness(self, tmp_path: Path) -> EmlHarness:
        return EmlHarness(tmp_path)


def test_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown option 'rot' \(did you mean 'root'\?\)"):
        create({"root": str(tmp_path), "rot": "x"})
    assert create({"root": str(tmp_path), "io_threads": "2"}).threads.threads == 2
