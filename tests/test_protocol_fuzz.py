"""Random input never breaks the engine (hypothesis): no exception, only well-formed
replies, never longer first lines than RFC 2449 allows, the session state stays sane."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pypop.protocol import PasswordLogin, ProtocolConfig, Retrieve, ServerConnection, State
from pypop.protocol.commands import Noop, Pass, Retr, Top, User

from .strategies import octets
from .test_protocol import Driver

EXAMPLES = 300 * int(os.environ.get("PYPOP_WIRE_EXAMPLES", "1"))

WORDS = [
    b"USER bob",
    b"PASS secret",
    b"PASS wrong",
    b"STAT",
    b"LIST",
    b"LIST 2",
    b"LIST 0",
    b"RETR 1",
    b"RETR 9",
    b"DELE 1",
    b"DELE 1",
    b"RSET",
    b"NOOP",
    b"TOP 1 0",
    b"TOP 2 x",
    b"UIDL",
    b"UIDL 3",
    b"CAPA",
    b"AUTH",
    b"AUTH PLAIN",
    b"AUTH PLAIN AGJvYgBzZWNyZXQ=",
    b"*",
    b"=",
    b"STLS",
    b"APOP bob " + b"0" * 32,
    b"QUIT",
    b"",
    b".",
    b"\x00",
    b"\xff\xfe",
    b"X" * 300,
    b"USER " + "jösé".encode(),
    b"list -1",
    b"retr 99999999999999999999",
]

# Lines built from POP3 words and junk, joined by every kind of line end.
lines = st.lists(
    st.one_of(
        st.sampled_from(WORDS),
        st.lists(st.integers(0, 255), max_size=40).map(bytes),
    ),
    max_size=30,
)
ends = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n"])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines, st.lists(ends, min_size=1), st.integers(1, 64))
def test_random_sessions_never_break_the_engine(
    parts: list[bytes], line_ends: list[bytes], chunk: int
) -> None:
    data = b"".join(p + line_ends[i % len(line_ends)] for i, p in enumerate(parts))
    cfg = ProtocolConfig(stls_available=True, max_bad_commands=50)
    conn = ServerConnection(cfg, apop_timestamp=b"<1.2@host>")
    conn.sasl_usable = ["PLAIN"]
    conn.greeting()
    driver = Driver(conn)
    out = bytearray(conn.data_to_send())
    for i in range(0, len(data), chunk):
        conn.receive_data(data[i : i + chunk])
        driver.run()
        out += driver.take()
        if driver.closed is not None:
            break
    text = bytes(out)
    assert text.endswith(b"\r\n")
    lines_out = text.split(b"\r\n")[:-1]
    for line in lines_out:
        assert b"\r" not in line
        assert b"\n" not in line
        assert b"Traceback" not in line
        assert b"Error" not in line
    # Every status line is upper-case +OK / -ERR (RFC 1939 §3), or a SASL "+ " challenge.
    statuses = [ln for ln in lines_out if ln.startswith((b"+OK", b"-ERR", b"+ "))]
    assert statuses[0] == b"+OK POP3 server ready <1.2@host>"
    assert all(len(ln) + 2 <= 512 for ln in statuses)
    assert conn.state in set(State)


# ---- parse_command's quick path agrees with the general parser -----------------------

_VERBS = [b"RETR", b"retr", b"Retr", b"DELE", b"dele", b"TOP", b"top", b"tOp", b"RETRX", b"TOPS"]
_PARTS = [
    b"",
    b" ",
    b"  ",
    b"1",
    b"0",
    b"007",
    b"12345678901234567890",
    b"-1",
    b"+1",
    b"x",
    b"1\r",
    b"\x00",
    b"\xd9\xa3",  # an Arabic-Indic digit (str.isdigit says yes; bytes must not)
    b"\xef\xbc\x91",  # a fullwidth digit
    b"\t1",
    b"1.0",
]


def test_quick_path_matches_the_general_parser_exhaustively() -> None:
    from pypop.protocol.commands import _parse, parse_command

    seen_quick = 0
    for verb in _VERBS:
        for a in _PARTS:
            for b in _PARTS:
                for c in _PARTS:
                    line = verb + a + b + c
                    got, want = parse_command(line), _parse(line)
                    assert got == want, line
                    assert type(got) is type(want), line
                    seen_quick += not hasattr(got, "text")
    assert seen_quick > 100  # the valid shapes were among them


@settings(max_examples=EXAMPLES * 3, deadline=None)
@given(
    st.sampled_from([b"RETR", b"DELE", b"TOP", b"retr", b"dele", b"top", b"RETR ", b"TOP "]),
    st.lists(
        st.one_of(
            st.sampled_from([b" ", b"1", b"9", b"0", b"\r", b"\x00", b"-", b"\xd9\xa3"]),
            octets(max_size=4),
        ),
        max_size=8,
    ).map(b"".join),
)
def test_quick_path_matches_the_general_parser(verb: bytes, rest: bytes) -> None:
    from pypop.protocol.commands import _parse, parse_command

    line = verb + rest
    assert parse_command(line) == _parse(line)


# ---- the engine's fetch path (pypop.wire.answer_fetches) agrees with the general one --


class _Wire:
    """A wire source: message 1 and 3 held, 2 not (None), 4 8-bit, 5 raising."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, int | None]] = []

    def __call__(self, index: int, top_lines: int | None) -> bytes | None:
        self.asked.append((index, top_lines))
        if index == 4:
            raise RuntimeError("backend bug")
        if index == 1:
            return None
        body = b"Subject: \xc3\xa9\r\n\r\n" if index == 3 else b"Subject: x\r\n\r\n"
        return body + (b"" if top_lines == 0 else b"line\r\n") + b".\r\n"


_FETCH_ARGS = [b"1", b"2", b"3", b"4", b"5", b"6", b"0", b"01", b"1 ", b"x"]
_FETCH_ARGS += [b"1 0", b"2 0", b"3 7", b"4 1", b"5 0", b"6 0", b"1 99999999999"]
_FETCH_LINES = [
    verb + b" " + arg for verb in (b"RETR", b"retr", b"Retr", b"TOP", b"top") for arg in _FETCH_ARGS
]
_FETCH_LINES += [b"DELE 1", b"DELE 3", b"dele 2", b"DELE 6", b"DELE 0", b"DELE 05", b"DELE  4"]
_FETCH_LINES += [b"RSET", b"NOOP", b"STAT", b"RETR", b"TOP 1", b"UTF8", b"LIST"]


class _General(ServerConnection):
    """The general path alone: parse_command, _dispatch, _answer_quick."""

    _fast = False  # no answer_fetches


def _fetch_session(lines: list[bytes], chunk: int, refuse: bool, fast: bool) -> tuple[object, ...]:
    conn = ServerConnection() if fast else _General()
    conn.receive_data(b"USER bob\r\nPASS secret\r\n")
    assert conn.next_event() == PasswordLogin("bob", "secret")
    conn.login_succeeded("bob", [100, 200, 300, 400, 500], ["a", "b", "c", "d", "e"])
    conn.data_to_send()
    source = _Wire()
    conn.serve_from(source, refuse_8bit=refuse)
    driver = Driver(conn)
    data = b"".join(line + b"\r\n" for line in lines)
    for i in range(0, len(data), chunk):
        conn.receive_data(data[i : i + chunk])
        driver.run()
    return (
        driver.take(),
        driver.events,
        source.asked,
        conn.state,
        conn.commands,
        conn.bad_commands,
        dict(conn.verbs),
        conn.retrieved,
        conn.retrieved_octets,
        conn.retrieved_indexes,
        conn.quick_retrievals,
        bytes(conn._deleted),
        conn._count,
        conn._octets,
    )


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    st.lists(st.sampled_from(_FETCH_LINES), max_size=40),
    st.integers(1, 64),
    st.booleans(),
)
def test_fetch_path_gives_the_general_answer(lines: list[bytes], chunk: int, refuse: bool) -> None:
    """RETR and TOP answered by the engine's fetch path (the plain shape, a wire source,
    TRANSACTION) leave the same bytes, events, source calls and counts as the general
    parse and dispatch: with the path taken out, every example gives the same."""
    fast = _fetch_session(lines, chunk, refuse, fast=True)
    assert fast == _fetch_session(lines, chunk, refuse, fast=False)


def test_fetch_path_is_taken() -> None:
    """(So that the test above compares two paths: the plain RETR skips the parser.)"""
    from unittest import mock

    from pypop.protocol import parse_command, server

    with mock.patch.object(server, "parse_command", wraps=parse_command) as parse:
        out = _fetch_session([b"RETR 1", b"top 3 0", b"NOOP"], 64, True, fast=True)
    assert parse.call_count == 3  # USER, PASS and NOOP
    assert isinstance(out[0], bytes)
    assert out[0].startswith(b"+OK 100 octets\r\nSubject: x\r\n\r\nline\r\n.\r\n+OK\r\n")


def test_answer_fetches_is_taken() -> None:
    """The engine's quick path is pypop.wire.answer_fetches: the general path
    (_handle_line) only sees the lines it stopped at without taking them."""
    from unittest import mock

    from pypop.protocol import server

    real = server.ServerConnection._handle_line
    with mock.patch.object(
        server.ServerConnection, "_handle_line", autospec=True, side_effect=real
    ) as general:
        out = _fetch_session([b"RETR 1", b"top 3 0", b"RETR 2", b"NOOP"], 64, True, fast=True)
    assert [c.args[1] for c in general.call_args_list] == [b"USER bob", b"PASS secret", b"NOOP"]
    assert out[1] == [Retrieve(1, 200, None)]  # RETR 2: the source lacks it (the miss)
    assert out[2] == [(0, None), (2, 0), (1, None)]
    assert out[6] == {User: 1, Pass: 1, Retr: 2, Top: 1, Noop: 1}
