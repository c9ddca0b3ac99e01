"""A hostile or broken upstream (a scripted fake IMAP server): whatever it sends, the
backend stays within its bounds, never serves one message's octets as another's, and
never deletes what the session did not mark."""

from __future__ import annotations

import contextlib
import tracemalloc
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

import pytest
import trio
from pypop.backend import Credentials, TemporaryFailure, UpdateFailed

from pypop_imap import ImapMailbox, ImapPassthroughBackend, create
from tests.fakeimap import mailbox, start_fake
from tests.pop3 import Raw, pypop


def _backend(port: int, **overrides: object) -> ImapPassthroughBackend:
    options: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "tls": "none",
        "timeout": 5,
        "reuse_idle": 0,
    }
    options.update(overrides)
    backend = create(options)
    assert isinstance(backend, ImapPassthroughBackend)
    return backend


async def _login(backend: ImapPassthroughBackend) -> ImapMailbox:
    return await backend.authenticate(Credentials("alice", "secret"))


async def _read(blocks: AsyncIterator[bytes]) -> bytes:
    return b"".join([block async for block in blocks])


@pytest.mark.parametrize("mark_seen", [False, True])
async def test_uidvalidity_changed_mid_session_serves_and_deletes_nothing(
    mark_seen: bool, nursery: trio.Nursery
) -> None:
    """The mailbox was recreated after the snapshot: its UIDs name other messages now."""
    ours = b"Subject: ours\r\n\r\nmine\r\n"
    other = b"Subject: other\r\n\r\nsomeone else's\r\n"
    base = mailbox({5: ours})

    def script(tag: bytes, line: bytes) -> bytes:
        if line.upper().startswith((b"UID FETCH 5 ", b"NOOP")):
            return b"* OK [UIDVALIDITY 8] recreated\r\n" + mailbox({5: other}, 8)(tag, line)
        return base(tag, line)

    fake = await start_fake(nursery, script)
    backend = _backend(fake.port, mark_seen="true" if mark_seen else "false")
    mbox = await _login(backend)
    assert [m.size for m in mbox.messages] == [len(ours)]
    with pytest.raises(TemporaryFailure):
        await _read(mbox.retrieve(0))
    with pytest.raises(UpdateFailed):
        await mbox.commit([0])
    await backend.aclose()
    assert not [c for c in fake.commands if c.upper().startswith((b"UID STORE", b"EXPUNGE"))]


def _peak(during: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[int]]:
    async def run() -> int:
        tracemalloc.start()
        try:
            with contextlib.suppress(Exception):
                await during()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    return run


FLOOD = 30_000


@pytest.mark.parametrize(
    ("command", "flood"),
    [
        # unsolicited flag updates, answering a command that wants no FETCH at all
        (b"UID STORE", b"* 1 FETCH (FLAGS (\\Deleted))\r\n" * FLOOD),
        (b"UID SEARCH", (b"* SEARCH" + b" 5" * 1000 + b"\r\n") * 1000),
        # a fetch ahead of two small messages, answered over and over
        (b"UID FETCH 6:7", (b"* 2 FETCH (UID 6 BODY[] {100}\r\n" + b"x" * 100 + b")\r\n") * FLOOD),
    ],
)
async def test_a_flood_of_untagged_responses_is_not_kept(
    command: bytes, flood: bytes, nursery: trio.Nursery
) -> None:
    """What a command collects is bounded by what it asked for, not by what the
    upstream sends before the tagged reply."""
    base = mailbox({5: b"a" * 100, 6: b"b" * 100, 7: b"c" * 100})

    def script(tag: bytes, line: bytes) -> bytes | list[bytes]:
        if line.upper().startswith(command):
            return [flood, tag + b" OK done\r\n"]
        return base(tag, line)

    fake = await start_fake(nursery, script)
    backend = _backend(fake.port)
    mbox = await _login(backend)

    async def work() -> None:
        if command.startswith(b"UID FETCH"):
            await _read(mbox.retrieve(0))
            await _read(mbox.retrieve(1))  # in order: 2 and 3 are fetched ahead
        else:
            await mbox.commit([0])

    peak = await _peak(work)()
    await mbox.aclose()
    await backend.aclose()
    assert peak < 4 * 1024 * 1024, f"{peak} octets held"


@pytest.mark.parametrize(
    ("greeting", "refused"),
    [
        # no capabilities in the greeting: asked for, and refused
        (b"* OK fake ready\r\n", b"CAPABILITY"),
        # STARTTLS advertised, then refused (or the refusal forged by a middlebox)
        (b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] ready\r\n", b"STARTTLS"),
        (b"* OK fake ready\r\n", b"STARTTLS"),
    ],
)
async def test_a_refused_set_up_command_is_sys_temp_without_traceback(
    greeting: bytes, refused: bytes, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    base = mailbox({5: b"x\r\n"})

    def script(tag: bytes, line: bytes) -> bytes:
        if line.upper() == refused:
            return tag + b" BAD [SERVERBUG] Traceback: secret internals\r\n"
        if line.upper() == b"CAPABILITY":
            return b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\n" + tag + b" OK done\r\n"
        return base(tag, line)

    fake = await start_fake(nursery, script, greeting)
    tls = "starttls" if refused == b"STARTTLS" else "none"
    backend = create(
        {"host": "127.0.0.1", "port": fake.port, "tls": tls, "timeout": 5, "reuse_idle": 0}
    )
    async with pypop(backend) as server:
        c = await trio.to_thread.run_sync(Raw, server.addresses[0][1])
        try:
            reply = await trio.to_thread.run_sync(c.login, "alice", "secret")
            after = await trio.to_thread.run_sync(c.cmd, "NOOP")
        finally:
            c.close()
    await backend.aclose()
    assert reply == b"-ERR [SYS/TEMP] Temporary authentication failure"
    assert after == b"-ERR Command not valid in this state"
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert b"secret" not in bytes(fake.received)  # nothing of the login went out


@pytest.mark.parametrize(
    ("mechanism", "caps"),
    [("PLAIN", b"AUTH=PLAIN"), ("PLAIN", b"AUTH=PLAIN SASL-IR"), ("XOAUTH2", b"AUTH=XOAUTH2")],
)
async def test_endless_authenticate_challenges_end_the_login(
    mechanism: str, caps: bytes, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that answers every line of AUTHENTICATE with another challenge: RFC
    4616 PLAIN has none after the initial response, RFC 7628 one error challenge."""
    authenticating = False

    def script(tag: bytes, line: bytes) -> bytes:
        nonlocal authenticating
        authenticating = authenticating or line.upper().startswith(b"AUTHENTICATE")
        return b"+ \r\n" if authenticating else tag + b" OK done\r\n"

    greeting = b"* OK [CAPABILITY IMAP4rev1 " + caps + b"] ready\r\n"
    fake = await start_fake(nursery, script, greeting)
    backend = _backend(fake.port)
    credentials = (
        Credentials("alice", "token", "bearer", mechanism)
        if mechanism == "XOAUTH2"
        else Credentials("alice", "secret", "password", mechanism)
    )
    with trio.fail_after(3), pytest.raises(TemporaryFailure):
        await backend.authenticate(credentials)
    await backend.aclose()
    assert len(fake.commands) <= 3  # the command, the response, one answer at most
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_top_reads_no_more_than_the_message(nursery: trio.Nursery) -> None:
    """A server that answers every partial fetch of the text in full, without a line
    end, would have TOP ask again and again: never past the message's own size."""
    header = b"Subject: s\r\n\r\n"
    base = mailbox({5: header + b"x" * 20_000})

    def script(tag: bytes, line: bytes) -> bytes:
        upper = line.upper()
        if upper.startswith(b"UID FETCH 5 ") and b"BODY.PEEK[" in upper:
            items = []
            if b"BODY.PEEK[HEADER]" in upper:
                items.append(b"BODY[HEADER] {%d}\r\n%s" % (len(header), header))
            if b"BODY.PEEK[TEXT]<" in upper:
                start, count = upper.split(b"BODY.PEEK[TEXT]<")[1].split(b">")[0].split(b".")
                items.append(b"BODY[TEXT]<%s> {%s}\r\n%s" % (start, count, b"x" * int(count)))
            return b"* 1 FETCH (UID 5 " + b" ".join(items) + b")\r\n" + tag + b" OK done\r\n"
        return base(tag, line)

    fake = await start_fake(nursery, script)
    backend = _backend(fake.port)
    mbox = await _login(backend)
    size = mbox.messages[0].size
    got = 0
    with trio.fail_after(10):
        top = mbox.retrieve(0, top_lines=1)
        assert isinstance(top, AsyncGenerator)
        async with contextlib.aclosing(top) as blocks:
            async for block in blocks:
                got += len(block)
                if got > 10 * size:
                    break
    await mbox.aclose()
    await backend.aclose()
    assert got <= 2 * size  # at most one doubling step past the declared size
    fetches = [c for c in fake.commands if c.upper().startswith(b"UID FETCH 5 ")]
    assert len(fetches) == 3  # 4224 octets, 8448 more, then 16896: past 20014


async def test_top_text_larger_than_asked_is_refused(nursery: trio.Nursery) -> None:
    """A partial fetch returns at most the octets asked for (RFC 3501 §6.4.5); text
    sent before the header is held until the header comes, so more than asked would
    be held in memory, as much as the server cares to send."""
    header = b"Subject: s\r\n\r\n"
    text = b"y" * (4 * 1024 * 1024)
    base = mailbox({5: header + b"body\r\n"})

    def script(tag: bytes, line: bytes) -> bytes | list[bytes]:
        if line.upper().startswith(b"UID FETCH 5 (BODY.PEEK[HEADER]"):
            return [
                b"* 1 FETCH (UID 5 BODY[TEXT]<0> {%d}\r\n" % len(text),
                text,
                b" BODY[HEADER] {%d}\r\n%s)\r\n%s OK done\r\n" % (len(header), header, tag),
            ]
        return base(tag, line)

    fake = await start_fake(nursery, script)
    backend = _backend(fake.port)
    mbox = await _login(backend)

    failed: list[Exception] = []

    async def top() -> None:
        try:
            await _read(mbox.retrieve(0, top_lines=1))
        except Exception as exc:
            failed.append(exc)

    peak = await _peak(top)()
    await mbox.aclose()
    await backend.aclose()
    assert [type(e) for e in failed] == [TemporaryFailure]
    assert peak < 2 * 1024 * 1024, f"{peak} octets held"


@pytest.mark.parametrize(
    "response",
    [
        # a large literal (streamed) whose UID, after it, names another message
        b"* 2 FETCH (BODY[] {%d}\r\n%s UID 6)\r\n",
        # a small one without any UID (RFC 3501 §6.4.8: UID FETCH answers carry it)
        b"* 2 FETCH (BODY[] {%d}\r\n%s)\r\n",
    ],
)
async def test_retr_never_completes_with_another_messages_octets(
    response: bytes, nursery: trio.Nursery
) -> None:
    ours = b"Subject: ours\r\n\r\n" + b"o" * 300_000
    other = (b"Subject: other\r\n\r\n" + b"x" * 300_000) if b"UID 6" in response else b"x\r\n"
    base = mailbox({5: ours, 6: other})

    def script(tag: bytes, line: bytes) -> bytes:
        if line.upper().startswith(b"UID FETCH 5 "):
            return response % (len(other), other) + tag + b" OK done\r\n"
        return base(tag, line)

    fake = await start_fake(nursery, script)
    backend = _backend(fake.port)
    mbox = await _login(backend)
    got: list[bytes] = []

    async def retr() -> None:
        async for block in mbox.retrieve(0):
            got.append(block)

    with pytest.raises(TemporaryFailure):
        await retr()
    # Failing after the first block, the session cuts the transfer (no terminator).
    assert b"".join(got) in (b"", other)
    await mbox.aclose()
    await backend.aclose()


@pytest.mark.parametrize("cut", ["UID STORE", "UID FETCH 1:*"])
async def test_a_command_cut_off_before_its_reply_is_never_pooled(
    cut: str, nursery: trio.Nursery
) -> None:
    """A session cancelled while a command waits for its tagged reply (the session's
    time limit, a shutdown) leaves that reply on the wire: the connection must not be
    pooled for the next login, which would read it as an answer to its own commands."""
    base = mailbox({5: b"Subject: s\r\n\r\nx\r\n"})
    hold = cut.encode()
    answered = {"count": 0}

    def script(tag: bytes, line: bytes) -> bytes:
        if line.upper().startswith(hold) and not answered["count"]:
            answered["count"] += 1
            return b""  # never answered
        return base(tag, line)

    fake = await start_fake(nursery, script)
    backend = _backend(fake.port, reuse_idle=60)
    if cut == "UID STORE":
        mbox = await _login(backend)
        with trio.move_on_after(0.5):
            await mbox.commit([0])
        await mbox.aclose()
    else:  # the login's own listing
        with trio.move_on_after(0.5):
            await _login(backend)
    assert backend.pooled == 0
    again = await _login(backend)  # a fresh upstream login, answered in order
    assert [m.size for m in again.messages] == [len(b"Subject: s\r\n\r\nx\r\n")]
    await again.aclose()
    await backend.aclose()
    assert fake.connections == 2
