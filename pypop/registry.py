"""Plugins by name, from entry-point groups.

- ``pypop.backends``: message stores; the entry point names a
  :data:`pypop.backend.BackendFactory` (options -> Backend).
- ``pypop.credentials``: credential stores; the entry point names a
  :data:`pypop.auth.store.CredentialStoreFactory` (options -> CredentialStore).
- ``pypop.locks``: where a backend without a lock of its own keeps the RFC 1939
  maildrop lock; the entry point names a factory (options ->
  :class:`pypop.backend_kit.MaildropLocks`). ``local`` (this process) is built in.

Only the configured plugin is imported (keyring/fsspec style); first-party plugins
register exactly like third-party ones. A name that is not installed, a plugin that
fails to import, or options it refuses stop the server at start-up with a clear
message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points

from pypop.auth.store import CredentialStore
from pypop.backend import Backend
from pypop.backend_kit import MaildropLocks

__all__ = [
    "BACKENDS",
    "CREDENTIALS",
    "GROUP",
    "LOCKS",
    "BackendLoadError",
    "PluginLoadError",
    "create_backend",
    "create_credential_store",
    "create_locks",
    "load_factory",
]

BACKENDS = "pypop.backends"
CREDENTIALS = "pypop.credentials"
LOCKS = "pypop.locks"
GROUP = BACKENDS  # the historical name


class PluginLoadError(Exception):
    """The configured plugin cannot be found, imported or created."""


BackendLoadError = PluginLoadError

_KIND = {BACKENDS: "backend", CREDENTIALS: "credential store", LOCKS: "lock service"}


def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


FIRST_PARTY_DISTRIBUTIONS: Mapping[str, Mapping[str, str]] = {
    BACKENDS: {"imap": "pypop3-imap", "maildir": "pypop3-maildir", "sql": "pypop3-sql"},
    CREDENTIALS: {"sql": "pypop3-sql"},
}
"""The plugins this project publishes outside pypop3, and their distributions on PyPI.

The install hint names only these: a name built from user input (``pypop-<name>``)
would send users to whatever anyone registered under it.
"""


def _install_hint(name: str, group: str) -> str:
    kind = _KIND.get(group, "plugin")
    ours = FIRST_PARTY_DISTRIBUTIONS.get(group, {})
    dist = ours.get(name)
    if dist is not None:
        return f"the pypop project publishes it as {dist}: pip install {dist}"
    listed = ", ".join(f"{n} ({d})" for n, d in sorted(ours.items()))
    published = listed or f"no {kind} outside pypop3"
    return (
        f"no first-party {kind} has that name (the pypop project publishes {published}); "
        "install the distribution that provides it"
    )


def load_factory(name: str, group: str = BACKENDS) -> Callable[[Mapping[str, object]], object]:
    kind = _KIND.get(group, "plugin")
    eps = _entry_points(group)
    ep = eps.get(name)
    if ep is None:
        installed = ", ".join(sorted(eps)) or "none"
        raise PluginLoadError(
            f"no pypop {kind} named {name!r} is installed (installed: {installed}); "
            + _install_hint(name, group)
        )
    try:
        factory = ep.load()
    except Exception as exc:
        raise PluginLoadError(
            f"the pypop {kind} {name!r} ({ep.value}) failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(factory):
        raise PluginLoadError(f"the pypop {kind} {name!r} ({ep.value}) is not callable")
    return factory  # type: ignore[no-any-return]


def _create(name: str, options: Mapping[str, object], group: str) -> object:
    factory = load_factory(name, group)
    try:
        return factory(options)
    except (ValueError, TypeError, OSError) as exc:
        kind = _KIND.get(group, "plugin")
        raise PluginLoadError(f"the pypop {kind} {name!r} cannot start: {exc}") from exc


def create_backend(name: str, options: Mapping[str, object]) -> Backend:
    backend = _create(name, options, BACKENDS)
    if not isinstance(backend, Backend):
        raise PluginLoadError(f"the pypop backend {name!r} did not return a Backend")
    return backend


def create_credential_store(name: str, options: Mapping[str, object]) -> CredentialStore:
    store = _create(name, options, CREDENTIALS)
    if not isinstance(store, CredentialStore):
        raise PluginLoadError(
            f"the pypop credential store {name!r} did not return a CredentialStore"
        )
    return store


def create_locks(name: str, options: Mapping[str, object]) -> MaildropLocks:
    locks = _create(name, options, LOCKS)
    if not isinstance(locks, MaildropLocks):
        raise PluginLoadError(f"the pypop lock service {name!r} did not return MaildropLocks")
    return locks
