"""Per-user policies from the passwd-file's extra fields (pypop.auth.userdb).

RFC 2449 §6.5 (LOGIN-DELAY) and §6.7 (EXPIRE): with per-user values the
AUTHORIZATION CAPA says ``LOGIN-DELAY n USER`` / ``EXPIRE n USER`` and the
TRANSACTION CAPA the user's own value; the delay is enforced with ``-ERR
[LOGIN-DELAY]``, the expiry at UPDATE. Also ``nologin`` with a reason, ``allow_nets``
and the maildrop location, for every way of logging in, and the backends'
``expire_days`` option.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from pathlib import Path

import pytest
import trio

from pypop.auth import PasswdFileStore
from pypop.auth.userdb import UserPolicy, allowed_from, parse_extra_fields
from pypop.backend import Account, Mailbox, MessageInfo
from pypop.backends.memory import MemoryBackend, create, sample_message
from pypop.config import ConfigError, ServerConfig
from pypop.errors import MailboxLocked
from pypop.server import Server
from tests.conftest import ServerStarter
from tests.test_server import port_of, talk
from tests.test_tls import Client

DAY = 86400.0

PASSWD = """\
alice:{PLAIN}wonderland
bob:{PLAIN}builder::::::login_delay=900 expire=30
carol:{PLAIN}carol-pw::::::expire=0
dave:{PLAIN}dave-pw::::::nologin reason=Mailbox moved to the new server, see https://example.org
erin:{PLAIN}erin-pw::::::nologin
frank:{PLAIN}frank-pw::::::allow_nets=192.0.2.0/24,2001:db8::/32
grace:{PLAIN}grace-pw::::::allow_nets=10.0.0.0/8,127.0.0.1
heidi:{PLAIN}heidi-pw:1000:1000::/home/heidi::userdb_mail=memory:shared
ivan:{PLAIN}ivan-pw::::::expire=NEVER
judy:{PLAIN}judy-pw::::::expire=30
"""


@pytest.fixture
def passwd(tmp_path: Path) -> Path:
    path = tmp_path / "passwd"
    path.write_text(PASSWD, encoding="utf-8")
    return path


@pytest.fixture
def backend() -> MemoryBackend:
    b = MemoryBackend()
    now = time.time()
    for user in ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "ivan", "judy"):
        b.deliver(user, sample_message(user, 1), uid=f"{user}-old", received=now - 40 * DAY)
        b.deliver(user, sample_message(user, 2), uid=f"{user}-new", received=now - 1 * DAY)
    b.deliver("shared", sample_message("shared", 1), uid="shared-1")
    return b


def login(user: str, password: str) -> bytes:
    return f"USER {user}\r\nPASS {password}\r\n".encode()


# ---- parsing -----------------------------------------------------------------------


def test_parse_extra_fields() -> None:
    assert parse_extra_fields("") == UserPolicy()
    p = parse_extra_fields("nologin reason=Gone  fishing,   back soon")
    assert p == UserPolicy(nologin=True, reason="Gone fishing, back soon")
    assert parse_extra_fields("nologin=n").nologin is False
    p = parse_extra_fields("allow_nets=127.0.0.0/8,::ffff:192.0.2.1,2001:db8::/32 quota=1G")
    assert p.allow_nets == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("192.0.2.1/32"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    p = parse_extra_fields("userdb_mail=maildir:~/Mail:LAYOUT=fs", home="/home/x")
    assert (p.mail, p.home) == ("maildir:~/Mail:LAYOUT=fs", "/home/x")
    assert parse_extra_fields("expire=NEVER").expire_capa == "NEVER"
    assert parse_extra_fields("expire=7 login_delay=60") == UserPolicy(login_delay=60, expire=7)
    for bad in ("expire=-1", "expire=soon", "login_delay=1e3", "allow_nets=300.1.1.1"):
        with pytest.raises(ValueError, match=r"^[a-z_]+ ") as info:
            parse_extra_fields(bad)
        assert bad.split("=")[1] not in str(info.value)  # never the value


def test_allowed_from() -> None:
    p = parse_extra_fields("allow_nets=192.0.2.0/24,2001:db8::/32")
    assert allowed_from(p, "192.0.2.9")
    assert allowed_from(p, "::ffff:192.0.2.9")  # IPv4-mapped counts as IPv4
    assert allowed_from(p, "2001:db8::1")
    assert not allowed_from(p, "127.0.0.1")
    assert not allowed_from(p, "not an address")
    assert allowed_from(UserPolicy(), "127.0.0.1")


async def test_store_reports_policies(passwd: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = PasswdFileStore(passwd)
    assert store.per_user_capabilities == frozenset({"EXPIRE", "LOGIN-DELAY"})
    bob = await store.user_policy("bob")
    assert bob == UserPolicy(login_delay=900, expire=30)
    assert await store.user_policy("alice") == UserPolicy()
    assert await store.user_policy("nobody") is None
    caplog.set_level(logging.WARNING)
    passwd.write_text("x:{PLAIN}y::::::expire=tomorrow\nok:{PLAIN}z\n")  # noqa: ASYNC240
    assert store.reload_if_changed()
    assert await store.user_policy("x") is None  # the malformed line is skipped
    assert "line 1: user 'x': expire must be" in caplog.text
    assert "tomorrow" not in caplog.text
    assert store.per_user_capabilities == frozenset()


# ---- RFC 2449 §6.5 and §6.7: CAPA before and after login --------------------------------


async def test_capa_user_values(
    start_server: ServerStarter, passwd: Path, backend: MemoryBackend
) -> None:
    server = await start_server(backend=backend, passwd_file=passwd)
    port = port_of(server)
    out = await talk(port, b"CAPA\r\n" + login("bob", "builder") + b"CAPA\r\nQUIT\r\n")
    before, after = out.split(b"+OK maildrop has")
    # AUTHORIZATION: the server's values, marked as varying per user
    assert b"\r\nEXPIRE NEVER USER\r\nLOGIN-DELAY 0 USER\r\n" in before
    # TRANSACTION: bob's own
    assert b"\r\nEXPIRE 30\r\nLOGIN-DELAY 900\r\n" in after
    assert b" USER\r\n" not in after.replace(b"UTF8 USER", b"")
    out = await talk(port, login("alice", "wonderland") + b"CAPA\r\nQUIT\r\n")
    # A user without values of her own: announced all the same, with the server's
    assert b"\r\nEXPIRE NEVER\r\nLOGIN-DELAY 0\r\n" in out
    out = await talk(port, login("carol", "carol-pw") + b"CAPA\r\nQUIT\r\n")
    assert b"\r\nEXPIRE 0\r\nLOGIN-DELAY 0\r\n" in out


async def test_login_delay_per_user(
    start_server: ServerStarter, passwd: Path, backend: MemoryBackend, autojump_clock: object
) -> None:
    server = await start_server(backend=backend, passwd_file=passwd, login_delay=60)
    port = port_of(server)
    c = await Client.connect(port)
    await c.line()
    capa = await c.multiline(b"CAPA\r\n")
    assert b"\r\nLOGIN-DELAY 60 USER\r\n" in capa
    await c.aclose()

    async def attempt(user: str, password: str) -> bytes:
        c = await Client.connect(port)
        await c.line()
        await c.cmd(f"USER {user}\r\n".encode())
        reply = await c.cmd(f"PASS {password}\r\n".encode())
        await c.cmd(b"QUIT\r\n")
        await c.aclose()
        return reply

    delayed = b"-ERR [LOGIN-DELAY] Minimum time between logins not reached\r\n"
    assert (await attempt("bob", "builder")).startswith(b"+OK maildrop")
    await trio.sleep(600)
    assert await attempt("bob", "builder") == delayed  # bob: 900 s
    await trio.sleep(301)
    assert (await attempt("bob", "builder")).startswith(b"+OK maildrop")
    assert (await attempt("alice", "wonderland")).startswith(b"+OK maildrop")
    await trio.sleep(61)  # alice: the server's 60 s
    assert (await attempt("alice", "wonderland")).startswith(b"+OK maildrop")
    assert await attempt("alice", "wonderland") == delayed


# ---- EXPIRE enforced ----------------------------------------------------------------


async def test_expire_per_user_at_update(
    start_server: ServerStarter,
    passwd: Path,
    backend: MemoryBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "pypop.expire")
    server = await start_server(backend=backend, passwd_file=passwd)
    port = port_of(server)
    # A session that does not QUIT removes nothing (mail goes only at UPDATE).
    await talk(port, login("judy", "judy-pw") + b"UIDL\r\n", until_close=False)
    assert [m.uid for m in (await _peek(backend, "judy"))] == ["judy-old", "judy-new"]
    # judy: EXPIRE 30, the 40-day-old message goes at QUIT; nothing was marked.
    out = await talk(port, login("judy", "judy-pw") + b"QUIT\r\n")
    assert out.endswith(b"+OK Logging out\r\n")
    assert [m.uid for m in (await _peek(backend, "judy"))] == ["judy-new"]
    assert "expire: user=<judy> removed=1 days=30" in caplog.text
    # carol: EXPIRE 0, what was retrieved goes at QUIT (TOP is not a retrieval).
    await talk(port, login("carol", "carol-pw") + b"RETR 2\r\nTOP 1 0\r\nQUIT\r\n")
    assert [m.uid for m in (await _peek(backend, "carol"))] == ["carol-old"]
    # alice and ivan (NEVER): nothing expires.
    for user, pw in (("alice", "wonderland"), ("ivan", "ivan-pw")):
        await talk(port, login(user, pw) + b"RETR 1\r\nQUIT\r\n")
        assert len(await _peek(backend, user)) == 2


async def test_backend_expire_days_option(
    start_server: ServerStarter, passwd: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pypop.expire")
    backend = create({"expire_days": "30"})
    assert backend.expire_days == 30
    now = time.time()
    backend.deliver("alice", sample_message("alice", 1), uid="a-old", received=now - 31 * DAY)
    backend.deliver("alice", sample_message("alice", 2), uid="a-new", received=now - 29 * DAY)
    backend.deliver("ivan", sample_message("ivan", 1), uid="i-old", received=now - 31 * DAY)
    server = await start_server(backend=backend, passwd_file=passwd)
    port = port_of(server)
    out = await talk(port, b"CAPA\r\n" + login("alice", "wonderland") + b"CAPA\r\nQUIT\r\n")
    assert b"\r\nEXPIRE 30 USER\r\n" in out  # passwd-file users have their own
    assert out.count(b"\r\nEXPIRE 30\r\n") == 1  # alice has the server's (the backend's)
    assert [m.uid for m in await _peek(backend, "alice")] == ["a-new"]
    await talk(port, login("ivan", "ivan-pw") + b"QUIT\r\n")  # ivan: NEVER
    assert [m.uid for m in await _peek(backend, "ivan")] == ["i-old"]
    assert "expire: user=<alice> removed=1 days=30" in caplog.text


async def test_unreadable_times_keep_the_marked_deletions(
    start_server: ServerStarter,
    passwd: Path,
    backend: MemoryBackend,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pypop.backends.memory import MemoryMailbox

    async def broken(self: MemoryMailbox) -> list[float | None]:
        raise OSError("store unreachable")  # fault injection

    monkeypatch.setattr(MemoryMailbox, "received_times", broken)
    caplog.set_level(logging.INFO, "pypop.expire")
    server = await start_server(backend=backend, passwd_file=passwd)
    out = await talk(port_of(server), login("judy", "judy-pw") + b"DELE 2\r\nQUIT\r\n")
    assert out.endswith(b"+OK Logging out\r\n")
    assert [m.uid for m in await _peek(backend, "judy")] == ["judy-old"]  # DELE 2 done
    assert (
        'expire: user=<judy> skipped: arrival times unreadable ("store unreachable")' in caplog.text
    )


def test_backend_expire_and_policy_expire_must_agree() -> None:
    backend = create({"expire_days": 30})
    cfg = ServerConfig(listen=[("127.0.0.1", 0)], expire="7", passwd_file=None)
    with pytest.raises(ConfigError, match=r"policy.expire = '7' but the backend removes mail"):
        Server(cfg, backend=backend, store=PasswdStub())
    cfg.expire = "30"
    assert Server(cfg, backend=backend, store=PasswdStub()).context.expire_days == 30


class PasswdStub:
    async def verify_password(self, user: str, password: str) -> bool:
        return False

    async def lookup(self, user: str) -> None:
        return None


async def _peek(backend: MemoryBackend, user: str) -> list[MessageInfo]:
    """The maildrop's messages, once the session that held it has let go."""
    with trio.fail_after(5):
        while True:
            try:
                box = await backend.open_mailbox(user)
                break
            except MailboxLocked:
                await trio.sleep(0.01)
    try:
        return list(box.messages)
    finally:
        await box.aclose()


# ---- nologin, allow_nets, the maildrop location --------------------------------------


async def test_nologin_reason_only_after_the_password(
    start_server: ServerStarter, passwd: Path, backend: MemoryBackend
) -> None:
    server = await start_server(
        backend=backend, passwd_file=passwd, mechanisms=["PLAIN"], apop=False
    )
    port = port_of(server)
    out = await talk(port, login("dave", "wrong") + login("dave", "dave-pw") + b"QUIT\r\n")
    assert out.split(b"\r\n")[2:5] == [
        b"-ERR [AUTH] Authentication failed",
        b"+OK",
        b"-ERR [SYS/PERM] Mailbox moved to the new server, see https://example.org",
    ]
    out = await talk(port, login("erin", "erin-pw") + b"QUIT\r\n")
    assert b"-ERR [SYS/PERM] Account disabled\r\n" in out
    # SASL goes the same way; after LANG the default text is translated, the
    # reason (the operator's) is not.
    plain = b"AUTH PLAIN AGVyaW4AZXJpbi1wdw==\r\n"  # \0erin\0erin-pw
    out = await talk(port, b"LANG de\r\n" + plain + b"QUIT\r\n")
    assert b"-ERR [SYS/PERM] Konto gesperrt\r\n" in out


async def test_allow_nets(
    start_server: ServerStarter, passwd: Path, backend: MemoryBackend
) -> None:
    server = await start_server(backend=backend, passwd_file=passwd)
    port = port_of(server)
    out = await talk(port, login("frank", "frank-pw") + b"QUIT\r\n")
    assert b"-ERR [AUTH] Authentication failed\r\n" in out  # like a wrong password
    out = await talk(port, login("grace", "grace-pw") + b"QUIT\r\n")
    assert b"+OK maildrop has 2 messages" in out


async def test_maildrop_location(
    start_server: ServerStarter, passwd: Path, backend: MemoryBackend
) -> None:
    server = await start_server(backend=backend, passwd_file=passwd)
    out = await talk(port_of(server), login("heidi", "heidi-pw") + b"UIDL\r\nQUIT\r\n")
    assert b"+OK\r\n1 shared-1\r\n.\r\n" in out  # userdb_mail=memory:shared


async def test_location_on_a_backend_without_it(
    start_server: ServerStarter, passwd: Path, backend: MemoryBackend
) -> None:
    class NoAccounts:
        async def open_mailbox(self, user: str) -> Mailbox:
            return await backend.open_mailbox(user)

        async def aclose(self) -> None:
            pass

    server = await start_server(backend=NoAccounts(), passwd_file=passwd)
    out = await talk(port_of(server), login("heidi", "heidi-pw") + b"QUIT\r\n")
    assert b"-ERR [SYS/PERM] Mailbox cannot be opened\r\n" in out


def test_uid_of_a_user_with_a_location() -> None:
    # Field 3 (or userdb_uid) is kept only with a per-user location, which a backend
    # may check it against; numbers only (a name is served without the check).
    assert parse_extra_fields("userdb_mail=maildir:~/M", home="/h", uid="1000").uid == 1000
    assert parse_extra_fields("", home="/h", uid="1000").uid == 1000
    assert parse_extra_fields("userdb_uid=77", home="/h", uid="1000").uid == 77
    assert parse_extra_fields("", uid="1000") == UserPolicy()  # no location: no policy
    for odd in ("vmail", "", "-1", "1e3", str(1 << 32)):
        assert parse_extra_fields("", home="/h", uid=odd).uid is None


async def test_the_account_carries_the_uid(
    start_server: ServerStarter, passwd: Path, backend: MemoryBackend
) -> None:
    seen: list[Account] = []

    class Recording:
        async def open_mailbox(self, user: str) -> Mailbox:
            return await backend.open_mailbox(user)

        async def open_account(self, account: Account) -> Mailbox:
            seen.append(account)
            return await backend.open_mailbox(account.user)

        async def aclose(self) -> None:
            pass

    server = await start_server(backend=Recording(), passwd_file=passwd)
    out = await talk(port_of(server), login("heidi", "heidi-pw") + b"QUIT\r\n")
    assert b"+OK maildrop has 0 messages (0 octets)\r\n" in out
    assert seen == [Account("heidi", "/home/heidi", "memory:shared", 1000)]
