"""The sans-I/O engine, driven without sockets (h11 tests/test_io.py style).

Every scenario is fed three ways (whole, byte by byte, and in one pipelined write
followed by nothing) and must produce exactly the same bytes.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pypop.protocol import (
    NEED_DATA,
    SEND_DATA,
    ApopLogin,
    Closing,
    ConnectionClosed,
    Event,
    LocalProtocolError,
    PasswordLogin,
    ProtocolConfig,
    Retrieve,
    SaslAborted,
    SaslResponse,
    SaslStart,
    ServerConnection,
    StartTLS,
    State,
    Text,
    Update,
    parse_command,
)
from pypop.protocol.commands import Dele, List, ParseError, Pass, Top, Uidl, User

SIZES = [120, 200, 300]
UIDS = ["uid-one", "uid-two", "u3"]
PLAINTEXT_MECHANISMS = frozenset({"PLAIN", "LOGIN"})


def server(
    cfg: ProtocolConfig | None = None, mechanisms: tuple[str, ...] = (), **kw: Any
) -> ServerConnection:
    """A connection offering ``mechanisms`` as the session would (plaintext ones only
    where plaintext is allowed)."""
    conn = ServerConnection(cfg, **kw)
    conn.sasl_usable = [
        m for m in mechanisms if conn.plaintext_allowed or m not in PLAINTEXT_MECHANISMS
    ]
    conn.sasl_refused_plaintext = [m for m in mechanisms if m not in conn.sasl_usable]
    return conn


BODY = b"Subject: x\r\n\r\nbody\r\n.\r\n"


class Driver:
    """A tiny synchronous 'session': answers events the way the real one would."""

    def __init__(self, conn: ServerConnection, password: str = "secret") -> None:  # noqa: S107
        self.conn = conn
        self.password = password
        self.events: list[Event] = []
        self.closed: str | None = None
        self.sent = bytearray()  # output drained at SEND_DATA (backpressure)

    def take(self) -> bytes:
        """Everything sent so far and still queued."""
        out = bytes(self.sent) + self.conn.data_to_send()
        self.sent.clear()
        return out

    def run(self) -> None:
        conn = self.conn
        while self.closed is None:
            ev = conn.next_event()
            if ev is NEED_DATA:
                return
            if ev is SEND_DATA:
                self.sent += conn.data_to_send()
                continue
            self.events.append(ev)
            match ev:
                case PasswordLogin(user=user, password=pw):
                    if pw == self.password:
                        conn.login_succeeded(user, SIZES, UIDS)
                    elif (c := conn.login_failed()) is not None:
                        self.closed = c.reason
                case ApopLogin():
                    conn.login_failed()
                case Retrieve():
                    conn.message_header()
                    conn.send_raw(BODY)
                    conn.message_done()
                case Update():
                    self.closed = conn.update_finished(False).reason
                case StartTLS():
                    conn.start_tls()
                case SaslStart(initial=initial):
                    if initial is None:
                        conn.sasl_challenge(b"")
                    elif initial == b"\0bob\0secret":
                        conn.login_succeeded("bob", SIZES, UIDS)
                    else:
                        conn.login_failed()
                case SaslResponse(data=data):
                    if data == b"\0bob\0secret":
                        conn.login_succeeded("bob", SIZES, UIDS)
                    else:
                        conn.login_failed()
                case SaslAborted(text=text):
                    if (c := conn.login_failed(None, text)) is not None:
                        self.closed = c.reason
                case Closing(reason=reason):
                    self.closed = reason
                case ConnectionClosed():
                    self.closed = "eof"


def chunkings(data: bytes) -> Iterator[list[bytes]]:
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    mid = len(data) // 2
    yield [data[:mid], data[mid:]]


def converse(
    data: bytes, make: Callable[[], ServerConnection] | None = None, login: bool = False
) -> bytes:
    """Feed ``data`` every way; assert the replies agree; return them (greeting cut)."""
    outputs = []
    for chunks in chunkings(data):
        conn = make() if make else ServerConnection()
        if login:
            conn.receive_data(b"USER bob\r\nPASS secret\r\n")
            Driver(conn).run()
            conn.data_to_send()
        d = Driver(conn)
        for chunk in chunks:
            conn.receive_data(chunk)
            d.run()
        outputs.append(d.take())
    assert outputs[0] == outputs[1] == outputs[2], outputs
    return outputs[0]


# ---- grammar -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"USER bob", User("bob")),
        (b"user bob", User("bob")),
        (b"PASS with spaces  inside ", Pass("with spaces  inside ")),
        (b"LIST", List(None)),
        (b"LIST 2", List(2)),
        (b"LIST 2 ", List(2)),
        (b"uidl 3", Uidl(3)),
        (b"DELE 1", Dele(1)),
        (b"TOP 1 0", Top(1, 0)),
        (b"TOP 1 99999999999999", Top(1, 1 << 32)),
    ],
)
def test_grammar_accepts(line: bytes, expected: object) -> None:
    assert parse_command(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        b"LIST -1",
        b"LIST abc",
        b"LIST 1 2",
        b"LIST +1",
        b"RETR",
        b"RETR 1 2",
        b"DELE x",
        b"TOP 1",
        b"TOP 1 -1",
        b"TOP a 1",
        b"USER",
        b"USER a b",
        b"PASS",
        b"STAT 1",
        b"NOOP x",
        b"LIST  1",
        b"APOP bob",
        b"APOP bob short",
        b"QUIT now",
    ],
)
def test_grammar_rejects_arguments(line: bytes) -> None:
    result = parse_command(line)
    assert isinstance(result, ParseError)
    assert result.text is Text.BAD_ARGUMENTS


@pytest.mark.parametrize("line", [b"", b"XY", b"HELLO", b"FOO1", b"R\xe9TR 1", b" STAT"])
def test_grammar_unknown(line: bytes) -> None:
    assert parse_command(line) == ParseError(Text.UNKNOWN_COMMAND)


@pytest.mark.parametrize("line", [b"STAT\r", b"US\rER x", b"USER a\0b", b"NOOP\0"])
def test_grammar_rejects_cr_and_nul(line: bytes) -> None:
    assert parse_command(line) == ParseError(Text.BAD_CHARACTERS)


def test_user_rejects_bad_utf8_and_controls() -> None:
    assert isinstance(parse_command(b"USER \xff"), ParseError)
    assert isinstance(parse_command(b"USER a\x01"), ParseError)
    assert parse_command("USER jösé".encode()) == User("jösé")


# ---- states ------------------------------------------------------------------------


def test_greeting_plain_and_apop() -> None:
    c = ServerConnection()
    c.greeting()
    assert c.data_to_send() == b"+OK POP3 server ready\r\n"
    c = ServerConnection(apop_timestamp=b"<1.2@host>")
    c.greeting("hi")
    assert c.data_to_send() == b"+OK hi <1.2@host>\r\n"


@pytest.mark.parametrize(
    "cmd", [b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"TOP 1 1", b"UIDL"]
)
def test_transaction_commands_refused_in_authorization(cmd: bytes) -> None:
    assert converse(cmd + b"\r\n") == b"-ERR Command not valid in this state\r\n"


@pytest.mark.parametrize(
    "cmd", [b"USER bob", b"PASS x", b"APOP bob " + b"a" * 32, b"STLS", b"AUTH PLAIN"]
)
def test_authorization_commands_refused_in_transaction(cmd: bytes) -> None:
    out = converse(cmd + b"\r\n", login=True)
    assert out == b"-ERR Command not valid in this state\r\n"


def test_login_and_stat_list_uidl() -> None:
    out = converse(b"USER bob\r\nPASS secret\r\nSTAT\r\nLIST\r\nLIST 2\r\nUIDL\r\nUIDL 3\r\n")
    assert out == (
        b"+OK\r\n"
        b"+OK maildrop has 3 messages (620 octets)\r\n"
        b"+OK 3 620\r\n"
        b"+OK 3 messages (620 octets)\r\n1 120\r\n2 200\r\n3 300\r\n.\r\n"
        b"+OK 2 200\r\n"
        b"+OK\r\n1 uid-one\r\n2 uid-two\r\n3 u3\r\n.\r\n"
        b"+OK 3 u3\r\n"
    )


def test_bare_lf_line_ends_are_accepted() -> None:
    assert converse(b"USER bob\nPASS secret\nSTAT\n").endswith(b"+OK 3 620\r\n")


@pytest.mark.parametrize("arg", [b"0", b"4", b"99999999999", b"18446744073709551616"])
def test_out_of_range_numbers(arg: bytes) -> None:
    for cmd in (b"LIST ", b"RETR ", b"DELE ", b"UIDL "):
        assert converse(cmd + arg + b"\r\n", login=True) == b"-ERR No such message\r\n"
    assert converse(b"TOP " + arg + b" 1\r\n", login=True) == b"-ERR No such message\r\n"


@pytest.mark.parametrize("arg", [b"-1", b"abc", b"1.0", b"1 2", b"\xd9\xa3"])
def test_malformed_numbers(arg: bytes) -> None:
    for cmd in (b"LIST ", b"RETR ", b"DELE ", b"UIDL "):
        assert converse(cmd + arg + b"\r\n", login=True) == b"-ERR Invalid arguments\r\n"


def test_deleted_messages_are_invisible_and_rset_restores() -> None:
    out = converse(
        b"DELE 2\r\nDELE 2\r\nSTAT\r\nLIST\r\nLIST 2\r\nUIDL\r\nUIDL 2\r\nRETR 2\r\nTOP 2 0\r\n"
        b"RSET\r\nSTAT\r\nLIST 2\r\n",
        login=True,
    )
    assert out == (
        b"+OK Marked to be deleted\r\n"
        b"-ERR Message already deleted\r\n"
        b"+OK 2 420\r\n"
        b"+OK 2 messages (420 octets)\r\n1 120\r\n3 300\r\n.\r\n"
        b"-ERR No such message\r\n"
        b"+OK\r\n1 uid-one\r\n3 u3\r\n.\r\n"
        b"-ERR No such message\r\n"
        b"-ERR No such message\r\n"
        b"-ERR No such message\r\n"
        b"+OK maildrop has 3 messages (620 octets)\r\n"
        b"+OK 3 620\r\n"
        b"+OK 2 200\r\n"
    )


def test_retr_and_top_events() -> None:
    conn = ServerConnection()
    conn.receive_data(b"USER bob\r\nPASS secret\r\nRETR 2\r\nTOP 3 5\r\nNOOP\r\n")
    d = Driver(conn)
    d.run()
    assert [e for e in d.events if isinstance(e, Retrieve)] == [
        Retrieve(1, 200, None),
        Retrieve(2, 300, 5),
    ]
    out = conn.data_to_send()
    assert out.endswith(b"+OK 200 octets\r\n" + BODY + b"+OK\r\n" + BODY + b"+OK\r\n")


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(1, 40)), st.integers(0, 40))
def test_quit_updates_exactly_the_marked(marked: set[int], rset_after: int) -> None:
    """Update.deleted is every message marked since the last RSET, in order
    (adjacent ones and the first and last message included)."""
    conn = logged_in([f"u{n}" for n in range(40)])
    order = sorted(marked, key=lambda n: (n * 7919) % 41)  # not in number order
    kept: set[int] = set()
    for k, n in enumerate(order):
        if k == rset_after:
            conn.receive_data(b"RSET\r\n")
            kept = set()
        conn.receive_data(b"DELE %d\r\n" % n)
        kept.add(n)
    conn.receive_data(b"QUIT\r\n")
    while True:
        ev = conn.next_event()
        if isinstance(ev, Update):
            break
        assert ev is NEED_DATA or ev is SEND_DATA, ev
        conn.data_to_send()
    assert ev.deleted == tuple(n - 1 for n in sorted(kept))


def test_quit_in_transaction_updates_only_marked() -> None:
    conn = ServerConnection()
    conn.receive_data(b"USER bob\r\nPASS secret\r\nDELE 3\r\nDELE 1\r\nQUIT\r\nNOOP\r\n")
    d = Driver(conn)
    d.run()
    assert Update((0, 2)) in d.events
    assert conn.state is State.CLOSED
    assert conn.data_to_send().endswith(b"+OK Logging out\r\n")


def test_quit_in_authorization_closes_without_update() -> None:
    conn = ServerConnection()
    conn.receive_data(b"QUIT\r\nUSER x\r\n")
    d = Driver(conn)
    d.run()
    assert d.closed == "quit"
    assert not any(isinstance(e, Update) for e in d.events)
    assert conn.data_to_send() == b"+OK Logging out\r\n"


def test_update_failure_reports_sys_temp() -> None:
    conn = ServerConnection()
    conn.receive_data(b"USER bob\r\nPASS secret\r\nDELE 1\r\nQUIT\r\n")
    d = Driver(conn)
    while not isinstance(ev := conn.next_event(), Update):
        d.events.append(ev)
        if isinstance(ev, PasswordLogin):
            conn.login_succeeded("bob", SIZES, UIDS)
    conn.data_to_send()
    conn.update_finished(True)
    assert conn.data_to_send() == b"-ERR [SYS/TEMP] Some deleted messages not removed\r\n"


def test_eof_is_connection_closed() -> None:
    conn = ServerConnection()
    conn.receive_data(b"USER bob\r\nPASS secret\r\nDELE 1\r\n")
    conn.receive_data(b"")
    d = Driver(conn)
    d.run()
    assert d.closed == "eof"
    assert not any(isinstance(e, Update) for e in d.events)


def test_pass_without_user_and_wrong_password() -> None:
    assert converse(b"PASS x\r\n") == b"-ERR No username given\r\n"
    out = converse(b"USER bob\r\nPASS wrong\r\nPASS secret\r\n")
    assert out == b"+OK\r\n-ERR [AUTH] Authentication failed\r\n-ERR No username given\r\n"


def test_apop_only_with_timestamp() -> None:
    assert converse(b"APOP bob " + b"0" * 32 + b"\r\n") == b"-ERR APOP not available\r\n"
    conn = ServerConnection(apop_timestamp=b"<1.2@h>")
    conn.receive_data(b"APOP bob " + b"a" * 32 + b"\r\n")
    assert conn.next_event() == ApopLogin("bob", b"a" * 32, b"<1.2@h>")


# ---- limits ------------------------------------------------------------------------


def test_command_line_limits() -> None:
    ok = b"USER " + b"a" * 248 + b"\r\n"  # 255 octets with CRLF
    assert len(ok) == 255
    assert converse(ok) == b"+OK\r\n"
    long = b"USER " + b"a" * 249 + b"\r\n"
    assert converse(long + b"NOOP\r\n") == (
        b"-ERR Line too long\r\n-ERR Command not valid in this state\r\n"
    )
    huge = b"X" * 100_000 + b"\r\nCAPA\r\n"
    assert converse(huge).startswith(b"-ERR Line too long\r\n+OK Capability list follows\r\n")


def test_too_many_bad_commands_disconnects() -> None:
    cfg = ProtocolConfig(max_bad_commands=3)
    conn = ServerConnection(cfg)
    conn.receive_data(b"FOO\r\nBAR\r\nBAZ\r\nCAPA\r\n")
    d = Driver(conn)
    d.run()
    assert d.closed == "too many invalid commands"
    assert conn.data_to_send() == (
        b"-ERR Unknown command\r\n-ERR Unknown command\r\n"
        b"-ERR Too many invalid commands, closing connection\r\n"
    )


def test_too_many_auth_failures_disconnects() -> None:
    conn = ServerConnection(ProtocolConfig(max_auth_failures=2))
    conn.receive_data(b"USER a\r\nPASS b\r\nUSER a\r\nPASS c\r\nUSER a\r\n")
    d = Driver(conn)
    d.run()
    assert d.closed == "too many authentication failures"
    assert conn.data_to_send().count(b"-ERR [AUTH]") == 2


def test_response_codes_are_checked() -> None:
    conn = ServerConnection()
    conn.receive_data(b"USER a\r\nPASS b\r\n")
    assert isinstance(conn.next_event(), PasswordLogin)
    with pytest.raises(LocalProtocolError):
        conn.login_failed("NOT-A-CODE")


def test_caller_must_complete_events() -> None:
    conn = ServerConnection()
    conn.receive_data(b"USER a\r\nPASS b\r\n")
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.next_event()


# ---- CAPA, plaintext policy, STLS, SASL -------------------------------------------


def test_capa_by_state_and_policy() -> None:
    cfg = ProtocolConfig(stls_available=True, login_delay=30)
    mechs = ("PLAIN", "CRAM-MD5")
    out = converse(b"CAPA\r\n", lambda: server(cfg, mechs))
    assert out == (
        b"+OK Capability list follows\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\n"
        b"AUTH-RESP-CODE\r\nPIPELINING\r\nUSER\r\nSASL PLAIN CRAM-MD5\r\nSTLS\r\n"
        b"EXPIRE NEVER\r\nLOGIN-DELAY 30\r\nUTF8 USER\r\nLANG\r\nIMPLEMENTATION pypop\r\n.\r\n"
    )
    out = converse(b"CAPA\r\n", lambda: server(cfg, mechs, plaintext_allowed=False))
    assert b"\r\nUTF8\r\n" in out  # no USER/PASS, no APOP: no UTF-8 names to take
    assert b"USER\r\n" not in out
    assert b"SASL CRAM-MD5\r\n" in out
    out = converse(b"CAPA\r\n", lambda: server(cfg, mechs), login=True)
    assert b"STLS" not in out
    assert b"USER\r\n" in out  # RFC 2449 §5: AUTHORIZATION capabilities in both states
    hidden = ProtocolConfig(implementation=None, expire=None)
    out = converse(b"CAPA\r\n", lambda: ServerConnection(hidden))
    assert b"IMPLEMENTATION" not in out
    assert b"EXPIRE" not in out


def test_plaintext_refused_without_tls() -> None:
    out = converse(
        b"USER bob\r\nPASS secret\r\nAUTH PLAIN\r\nAUTH\r\n",
        lambda: server(None, ("PLAIN",), plaintext_allowed=False),
    )
    refused = (
        b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections\r\n"
    )
    assert out == refused * 3 + b"+OK\r\n.\r\n"


def test_stls_discards_pipelined_plaintext() -> None:
    cfg = ProtocolConfig(stls_available=True)
    conn = ServerConnection(cfg)
    conn.receive_data(b"STLS\r\nCAPA\r\nUSER injected\r\nPAS")
    d = Driver(conn)
    d.run()
    assert d.events == [StartTLS()]
    assert conn.data_to_send() == b"+OK Begin TLS negotiation\r\n"
    assert conn.tls_active
    conn.receive_data(b"CAPA\r\n")
    d.run()
    out = conn.data_to_send()
    assert out.startswith(b"+OK Capability list follows\r\n")
    assert b"STLS" not in out
    assert converse(b"STLS\r\n") == b"-ERR STLS not available\r\n"
    out = converse(b"STLS\r\n", lambda: ServerConnection(cfg, tls_active=True))
    assert out == b"-ERR TLS already active\r\n"


def test_sasl_exchange() -> None:
    make = lambda: server(None, ("PLAIN",))  # noqa: E731
    good = base64.b64encode(b"\0bob\0secret")
    assert converse(b"AUTH plain " + good + b"\r\n", make) == (
        b"+OK maildrop has 3 messages (620 octets)\r\n"
    )
    assert converse(b"AUTH PLAIN\r\n" + good + b"\r\nSTAT\r\n", make) == (
        b"+ \r\n+OK maildrop has 3 messages (620 octets)\r\n+OK 3 620\r\n"
    )
    assert converse(b"AUTH PLAIN\r\n*\r\nNOOP\r\n", make) == (
        b"+ \r\n-ERR Authentication cancelled\r\n-ERR Command not valid in this state\r\n"
    )
    assert converse(b"AUTH PLAIN\r\n!!!\r\n", make) == b"+ \r\n-ERR Invalid base64 data\r\n"
    assert converse(b"AUTH PLAIN !!!\r\n", make) == b"-ERR Invalid base64 data\r\n"
    assert converse(b"AUTH PLAIN =\r\n", make) == b"-ERR [AUTH] Authentication failed\r\n"
    assert converse(b"AUTH FOO\r\n", make) == b"-ERR Unsupported authentication mechanism\r\n"
    assert converse(b"AUTH\r\n", make) == b"+OK\r\nPLAIN\r\n.\r\n"


def test_sasl_continuation_may_exceed_command_limit() -> None:
    conn = server(None, ("XOAUTH2",))
    conn.receive_data(b"AUTH XOAUTH2\r\n")
    assert conn.next_event() == SaslStart("XOAUTH2", None)
    conn.sasl_challenge(b"")
    token = base64.b64encode(b"x" * 3000)
    conn.receive_data(token + b"\r\n")
    ev = conn.next_event()
    assert ev == SaslResponse(b"x" * 3000)
    conn.login_failed()
    conn.receive_data(b"USER " + b"a" * 300 + b"\r\n")  # back to the 255 limit
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send().endswith(b"-ERR Line too long\r\n")


def test_protocol_imports_no_io() -> None:
    code = (
        "import sys, pypop.protocol; "
        "bad = {'trio', 'socket', 'ssl', 'asyncio'} & set(sys.modules); "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- backpressure and bounded work (issue 15 item 1) ----------------------------------


def logged_in(uids: list[str], cfg: ProtocolConfig | None = None) -> ServerConnection:
    conn = ServerConnection(cfg)
    conn.receive_data(b"USER bob\r\nPASS secret\r\n")
    ev = conn.next_event()
    assert isinstance(ev, PasswordLogin)
    conn.login_succeeded("bob", [100] * len(uids), uids)
    conn.data_to_send()
    return conn


def test_pipelined_flood_is_answered_a_bounded_slice_at_a_time() -> None:
    """UIDL x 20000 on 5000 messages in one write: the engine never queues more than
    the output bound plus one listing slice, however long the peer does not read."""
    uids = [f"uid-{n:08d}" for n in range(5000)]
    conn = logged_in(uids)
    conn.receive_data(b"UIDL\n" * 20000)
    bound = ProtocolConfig().output_limit + 512 * 40
    listing = b"+OK\r\n" + "".join(f"{n + 1} {u}\r\n" for n, u in enumerate(uids)).encode()
    listing += b".\r\n"
    out = bytearray()
    while len(out) < 3 * len(listing):  # drained as a slow reader would
        assert conn.next_event() is SEND_DATA
        assert conn.pending_output <= bound
        out += conn.data_to_send()
    assert out[: 3 * len(listing)] == listing * 3


def test_many_small_commands_are_answered_in_slices() -> None:
    """A 64 KiB read of one-line commands is not answered in one synchronous loop."""
    conn = ServerConnection()
    conn.receive_data(b"USER x\n" * 9000)
    answered = 0
    slices = 0
    while (ev := conn.next_event()) is SEND_DATA:
        slices += 1
        answered += conn.data_to_send().count(b"+OK\r\n")
        assert answered <= slices * 128
    assert ev is NEED_DATA
    assert answered + conn.data_to_send().count(b"+OK\r\n") == 9000
    assert slices >= 9000 // 128 - 1


def test_input_is_framed_lazily() -> None:
    """One read is not turned into tens of thousands of queued line objects."""
    conn = ServerConnection()
    conn.receive_data(b"CAPA\n" * 13000)
    assert conn.next_event() is SEND_DATA
    assert len(conn._lines) <= 4096 // 5


# ---- SASL lines and the framer (issue 15 item 9) --------------------------------------


@pytest.mark.parametrize("chunk", [65536, 4096, 1_000_000 + 20])
def test_overlong_sasl_line_gets_one_err(chunk: int) -> None:
    """AUTH PLAIN, a 1 MiB line, CAPA: one -ERR for the line (the framer swap back to
    255 octets waits for its LF), then the CAPA reply; no reply is off by one."""
    conn = server(None, ("PLAIN",))
    conn.receive_data(b"AUTH PLAIN\r\n")
    assert conn.next_event() == SaslStart("PLAIN", None)
    conn.sasl_challenge(b"")
    d = Driver(conn)
    data = b"A" * 1_000_000 + b"\r\nCAPA\r\n"
    for i in range(0, len(data), chunk):
        conn.receive_data(data[i : i + chunk])
        d.run()
    out = d.take()
    assert out.startswith(b"+ \r\n-ERR Line too long\r\n+OK Capability list follows\r\n")
    assert out.count(b"-ERR") == 1
    assert d.events == [SaslAborted(Text.LINE_TOO_LONG)]
    assert conn.auth_failures == 1  # an aborted exchange counts


def test_sasl_aborts_count_toward_max_auth_failures() -> None:
    make = lambda: server(ProtocolConfig(max_auth_failures=3), ("PLAIN",))  # noqa: E731
    out = converse(b"AUTH PLAIN\r\n*\r\nAUTH PLAIN\r\n!!\r\nAUTH PLAIN\r\n*\r\nCAPA\r\n", make)
    assert out == (
        b"+ \r\n-ERR Authentication cancelled\r\n+ \r\n-ERR Invalid base64 data\r\n"
        b"+ \r\n-ERR Authentication cancelled\r\n"
    )


def test_sasl_challenge_is_a_bounded_line() -> None:
    conn = server(None, ("PLAIN",))
    conn.receive_data(b"AUTH PLAIN\r\n")
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.sasl_challenge(b"x" * 400)  # base64: 536 octets with "+ " and CRLF
    conn.sasl_challenge(b"x" * 381)  # 512 octets: the largest allowed


# ---- counters (issue 15 item 13) ------------------------------------------------------


def test_bad_commands_are_counted_consecutively() -> None:
    """Dovecot counts bad commands in a row; a valid one resets the count."""
    cfg = ProtocolConfig(max_bad_commands=3)
    probing = b"XTND\r\nXSENDER\r\nCAPA\r\n" * 10
    out = converse(probing + b"QUIT\r\n", lambda: ServerConnection(cfg))
    assert out.count(b"-ERR Unknown command\r\n") == 20
    assert out.endswith(b"+OK Logging out\r\n")
    out = converse(b"X\r\nY\r\nZ\r\nCAPA\r\n", lambda: ServerConnection(cfg))
    assert out.endswith(b"-ERR Too many invalid commands, closing connection\r\n")


@pytest.mark.parametrize(
    ("code", "text"),
    [
        ("IN-USE", Text.IN_USE),
        ("SYS/TEMP", Text.MAILBOX_TEMPORARY),
        ("SYS/TEMP", Text.AUTH_TEMPORARY),
        ("SYS/PERM", Text.MAILBOX_PERMANENT),
        ("LOGIN-DELAY", Text.LOGIN_DELAY),
    ],
)
def test_only_credential_failures_count(code: str, text: Text) -> None:
    conn = ServerConnection(ProtocolConfig(max_auth_failures=2))
    for _ in range(5):
        conn.receive_data(b"USER a\r\nPASS b\r\n")
        assert isinstance(conn.next_event(), PasswordLogin)
        assert conn.login_failed(code, text) is None
    assert conn.auth_failures == 0
    conn.receive_data(b"USER a\r\nPASS b\r\n")
    conn.next_event()
    assert conn.login_failed() is None
    conn.receive_data(b"USER a\r\nPASS b\r\n")
    conn.next_event()
    assert conn.login_failed() == Closing("too many authentication failures")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"LIST 000000000000000000001", List(1)),
        (b"TOP 8 00000000000000000000000000003", Top(8, 3)),
        (b"TOP 1 999999999999999999999", Top(1, 1 << 32)),
        (b"DELE 0000000000000000000000000000000000000002", Dele(2)),
        (b"UIDL 99999999999999999999999999", Uidl(99999999999999999999999999)),
    ],
)
def test_numbers_are_parsed_by_value_not_length(line: bytes, expected: object) -> None:
    """RFC 1939 §7: TOP n beyond the body sends the whole message; zero-padding is
    still the number."""
    assert parse_command(line) == expected


def test_padded_numbers_in_a_session() -> None:
    out = converse(
        b"LIST 000000000000000000001\r\nUIDL 00000000000000000000003\r\n"
        b"LIST 99999999999999999999999\r\n",
        login=True,
    )
    assert out == b"+OK 1 120\r\n+OK 3 u3\r\n-ERR No such message\r\n"


# ---- RETR and TOP answered from a wire source (serve_from) ---------------------------


class Source:
    """A WireCache stand-in: the wire form of some messages, and what was asked."""

    def __init__(self, wire: dict[tuple[int, int | None], bytes]) -> None:
        self.wire = wire
        self.asked: list[tuple[int, int | None]] = []
        self.fail: Exception | None = None

    def __call__(self, index: int, top_lines: int | None) -> bytes | None:
        self.asked.append((index, top_lines))
        if self.fail is not None:
            raise self.fail
        return self.wire.get((index, top_lines))


def test_wire_source_answers_retr_and_top_without_an_event() -> None:
    conn = logged_in(UIDS[:3])
    src = Source({(0, None): BODY, (1, 0): b"Subject: y\r\n\r\n.\r\n"})
    conn.serve_from(src, refuse_8bit=True)
    conn.receive_data(b"RETR 1\r\nTOP 2 0\r\nNOOP\r\nRETR 3\r\n")
    ev = conn.next_event()
    # Message 3 is not in the source: the event, after the three quick replies.
    assert ev == Retrieve(2, 100, None)
    assert conn.data_to_send() == (
        b"+OK 100 octets\r\n" + BODY + b"+OK\r\nSubject: y\r\n\r\n.\r\n" + b"+OK\r\n"
    )
    assert src.asked == [(0, None), (1, 0), (2, None)]
    conn.message_header()
    conn.send_raw(BODY)
    conn.message_done()
    assert conn.next_event() is NEED_DATA
    # RETRs count on both paths, TOP does not; only the first was quick.
    assert (conn.retrieved, conn.retrieved_octets, conn.retrieved_indexes) == (2, 200, {0, 2})
    assert conn.quick_retrievals == 1


def test_wire_source_failure_or_8bit_takes_the_event_path() -> None:
    conn = logged_in(UIDS[:3])
    eight = b"Subject: \xc3\xa9\r\n\r\n.\r\n"
    src = Source({(0, None): eight, (1, None): BODY})
    conn.serve_from(src, refuse_8bit=True)
    conn.receive_data(b"RETR 1\r\n")
    assert conn.next_event() == Retrieve(0, 100, None)  # 8-bit before UTF8: the event
    conn.reply_err(Text.UTF8_NEEDED, "UTF8")
    src.fail = RuntimeError("backend bug")
    conn.receive_data(b"RETR 2\r\n")
    assert conn.next_event() == Retrieve(1, 100, None)  # the caller reports the failure
    conn.reply_err(Text.MESSAGE_TEMPORARY, "SYS/TEMP")
    assert conn.next_event() is NEED_DATA
    assert b"RuntimeError" not in conn.data_to_send()
    assert conn.retrieved == conn.quick_retrievals == 0
    # Not refusing (the server's utf8_headers policy): 8-bit mail is answered at once.
    src.fail = None
    conn.serve_from(src, refuse_8bit=False)
    conn.receive_data(b"RETR 1\r\n")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"+OK 100 octets\r\n" + eight


def test_wire_source_respects_deleted_messages_and_numbers() -> None:
    conn = logged_in(UIDS[:3])
    src = Source({(i, None): BODY for i in range(3)})
    conn.serve_from(src, refuse_8bit=False)
    conn.receive_data(b"DELE 1\r\nRETR 1\r\nRETR 4\r\nRETR 0\r\nRETR 2\r\n")
    assert conn.next_event() is NEED_DATA
    out = conn.data_to_send()
    assert out.count(b"-ERR") == 3
    assert out.endswith(b"+OK 100 octets\r\n" + BODY)
    assert src.asked == [(1, None)]


def test_quick_dele_speaks_the_session_s_texts() -> None:
    """A DELE answered with the RETRs (pypop.wire.answer_fetches) says what the general
    path would: an operator's text, and after LANG the language's."""
    conn = ServerConnection(texts={Text.MARKED: "Weg damit"})
    conn.receive_data(b"USER bob\r\nPASS secret\r\n")
    assert isinstance(conn.next_event(), PasswordLogin)
    conn.login_succeeded("bob", [100] * 3, UIDS)
    conn.serve_from(Source({(0, None): BODY}), refuse_8bit=False)
    conn.data_to_send()
    conn.receive_data(b"RETR 1\r\nDELE 1\r\nLANG de\r\nDELE 2\r\nDELE 2\r\nSTAT\r\n")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == (
        b"+OK 100 octets\r\n"
        + BODY
        + b"+OK Weg damit\r\n"
        + b"+OK de Sprache geaendert\r\n"
        + b"+OK Zum Loeschen markiert\r\n"
        + b"-ERR Nachricht ist bereits geloescht\r\n"
        + b"+OK 1 100\r\n"
    )
