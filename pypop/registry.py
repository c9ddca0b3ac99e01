"""Backends by name, from the entry-point group ``pypop.backends``.

Only the configured backend is imported (keyring/fsspec style); first-party backends
register exactly like third-party ones. A name that is not installed, or a plugin that
fails to import, stops the server at start-up with a clear message.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import cast

from pypop.backend import Backend, BackendFactory

__all__ = ["GROUP", "BackendLoadError", "available", "create_backend", "load_factory"]

GROUP = "pypop.backends"


class BackendLoadError(Exception):
    """The configured backend cannot be found, imported or created."""


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def available() -> list[str]:
    """Names of the installed backends."""
    return sorted(_entry_points())


FIRST_PARTY_DISTRIBUTIONS: Mapping[str, str] = {
    "imap": "pypop3-imap",
    "maildir": "pypop3-maildir",
    "sql": "pypop3-sql",
}
"""The backends this project publishes, and their distributions on PyPI.

The install hint names only these: a name built from user input (``pypop-<name>``)
would send users to whatever anyone registered under it.
"""


def _install_hint(name: str) -> str:
    dist = FIRST_PARTY_DISTRIBUTIONS.get(name)
    if dist is not None:
        return f"the pypop project publishes it as {dist}: pip install {dist}"
    ours = ", ".join(f"{n} ({d})" for n, d in sorted(FIRST_PARTY_DISTRIBUTIONS.items()))
    return (
        f"no first-party backend has that name (the pypop project publishes {ours}); "
        "install the distribution that provides it"
    )


def load_factory(name: str) -> BackendFactory:
    eps = _entry_points()
    ep = eps.get(name)
    if ep is None:
        installed = ", ".join(sorted(eps)) or "none"
        raise BackendLoadError(
            f"no pypop backend named {name!r} is installed (installed: {installed}); "
            + _install_hint(name)
        )
    try:
        factory = ep.load()
    except Exception as exc:
        raise BackendLoadError(
            f"the pypop backend {name!r} ({ep.value}) failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(factory):
        raise BackendLoadError(f"the pypop backend {name!r} ({ep.value}) is not callable")
    return cast(BackendFactory, factory)


def create_backend(name: str, options: Mapping[str, object]) -> Backend:
    factory = load_factory(name)
    try:
        backend = factory(options)
    except (ValueError, TypeError, OSError) as exc:
        raise BackendLoadError(f"the pypop backend {name!r} rejected its options: {exc}") from exc
    if not isinstance(backend, Backend):
        raise BackendLoadError(f"the pypop backend {name!r} did not return a Backend")
    return backend
