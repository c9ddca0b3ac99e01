"""Fixtures: a real Dovecot IMAP server (one per test session, plus fresh ones for the
fault tests), trustme certificates, users made per test."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from pypop_imap import ImapBackend, create
from tests.dovecot import Dovecot, dovecot_available

MASTER = ("admin", "master-secret")


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def certs(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("certs")
    os.chmod(d, 0o755)  # noqa: S103 - Dovecot reads the files as root, then drops
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    paths = {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    with paths["cert"].open("wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    return paths


def _need_dovecot() -> None:
    why = dovecot_available()
    if why is None:
        return
    if os.environ.get("PYPOP_REQUIRE_DOVECOT"):
        pytest.fail(f"PYPOP_REQUIRE_DOVECOT is set but {why}")
    pytest.skip(why)


DovecotFactory = Callable[..., Dovecot]


@pytest.fixture(scope="session")
def _dovecots() -> Iterator[list[Dovecot]]:
    started: list[Dovecot] = []
    yield started
    for d in started:
        d.stop()
        shutil.rmtree(d.dir, ignore_errors=True)


def _workdir() -> Path:
    # Not under pytest's tmp_path: that is mode 0700, and Dovecot's unprivileged
    # processes must reach their files.
    d = Path(tempfile.mkdtemp(prefix="pypop-imap-dovecot-"))
    os.chmod(d, 0o755)  # noqa: S103
    return d


@pytest.fixture
def make_dovecot(
    _dovecots: list[Dovecot], certs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DovecotFactory]:
    """A fresh Dovecot for this test (stopped after it)."""
    mine: list[Dovecot] = []

    def make(**kwargs: object) -> Dovecot:
        _need_dovecot()
        kwargs.setdefault("masters", dict([MASTER]))
        d = Dovecot(_workdir(), cert=(certs["cert"], certs["key"]), **kwargs)  # type: ignore[arg-type]
        mine.append(d)
        d.start()
        return d

    yield make
    for d in mine:
        d.stop()
        shutil.rmtree(d.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecot(
    _dovecots: list[Dovecot], certs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Dovecot:
    """The Dovecot most tests share (each test makes its own users)."""
    _need_dovecot()
    d = Dovecot(
        _workdir(), users=pool_users(), masters=dict([MASTER]), cert=(certs["cert"], certs["key"])
    )
    _dovecots.append(d)
    d.start()
    return d


_names = itertools.count(1)
POOL = 600  # users made in advance: Dovecot may not notice a passwd-file changed in the same second


def pool_users() -> dict[str, str]:
    return {f"user{n}": f"pw-{n} with spaces" for n in range(1, POOL + 1)}


@pytest.fixture
def new_user(dovecot: Dovecot) -> Callable[[], tuple[str, str]]:
    """A user of the shared Dovecot that no other test touches: (name, password)."""

    def make() -> tuple[str, str]:
        user = f"user{next(_names)}"
        return user, dovecot.users[user]

    return make


def backend_options(d: Dovecot, certs: dict[str, Path], **overrides: object) -> dict[str, object]:
    options: dict[str, object] = {
        "host": "127.0.0.1",
        "port": d.imaps_port,
        "tls": "implicit",
        "ca_file": str(certs["ca"]),
        "timeout": 10,
    }
    tls = overrides.get("tls")
    if tls in ("starttls", "none"):
        options["port"] = d.imap_port
    options.update(overrides)
    return options


BackendMaker = Callable[..., ImapBackend]


@pytest.fixture
def make_backend(dovecot: Dovecot, certs: dict[str, Path], tmp_path: Path) -> BackendMaker:
    """``make_backend(**options)``: an imap backend in front of the shared Dovecot;
    ``master=True`` adds the master user (a password file in tmp_path)."""

    def make(
        *, target: Dovecot | None = None, master: bool = False, **overrides: object
    ) -> ImapBackend:
        d = target or dovecot
        if master:
            path = tmp_path / "master-password"
            path.write_text(MASTER[1] + "\n")
            path.chmod(0o600)
            overrides.setdefault("master_user", MASTER[0])
            overrides.setdefault("master_password_file", str(path))
        return create(backend_options(d, certs, **overrides))

    return make
