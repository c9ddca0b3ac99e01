"""Options: checked at start-up, with messages that name the option."""

from __future__ import annotations

from pathlib import Path

import pytest
from pypop.backend_kit import LocalLocks, OptionError
from pypop.registry import PluginLoadError, create_backend

from pypop_imap import DEFAULT_UIDL_FORMAT, ImapBackend, ImapPassthroughBackend, UidlFormat, create


def test_defaults_and_entry_point() -> None:
    backend = create_backend("imap", {"host": "imap.example.org"})
    assert isinstance(backend, ImapPassthroughBackend)
    s = backend.settings
    assert (s.endpoint.port, s.endpoint.tls, s.mailbox, s.mark_seen) == (
        993,
        "implicit",
        "INBOX",
        False,
    )
    assert s.endpoint.timeout == 30.0
    assert isinstance(s.locks, LocalLocks)
    assert s.uidl.text == DEFAULT_UIDL_FORMAT
    assert create({"host": "h", "tls": "starttls"}).settings.endpoint.port == 143


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "option 'host' is required"),
        ({"host": "h", "tls": "ssl"}, "option 'tls' must be one of"),
        ({"host": "mail.example.org", "tls": "none"}, "only to a loopback address"),
        ({"host": "10.0.0.1", "tls": "none"}, "only to a loopback address"),
        ({"host": "h", "port": "99999"}, "option 'port' must be <= 65535"),
        ({"host": "h", "uidl_format": "%m"}, "header MD5"),
        ({"host": "h", "uidl_format": "%v"}, "needs %u or %g"),
        ({"host": "h", "uidl_format": "%q"}, "unknown variable %q"),
        ({"host": "h", "master_user": "admin"}, "go together"),
        ({"host": "h", "mailbox": "Eingänge"}, "non-empty ASCII name"),
        ({"host": "h", "timeuot": "5"}, "did you mean 'timeout'"),
        ({"host": "h", "ca_file": "/nonexistent/ca.pem"}, "option 'ca_file'"),
        ({"host": "h", "lock": "postgres"}, "option 'lock'"),
        ({"host": "h", "master_separator": "*"}, "needs 'master_user'"),
    ],
)
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(OptionError, match=message.replace("(", r"\(")):
        create(options)


def test_bad_options_stop_the_server_at_start_up() -> None:
    with pytest.raises(PluginLoadError, match=r"imap.*cannot start.*host"):
        create_backend("imap", {})


def test_loopback_may_go_without_tls() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.3.4.5"):
        assert create({"host": host, "tls": "none"}).settings.endpoint.ssl_context is None


def test_master_password_file(tmp_path: Path) -> None:
    path = tmp_path / "master"
    path.write_text("s3cret\n")
    path.chmod(0o640)
    backend = create({"host": "h", "master_user": "admin", "master_password_file": str(path)})
    assert type(backend) is ImapBackend
    assert backend.settings.master_password == "s3cret"
    path.chmod(0o644)
    with pytest.raises(OptionError, match="readable by everyone"):
        create({"host": "h", "master_user": "admin", "master_password_file": str(path)})
    path.write_text("")
    path.chmod(0o600)
    with pytest.raises(OptionError, match="on one line"):
        create({"host": "h", "master_user": "admin", "master_password_file": str(path)})


def test_lock_plugin_by_name_or_table() -> None:
    assert isinstance(create({"host": "h", "lock": "local"}).settings.locks, LocalLocks)
    assert isinstance(create({"host": "h", "lock": {"name": "local"}}).settings.locks, LocalLocks)
    with pytest.raises(OptionError, match="unknown option 'x'"):
        create({"host": "h", "lock": {"name": "local", "x": 1}})


@pytest.mark.parametrize(
    ("fmt", "uid", "validity", "guid", "expected"),
    [
        ("%08Xu%08Xv", 1, 0x6B0D5D33, "", "000000016b0d5d33"),
        ("%08Xu%08Xv", 0xABCDEF12, 1, "", "abcdef1200000001"),
        ("%u-%v", 7, 99, "", "7-99"),
        ("%{uid}.%{uidvalidity}", 7, 99, "", "7.99"),
        ("%Xu", 255, 1, "", "ff"),
        ("%g", 1, 1, "0a1b2c", "0a1b2c"),
        ("%Ug", 1, 1, "0a1b2c", "0A1B2C"),
        ("%4g", 1, 1, "0a1b2c", "0a1b"),
        ("x%%%u", 3, 1, "", "x%3"),
    ],
)
def test_uidl_formats(fmt: str, uid: int, validity: int, guid: str, expected: str) -> None:
    assert UidlFormat(fmt)(uid, validity, guid) == expected


def test_uidl_must_be_valid() -> None:
    with pytest.raises(ValueError, match="invalid UIDL"):
        UidlFormat("a b%u")(1, 1)
    assert UidlFormat("%g").needs_guid
