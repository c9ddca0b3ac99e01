"""The sans-I/O ClientConnection: framing, strictness, pipelining, SASL, STLS; and
hypothesis: any bytes a server sends give events or ProtocolError, nothing else."""

from __future__ import annotations

import base64
import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pypop.errors import ProtocolError
from pypop.protocol.client import Challenge, ClientConnection, Greeting, Reply
from pypop.protocol.commands import (
    Auth,
    Capa,
    Dele,
    List,
    Noop,
    Quit,
    Retr,
    Stat,
    Stls,
    Top,
    Uidl,
    User,
)
from pypop.protocol.events import NEED_DATA, ConnectionClosed
from pypop.protocol.replies import (
    ReplyLineError,
    encode_multiline,
    encode_status,
    parse_capabilities,
    parse_listing,
)
from pypop.protocol.server import ServerConnection

from .strategies import octets


def events(conn: ClientConnection) -> list[object]:
    out: list[object] = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            break
    return out


def greeted(**kw: object) -> ClientConnection:
    conn = ClientConnection(**kw)  # type: ignore[arg-type]
    conn.receive_data(b"+OK POP3 ready <1.2@host>\r\n")
    [ev] = events(conn)
    assert isinstance(ev, Greeting)
    assert ev.timestamp == b"<1.2@host>"
    return conn


def test_greeting_then_one_command_at_a_time_without_pipelining() -> None:
    conn = ClientConnection()
    conn.send(Stat())
    assert conn.data_to_send() == b""  # waits for the greeting
    conn.receive_data(b"+OK hi\r\n")
    [greeting] = events(conn)
    assert isinstance(greeting, Greeting)
    assert greeting.timestamp is None
    conn.send(Noop())
    assert conn.data_to_send() == b"STAT\r\n"
    conn.receive_data(b"+OK 2 320\r\n")
    [reply] = events(conn)
    assert isinstance(reply, Reply)
    assert reply.status.text == "2 320"
    assert conn.data_to_send() == b"NOOP\r\n"


def test_pipelining_sends_up_to_the_window_and_barriers_go_alone() -> None:
    conn = greeted(pipelining=True, window=3)
    for n in range(1, 6):
        conn.send(Retr(n))
    assert conn.data_to_send() == b"RETR 1\r\nRETR 2\r\nRETR 3\r\n"
    conn.receive_data(b"+OK\r\nab\r\n..dot\r\n.\r\n")
    [reply] = events(conn)
    assert isinstance(reply, Reply)
    assert reply.body == b"ab\r\n.dot\r\n"
    assert conn.data_to_send() == b"RETR 4\r\n"
    conn2 = greeted(pipelining=True)
    conn2.send(Stat())
    conn2.send(Stls())
    conn2.send(Noop())
    assert conn2.data_to_send() == b"STAT\r\n"  # STLS waits for STAT, NOOP for STLS
    conn2.receive_data(b"+OK 0 0\r\n")
    events(conn2)
    assert conn2.data_to_send() == b"STLS\r\n"


def test_multiline_replies_and_their_parsers_round_trip_with_the_server() -> None:
    conn = greeted(pipelining=True)
    server = ServerConnection()
    conn.send(Capa())
    conn.send(List(None))
    conn.send(Uidl(None))
    conn.send(Top(1, 0))
    conn.send(Dele(9))
    body = encode_multiline(server.capabilities())
    conn.receive_data(
        encode_status(True, "Capability list follows")
        + body
        + b"+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n"
        + b"+OK\r\n1 abc\r\n2 d.e\r\n.\r\n"
        + b"+OK\r\nSubject: x\r\n\r\n.\r\n"
        + b"-ERR [SYS/TEMP] No such message\r\n"
    )
    capa, listing, uidl, top, dele = events(conn)
    assert isinstance(capa, Reply)
    assert capa.body is not None
    assert parse_capabilities(capa.body)["PIPELINING"] == []
    assert isinstance(listing, Reply)
    assert listing.body is not None
    assert parse_listing(listing.body, uid=False) == [(1, 120), (2, 200)]
    assert isinstance(uidl, Reply)
    assert uidl.body is not None
    assert parse_listing(uidl.body, uid=True) == [(1, "abc"), (2, "d.e")]
    assert isinstance(top, Reply)
    assert top.body == b"Subject: x\r\n\r\n"
    assert isinstance(dele, Reply)
    assert not dele.status.ok
    assert dele.status.code == "SYS/TEMP"
    assert dele.body is None


def test_bytes_fed_one_at_a_time_give_the_same_events() -> None:
    wire = b"+OK hi\r\n+OK 3 octets\r\nab\r\n..c\r\n.\r\n+OK bye\r\n"
    conn = ClientConnection(pipelining=True)
    conn.send(Retr(1))
    conn.send(Quit())
    got = []
    for i in range(len(wire)):
        conn.receive_data(wire[i : i + 1])
        got.extend(events(conn))
    assert [type(e).__name__ for e in got] == ["Greeting", "Reply", "Reply"]
    assert isinstance(got[1], Reply)
    assert got[1].body == b"ab\r\n.c\r\n"


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"+OK " + b"x" * 510 + b"\r\n", "over 512"),
        (b"+OK " + b"x" * 600, "over 512"),
        (b"+OK hi\n", "bare LF"),
        (b"+OK h\ri\r\n", "bare CR"),
        (b"+OK hi\rmore", "bare CR"),
        (b"+OKhi\r\n", "followed by a space"),
        (b"OK hi\r\n", "does not start with"),
    ],
)
def test_strict_status_lines(wire: bytes, message: str) -> None:
    conn = ClientConnection()
    conn.receive_data(wire)
    with pytest.raises(ProtocolError, match=message):
        events(conn)
    with pytest.raises(ProtocolError):  # the connection stays dead
        conn.next_event()


def test_status_line_of_exactly_512_octets_is_fine() -> None:
    conn = ClientConnection()
    conn.receive_data(b"+OK " + b"x" * 506 + b"\r\n")
    [ev] = events(conn)
    assert isinstance(ev, Greeting)


def test_body_without_the_dot_line_is_an_error() -> None:
    conn = greeted()
    conn.send(Retr(1))
    conn.receive_data(b"+OK\r\nline\r\n")
    assert events(conn) == []
    conn.receive_data(b"")
    with pytest.raises(ProtocolError, match=r"without the '\.' line"):
        events(conn)


def test_bare_lf_in_a_listing_is_an_error_and_bare_lf_in_a_message_is_data() -> None:
    conn = greeted(pipelining=True)
    conn.send(Retr(1))
    conn.send(List(None))
    conn.receive_data(b"+OK\r\na\nb\r\n.\r\n+OK\r\n1 2\n3 4\r\n.\r\n")
    retr, listing = events(conn)
    assert isinstance(retr, Reply)
    assert retr.body == b"a\nb\r\n"
    assert isinstance(listing, Reply)
    assert listing.body is not None
    with pytest.raises(ReplyLineError):
        parse_listing(listing.body, uid=False)


def test_max_body() -> None:
    conn = greeted(max_body=10)
    conn.send(Retr(1))
    conn.receive_data(b"+OK\r\n" + b"x" * 20 + b"\r\n.\r\n")
    with pytest.raises(ProtocolError, match="over 10 octets"):
        events(conn)


def test_sasl_continuations() -> None:
    conn = greeted(pipelining=True)
    conn.send(Auth("CRAM-MD5", None))
    conn.send(Stat())
    assert conn.data_to_send() == b"AUTH CRAM-MD5\r\n"
    conn.receive_data(b"+ " + base64.b64encode(b"<1.2@h>") + b"\r\n")
    [ch] = events(conn)
    assert isinstance(ch, Challenge)
    assert ch.data == b"<1.2@h>"
    assert conn.data_to_send() == b""  # STAT waits behind AUTH
    conn.send_sasl(b"alice 0123")
    assert conn.data_to_send() == base64.b64encode(b"alice 0123") + b"\r\n"
    conn.receive_data(b"+\r\n")
    [ch2] = events(conn)
    assert isinstance(ch2, Challenge)
    assert ch2.data == b""
    conn.send_sasl(None)
    assert conn.data_to_send() == b"*\r\n"
    conn.receive_data(b"-ERR [AUTH] Authentication cancelled\r\n")
    [reply] = events(conn)
    assert isinstance(reply, Reply)
    assert reply.status.code == "AUTH"
    assert conn.data_to_send() == b"STAT\r\n"


def test_bad_base64_challenge() -> None:
    conn = greeted()
    conn.send(Auth("PLAIN", None))
    conn.receive_data(b"+ !!!\r\n")
    with pytest.raises(ProtocolError, match="base64"):
        events(conn)


def test_stls_response_injection_is_refused() -> None:
    conn = greeted()
    conn.send(Stls())
    conn.receive_data(b"+OK Begin TLS\r\n+OK injected\r\n")
    with pytest.raises(ProtocolError, match="injection"):
        events(conn)
    conn2 = greeted()
    conn2.send(Stls())
    conn2.receive_data(b"+OK Begin TLS\r\n")
    events(conn2)
    with pytest.raises(ProtocolError, match="injection"):
        conn2.receive_data(b"+OK late injected\r\n")


def test_data_nobody_asked_for_and_close() -> None:
    conn = greeted()
    conn.receive_data(b"+OK unsolicited\r\n")
    with pytest.raises(ProtocolError, match="answers no command"):
        events(conn)
    conn2 = greeted()
    conn2.receive_data(b"")
    assert events(conn2) == [ConnectionClosed()]


def test_encode_refuses_what_the_grammar_refuses() -> None:
    conn = greeted()
    with pytest.raises(ValueError, match="CR, LF"):
        conn.send(User("a\r\nDELE 1"))


# ---- hypothesis: any server bytes ------------------------------------------------------


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    chunks=st.lists(
        st.one_of(
            octets(max_size=80),
            st.sampled_from(
                [
                    b"+OK\r\n",
                    b"-ERR [IN-USE] x\r\n",
                    b".\r\n",
                    b"+ \r\n",
                    b"\r\n",
                    b"..\r\n",
                    b"+OK 1 2\r\n",
                    b"\n",
                    b"\r",
                    b"+ YWJj\r\n",
                ]
            ),
        ),
        max_size=30,
    ),
    commands=st.lists(
        st.sampled_from(
            [
                Retr(1),
                List(None),
                Uidl(None),
                Capa(),
                Stat(),
                Auth("PLAIN", None),
                Top(1, 0),
                Stls(),
                Noop(),
            ]
        ),
        max_size=8,
    ),
    pipelining=st.booleans(),
)
def test_any_server_bytes_give_events_or_protocol_error(
    chunks: list[bytes], commands: list[object], pipelining: bool
) -> None:
    conn = ClientConnection(pipelining=pipelining, window=3, max_body=4096)
    for cmd in commands:
        conn.send(cmd)  # type: ignore[arg-type]
    try:
        for chunk in [*chunks, b""]:
            conn.receive_data(chunk)
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA or isinstance(ev, ConnectionClosed):
                    break
                if isinstance(ev, Challenge):
                    conn.send_sasl(b"")
                if isinstance(ev, Reply) and ev.body is not None:
                    with contextlib.suppress(ReplyLineError):
                        parse_listing(ev.body, uid=True)
                conn.data_to_send()
    except ProtocolError:
        pass
