"""pypop with the imap backend in front of a real Dovecot: stdlib poplib, curl and
pypop.client over STLS and implicit TLS, every upstream TLS mode, master-user logins
with any mechanism, DELE only at UPDATE, no flag changes, a server without UIDPLUS,
UIDVALIDITY changes, connection reuse."""

from __future__ import annotations

import base64
import logging
import os
import poplib
import shutil
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from pypop.auth import MemoryCredentialStore
from pypop.backend import AuthFailed, Credentials
from pypop.config import ServerConfig
from pypop.server import Server, serve
from pypop.wire import apop_digest

from pypop_imap import ImapPassthroughBackend, create
from tests.conftest import BackendMaker, backend_options, pool_users
from tests.dovecot import Dovecot
from tests.pop3 import Raw, pypop

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None and not os.environ.get("CI"), reason="no curl")

NewUser = Callable[[], tuple[str, str]]


def _client_tls(certs: dict[str, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs["ca"]))


@pytest.mark.parametrize("upstream", ["implicit", "starttls", "none"])
async def test_poplib_stls_and_implicit_tls(
    upstream: str,
    dovecot: Dovecot,
    new_user: NewUser,
    make_backend: BackendMaker,
    certs: dict[str, Path],
) -> None:
    user, password = new_user()
    dovecot.deliver(user, b"Subject: one\n\nfirst\n")
    dovecot.deliver(user, b"Subject: two\r\n\r\nsecond\r\n.dot\r\n")
    backend = make_backend(tls=upstream)
    async with pypop(backend, certs) as server:
        port, tls_port = server.addresses[0][1], server.tls_addresses[0][1]
        ctx = _client_tls(certs)

        def stls() -> list[bytes]:
            pop = poplib.POP3("127.0.0.1", port, timeout=30)
            pop.stls(ctx)
            pop.user(user)
            pop.pass_(password)
            lines = pop.retr(2)[1]
            pop.quit()
            return lines

        def implicit() -> tuple[list[bytes], list[bytes]]:
            pop = poplib.POP3_SSL("127.0.0.1", tls_port, context=ctx, timeout=30)
            pop.user(user)
            pop.pass_(password)
            got = pop.retr(1)[1], pop.uidl()[1]
            pop.quit()
            return got

        assert await trio.to_thread.run_sync(stls) == [b"Subject: two", b"", b"second", b".dot"]
        lines, uidl = await trio.to_thread.run_sync(implicit)
    assert lines == [b"Subject: one", b"", b"first"]
    assert [u.split()[1][:8] for u in uidl] == [b"00000001", b"00000002"]
    await backend.aclose()


@needs_curl
async def test_curl_pop3s_and_ssl_reqd(
    dovecot: Dovecot,
    new_user: NewUser,
    make_backend: BackendMaker,
    certs: dict[str, Path],
) -> None:
    user, password = new_user()
    message = b"Subject: curl\r\n\r\nfetched by curl\r\n"
    dovecot.deliver(user, message)
    backend = make_backend(tls="starttls")
    async with pypop(backend, certs) as server:
        port, tls_port = server.addresses[0][1], server.tls_addresses[0][1]
        assert CURL is not None
        auth = f"{user}:{password}"

        async def curl(*args: str) -> bytes:
            done = await trio.run_process(
                [CURL, "-s", "--cacert", str(certs["ca"]), "-u", auth, *args],
                capture_stdout=True,
            )
            return done.stdout

        got_tls = await curl(f"pop3s://localhost:{tls_port}/1")
        got_stls = await curl("--ssl-reqd", f"pop3://localhost:{port}/1")
        listing = await curl(f"pop3s://localhost:{tls_port}/")
    assert got_tls == message
    assert got_stls == message
    assert listing == f"1 {len(message)}\r\n".encode()
    await backend.aclose()


async def test_untrusted_upstream_certificate_is_sys_temp(
    dovecot: Dovecot,
    new_user: NewUser,
    certs: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    user, password = new_user()
    # No ca_file: the system's CAs, which do not know the test CA.
    backend = create(
        {"host": "127.0.0.1", "port": dovecot.imaps_port, "tls": "implicit", "timeout": 10}
    )
    async with pypop(backend) as server:
        c = await trio.to_thread.run_sync(Raw, server.addresses[0][1])
        try:
            reply = await trio.to_thread.run_sync(c.login, user, password)
        finally:
            c.close()
    assert reply == b"-ERR [SYS/TEMP] Temporary authentication failure"
    assert "certificate not trusted" in caplog.text
    await backend.aclose()


async def test_upstream_text_never_reaches_the_client(
    dovecot: Dovecot, new_user: NewUser, make_backend: BackendMaker
) -> None:
    user, _ = new_user()
    backend = make_backend()
    async with pypop(backend) as server:
        c = await trio.to_thread.run_sync(Raw, server.addresses[0][1])
        try:
            wrong = await trio.to_thread.run_sync(c.login, user, "wrong")
            plain = base64.b64encode(f"\0{user}\0wrong".encode()).decode()
            sasl = await trio.to_thread.run_sync(c.cmd, f"AUTH PLAIN {plain}")
        finally:
            c.close()
    # Dovecot says "[AUTHENTICATIONFAILED] Authentication failed."; we say our own.
    assert wrong == sasl == b"-ERR [AUTH] Authentication failed"
    await backend.aclose()


# ------------------------------------------------------------------- master user


async def test_master_user_serves_apop_and_cram_md5_users(
    dovecot: Dovecot,
    new_user: NewUser,
    make_backend: BackendMaker,
    nursery: trio.Nursery,
) -> None:
    # pypop checks the user itself (any mechanism), then logs in upstream as master.
    user, _ = new_user()
    dovecot.deliver(user, b"Subject: via master\r\n\r\nhello\r\n")
    backend = make_backend(master=True)
    store = MemoryCredentialStore({user: "{PLAIN}pypop-own-secret"})
    config = ServerConfig(
        listen=[("127.0.0.1", 0)],
        apop=True,
        mechanisms=["CRAM-MD5", "PLAIN"],
        auth_failure_delay=0.0,
        auth_penalty_max=0.0,
        hostname="pop.test",
    )
    server: Server = await nursery.start(
        lambda task_status: serve(config, backend=backend, store=store, task_status=task_status)
    )
    port = server.addresses[0][1]

    def apop() -> list[bytes]:
        c = Raw(port)
        try:
            stamp = c.greeting[c.greeting.index(b"<") :]
            digest = apop_digest(stamp, b"pypop-own-secret")
            assert c.cmd(f"APOP {user} {digest}").startswith(b"+OK")
            assert c.cmd("RETR 1").startswith(b"+OK")
            return [c.multiline()]
        finally:
            c.close()

    got = await trio.to_thread.run_sync(apop)
    assert got == [b"Subject: via master\r\n\r\nhello\r\n.\r\n"]
    server.shutdown()
    await backend.aclose()


async def test_master_login_refused_is_sys_temp_and_logged(
    dovecot: Dovecot,
    new_user: NewUser,
    make_backend: BackendMaker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    user, _ = new_user()
    wrong = tmp_path / "wrong-master"
    wrong.write_text("not the master password\n")
    wrong.chmod(0o600)
    backend = make_backend(master=True, master_password_file=str(wrong))
    from pypop.backend import TemporaryFailure

    with pytest.raises(TemporaryFailure):
        await backend.open_mailbox(user)
    assert "refused master user 'admin'" in caplog.text
    await backend.aclose()


# ------------------------------------------------------------------------ UPDATE


async def test_dele_changes_nothing_until_quit_and_a_drop_changes_nothing(
    dovecot: Dovecot, new_user: NewUser, make_backend: BackendMaker
) -> None:
    user, password = new_user()
    for n in range(1, 5):
        dovecot.deliver(user, f"Subject: {n}\r\n\r\n{n}\r\n".encode())
    backend = make_backend()
    async with pypop(backend) as server:
        port = server.addresses[0][1]

        def dele_then(end: str) -> dict[int, str]:
            c = Raw(port)
            assert c.login(user, password).startswith(b"+OK")
            assert c.cmd("RETR 1").startswith(b"+OK")
            c.multiline()
            assert c.cmd("DELE 2").startswith(b"+OK")
            assert c.cmd("DELE 4").startswith(b"+OK")
            flags = dovecot.flags(user)  # another client's view, mid-session
            if end == "quit":
                assert c.cmd("QUIT") == b"+OK Logging out"
            c.close()
            return flags

        during = await trio.to_thread.run_sync(dele_then, "drop")
        assert during == {1: "", 2: "", 3: "", 4: ""}  # no \Seen, no \Deleted
        for _ in range(100):  # the dropped session ends, nothing changed
            if backend.lock_key(user) not in backend.settings.locks:  # type: ignore[operator]
                break
            await trio.sleep(0.05)
        assert dovecot.uids(user) == [1, 2, 3, 4]
        assert dovecot.flags(user) == {1: "", 2: "", 3: "", 4: ""}
        await trio.to_thread.run_sync(dele_then, "quit")
    assert dovecot.uids(user) == [1, 3]
    assert dovecot.flags(user) == {1: "", 3: ""}  # RETR set no \Seen
    await backend.aclose()


async def test_mark_seen_when_configured(
    dovecot: Dovecot, new_user: NewUser, make_backend: BackendMaker
) -> None:
    user, password = new_user()
    for n in range(1, 4):
        dovecot.deliver(user, f"Subject: {n}\r\n\r\n{n}\r\n".encode())
    backend = make_backend(mark_seen=True)
    async with pypop(backend) as server:

        def retr_1_and_top_3() -> None:
            pop = poplib.POP3("127.0.0.1", server.addresses[0][1], timeout=30)
            pop.user(user)
            pop.pass_(password)
            pop.retr(1)
            pop.top(3, 0)
            pop.quit()

        await trio.to_thread.run_sync(retr_1_and_top_3)
    assert dovecot.flags(user) == {1: "\\Seen", 2: "", 3: ""}
    await backend.aclose()


async def test_without_uidplus_only_our_marks_are_expunged(
    make_dovecot: Callable[..., Dovecot], certs: dict[str, Path]
) -> None:
    caps = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN"
    d = make_dovecot(users=pool_users(), capabilities=caps)
    user, password = "user1", d.users["user1"]
    for n in range(1, 5):
        d.deliver(user, f"Subject: {n}\r\n\r\n{n}\r\n".encode())
    with d.imap(user) as other:  # an IMAP user marked 3 without expunging
        other.uid("STORE", "3", "+FLAGS.SILENT", r"(\Deleted)")
    backend = create(backend_options(d, certs))
    async with pypop(backend) as server:

        def dele_1() -> None:
            pop = poplib.POP3("127.0.0.1", server.addresses[0][1], timeout=30)
            pop.user(user)
            pop.pass_(password)
            pop.dele(1)
            pop.quit()

        await trio.to_thread.run_sync(dele_1)
    assert d.uids(user) == [2, 3, 4]
    assert d.flags(user)[3] == "\\Deleted"  # theirs: still marked, not expunged
    await backend.aclose()


async def test_uidvalidity_change_is_logged_and_changes_uidls(
    dovecot: Dovecot,
    new_user: NewUser,
    make_backend: BackendMaker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    user, password = new_user()
    doveadm = ["doveadm", "-c", str(dovecot.conf)]
    await trio.run_process([*doveadm, "mailbox", "create", "-u", user, "Work"])
    dovecot.deliver(user, b"Subject: w\r\n\r\nw\r\n", mailbox="Work")
    backend = make_backend(mailbox="Work", reuse_idle=0)
    assert isinstance(backend, ImapPassthroughBackend)
    box = await backend.authenticate(Credentials(user, password))
    before = [m.uid for m in box.messages]
    await box.aclose()
    await trio.run_process([*doveadm, "mailbox", "delete", "-u", user, "Work"])
    await trio.sleep(1.1)  # UIDVALIDITY is a time stamp in Dovecot
    await trio.run_process([*doveadm, "mailbox", "create", "-u", user, "Work"])
    dovecot.deliver(user, b"Subject: w\r\n\r\nw\r\n", mailbox="Work")
    with caplog.at_level(logging.WARNING, logger="pypop.imap"):
        box = await backend.authenticate(Credentials(user, password))
    after = [m.uid for m in box.messages]
    await box.aclose()
    assert before != after
    assert before[0][:8] == after[0][:8] == "00000001"
    assert f"UIDVALIDITY of {user}'s Work changed from" in caplog.text
    await backend.aclose()


# ---------------------------------------------------------------- reuse, locks


async def test_reused_connection_needs_the_same_secret(
    dovecot: Dovecot, new_user: NewUser, make_backend: BackendMaker
) -> None:
    user, password = new_user()
    dovecot.deliver(user, b"Subject: 1\r\n\r\n1\r\n")
    backend = make_backend()
    assert isinstance(backend, ImapPassthroughBackend)
    logins_before = dovecot.log.count(f"Login: user=<{user}>")
    for _ in range(3):
        box = await backend.authenticate(Credentials(user, password))
        await box.commit([])
    assert backend.pooled == 1
    assert dovecot.log.count(f"Login: user=<{user}>") - logins_before == 1
    with pytest.raises(AuthFailed):  # the pooled connection is not a password cache
        await backend.authenticate(Credentials(user, "wrong"))
    dovecot.deliver(user, b"Subject: 2\r\n\r\n2\r\n")
    box = await backend.authenticate(Credentials(user, password))
    assert len(box.messages) == 2  # a fresh snapshot on a reused connection
    await box.aclose()
    await backend.aclose()
    assert backend.pooled == 0


async def test_no_reuse_when_disabled(
    dovecot: Dovecot, new_user: NewUser, make_backend: BackendMaker
) -> None:
    user, password = new_user()
    backend = make_backend(reuse_idle=0)
    assert isinstance(backend, ImapPassthroughBackend)
    before = dovecot.log.count(f"Login: user=<{user}>")
    for _ in range(2):
        box = await backend.authenticate(Credentials(user, password))
        await box.aclose()
    assert backend.pooled == 0
    for _ in range(50):
        if dovecot.log.count(f"Login: user=<{user}>") - before == 2:
            break
        await trio.sleep(0.05)
    assert dovecot.log.count(f"Login: user=<{user}>") - before == 2
    await backend.aclose()


async def test_lock_is_per_upstream_user_whatever_the_case(
    dovecot: Dovecot, new_user: NewUser, make_backend: BackendMaker
) -> None:
    user, password = new_user()
    backend = make_backend()
    assert isinstance(backend, ImapPassthroughBackend)
    box = await backend.authenticate(Credentials(user, password))
    from pypop.backend import MailboxLocked

    with pytest.raises(MailboxLocked):  # Dovecot folds case: same maildrop
        await backend.authenticate(Credentials(user.upper(), password))
    await box.aclose()
    await backend.aclose()


async def test_client_address_goes_upstream_in_id(
    dovecot: Dovecot, new_user: NewUser, make_backend: BackendMaker
) -> None:
    # Dovecot (login_trusted_networks) logs, and penalises, the real client.
    user, password = new_user()
    backend = make_backend(reuse_idle=0)
    async with pypop(backend) as server:

        def login_from(source: str) -> bytes:
            c = Raw(server.addresses[0][1], source=source)
            try:
                return c.login(user, password)
            finally:
                c.close()

        assert (await trio.to_thread.run_sync(login_from, "127.0.0.2")).startswith(b"+OK")
    for _ in range(50):
        if f"user=<{user}>, method=PLAIN, rip=127.0.0.2" in dovecot.log:
            break
        await trio.sleep(0.05)
    assert f"user=<{user}>, method=PLAIN, rip=127.0.0.2" in dovecot.log
    await backend.aclose()


@pytest.mark.parametrize("tls", ["implicit", "require"])
async def test_pypop_client_through_the_imap_backend(
    tls: str,
    dovecot: Dovecot,
    new_user: NewUser,
    make_backend: BackendMaker,
    certs: dict[str, Path],
) -> None:
    # pypop's own client library (pypop.client), pipelined RETRs, over implicit TLS
    # and STLS ("require").
    from pypop.client import Client

    user, password = new_user()
    messages = [f"Subject: {n}\r\n\r\n.line {n}\r\n".encode() for n in range(1, 6)]
    for m in messages:
        dovecot.deliver(user, m)
    backend = make_backend()
    async with pypop(backend, certs) as server:
        port = server.tls_addresses[0][1] if tls == "implicit" else server.addresses[0][1]

        def fetch() -> tuple[dict[int, str], list[bytes], tuple[int, int]]:
            with Client("127.0.0.1", port, user, password, tls=tls, cafile=certs["ca"]) as pop:
                uidls = pop.uidl()
                got = [data for _, data in pop.retrieve([1, 2, 3, 4, 5])]
                pop.dele(2)
                stat = pop.stat()
                pop.quit()
            return uidls, got, stat

        uidls, got, stat = await trio.to_thread.run_sync(fetch)
    assert got == messages
    assert uidls[1] == "00000001" + uidls[1][8:]
    assert stat == (4, sum(map(len, messages)) - len(messages[1]))
    assert dovecot.uids(user) == [1, 3, 4, 5]
    await backend.aclose()
