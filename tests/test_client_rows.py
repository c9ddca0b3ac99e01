"""CFPOP rows from the hard-message corpus (tests/data/corpus), safe attachment names,
and the two engines talking to each other (the server's replies parse in the client)."""

from __future__ import annotations

import datetime as dt
import os
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pypop.client import build_row, safe_filename
from pypop.client.attachments import save
from pypop.protocol.client import ClientConnection, Greeting, Reply
from pypop.protocol.commands import List, Retr, Stat, Top, Uidl
from pypop.protocol.events import NEED_DATA, Retrieve
from pypop.protocol.replies import parse_listing, parse_stat
from pypop.protocol.server import ServerConnection
from pypop.wire import DotStuffer

CORPUS = {p.name: p.read_bytes() for p in (Path(__file__).parent / "data" / "corpus").iterdir()}


def test_encoded_words_in_every_header() -> None:
    r = build_row(1, "u", CORPUS["01-encoded-words.eml"])
    assert r.from_ == "Jürgen Müller <juergen@example.org>"
    assert r.to == "François Lefèvre <francois@example.org>, plain@example.org"
    assert r.cc == "山田 太郎 <taro@example.jp>"
    assert r.reply_to == "Æthelred <aethelred@example.org>"
    assert r.subject == "Große Grüße aus München 🌳 und mehr"
    assert r.body == "Grüße, Jürgen\n"
    assert r.defects == []


def test_rfc2231_continuations(tmp_path: Path) -> None:
    r = build_row(1, "u", CORPUS["02-rfc2231.eml"], attachment_path=tmp_path)
    assert r.attachments == ["Rechnung für März 2026.pdf"]
    saved = Path(r.attachment_files[0])
    assert saved.name == unicodedata.normalize("NFC", "Rechnung für März 2026.pdf")
    assert saved.read_bytes().startswith(b"%PDF-1.4")


def test_traversal_and_reserved_names(tmp_path: Path) -> None:
    inside = tmp_path / "att"
    r = build_row(1, "u", CORPUS["03-traversal.eml"], attachment_path=inside)
    assert r.attachments == ["../../etc/passwd", "CON.txt", ".bashrc"]
    assert sorted(os.listdir(inside)) == ["_CON.txt", "_bashrc", "passwd"]
    assert sorted(os.listdir(tmp_path)) == ["att"]  # nothing outside


def test_nested_multiparts_inline_image_forward_and_tnef(tmp_path: Path) -> None:
    r = build_row(1, "u", CORPUS["04-nested.eml"], attachment_path=tmp_path)
    assert r.body == "Plain text version."
    assert r.text_body == "Plain text version."
    assert r.html_body == '<p>HTML version <img src="cid:logo@example.org"></p>'
    assert r.attachments == ["logo.png", "attachment-4.eml", "winmail.dat"]
    assert r.cids == {"logo@example.org": str(tmp_path / "logo.png")}
    assert (tmp_path / "logo.png").read_bytes().startswith(b"\x89PNG")
    assert b"Subject: the forwarded one" in (tmp_path / "attachment-4.eml").read_bytes()
    assert (tmp_path / "winmail.dat").exists()


def test_8bit_headers() -> None:
    r = build_row(1, "u", CORPUS["05-8bit-headers.eml"])
    assert r.from_ == "Zoë Çelik <zoe@example.org>"
    assert r.subject == "Ünïcödé without encoded words"
    assert r.body == "Body with 8-bit text: naïve café.\n"


def test_dates() -> None:
    missing = build_row(1, "u", CORPUS["06-no-date.eml"])
    assert (missing.date, missing.date_header, missing.defects) == (None, None, ["Date: missing"])
    bad = build_row(1, "u", CORPUS["07-bad-date.eml"])
    assert bad.date is None
    assert bad.date_header == "the day after tomorrow, probably"
    assert bad.defects == ["Date: unparseable"]
    eastern = build_row(1, "u", CORPUS["08-date-0400.eml"])
    assert eastern.date == dt.datetime(2026, 12, 1, 14, 0, tzinfo=dt.UTC)
    assert eastern.date_header == "Tue, 01 Dec 2026 10:00:00 -0400"


def test_no_final_newline_and_dots() -> None:
    assert build_row(1, "u", CORPUS["09-no-final-newline.eml"]).body == (
        "The last line has no line end"
    )
    assert (
        build_row(1, "u", CORPUS["10-dots.eml"]).body == ".\n..\n.leading dot\n...three\n.\nend\n"
    )


def test_wrong_and_unknown_charsets() -> None:
    r = build_row(1, "u", CORPUS["11-bad-charsets.eml"])
    assert r.text_body == "café in an unknown charset"
    assert r.html_body == "<p>café declared us-ascii but UTF-8</p>"
    assert "unknown charset 'x-no-such-charset'" in r.defects
    assert "text is not us-ascii" in r.defects
    assert r.subject  # never silently empty
    assert "Subject: undecodable characters" in r.defects


def test_malformed_mail_gives_a_row_with_defects() -> None:
    r = build_row(1, "u", CORPUS["12-malformed.eml"])
    assert r.from_ == "<<<broken@@example..org"
    assert r.to == '"unterminated <x@example.org'
    assert "CloseBoundaryNotFoundDefect" in r.defects
    assert "From: InvalidHeaderDefect" in r.defects
    assert r.body is not None
    assert r.body.startswith("The boundary is never closed")


# Headers the stdlib parser raises on (not a defect it records): an RFC 2231 charset
# with a NUL (ValueError from the codec lookup, even inside message_from_bytes) and a
# parameter name ending in ``*`` with no value (IndexError on first access).
NUL_CHARSET = (
    b"From: Mallory <m@example.org>\r\nSubject: invoice\r\n"
    b"Content-Type: text/plain; charset*=ut\x00f''x\r\n\r\nPay now\r\n"
)
BARE_STAR_PARAM = (
    b"From: Mallory <m@example.org>\r\nSubject: invoice\r\n"
    b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
    b"--B\r\nContent-Type: text/plain\r\n\r\nPay now\r\n"
    b"--B\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
    b"Content-Disposition: attachment; filename*0*\r\n\r\nJVBERi0=\r\n--B--\r\n"
)


def test_headers_the_parser_raises_on_still_make_a_row(tmp_path: Path) -> None:
    r = build_row(1, "u", NUL_CHARSET, attachment_path=tmp_path)
    assert (r.from_, r.subject) == ("Mallory <m@example.org>", "invoice")
    assert r.body == "Pay now\n"
    assert "unparseable (ValueError): parsed leniently" in r.defects
    assert "charset: unreadable" in r.defects
    h = build_row(1, "u", NUL_CHARSET, headers_only=True)
    assert (h.subject, h.body) == ("invoice", None)
    r = build_row(2, "u", BARE_STAR_PARAM, attachment_path=tmp_path)
    assert (r.subject, r.body) == ("invoice", "Pay now")
    # The part whose headers raise is kept as an opaque attachment, not dropped.
    assert "part 2: IndexError" in r.defects
    assert r.attachments == ["attachment-2.dat"]
    assert r.attachment_files == [str(tmp_path / "attachment-2.dat")]
    assert (tmp_path / "attachment-2.dat").read_bytes() == b"%PDF-"


def test_headers_only_rows_have_no_body() -> None:
    r = build_row(3, "u3", CORPUS["04-nested.eml"], headers_only=True, size=10)
    assert (r.body, r.text_body, r.html_body, r.attachments) == (None, None, None, [])
    assert r.cfpop()["MessageNumber"] == 3
    assert r.cfpop()["Size"] == 10
    assert r.header.startswith("From: Nested Sender")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 255), max_size=400).map(bytes))
def test_any_bytes_make_a_row(data: bytes) -> None:
    r = build_row(1, None, data)
    assert r.body is not None


# ---- safe names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\win.ini", "win.ini"),
        ("..", "attachment"),
        (".", "attachment"),
        ("", "attachment"),
        ("a\0b\x01c\x7f.txt", "abc.txt"),
        ("line\nbreak.txt", "linebreak.txt"),
        (".hidden", "_hidden"),
        ("...", "attachment"),
        ("CON.txt", "_CON.txt"),
        ("nul", "_nul"),
        ("com1.tar.gz", "_com1.tar.gz"),
        ("LPT9", "_LPT9"),
        ('what?<x>:"y"|*.doc', "what__x___y___.doc"),
        ("trailing. . ", "trailing"),
        ("e\u0301te\u0301.txt", "\u00e9t\u00e9.txt"),  # NFC
    ],
)
def test_safe_filename(name: str, safe: str) -> None:
    assert safe_filename(name) == safe


def test_names_are_capped_at_255_octets_keeping_the_extension() -> None:
    name = "ü" * 300 + ".pdf"
    safe = safe_filename(name)
    assert len(safe.encode()) <= 255
    assert safe.endswith(".pdf")
    assert safe.startswith("üü")


def test_save_does_not_follow_symlinks_and_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "outside"
    target.write_bytes(b"precious")
    box = tmp_path / "box"
    box.mkdir()
    (box / "report.pdf").symlink_to(target)
    save(box, "report.pdf", b"new")
    assert target.read_bytes() == b"precious"
    assert (box / "report.pdf").read_bytes() == b"new"
    assert not (box / "report.pdf").is_symlink()
    (box / "x.txt").symlink_to(target)
    path = save(box, "x.txt", b"other", unique=True)
    assert path.name == "x_1.txt"
    assert target.read_bytes() == b"precious"
    assert sorted(os.listdir(box)) == ["report.pdf", "x.txt", "x_1.txt"]  # no temp files


# ---- the two engines talk ------------------------------------------------------------------


def test_server_engine_replies_parse_in_the_client_engine() -> None:
    messages = [b"Subject: one\r\n\r\n.dot\r\n", b"Subject: two\r\n\r\nbody"]
    server = ServerConnection()
    client = ClientConnection(pipelining=True)
    server.greeting()
    client.receive_data(server.data_to_send())
    assert isinstance(client.next_event(), Greeting)
    server.receive_data(b"USER a\r\nPASS b\r\n")
    server.next_event()
    server.login_succeeded(
        "a", [len(m) + (2 if not m.endswith(b"\r\n") else 0) for m in messages], ["u1", "u2"]
    )
    server.data_to_send()
    for cmd in (Stat(), List(None), Uidl(None), Retr(1), Top(2, 0), Retr(2)):
        client.send(cmd)
    server.receive_data(client.data_to_send())
    while (ev := server.next_event()) is not NEED_DATA:
        assert isinstance(ev, Retrieve)
        server.message_header()
        stuffer = DotStuffer(ev.top_lines)
        server.send_raw(stuffer.feed(messages[ev.index]) + stuffer.finish())
        server.message_done()
    client.receive_data(server.data_to_send())
    replies = []
    while (r := client.next_event()) is not NEED_DATA:
        assert isinstance(r, Reply)
        replies.append(r)
    stat, listing, uidl, retr1, top2, retr2 = replies
    assert parse_stat(stat.status.text) == (2, len(messages[0]) + len(messages[1]) + 2)
    assert parse_listing(listing.body or b"", uid=False) == [(1, 22), (2, 22)]
    assert parse_listing(uidl.body or b"", uid=True) == [(1, "u1"), (2, "u2")]
    assert retr1.body == messages[0]
    assert top2.body == b"Subject: two\r\n\r\n"
    assert retr2.body == messages[1] + b"\r\n"
