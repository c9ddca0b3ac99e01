"""The stored form (CRLF line ends) goes out exactly as the delivered octets would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from pypop.testing import HARD_MESSAGES
from pypop.wire import stuff, wire_size

from pypop_sql._engine import crlf_form

# Octets that matter to line ends and stuffing, and a few others.
WIRE_BYTES = st.binary(max_size=200).map(lambda b: bytes(b".\r\na\xff "[x % 6] for x in b))


@settings(max_examples=500, deadline=None)
@given(WIRE_BYTES)
def test_crlf_form_serves_the_same_octets(data: bytes) -> None:
    stored = crlf_form(data)
    assert stuff(stored) == stuff(data)
    for top in (0, 1, 2, 5):
        assert stuff(stored, top) == stuff(data, top)
    assert wire_size(stored) == wire_size(data)
    assert crlf_form(stored) == stored  # idempotent
    assert b"\n" not in stored.replace(b"\r\n", b"")
    assert b"\r" not in stored.replace(b"\r\n", b"")


def test_crlf_form_examples() -> None:
    assert crlf_form(b"a\nb\n") == b"a\r\nb\r\n"
    assert crlf_form(b"a\rb\r\r\n") == b"a\r\nb\r\n\r\n"  # bare CRs are line ends
    assert crlf_form(b"no final\nnewline") == b"no final\r\nnewline"  # nothing added
    assert crlf_form(b"..dots\n.\n") == b"..dots\r\n.\r\n"  # stored unstuffed
    crlf = HARD_MESSAGES["leading-dots"]
    assert crlf_form(crlf) is crlf  # already CRLF: not copied
    assert crlf_form(b"") == b""
