"""Options are validated at start-up with clear messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from pypop_maildir import MaildirConfig, OptionError, create


def test_defaults(root: Path) -> None:
    backend = create({"root": str(root)})
    assert backend.config == MaildirConfig(root=str(root))


def test_values_are_parsed(root: Path) -> None:
    cfg = create(
        {
            "root": str(root),
            "template": "%d/%n/Maildir",
            "save_uidl": "yes",
            "lock": "fcntl",
            "lock_stale_timeout": 90,
            "flag_updates": False,
            "io_threads": 4,
        }
    ).config
    assert (cfg.template, cfg.save_uidl, cfg.lock, cfg.lock_stale_timeout) == (
        "%d/%n/Maildir", True, "fcntl", 90.0,
    )  # fmt: skip
    assert (cfg.flag_updates, cfg.io_threads) == (False, 4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "option 'root'"),
        ({"root": "/nonexistent/pypop"}, "is not a directory"),
        ({"template": "%x"}, "unknown variable '%x'"),
        ({"template": "/abs/%u"}, "relative"),
        ({"template": "shared"}, "must contain %u, %n or %d"),
        ({"template": "%d/../%n"}, "'..'"),
        ({"template": "%d//%n"}, "empty"),
        ({"lock": "flock"}, "option 'lock'"),
        ({"save_uidl": "maybe"}, "option 'save_uidl' must be a boolean"),
        ({"lock_stale_timeout": 0}, "option 'lock_stale_timeout' must be >= 1"),
        ({"io_threads": 2.5}, "option 'io_threads' must be an integer"),
        ({"colour": "blue"}, "unknown option 'colour'; known: "),
        ({"rooot": "x"}, "unknown option 'rooot' (did you mean 'root'?)"),
        ({"lock": "flock"}, "option 'lock' must be one of 'auto', 'dotlock', 'fcntl'"),
        ({"io_timeout": "nan"}, "must be a finite number"),
    ],
)
def test_errors(root: Path, options: dict[str, object], message: str) -> None:
    opts: dict[str, object] = {"root": str(root), **options}
    if not options:
        opts = {}
    with pytest.raises(OptionError) as info:
        create(opts)
    assert message in str(info.value)
    assert str(info.value).startswith("maildir backend: ")
    assert isinstance(info.value, ValueError)


def test_entry_point_is_registered() -> None:
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="pypop.backends") if e.name == "maildir"]
    assert ep.value == "pypop_maildir:create"
    assert ep.load() is create
