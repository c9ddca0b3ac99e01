"""Schema creation and versions, options, and the ``sql`` credential store."""

from __future__ import annotations

import poplib
import sqlite3
from pathlib import Path

import pytest
from pypop.auth import schemes
from pypop.backend_kit import OptionError
from pypop.registry import PluginLoadError, create_backend, create_credential_store

from pypop_sql import SCHEMA_VERSION, SchemaError, SqlCredentialStore, create
from tests.helpers import PASSWORD, open_engine, pypop, start_serve


def _sql(url: str, statement: str, params: tuple[object, ...] = ()) -> None:
    with open_engine(url) as e:
        if e.kind == "sqlite":
            conn = sqlite3.connect(e.config.path)
            conn.execute(statement, params)
            conn.commit()
            conn.close()
        else:
            import psycopg

            with psycopg.connect(url, autocommit=True) as pg:
                pg.execute(statement.replace("?", "%s"), params)


def test_schema_created_once_with_its_version(db_url: str) -> None:
    for _ in range(2):  # the second start finds it current
        with open_engine(db_url):
            pass
    _sql(db_url, "INSERT INTO users (name, password) VALUES (?, ?)", ("x", "{PLAIN}y"))
    with open_engine(db_url) as e:
        assert e.password("x") == ("{PLAIN}y", True)


def test_newer_schema_stops_the_server_with_a_clear_message(db_url: str, tmp_path: Path) -> None:
    with open_engine(db_url):
        pass
    _sql(db_url, "UPDATE pypop_meta SET value = ? WHERE key = 'schema_version'", ("99",))
    with pytest.raises(SchemaError, match=f"version 99, newer than .* \\({SCHEMA_VERSION}\\)"):
        create({"url": db_url})
    with pytest.raises(PluginLoadError, match="upgrade pypop3-sql"):
        create_backend("sql", {"url": db_url})
    conf = tmp_path / "p.toml"
    conf.write_text(
        f'[server]\nlisten = ["127.0.0.1:0"]\n[auth]\npasswd_file = "{conf}"\n'
        f'[backend]\nname = "sql"\nurl = "{db_url}"\n'
    )
    r = pypop("serve", "-c", str(conf))
    assert r.returncode == 2
    assert b"newer than this pypop-sql" in r.stderr
    assert b"Traceback" not in r.stderr


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "other.db")
    conn.execute("CREATE TABLE invoices (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaError, match="not a pypop-sql database"):
        create({"url": f"sqlite://{tmp_path / 'other.db'}"})


def test_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="'url' is required"):
        create({})
    with pytest.raises(OptionError, match="must start with sqlite: or postgresql://"):
        create({"url": "mysql://x/y"})
    with pytest.raises(OptionError, match="does not exist"):
        create({"url": "sqlite:///nonexistent/dir/mail.db"})
    with pytest.raises(OptionError, match="did you mean 'pool_size'"):
        create({"url": f"sqlite://{tmp_path / 'm.db'}", "pool_sise": "3"})
    with pytest.raises(OptionError, match="'autocreate' must be one of"):
        create({"url": f"sqlite://{tmp_path / 'm.db'}", "autocreate": "maybe"})


def test_postgresql_down_at_start_is_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "p.toml"
    conf.write_text(
        f'[server]\nlisten = ["127.0.0.1:0"]\n[auth]\npasswd_file = "{conf}"\n'
        '[backend]\nname = "sql"\nurl = "postgresql://pypop@127.0.0.1:1/none"\n'
    )
    r = pypop("serve", "-c", str(conf))
    assert r.returncode == 1
    assert r.stderr.decode().startswith("pypop: cannot start: postgresql: cannot connect")
    assert b"Traceback" not in r.stderr


HASHED = {
    "plain": "{PLAIN}" + PASSWORD,
    "sha512": schemes.hash_password("SHA512-CRYPT", PASSWORD),
    "bcrypt": schemes.hash_password("BLF-CRYPT", PASSWORD),
    "ssha512": schemes.hash_password("SSHA512", PASSWORD),
    "bare": schemes.hash_password("SHA512-CRYPT", PASSWORD).removeprefix("{SHA512-CRYPT}"),
}


async def test_credential_store_schemes_disabled_and_unknown(db_url: str) -> None:
    for user, stored in HASHED.items():
        _sql(db_url, "INSERT INTO users (name, password) VALUES (?, ?)", (user, stored))
    _sql(db_url, "INSERT INTO users (name, password, enabled) VALUES (?, ?, ?)",
         ("off", "{PLAIN}" + PASSWORD, False))  # fmt: skip
    _sql(db_url, "INSERT INTO users (name, password) VALUES (?, ?)", ("broken", "{NOPE}x"))
    store = create_credential_store("sql", {"url": db_url})
    assert isinstance(store, SqlCredentialStore)
    try:
        for user in HASHED:
            assert await store.verify_password(user, PASSWORD), user
            assert not await store.verify_password(user, PASSWORD + "x"), user
        for user in ("off", "broken", "ghost"):
            assert not await store.verify_password(user, PASSWORD)
            assert await store.lookup(user) is None
        cred = await store.lookup("plain")
        assert cred is not None
        assert cred.plaintext() == PASSWORD
        # Unknown users are checked against a dummy of a heavy scheme in the table.
        assert store._dummy.heavy
        assert store._dummy.scheme in ("SHA512-CRYPT", "BLF-CRYPT")
    finally:
        await store.aclose()


async def test_failed_dummy_refresh_is_retried_at_the_next_login(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unknown users are verified against a dummy as heavy as the table's hashes. If
    the first sample of the table failed (a database hiccup), the store kept its
    start-up dummy (PLAIN: no cost) for DUMMY_REFRESH seconds: for five minutes an
    unknown name was answered at once and a known one after a SHA512-CRYPT, so user
    names could be told apart by timing. The next login must sample again."""
    from pypop.errors import TemporaryFailure

    for user in ("u1", "u2", "u3"):
        stored = schemes.hash_password("SHA512-CRYPT", PASSWORD)
        _sql(db_url, "INSERT INTO users (name, password) VALUES (?, ?)", (user, stored))
    store = create_credential_store("sql", {"url": db_url})
    assert isinstance(store, SqlCredentialStore)
    real = store.engine.sample_passwords

    def down(limit: int) -> list[str]:
        raise TemporaryFailure("postgresql: cannot read users: OperationalError: gone")

    try:
        monkeypatch.setattr(store.engine, "sample_passwords", down)
        with pytest.raises(TemporaryFailure):
            await store.verify_password("ghost", PASSWORD)
        monkeypatch.setattr(store.engine, "sample_passwords", real)
        assert not await store.verify_password("ghost", PASSWORD)
        assert store._dummy.scheme == "SHA512-CRYPT"
        assert await store.verify_password("u1", PASSWORD)
    finally:
        await store.aclose()


def test_credential_store_options() -> None:
    with pytest.raises(PluginLoadError, match="unknown scheme"):
        create_credential_store("sql", {"url": "sqlite:///tmp/x.db", "default_scheme": "ROT13"})
    with pytest.raises(PluginLoadError, match="unknown option 'autocreate'"):
        create_credential_store("sql", {"url": "sqlite:///tmp/x.db", "autocreate": "yes"})


def test_one_database_holds_the_site(db_url: str, tmp_path: Path) -> None:
    """Credentials and mail in one database: pypop serve with [credentials] sql."""
    with open_engine(db_url) as e:
        e.deliver("alice", b"Subject: hi\r\n\r\nsite\r\n", None, None)
    _sql(db_url, "INSERT INTO users (name, password) VALUES (?, ?)", ("alice", HASHED["sha512"]))
    server = start_serve(tmp_path, db_url, "site", credentials="sql")
    try:
        pop = server.login("alice")
        assert pop.retr(1)[1] == [b"Subject: hi", b"", b"site"]
        pop.quit()
        with pytest.raises(poplib.error_proto) as info:
            server.login("bob")  # in the passwd list of other tests, not in this table
        assert info.value.args[0] == b"-ERR [AUTH] Authentication failed"
    finally:
        server.stop()
    assert "Traceback" not in server.tail()


async def test_backend_deliver_rejects_bad_uids(tmp_path: Path) -> None:
    backend = create({"url": f"sqlite://{tmp_path / 'm.db'}"})
    try:
        with pytest.raises(ValueError, match="invalid UIDL"):
            await backend.deliver("a", b"x", uid="has space")
        assert await backend.deliver("a", b"x", uid="u1") == "u1"
        from pypop.errors import DuplicateUid

        with pytest.raises(DuplicateUid):
            await backend.deliver("a", b"y", uid="u1")
    finally:
        await backend.aclose()


@pytest.mark.parametrize(("given", "expected"), [({}, 256 * 1024 * 1024), ({"mmap_size": "0"}, 0)])
def test_sqlite_reads_through_mmap(tmp_path: Path, given: dict[str, str], expected: int) -> None:
    """Every SQLite connection gets the mmap_size option (PRAGMA mmap_size)."""
    from pypop_sql._config import parse_options
    from pypop_sql._engine import SqliteEngine, make_engine

    eng = make_engine(parse_options({"url": f"sqlite://{tmp_path / 'm.db'}", **given}))
    assert isinstance(eng, SqliteEngine)
    eng.start()
    try:
        (size,) = eng._conn().execute("PRAGMA mmap_size").fetchone()
        assert size == expected
    finally:
        eng.close()
    with pytest.raises(OptionError, match="mmap_size"):
        create({"url": f"sqlite://{tmp_path / 'm.db'}", "mmap_size": "-1"})
