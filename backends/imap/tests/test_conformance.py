"""The public conformance kit (pypop.testing) against a real Dovecot IMAP server,
through the imap backend: passthrough (the kit's authenticating-backend tests too) and
master-user mode."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
from pypop.backend import Backend
from pypop.testing import BackendConformance
from pypop.wire import wire_size

from tests.conftest import BackendMaker
from tests.dovecot import Dovecot


class DovecotHarness:
    """Users of the shared Dovecot made for this test; mail saved with doveadm."""

    def __init__(
        self,
        dovecot: Dovecot,
        make_backend: BackendMaker,
        new_user: Callable[[], tuple[str, str]],
        **options: object,
    ) -> None:
        self.dovecot = dovecot
        self._make = make_backend
        self._options = options
        self.backends: list[Backend] = []
        made = [new_user() for _ in range(2)]
        self.users = tuple(u for u, _ in made)
        self._passwords = dict(made)

    def password(self, user: str) -> str:
        return self._passwords[user]

    def make_backend(self) -> Backend:
        backend = self._make(**self._options)
        self.backends.append(backend)
        return backend

    async def aclose(self) -> None:
        # Close pooled upstream connections (async autouse fixtures do not run under
        # pytest 9 with pytest-trio 0.8, so the tests that may fail call this).
        with trio.CancelScope(shield=True):  # pytest-trio cancels after a failure
            for backend in self.backends:
                await backend.aclose()

    async def deliver(self, backend: Backend, user: str, message: bytes) -> None:
        await trio.to_thread.run_sync(self.dovecot.deliver, user, message)


# Sizes come from RFC822.SIZE, Dovecot's count: a message without a final line end is
# not charged for the CRLF the server adds before the terminator. pypop's own rule
# counts it until the size-rule change (Dovecot's rule) is merged; then these pass,
# and strict xfail makes sure the marker goes.
_OLD_SIZE_RULE = wire_size(b"x") == 3
_dovecot_sizes = pytest.mark.xfail(
    _OLD_SIZE_RULE,
    reason="pypop's size rule still counts the CRLF added to a message without a final "
    "newline; RFC822.SIZE (Dovecot's rule) does not",
    strict=True,
)


class ImapConformance(BackendConformance):
    @_dovecot_sizes
    async def test_sizes_match_streamed_octets(self, harness: DovecotHarness) -> None:  # type: ignore[override]
        try:
            await super().test_sizes_match_streamed_octets(harness)
        finally:  # the kit leaves the backend open when it fails half-way
            await harness.aclose()

    @_dovecot_sizes
    async def test_retr_delivers_listed_size_and_exact_bytes(self, harness: DovecotHarness) -> None:  # type: ignore[override]
        try:
            await super().test_retr_delivers_listed_size_and_exact_bytes(harness)
        finally:
            await harness.aclose()


class TestPassthrough(ImapConformance):
    @pytest.fixture
    def harness(
        self, dovecot: Dovecot, make_backend: BackendMaker, new_user: Callable[[], tuple[str, str]]
    ) -> DovecotHarness:
        return DovecotHarness(dovecot, make_backend, new_user)


class TestPassthroughStartTLS(ImapConformance):
    @pytest.fixture
    def harness(
        self, dovecot: Dovecot, make_backend: BackendMaker, new_user: Callable[[], tuple[str, str]]
    ) -> DovecotHarness:
        return DovecotHarness(dovecot, make_backend, new_user, tls="starttls", reuse_idle=0)


class TestMasterUser(ImapConformance):
    @pytest.fixture
    def harness(
        self, dovecot: Dovecot, make_backend: BackendMaker, new_user: Callable[[], tuple[str, str]]
    ) -> DovecotHarness:
        return DovecotHarness(dovecot, make_backend, new_user, master=True)


class TestMasterUserSeparator(ImapConformance):
    @pytest.fixture
    def harness(
        self, dovecot: Dovecot, make_backend: BackendMaker, new_user: Callable[[], tuple[str, str]]
    ) -> DovecotHarness:
        return DovecotHarness(
            dovecot, make_backend, new_user, master=True, master_separator="*", tls="none"
        )
