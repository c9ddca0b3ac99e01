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

__all__ = ["GROUP", "BackendLoadError", "create_backend", "load_factory"]

GROUP = "pypop.backends"


class BackendLoadError(Exception):
    """The configured backend cannot be found, imported or created."""


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load_factory(name: str) -> BackendFactory:
    eps = _entry_points()
    ep = eps.get(name)
    if ep is None:
        installed = ", ".join(sorted(eps)) or "none"
        raise BackendLoadError(
            f"no pypop backend named {name!r} is installed (installed: {installed}); "
            f"try: pip install pypop-{name}"
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
