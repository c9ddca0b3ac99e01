"""RFC 6856: UTF8 and LANG, in the engine and against a real server with real clients.

The RFC 6856 examples (the LANG listing, a language changed and refused, "*"), the
reply tables (complete, same fields, US-ASCII before UTF8), UTF-8 user names
prepared with PRECIS and used by curl and poplib, and a client that never sent UTF8
meeting a message with 8-bit header octets: ``-ERR [UTF8]`` on every way a message
leaves (the memory backend's wire cache, a backend that streams, Maildir), exact
bytes, and the operator's "send" choice.
"""

from __future__ import annotations

import poplib
import shutil
import string
import subprocess
import unicodedata
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import trio

from pypop.backend import Mailbox, MessageInfo
from pypop.backends.memory import MemoryBackend
from pypop.protocol import ProtocolConfig, ServerConnection
from pypop.protocol.commands import Lang, ParseError, Utf8, encode_command, parse_command
from pypop.protocol.replies import LANGUAGES, MAX_STATUS_LINE, TEXTS, Text, encode_status
from pypop.server.intl import HeaderCheck, wire_header_is_ascii
from tests.conftest import ServerStarter
from tests.test_protocol import converse, server
from tests.test_server import port_of, talk

CURL = shutil.which("curl")

EIGHT_BIT = "From: Jürgen <j@example.org>\r\nSubject: Grüße\r\n\r\nHallo\r\n".encode()
EIGHT_BIT_BODY = "Subject: plain\r\n\r\nÜber den Körper, nicht den Kopf\r\n".encode()
A, B = len(EIGHT_BIT), len(EIGHT_BIT_BODY)  # CRLF throughout: POP3 size = length
UTF8_NEEDED = b"-ERR [UTF8] Message has UTF-8 header fields; it needs a client that sends UTF8\r\n"


# ---- grammar ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"UTF8", Utf8()),
        (b"utf8", Utf8()),
        (b"LANG", Lang(None)),
        (b"LANG es", Lang("es")),
        (b"LANG en-US", Lang("en-US")),
        (b"LANG *", Lang("*")),
        (b"LANG zh-Hant-TW", Lang("zh-Hant-TW")),
        (b"UTF8 USER", ParseError(Text.BAD_ARGUMENTS)),
        (b"LANG es de", ParseError(Text.BAD_ARGUMENTS)),
        (b"LANG e$", ParseError(Text.BAD_ARGUMENTS)),
        (b"LANG en-", ParseError(Text.BAD_ARGUMENTS)),
        (b"LANG abcdefghi", ParseError(Text.BAD_ARGUMENTS)),  # RFC 4647: 1*8ALPHA
        (b"LANG " + b"-".join([b"a"] * 20), ParseError(Text.BAD_ARGUMENTS)),  # too long
        ("LANG é".encode(), ParseError(Text.BAD_ARGUMENTS)),
    ],
)
def test_grammar(line: bytes, expected: object) -> None:
    assert parse_command(line) == expected


def test_encode() -> None:
    assert encode_command(Utf8()) == b"UTF8\r\n"
    assert encode_command(Lang(None)) == b"LANG\r\n"
    assert encode_command(Lang("de")) == b"LANG de\r\n"


# ---- the tables ---------------------------------------------------------------------


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


@pytest.mark.parametrize("tag", list(LANGUAGES))
def test_every_language_is_complete(tag: str) -> None:
    lang = LANGUAGES[tag]
    assert set(lang.texts) == set(Text)
    assert set(lang.ascii_texts) == set(Text)
    for key in Text:
        assert _fields(lang.texts[key]) == _fields(key.value), key
        assert lang.ascii_texts[key].isascii(), key
        # Filled with wide values, every text still fits one status line.
        filled = lang.texts[key].format(count=10**9, octets=10**15, size=10**12, lang="x" * 35)
        assert len(encode_status(False, filled, "SYS/TEMP")) <= MAX_STATUS_LINE
    assert lang.name


def test_ascii_forms() -> None:
    de = LANGUAGES["de"]
    assert de.texts[Text.LANG_CHANGED] == "Sprache geändert"
    assert de.ascii_texts[Text.LANG_CHANGED] == "Sprache geaendert"
    assert LANGUAGES["es"].ascii_texts[Text.LINE_TOO_LONG] == "Linea demasiado larga"
    assert LANGUAGES["en"].texts is TEXTS or dict(LANGUAGES["en"].texts) == dict(TEXTS)


# ---- the engine: RFC 6856 examples ------------------------------------------------------


def test_capa_lists_utf8_and_lang() -> None:
    out = converse(b"CAPA\r\n", lambda: server(None, ("PLAIN",)))
    assert b"\r\nUTF8 USER\r\nLANG\r\n" in out
    out = converse(b"CAPA\r\n", lambda: server(None, ("PLAIN",)), login=True)
    assert b"\r\nUTF8 USER\r\nLANG\r\n" in out  # RFC 2449 §5: in both states


def test_lang_listing_before_and_after_utf8() -> None:
    listing = (
        b"+OK Language listing follows\r\n"
        b"en English\r\n"
        b"de Deutsch\r\n"
        b"es Espanol\r\n"
        b"i-default Default language (English)\r\n"
        b".\r\n"
    )
    assert converse(b"LANG\r\n") == listing
    # Once the server is in UTF-8 mode it may use non-ASCII characters (RFC 6856).
    out = converse(b"UTF8\r\nLANG\r\n")
    assert out == b"+OK UTF-8 mode enabled\r\n" + listing.replace(
        b"es Espanol", "es Español".encode()
    )


def test_lang_changes_refuses_and_star() -> None:
    out = converse(b"LANG es\r\nLANG uga\r\nLANG de\r\nNOOP\r\nLANG *\r\nLANG MUL\r\n")
    assert out == (
        b"+OK es Idioma cambiado\r\n"
        # refused: the language stays, and the reply starts with its tag
        b"-ERR es El idioma uga no esta disponible\r\n"
        b"+OK de Sprache geaendert\r\n"
        b"-ERR Befehl in diesem Zustand nicht erlaubt\r\n"  # NOOP before login
        b"+OK en Language changed\r\n"
        b"-ERR en Language MUL is not supported\r\n"
    )
    assert converse(b"LANG DE-ch\r\n") == b"-ERR i-default Language DE-ch is not supported\r\n"
    assert converse(b"LANG DE\r\n") == b"+OK de Sprache geaendert\r\n"  # case-insensitive
    assert converse(b"LANG i-default\r\n") == b"+OK i-default Language changed\r\n"


def test_utf8_mode_sends_the_table_as_written() -> None:
    out = converse(b"LANG de\r\nUTF8\r\nLANG de\r\nFOO\r\n")
    assert out == (
        b"+OK de Sprache geaendert\r\n"
        + "+OK UTF-8-Modus eingeschaltet\r\n+OK de Sprache geändert\r\n".encode()
        + b"-ERR Unbekannter Befehl\r\n"
    )


def test_codes_and_machine_readable_parts_never_change() -> None:
    for tag in LANGUAGES:
        out = converse(
            f"LANG {tag}\r\nUTF8\r\nUSER bob\r\nPASS wrong\r\nPASS x\r\nUSER bob\r\nPASS secret\r\n"
            "STAT\r\nLIST\r\nUIDL 2\r\nLIST 9\r\nUTF8\r\nLANG\r\n".encode(),
            lambda: server(ProtocolConfig(max_auth_failures=9)),
        )
        lines = out.split(b"\r\n")
        assert lines[0].startswith(f"+OK {tag} ".encode())
        assert lines[3].startswith(b"-ERR [AUTH] ")
        assert lines[4].startswith(b"-ERR ")  # no USER given: no response code
        assert b"[" not in lines[4]
        assert lines[7] == b"+OK 3 620"  # STAT: counts only
        assert lines[9:12] == [b"1 120", b"2 200", b"3 300"]
        assert lines[13] == b"+OK 2 uid-two"
        assert lines[14].startswith(b"-ERR ")
        assert lines[15].startswith(b"-ERR ")  # UTF8 after login: wrong state
        assert lines[17:21] == [b"en English", b"de Deutsch", "es Español".encode(), lines[20]]


def test_stls_refused_after_utf8() -> None:
    cfg = ProtocolConfig(stls_available=True)
    out = converse(b"UTF8\r\nSTLS\r\n", lambda: ServerConnection(cfg))
    assert out == b"+OK UTF-8 mode enabled\r\n-ERR STLS is not allowed after UTF8\r\n"


def test_operator_texts_are_folded_before_utf8() -> None:
    custom = dict(TEXTS)
    custom[Text.GREETING] = "Grüß Gott"
    conn = ServerConnection(texts=custom)
    conn.greeting()
    assert conn.data_to_send() == b"+OK Gruess Gott\r\n"
    conn.receive_data(b"UTF8\r\n")
    conn.next_event()
    assert conn.data_to_send() == b"+OK UTF-8 mode enabled\r\n"


# ---- the header check ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "ascii"),
    [
        (EIGHT_BIT, False),
        (EIGHT_BIT_BODY, True),
        (b"Subject: x\n\n\xff\n", True),
        (b"Subject: x\r\r\xff\r", True),  # bare CR line ends, as on the wire
        (b"\r\nX\xff: body only", True),  # an empty header
        (b"Subject: only a header \xc3\xa4", False),
        (b"Subject: x\r\n" + b"X: " + b"a" * 70000 + b"\r\nY: \xc3\xa4\r\n\r\n", False),
    ],
)
def test_header_check(message: bytes, ascii: bool) -> None:
    from pypop.wire import stuff

    assert wire_header_is_ascii(stuff(message)) is ascii
    for size in (1, 7, 65536):
        check = HeaderCheck()
        for i in range(0, len(message), size):
            check.feed(message[i : i + size])
            if check.decided:
                break
        check.finish()
        assert check.ascii is ascii, size


# ---- a real server ------------------------------------------------------------------


class StreamOnly:
    """A backend without the wire cache: every RETR streams (the other path)."""

    def __init__(self, real: MemoryBackend) -> None:
        self.real = real

    async def open_mailbox(self, user: str) -> Mailbox:
        return _Streaming(await self.real.open_mailbox(user))

    async def aclose(self) -> None:
        await self.real.aclose()


class _Streaming:
    def __init__(self, real: Mailbox) -> None:
        self.real = real

    @property
    def messages(self) -> Sequence[MessageInfo]:
        return self.real.messages

    async def retrieve(self, index: int, *, top_lines: int | None = None) -> AsyncIterator[bytes]:
        data = b"".join([b async for b in self.real.retrieve(index, top_lines=top_lines)])
        for i in range(0, len(data), 5):  # small blocks: the header spans several
            yield data[i : i + 5]

    async def commit(self, deleted: Sequence[int]) -> None:
        await self.real.commit(deleted)

    async def aclose(self) -> None:
        await self.real.aclose()


def intl_backend() -> MemoryBackend:
    backend = MemoryBackend()
    backend.deliver("alice", EIGHT_BIT, uid="eight-bit")
    backend.deliver("alice", EIGHT_BIT_BODY, uid="eight-bit-body")
    return backend


LOGIN = b"USER alice\r\nPASS wonderland\r\n"


@pytest.mark.parametrize("streaming", [False, True])
async def test_non_utf8_client_gets_utf8_code(start_server: ServerStarter, streaming: bool) -> None:
    memory = intl_backend()
    server = await start_server(backend=StreamOnly(memory) if streaming else memory)
    out = await talk(port_of(server), LOGIN + b"LIST\r\nRETR 1\r\nTOP 1 0\r\nRETR 2\r\nQUIT\r\n")
    body = stuffed(EIGHT_BIT_BODY)
    assert out.split(b"\r\n", 1)[1] == (
        b"+OK\r\n"
        + f"+OK maildrop has 2 messages ({A + B} octets)\r\n".encode()
        + f"+OK 2 messages ({A + B} octets)\r\n1 {A}\r\n2 {B}\r\n.\r\n".encode()  # as stored
        + UTF8_NEEDED
        + UTF8_NEEDED
        + f"+OK {B} octets\r\n".encode()
        + body  # an ASCII header with an 8-bit body goes out as it is
        + b"+OK Logging out\r\n"
    )


@pytest.mark.parametrize("streaming", [False, True])
async def test_utf8_client_gets_the_message_unchanged(
    start_server: ServerStarter, streaming: bool
) -> None:
    memory = intl_backend()
    server = await start_server(backend=StreamOnly(memory) if streaming else memory)
    out = await talk(port_of(server), b"UTF8\r\n" + LOGIN + b"RETR 1\r\nTOP 1 0\r\nQUIT\r\n")
    lines = out.split(b"\r\n", 4)
    assert lines[1] == b"+OK UTF-8 mode enabled"
    assert lines[4] == (
        f"+OK {A} octets\r\n".encode()
        + stuffed(EIGHT_BIT)
        + b"+OK\r\n"
        + stuffed(EIGHT_BIT.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
        + b"+OK Logging out\r\n"
    )


async def test_operator_may_send_8bit_headers(start_server: ServerStarter) -> None:
    server = await start_server(backend=intl_backend(), utf8_headers="send")
    out = await talk(port_of(server), LOGIN + b"RETR 1\r\nQUIT\r\n")
    assert out.endswith(
        f"+OK {A} octets\r\n".encode() + stuffed(EIGHT_BIT) + b"+OK Logging out\r\n"
    )


async def test_maildir_stream_gets_the_same_check(
    start_server: ServerStarter, tmp_path: Path
) -> None:
    pytest.importorskip("pypop_maildir")
    from pypop_maildir import create

    for n, data in enumerate((EIGHT_BIT, EIGHT_BIT_BODY)):
        for sub in ("cur", "new", "tmp"):
            (tmp_path / "alice" / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / "alice" / "new" / f"{1700000000 + n}.M{n}P1.host").write_bytes(data)
    backend = create({"root": str(tmp_path)})
    server = await start_server(backend=backend)
    out = await talk(port_of(server), LOGIN + b"RETR 1\r\nRETR 2\r\nQUIT\r\n")
    assert UTF8_NEEDED + f"+OK {B} octets\r\n".encode() + stuffed(EIGHT_BIT_BODY) in out
    out = await talk(port_of(server), b"UTF8\r\n" + LOGIN + b"RETR 1\r\nQUIT\r\n")
    assert f"+OK {A} octets\r\n".encode() + stuffed(EIGHT_BIT) in out


def stuffed(message: bytes) -> bytes:
    from pypop.wire import stuff

    return stuff(message)


# ---- UTF-8 user names end to end --------------------------------------------------------

NAME = "jürgen"
PASSWORD = "pässwörd"


@pytest.fixture
def utf8_passwd(tmp_path: Path) -> Path:
    path = tmp_path / "passwd"
    # Written decomposed (NFD): PRECIS prepares both sides to NFC.
    name = unicodedata.normalize("NFD", NAME)
    path.write_text(f"{name}:{{PLAIN}}{PASSWORD}\nalice:{{PLAIN}}wonderland\n", encoding="utf-8")
    return path


async def test_utf8_user_with_poplib(start_server: ServerStarter, utf8_passwd: Path) -> None:
    backend = MemoryBackend()
    backend.deliver(NAME, EIGHT_BIT, uid="m1")
    server = await start_server(backend=backend, passwd_file=utf8_passwd)

    def client() -> tuple[bytes, bytes, list[bytes]]:
        pop = poplib.POP3("127.0.0.1", port_of(server), timeout=10)
        try:
            utf8 = pop.utf8()
            pop.user(NAME)
            ok = pop.pass_(PASSWORD)
            return utf8, ok, pop.retr(1)[1]
        finally:
            pop.quit()

    utf8, ok, lines = await trio.to_thread.run_sync(client)
    assert utf8 == b"+OK UTF-8 mode enabled"
    assert ok == f"+OK maildrop has 1 messages ({A} octets)".encode()
    assert b"\r\n".join(lines) + b"\r\n" == EIGHT_BIT
    # The name typed decomposed, the password with a no-break space mapped: PRECIS.
    out = await talk(
        port_of(server),
        b"USER " + unicodedata.normalize("NFD", NAME).encode() + b"\r\n"
        b"PASS " + PASSWORD.encode() + b"\r\nQUIT\r\n",
    )
    assert b"+OK maildrop has 1 messages" in out
    out = await talk(port_of(server), "USER jürgen\u200b\r\nPASS pässwörd\r\nQUIT\r\n".encode())
    assert b"-ERR [AUTH] Authentication failed\r\n" in out  # PRECIS refuses the name


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest.mark.parametrize("login", ["USER", "PLAIN"])
async def test_utf8_user_with_curl(
    start_server: ServerStarter, utf8_passwd: Path, login: str
) -> None:
    backend = MemoryBackend()
    backend.deliver(NAME, EIGHT_BIT_BODY, uid="m1")
    server = await start_server(
        backend=backend,
        passwd_file=utf8_passwd,
        mechanisms=["PLAIN"] if login == "PLAIN" else ["SCRAM-SHA-256"],
    )
    assert CURL is not None
    url = f"pop3://127.0.0.1:{port_of(server)}/1"
    options = ["--login-options", "AUTH=PLAIN"] if login == "PLAIN" else []
    result = await trio.run_process(
        [CURL, "-s", "-S", "--max-time", "20", *options, "-u", f"{NAME}:{PASSWORD}", url],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == EIGHT_BIT_BODY.replace(b"\r\n", b"\n") or (
        result.stdout == EIGHT_BIT_BODY
    )


def test_curl_version() -> None:
    if CURL is None:
        pytest.skip("curl is not installed")
    subprocess.run([CURL, "--version"], check=True, capture_output=True)


# ---- the pypop client --------------------------------------------------------------


async def test_utf8_user_with_the_pypop_client(
    start_server: ServerStarter, utf8_passwd: Path
) -> None:
    from pypop.client import Client

    backend = MemoryBackend()
    backend.deliver(NAME, EIGHT_BIT, uid="m1")
    server = await start_server(backend=backend, passwd_file=utf8_passwd)
    url = f"pop://127.0.0.1:{port_of(server)}"

    def client(utf8: bool) -> tuple[bool, bytes | str]:
        # The name typed decomposed: the client prepares it (PRECIS) as the server does.
        with Client(
            url, user=unicodedata.normalize("NFD", NAME), password=PASSWORD, utf8=utf8
        ) as pop:
            try:
                return pop.utf8, pop.retr(1)
            except Exception as exc:  # the -ERR [UTF8] of a client that did not send it
                return pop.utf8, f"{type(exc).__name__}: {exc} [{getattr(exc, 'code', '')}]"

    assert await trio.to_thread.run_sync(client, True) == (True, EIGHT_BIT)
    utf8, refused = await trio.to_thread.run_sync(client, False)
    assert not utf8
    assert refused == (
        "CommandError: RETR 1 failed: server said -ERR [UTF8] Message has UTF-8 header "
        "fields; it needs a client that sends UTF8 [UTF8]"
    )
