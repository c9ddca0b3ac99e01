"""What ``pypop deliver`` and ``pypop import`` share: the backend from the config file
and flags (as ``pypop serve`` reads it), and sysexits codes for the MTA."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

from pypop.backend import Backend, Deliverer
from pypop.cli.serve import _key_value
from pypop.config import ServerConfig, load_config
from pypop.errors import DuplicateUid, NoSuchUser, PermanentFailure, TemporaryFailure
from pypop.registry import PluginLoadError, create_backend

__all__ = [
    "EX_CONFIG",
    "EX_DATAERR",
    "EX_NOINPUT",
    "EX_NOUSER",
    "EX_SOFTWARE",
    "EX_TEMPFAIL",
    "EX_UNAVAILABLE",
    "EX_USAGE",
    "add_backend_flags",
    "exit_status",
    "open_deliverer",
]

# sysexits.h: what an MTA (Postfix mailbox_command, an LDA) understands.
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78


def add_backend_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path, help="TOML config file: its [backend] is used")
    p.add_argument("--backend", help="backend name from the pypop.backends entry points")
    p.add_argument(
        "-o",
        "--backend-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend option (repeatable)",
    )


def backend_config(args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    """(backend name, options) from ``-c`` and the flags, as ``pypop serve`` takes them.

    A :class:`~pypop.config.ConfigError` (a ``ValueError``) names what is wrong."""
    cfg = load_config(args.config) if args.config else ServerConfig()
    name, options = cfg.backend, dict(cfg.backend_options)
    if args.backend and args.backend != name:
        name, options = args.backend, {}
    for item in args.backend_option:
        key, value = _key_value("--backend-option", item)
        options[key] = value
    return name, options


def open_deliverer(args: argparse.Namespace) -> tuple[Backend, Deliverer]:
    """The configured backend, which must take deliveries.

    Raises ``ValueError`` (config), :class:`~pypop.registry.PluginLoadError`,
    :class:`TemporaryFailure` (the store is down), or ``TypeError`` (no delivery)."""
    name, options = backend_config(args)
    backend = create_backend(name, options)
    # Deliverer is a Protocol: isinstance checks only that a "deliver" exists.
    if not isinstance(backend, Deliverer) or not inspect.iscoroutinefunction(backend.deliver):
        raise TypeError(f"the {name!r} backend does not take deliveries")
    return backend, backend


def exit_status(exc: BaseException) -> int:
    """The sysexits code for a failure: temporary ones make the MTA keep the mail."""
    if isinstance(exc, NoSuchUser):
        return EX_NOUSER
    if isinstance(exc, DuplicateUid):
        return EX_DATAERR
    if isinstance(exc, PermanentFailure):
        return EX_UNAVAILABLE
    if isinstance(exc, TemporaryFailure | OSError):
        return EX_TEMPFAIL
    if isinstance(exc, PluginLoadError | TypeError | ValueError):
        # Postfix defers on EX_CONFIG (4.3.5): a broken setup never bounces mail.
        return EX_CONFIG
    return EX_TEMPFAIL  # unknown: keep the mail, let the MTA retry
