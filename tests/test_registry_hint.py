"""The install hint for a backend that is not installed names only distributions
this project publishes (``pypop3-*``), never a name built from the user's input."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from pypop import registry
from pypop.registry import (
    BACKENDS,
    CREDENTIALS,
    FIRST_PARTY_DISTRIBUTIONS,
    BackendLoadError,
    create_backend,
    create_credential_store,
)

OURS = "imap (pypop3-imap), maildir (pypop3-maildir), sql (pypop3-sql)"


def installed(group: str = BACKENDS) -> str:
    return ", ".join(sorted(ep.name for ep in entry_points(group=group)))


def test_the_table_is_the_published_names() -> None:
    assert {g: dict(t) for g, t in FIRST_PARTY_DISTRIBUTIONS.items()} == {
        BACKENDS: {"imap": "pypop3-imap", "maildir": "pypop3-maildir", "sql": "pypop3-sql"},
        CREDENTIALS: {"sql": "pypop3-sql"},
    }


@pytest.mark.parametrize("name", ["imap", "sql"])
def test_first_party_backend_not_installed(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Installed or not here (scripts/test installs pypop3-imap), it is hidden.
    real = registry._entry_points
    monkeypatch.setattr(
        registry, "_entry_points", lambda group: {k: v for k, v in real(group).items() if k != name}
    )
    others = ", ".join(n for n in installed().split(", ") if n != name)
    with pytest.raises(BackendLoadError) as info:
        create_backend(name, {})
    assert str(info.value) == (
        f"no pypop backend named {name!r} is installed (installed: {others}); "
        f"the pypop project publishes it as pypop3-{name}: pip install pypop3-{name}"
    )


@pytest.mark.parametrize("name", ["nosuch", "pop3", "Maildir", "maildir2", "../maildir"])
def test_other_names_get_no_distribution_to_install(name: str) -> None:
    with pytest.raises(BackendLoadError) as info:
        create_backend(name, {})
    assert str(info.value) == (
        f"no pypop backend named {name!r} is installed (installed: {installed()}); "
        f"no first-party backend has that name (the pypop project publishes {OURS}); "
        "install the distribution that provides it"
    )
    assert "pip install" not in str(info.value)


def test_credential_stores_get_no_distribution_to_install() -> None:
    with pytest.raises(BackendLoadError) as info:
        create_credential_store("ldap", {})
    assert str(info.value) == (
        f"no pypop credential store named 'ldap' is installed "
        f"(installed: {installed(CREDENTIALS)}); no first-party credential store has that "
        "name (the pypop project publishes sql (pypop3-sql)); "
        "install the distribution that provides it"
    )


def test_first_party_credential_store_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = registry._entry_points
    monkeypatch.setattr(
        registry,
        "_entry_points",
        lambda group: {k: v for k, v in real(group).items() if k != "sql"},
    )
    with pytest.raises(BackendLoadError) as info:
        create_credential_store("sql", {})
    assert str(info.value).endswith(
        "the pypop project publishes it as pypop3-sql: pip install pypop3-sql"
    )


# The CLI, with pypop3-sql hidden whether it is installed or not.
HIDE_SQL = """
import sys
import pypop.registry as registry
real = registry._entry_points
registry._entry_points = lambda group: {k: v for k, v in real(group).items() if k != "sql"}
from pypop.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_prints_the_hint_without_traceback() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            HIDE_SQL,
            "serve",
            "--backend",
            "sql",
            "--listen",
            "127.0.0.1:0",
            "--passwd-file",
            "/dev/null",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "the pypop project publishes it as pypop3-sql: pip install pypop3-sql" in result.stderr
    assert "Traceback" not in result.stderr
