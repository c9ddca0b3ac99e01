"""The public conformance kit (pypop.testing) against a real Dovecot IMAP server,
through the imap backend: passthrough (the kit's authenticating-backend tests too) and
master-user mode."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
from pypop.backend import Backend
from pypop.testing import BackendConformance

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
        made = [new_user() for _ in range(2)]
        self.users = tuple(u for u, _ in made)
        self._passwords = dict(made)

    def password(self, user: str) -> str:
        return self._passwords[user]

    def make_backend(self) -> Backend:
        return self._make(**self._options)

    async def deliver(self, backend: Backend, user: str, message: bytes) -> None:
        await trio.to_thread.run_sync(self.dovecot.deliver, user, message)


class ImapConformance(BackendConformance):
    """Sizes are RFC822.SIZE (Dovecot's count): the kit's size rule is the same."""


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
