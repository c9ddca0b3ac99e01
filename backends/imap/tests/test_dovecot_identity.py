"""The same maildrop read through Dovecot's own POP3 and through pypop with the imap
backend in front of Dovecot's IMAP: the same sizes, the same UIDLs, byte-identical
RETR and TOP replies (users moving between the two download nothing again)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from pypop.testing import HARD_MESSAGES

from tests.conftest import BackendMaker
from tests.dovecot import Dovecot
from tests.pop3 import Raw, pypop, transcript


def _text(n: int, size: int, rng: random.Random) -> bytes:
    head = f"From: a@example.org\nSubject: message {n}\n\n".encode()
    lines: list[bytes] = []
    while sum(len(x) for x in lines) < size - len(head):
        k = rng.randrange(60)
        lines.append((b"." if k % 7 == 0 else b"") + b"x" * k + b"\n")
    return head + b"".join(lines)


MESSAGES: list[bytes] = [
    *(m for name, m in HARD_MESSAGES.items() if name != "just-dot"),
    b"Subject: header only, no body\r\n",
    b"Subject: x\r\n\r\nbody\r\n.tail",
    b"Subject: header only, no final newline",
    b"Subject: blank lines\r\n\r\n\r\n\r\n.\r\n..\r\n",
    b"Subject: lf\n\n" + b"line\n" * 50,
    _text(1, 4096, random.Random(1)),
    _text(2, 300 * 1024, random.Random(2)),  # streamed, not fetched ahead
    _text(3, 1024 * 1024 + 7, random.Random(3)),
]


async def test_pop3_through_imap_equals_dovecot_pop3(
    dovecot: Dovecot,
    new_user: Callable[[], tuple[str, str]],
    make_backend: BackendMaker,
) -> None:
    user, password = new_user()
    for message in MESSAGES:
        dovecot.deliver(user, message)
    backend = make_backend()
    # Dovecot (no RFC 6856 UTF8) sends 8-bit headers as stored to every client; pypop
    # refuses them to a client that never sent UTF8 unless told to send them.
    async with pypop(backend, utf8_headers="send") as server:
        ours = await trio.to_thread.run_sync(transcript, server.addresses[0][1], user, password)
    await backend.aclose()
    theirs = await trio.to_thread.run_sync(transcript, dovecot.pop3_port, user, password)
    assert len(ours.sizes) == len(MESSAGES)
    assert ours.stat == theirs.stat
    assert ours.sizes == theirs.sizes
    assert ours.uidls == theirs.uidls
    assert ours.uidls[0] == b"%08x%08x" % (1, int(theirs.uidls[0][8:], 16))  # %08Xu%08Xv
    for n, (mine, dovecots) in enumerate(zip(ours.retr, theirs.retr, strict=True), 1):
        assert mine == dovecots, f"RETR {n} differs"
    for key in theirs.top:
        assert ours.top[key] == theirs.top[key], f"TOP {key} differs"


# Dovecot 2.3.19's POP3 does not stuff a "." at the very start of a message: "." goes
# out as ".\r\n.\r\n" (an empty message, then a stray dot), ".Subject" loses its dot
# at the client. pypop stuffs it (RFC 1939 §3); sizes and UIDLs still agree.
UNSTUFFED_BY_DOVECOT = [b".", b".Subject: starts with a dot\r\n\r\nbody\r\n"]


def _dovecot_retr(port: int, user: str, password: str, n: int) -> bytes:
    """RETR n on a connection of its own: Dovecot's reply may leave a stray line."""
    c = Raw(port)
    try:
        assert c.login(user, password).startswith(b"+OK")
        assert c.cmd(f"RETR {n}").startswith(b"+OK")
        return c.multiline()
    finally:
        c.close()


async def test_dovecot_pop3_leaves_a_final_dot_unstuffed_pypop_does_not(
    dovecot: Dovecot,
    new_user: Callable[[], tuple[str, str]],
    make_backend: BackendMaker,
) -> None:
    user, password = new_user()
    for message in UNSTUFFED_BY_DOVECOT:
        dovecot.deliver(user, message)
    backend = make_backend()
    async with pypop(backend) as server:
        ours = await trio.to_thread.run_sync(transcript, server.addresses[0][1], user, password, ())
    await backend.aclose()
    assert ours.retr == [b"..\r\n.\r\n", b"..Subject: starts with a dot\r\n\r\nbody\r\n.\r\n"]
    port = dovecot.pop3_port
    theirs = [await trio.to_thread.run_sync(_dovecot_retr, port, user, password, n) for n in (1, 2)]
    assert theirs == [
        b".\r\n",  # the terminator alone; the stray "." follows it
        b".Subject: starts with a dot\r\n\r\nbody\r\n.\r\n",
    ]
    c = await trio.to_thread.run_sync(Raw, port)
    try:
        await trio.to_thread.run_sync(c.login, user, password)
        assert await trio.to_thread.run_sync(c.cmd, "LIST") == b"+OK 2 messages:"
        listing = await trio.to_thread.run_sync(c.multiline)
        assert await trio.to_thread.run_sync(c.cmd, "UIDL") == b"+OK"
        uidls = await trio.to_thread.run_sync(c.multiline)
    finally:
        c.close()
    assert [int(x.split()[1]) for x in listing.split(b"\r\n")[:-2]] == ours.sizes
    assert [x.split()[1] for x in uidls.split(b"\r\n")[:-2]] == ours.uidls


@pytest.mark.parametrize("fmt", ["%u-%v", "%g", "%08Xv%08Xu"])
async def test_uidl_format_option_matches_dovecot(
    fmt: str,
    make_dovecot: Callable[..., Dovecot],
    certs: dict[str, Path],
) -> None:
    from pypop_imap import create
    from tests.conftest import backend_options, pool_users

    d = make_dovecot(users=pool_users(), pop3_uidl_format=fmt)
    user, password = "user1", d.users["user1"]
    d.deliver(user, b"Subject: 1\r\n\r\n1\r\n")
    d.deliver(user, b"Subject: 2\r\n\r\n2\r\n")
    backend = create(backend_options(d, certs, uidl_format=fmt))
    async with pypop(backend) as server:
        ours = await trio.to_thread.run_sync(transcript, server.addresses[0][1], user, password, ())
    await backend.aclose()
    theirs = await trio.to_thread.run_sync(transcript, d.pop3_port, user, password, ())
    assert ours.uidls == theirs.uidls
    assert len(set(ours.uidls)) == 2
