"""The IMAP response parser: strict framing (DESIGN rule 4), literals inline and
streamed, the same events whatever the chunking."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pypop_imap._connection import _response_name, uid_set
from pypop_imap._protocol import (
    NEED_DATA,
    Atom,
    Continuation,
    Data,
    Event,
    Fetch,
    ImapProtocolError,
    LiteralChunk,
    LiteralStart,
    ResponseParser,
    Status,
    Streamed,
    encode_astring,
    quote,
)

SESSION = (
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] Dovecot ready.\r\n"
    b"* 3 EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 1701] UIDs valid\r\n"
    b"* FLAGS (\\Answered \\Seen $Forwarded)\r\n"
    b"* 1 FETCH (UID 4 RFC822.SIZE 22)\r\n"
    b"* 1 FETCH (UID 4 BODY[] {7}\r\nab\r\n.cd)\r\n"
    b"* 2 FETCH (UID 7 BODY[] {30}\r\n" + b"x" * 28 + b"\r\n FLAGS (\\Seen))\r\n"
    b'* 3 FETCH (FLAGS () UID 9 BODY[HEADER.FIELDS (SUBJECT)] "q\\"uo\\\\te" X NIL)\r\n'
    b"* 4 FETCH (UID 10 BODY[HEADER] {2}\r\n\r\n BODY[TEXT]<0> {3}\r\nabc)\r\n"
    b"* 2 EXPUNGE\r\n* SEARCH 1 5 9\r\n"
    b"p1 OK [READ-ONLY] Examine completed.\r\n+ ready\r\n+\r\n"
    b"p2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
)


def events(data: bytes, chunk: int, inline: int = 16) -> list[Event]:
    parser = ResponseParser(inline_literal=inline)
    out: list[Event] = []
    for i in range(0, len(data), chunk):
        parser.feed(data[i : i + chunk])
        while (event := parser.next_event()) is not NEED_DATA:
            out.append(event)
    return out


def merged(evs: list[Event]) -> list[Event]:
    """Adjacent LiteralChunks joined: chunking may split them differently."""
    out: list[Event] = []
    for e in evs:
        if isinstance(e, LiteralChunk) and out and isinstance(out[-1], LiteralChunk):
            out[-1] = LiteralChunk(out[-1].data + e.data)
        else:
            out.append(e)
    return out


def test_a_session_parses() -> None:
    got = merged(events(SESSION, len(SESSION)))
    assert got == [
        Status(None, b"OK", b"CAPABILITY", b"IMAP4rev1 SASL-IR AUTH=PLAIN", b"Dovecot ready."),
        Data(b"EXISTS", 3, []),
        Data(b"RECENT", 0, []),
        Status(None, b"OK", b"UIDVALIDITY", b"1701", b"UIDs valid"),
        Data(b"FLAGS", None, [[b"\\Answered", b"\\Seen", b"$Forwarded"]]),
        Fetch(1, {b"UID": 4, b"RFC822.SIZE": 22}),
        Fetch(1, {b"UID": 4, b"BODY[]": b"ab\r\n.cd"}),
        LiteralStart(2, b"BODY[]", 30, {b"UID": 7}),
        LiteralChunk(b"x" * 28 + b"\r\n"),
        Fetch(2, {b"UID": 7, b"BODY[]": Streamed(30), b"FLAGS": [b"\\Seen"]}),
        Fetch(
            3,
            {
                b"FLAGS": [],
                b"UID": 9,
                b"BODY[HEADER.FIELDS (SUBJECT)]": b'q"uo\\te',
                b"X": None,
            },
        ),
        Fetch(4, {b"UID": 10, b"BODY[HEADER]": b"\r\n", b"BODY[TEXT]<0>": b"abc"}),
        Data(b"EXPUNGE", 2, []),
        Data(b"SEARCH", None, [1, 5, 9]),
        Status(b"p1", b"OK", b"READ-ONLY", b"", b"Examine completed."),
        Continuation(b"ready"),
        Continuation(b""),
        Status(b"p2", b"NO", b"AUTHENTICATIONFAILED", b"", b"Authentication failed."),
    ]
    atom = got[4]
    assert isinstance(atom, Data)
    assert isinstance(atom.values[0], list)
    assert isinstance(atom.values[0][0], Atom)  # atoms and strings stay apart


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_any_chunking_gives_the_same_events(chunk: int) -> None:
    assert merged(events(SESSION, chunk)) == merged(events(SESSION, len(SESSION)))


@given(st.lists(st.integers(1, 40), min_size=1, max_size=60))
@settings(max_examples=200, deadline=None)
def test_random_chunking(sizes: list[int]) -> None:
    parser = ResponseParser(inline_literal=16)
    out: list[Event] = []
    pos, i = 0, 0
    while pos < len(SESSION):
        n = sizes[i % len(sizes)]
        i += 1
        parser.feed(SESSION[pos : pos + n])
        pos += n
        while (event := parser.next_event()) is not NEED_DATA:
            out.append(event)
    assert merged(out) == merged(events(SESSION, len(SESSION)))


@pytest.mark.parametrize(
    "bad",
    [
        b"* OK bare LF\n",
        b"* OK bare\rCR\r\n",
        b"* OK nul\0here\r\n",
        b"\r\n",  # empty line
        b"* 1 FETCH (UID 1 BODY[] {5}\r\nabc)\r\n* x\r\n",  # literal shorter than said
        b"* 1 FETCH (UID 1))\r\n",  # unbalanced
        b"* 1 FETCH (UID 1\r\n",  # unclosed list
        b'* 1 FETCH (UID 1 BODY[] "a\\qb")\r\n',  # bad escape
        b'* 1 FETCH (UID 1 BODY[] "unterminated)\r\n',
        b"* 1 FETCH (UID {3} 1)\r\n",  # a literal not at the end of a line
        b"* 1 FETCH (UID 1 BODY[] {99999999999}\r\n",  # more digits than allowed
        b"* 1 FETCH (UID\x7f 1)\r\n",
        b"* 1 FETCH (UID 1 BODY[\r\n",
        b"A1 MAYBE\r\n",
        b"+x\r\n",
        b"* 1 FETCH (UID 1 RFC822.SIZE)\r\n",  # odd item list
    ],
)
def test_strict_framing_refuses(bad: bytes) -> None:
    parser = ResponseParser(inline_literal=16)
    parser.feed(bad)

    def drain() -> None:
        while parser.next_event() is not NEED_DATA:
            pass

    with pytest.raises(ImapProtocolError):  # never "incomplete": refused
        drain()
    with pytest.raises(ImapProtocolError):  # and broken for good
        parser.next_event()


def test_literal_only_where_the_grammar_has_one() -> None:
    # Response text ending in "{5}" is text: no literal follows.
    got = events(b"* OK see {5}\r\nA1 OK done {3}\r\n", 64)
    assert got == [
        Status(None, b"OK", None, b"", b"see {5}"),
        Status(b"A1", b"OK", None, b"", b"done {3}"),
    ]


def test_bounds() -> None:
    parser = ResponseParser(max_line=100)
    parser.feed(b"* OK " + b"x" * 200)
    with pytest.raises(ImapProtocolError, match="too long"):
        parser.next_event()
    parser = ResponseParser(inline_literal=10)
    parser.feed(b'* LIST () "/" {11}\r\n')  # a big literal outside FETCH
    with pytest.raises(ImapProtocolError, match="literal too large"):
        parser.next_event()
    parser = ResponseParser(inline_literal=10, max_literal=100)
    parser.feed(b"* 1 FETCH (UID 1 BODY[] {101}\r\n")
    with pytest.raises(ImapProtocolError, match="literal too large"):
        parser.next_event()


@given(st.binary(max_size=300))
@settings(max_examples=500, deadline=None)
def test_junk_is_a_protocol_error_or_events_never_anything_else(junk: bytes) -> None:
    parser = ResponseParser(inline_literal=8, max_line=200, max_literal=1000)
    parser.feed(junk)
    try:
        while parser.next_event() is not NEED_DATA:
            pass
    except ImapProtocolError:
        pass


def test_quote_and_astring() -> None:
    assert quote(b'a"b\\c') == b'"a\\"b\\\\c"'
    assert quote(b"a\r\nb") is None
    assert quote(b"caf\xc3\xa9") is None  # 8-bit: a literal
    assert encode_astring(b"alice") == b"alice"
    assert encode_astring(b"NIL") == b'"NIL"'
    assert encode_astring(b"two words") == b'"two words"'


def test_uid_sets_and_names() -> None:
    assert uid_set([5, 1, 2, 3, 9, 10]) == [b"1:3,5,9:10"]
    assert uid_set([]) == []
    many = uid_set(list(range(1, 20000, 2)))
    assert len(many) > 1
    assert all(len(s) <= 8010 for s in many)
    assert _response_name(b"BODY.PEEK[]") == b"BODY[]"
    assert _response_name(b"BODY.PEEK[TEXT]<4096.8192>") == b"BODY[TEXT]<4096>"
    assert _response_name(b"body.peek[header]") == b"BODY[HEADER]"


@pytest.mark.parametrize("fetch", [True, False])
def test_literals_held_in_one_response_are_bounded(fetch: bool) -> None:
    """Each literal under the inline bound, but without end in one response: a server
    could make the parser hold any amount of memory."""
    parser = ResponseParser(inline_literal=1000, max_line=100)
    parser.feed(b"* 1 FETCH (UID 1" if fetch else b"* 1 XLIST (")
    part = b" X {1000}\r\n" + b"x" * 1000
    for _ in range(4):  # within the bound (4 * (1000 + 100))
        parser.feed(part)
        assert parser.next_event() is NEED_DATA
    parser.feed(part)
    with pytest.raises(ImapProtocolError, match="response too large"):
        parser.next_event()


def test_a_response_of_many_lines_within_the_bound_parses() -> None:
    # Two sections of a TOP at the inline bound each: as much as the backend asks for.
    parser = ResponseParser(inline_literal=1000, max_line=100)
    parser.feed(
        b"* 1 FETCH (UID 1 BODY[HEADER] {1000}\r\n"
        + b"h" * 1000
        + b" BODY[TEXT]<0> {1000}\r\n"
        + b"t" * 1000
        + b")\r\n"
    )
    assert parser.next_event() == Fetch(
        1, {b"UID": 1, b"BODY[HEADER]": b"h" * 1000, b"BODY[TEXT]<0>": b"t" * 1000}
    )
