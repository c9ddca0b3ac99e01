"""Every POP3 reply, for both roles: the text tables, status lines, multi-line bodies.

The server formats its replies here and the client parses them here, so the two
cannot drift. The human-readable texts live in one table per language, keyed by
:class:`Text`: :data:`TEXTS` (English, also ``i-default``) and the translations in
:data:`LANGUAGES`, which RFC 6856 ``LANG`` switches between. Response codes (RFC 2449
§8, RFC 3206, RFC 6856) and the machine-readable parts of a reply (STAT's counts,
LIST and UIDL lines, the language tag of a LANG reply) never come from a table.

Until a client sends ``UTF8`` the server's replies are US-ASCII (RFC 1939, RFC 6856
§3): every language has an ASCII form of its table (:func:`ascii_fold`, e.g. "ä" as
"ae"), used before UTF8; after it the table is sent as written.
"""

from __future__ import annotations

import enum
import string
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CRLF",
    "DEFAULT_LANGUAGE",
    "LANGUAGES",
    "MAX_STATUS_LINE",
    "RESP_CODES",
    "TEXTS",
    "Language",
    "ReplyLineError",
    "StatusLine",
    "Text",
    "ascii_fold",
    "encode_multiline",
    "encode_status",
    "match_language",
    "parse_capabilities",
    "parse_listing",
    "parse_scan",
    "parse_stat",
    "parse_status",
    "parse_uid",
    "split_lines",
]

CRLF: Final = b"\r\n"
# RFC 2449 §4: the first line of a response is at most 512 octets with its CRLF.
MAX_STATUS_LINE: Final = 512
# The response codes this server sends (RFC 2449 §8.1, RFC 3206 §4).
RESP_CODES: Final = frozenset(
    {"AUTH", "IN-USE", "LOGIN-DELAY", "SYS/TEMP", "SYS/PERM", "UTF8"}  # UTF8: RFC 6856
)


class Text(enum.Enum):
    """The reply texts; each value is the English text (``str.format`` fields in braces)."""

    # By identity, in C: every reply looks its text up by member (see State).
    __hash__ = object.__hash__

    GREETING = "POP3 server ready"
    CAPA = "Capability list follows"
    LOGGING_OUT = "Logging out"
    MAILDROP = "maildrop has {count} messages ({octets} octets)"
    SCAN_LISTING = "{count} messages ({octets} octets)"
    OCTETS = "{size} octets"
    MARKED = "Marked to be deleted"
    BEGIN_TLS = "Begin TLS negotiation"
    # command errors (RFC 1939 §3)
    UNKNOWN_COMMAND = "Unknown command"
    BAD_ARGUMENTS = "Invalid arguments"
    BAD_CHARACTERS = "Invalid characters in command"
    BAD_BASE64 = "Invalid base64 data"
    LINE_TOO_LONG = "Line too long"
    WRONG_STATE = "Command not valid in this state"
    TOO_MANY_BAD = "Too many invalid commands, closing connection"
    NO_SUCH_MESSAGE = "No such message"
    ALREADY_DELETED = "Message already deleted"
    # authentication
    NO_USERNAME = "No username given"
    APOP_UNAVAILABLE = "APOP not available"
    UNSUPPORTED_MECHANISM = "Unsupported authentication mechanism"
    PLAINTEXT_REFUSED = "Plaintext authentication disallowed on non-secure (SSL/TLS) connections"
    AUTH_FAILED = "Authentication failed"
    AUTH_CANCELLED = "Authentication cancelled"
    AUTH_TEMPORARY = "Temporary authentication failure"
    LOGIN_DELAY = "Minimum time between logins not reached"
    # TLS
    STLS_UNAVAILABLE = "STLS not available"
    TLS_ACTIVE = "TLS already active"
    # the maildrop
    IN_USE = "Mailbox is locked by another session"
    MAILBOX_PERMANENT = "Mailbox cannot be opened"
    MAILBOX_TEMPORARY = "Mailbox temporarily unavailable"
    MESSAGE_TEMPORARY = "Message temporarily unavailable"
    NOT_REMOVED = "Some deleted messages not removed"
    TOO_MANY_CONNECTIONS = "Too many connections, try again later"
    ACCOUNT_DISABLED = "Account disabled"
    # RFC 6856
    UTF8_ENABLED = "UTF-8 mode enabled"
    UTF8_NEEDED = "Message has UTF-8 header fields; it needs a client that sends UTF8"
    STLS_AFTER_UTF8 = "STLS is not allowed after UTF8"
    LANG_LIST = "Language listing follows"
    LANG_CHANGED = "Language changed"
    LANG_UNKNOWN = "Language {lang} is not supported"


TEXTS: Final[Mapping[Text, str]] = {t: t.value for t in Text}
"""English, the default language (``en`` and ``i-default``)."""

_GERMAN: Final[Mapping[Text, str]] = {
    Text.GREETING: "POP3-Server bereit",
    Text.CAPA: "Liste der Fähigkeiten folgt",
    Text.LOGGING_OUT: "Abmeldung",
    Text.MAILDROP: "Postfach enthält {count} Nachrichten ({octets} Oktette)",
    Text.SCAN_LISTING: "{count} Nachrichten ({octets} Oktette)",
    Text.OCTETS: "{size} Oktette",
    Text.MARKED: "Zum Löschen markiert",
    Text.BEGIN_TLS: "TLS-Aushandlung beginnt",
    Text.UNKNOWN_COMMAND: "Unbekannter Befehl",
    Text.BAD_ARGUMENTS: "Ungültige Argumente",
    Text.BAD_CHARACTERS: "Ungültige Zeichen im Befehl",
    Text.BAD_BASE64: "Ungültige Base64-Daten",
    Text.LINE_TOO_LONG: "Zeile zu lang",
    Text.WRONG_STATE: "Befehl in diesem Zustand nicht erlaubt",
    Text.TOO_MANY_BAD: "Zu viele ungültige Befehle, Verbindung wird geschlossen",
    Text.NO_SUCH_MESSAGE: "Keine solche Nachricht",
    Text.ALREADY_DELETED: "Nachricht ist bereits gelöscht",
    Text.NO_USERNAME: "Kein Benutzername angegeben",
    Text.APOP_UNAVAILABLE: "APOP nicht verfügbar",
    Text.UNSUPPORTED_MECHANISM: "Nicht unterstütztes Anmeldeverfahren",
    Text.PLAINTEXT_REFUSED: "Klartext-Anmeldung nur über sichere (SSL/TLS) Verbindungen",
    Text.AUTH_FAILED: "Anmeldung fehlgeschlagen",
    Text.AUTH_CANCELLED: "Anmeldung abgebrochen",
    Text.AUTH_TEMPORARY: "Vorübergehender Fehler bei der Anmeldung",
    Text.LOGIN_DELAY: "Mindestabstand zwischen Anmeldungen noch nicht erreicht",
    Text.STLS_UNAVAILABLE: "STLS nicht verfügbar",
    Text.TLS_ACTIVE: "TLS ist bereits aktiv",
    Text.IN_USE: "Postfach ist von einer anderen Sitzung gesperrt",
    Text.MAILBOX_PERMANENT: "Postfach kann nicht geöffnet werden",
    Text.MAILBOX_TEMPORARY: "Postfach vorübergehend nicht verfügbar",
    Text.MESSAGE_TEMPORARY: "Nachricht vorübergehend nicht verfügbar",
    Text.NOT_REMOVED: "Einige gelöschte Nachrichten wurden nicht entfernt",
    Text.TOO_MANY_CONNECTIONS: "Zu viele Verbindungen, bitte später erneut versuchen",
    Text.ACCOUNT_DISABLED: "Konto gesperrt",
    Text.UTF8_ENABLED: "UTF-8-Modus eingeschaltet",
    Text.UTF8_NEEDED: "Nachricht hat UTF-8-Kopfzeilen; sie braucht ein Programm, das UTF8 sendet",
    Text.STLS_AFTER_UTF8: "STLS ist nach UTF8 nicht erlaubt",
    Text.LANG_LIST: "Liste der Sprachen folgt",
    Text.LANG_CHANGED: "Sprache geändert",
    Text.LANG_UNKNOWN: "Sprache {lang} wird nicht unterstützt",
}

_SPANISH: Final[Mapping[Text, str]] = {
    Text.GREETING: "Servidor POP3 listo",
    Text.CAPA: "Sigue la lista de capacidades",
    Text.LOGGING_OUT: "Cerrando la sesión",
    Text.MAILDROP: "El buzón tiene {count} mensajes ({octets} octetos)",
    Text.SCAN_LISTING: "{count} mensajes ({octets} octetos)",
    Text.OCTETS: "{size} octetos",
    Text.MARKED: "Marcado para borrar",
    Text.BEGIN_TLS: "Comienza la negociación TLS",
    Text.UNKNOWN_COMMAND: "Orden desconocida",
    Text.BAD_ARGUMENTS: "Argumentos no válidos",
    Text.BAD_CHARACTERS: "Caracteres no válidos en la orden",
    Text.BAD_BASE64: "Datos base64 no válidos",
    Text.LINE_TOO_LONG: "Línea demasiado larga",
    Text.WRONG_STATE: "Orden no válida en este estado",
    Text.TOO_MANY_BAD: "Demasiadas órdenes no válidas, se cierra la conexión",
    Text.NO_SUCH_MESSAGE: "No existe ese mensaje",
    Text.ALREADY_DELETED: "El mensaje ya está borrado",
    Text.NO_USERNAME: "Falta el nombre de usuario",
    Text.APOP_UNAVAILABLE: "APOP no disponible",
    Text.UNSUPPORTED_MECHANISM: "Mecanismo de autenticación no admitido",
    Text.PLAINTEXT_REFUSED: "Autenticación en claro no permitida sin conexión segura (SSL/TLS)",
    Text.AUTH_FAILED: "Falló la autenticación",
    Text.AUTH_CANCELLED: "Autenticación cancelada",
    Text.AUTH_TEMPORARY: "Fallo temporal de autenticación",
    Text.LOGIN_DELAY: "Aún no ha pasado el tiempo mínimo entre accesos",
    Text.STLS_UNAVAILABLE: "STLS no disponible",
    Text.TLS_ACTIVE: "TLS ya está activo",
    Text.IN_USE: "El buzón está bloqueado por otra sesión",
    Text.MAILBOX_PERMANENT: "No se puede abrir el buzón",
    Text.MAILBOX_TEMPORARY: "Buzón no disponible temporalmente",
    Text.MESSAGE_TEMPORARY: "Mensaje no disponible temporalmente",
    Text.NOT_REMOVED: "Algunos mensajes borrados no se eliminaron",
    Text.TOO_MANY_CONNECTIONS: "Demasiadas conexiones, inténtelo más tarde",
    Text.ACCOUNT_DISABLED: "Cuenta desactivada",
    Text.UTF8_ENABLED: "Modo UTF-8 activado",
    Text.UTF8_NEEDED: "El mensaje tiene cabeceras UTF-8; necesita un cliente que envíe UTF8",
    Text.STLS_AFTER_UTF8: "STLS no está permitido después de UTF8",
    Text.LANG_LIST: "Sigue la lista de idiomas",
    Text.LANG_CHANGED: "Idioma cambiado",
    Text.LANG_UNKNOWN: "El idioma {lang} no está disponible",
}

# German transliteration (DIN 5007-2); everything else loses its accents.
_FOLD: Final = str.maketrans(
    {"ä": "ae", "ö": "oe", "ü": "ue", "Ä": "Ae", "Ö": "Oe", "Ü": "Ue", "ß": "ss"}
)


def ascii_fold(text: str) -> str:
    """``text`` in US-ASCII for a client that has not sent UTF8: German umlauts
    transliterated, other accents dropped, anything left as ``?``."""
    if text.isascii():
        return text
    decomposed = unicodedata.normalize("NFKD", text.translate(_FOLD))
    kept = "".join(c for c in decomposed if not unicodedata.combining(c))
    return kept.encode("ascii", "replace").decode("ascii")


@dataclass(frozen=True, slots=True)
class Language:
    """One language of the reply texts (RFC 6856 §3)."""

    tag: str
    """RFC 5646 language tag, lower case."""
    name: str
    """What the language calls itself (the LANG listing's description)."""
    texts: Mapping[Text, str]
    """Its table, as written (sent after UTF8)."""
    ascii_texts: Mapping[Text, str]
    """The same table folded to US-ASCII (sent before UTF8)."""

    @classmethod
    def build(cls, tag: str, name: str, texts: Mapping[Text, str]) -> Language:
        missing = [t.name for t in Text if t not in texts]
        if missing:
            raise ValueError(f"language {tag}: no text for {', '.join(missing)}")
        for key, value in texts.items():
            if _fields(value) != _fields(key.value):
                raise ValueError(f"language {tag}: {key.name} has other fields than English")
        folded = {key: ascii_fold(value) for key, value in texts.items()}
        return cls(tag, name, dict(texts), folded)


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


DEFAULT_LANGUAGE: Final = "i-default"
"""RFC 2277 / RFC 6856 §3: the language of a session until LANG changes it."""

LANGUAGES: Final[Mapping[str, Language]] = {
    lang.tag: lang
    for lang in (
        Language.build("en", "English", TEXTS),
        Language.build("de", "Deutsch", _GERMAN),
        Language.build("es", "Español", _SPANISH),
        Language.build(DEFAULT_LANGUAGE, "Default language (English)", TEXTS),
    )
}
"""Every language LANG offers, by lower-case tag, in listing order."""


def match_language(language_range: str) -> Language | None:
    """The language a LANG argument selects (RFC 4647 §3.3.1 basic filtering, case
    insensitive, the first tag in :data:`LANGUAGES` order that the range matches);
    ``*`` selects English. None if no language matches."""
    wanted = language_range.lower()
    if wanted == "*":
        return LANGUAGES["en"]
    for tag, lang in LANGUAGES.items():
        if tag == wanted or tag.startswith(wanted + "-"):
            return lang
    return None


class ReplyLineError(ValueError):
    """A status line that breaks RFC 1939 §3 / RFC 2449 §4 (too long, no status)."""


@dataclass(frozen=True, slots=True)
class StatusLine:
    """The first line of a reply: ``+OK``/``-ERR``, an optional response code, text."""

    ok: bool
    text: str = ""
    code: str | None = None

    def encode(self) -> bytes:
        return encode_status(self.ok, self.text, self.code)


def encode_status(ok: bool, text: str = "", code: str | None = None) -> bytes:
    """``+OK text`` / ``-ERR [CODE] text`` with CRLF; at most 512 octets (RFC 2449 §4)."""
    if code is not None:
        # RFC 2449 §6.4: a response code is bracketed and starts the text.
        text = f"[{code}] {text}" if text else f"[{code}]"
    status = "+OK" if ok else "-ERR"
    line = (f"{status} {text}" if text else status).encode("utf-8") + CRLF
    if len(line) > MAX_STATUS_LINE:
        raise ReplyLineError("status line over 512 octets")
    return line


def encode_multiline(lines: Iterable[str]) -> bytes:
    """The body of a multi-line reply built from ASCII lines (CAPA, LIST, UIDL),
    dot-stuffed (RFC 1939 §3) and terminated by ``.``."""
    out = []
    for line in lines:
        out.append(f".{line}\r\n" if line.startswith(".") else f"{line}\r\n")
    out.append(".\r\n")
    return "".join(out).encode("utf-8")


def _resp_code(text: str) -> tuple[str | None, str]:
    """RFC 2449 §8: ``[resp-level *("/" resp-level)]`` at the start of the text."""
    if not text.startswith("["):
        return None, text
    end = text.find("]")
    if end < 2:
        return None, text
    code = text[1:end]
    # rchar is %x21-7F without "/" and "]"; levels are separated by "/".
    levels = code.split("/")
    if not all(level and all("\x21" <= c <= "\x7f" for c in level) for level in levels):
        return None, text
    return code, text[end + 1 :].lstrip(" ")


def parse_status(line: bytes) -> StatusLine:
    """Parse a status line without its CRLF (the caller framed it strictly).

    Raises :class:`ReplyLineError` unless it starts with ``+OK`` or ``-ERR`` (upper
    case, RFC 1939 §3) followed by the end or a space, or if it is over 510 octets.
    The text is decoded as UTF-8, with replacement: a server's text is for people.
    """
    if len(line) + 2 > MAX_STATUS_LINE:
        raise ReplyLineError("status line over 512 octets")
    if line.startswith(b"+OK"):
        ok, rest = True, line[3:]
    elif line.startswith(b"-ERR"):
        ok, rest = False, line[4:]
    else:
        raise ReplyLineError("reply does not start with +OK or -ERR")
    if rest and not rest.startswith(b" "):
        raise ReplyLineError("status indicator not followed by a space")
    text = rest[1:].decode("utf-8", "replace")
    code, text = _resp_code(text)
    return StatusLine(ok, text, code)


# --------------------------------------------------------------------------------------
# The machine-readable parts of replies, for the client role. The server writes these
# with the f-strings in ``pypop.protocol.server``; the round trip is tested.
# --------------------------------------------------------------------------------------

MAX_UID: Final = 255
"""Longest unique-id we accept. RFC 1939 §7 says 70; some servers send more, and the
length does not matter to the framing."""


def split_lines(body: bytes) -> list[bytes]:
    """The lines of an unstuffed multi-line body that must be CRLF lines (CAPA, LIST,
    UIDL, AUTH): ``ReplyLineError`` on a bare CR or LF or a missing final CRLF."""
    if not body:
        return []
    if not body.endswith(CRLF):
        raise ReplyLineError("multi-line reply does not end with CRLF")
    lines = body[:-2].split(CRLF)
    for line in lines:
        if 13 in line or 10 in line:  # CR, LF (an int needle: see parse_command)
            raise ReplyLineError("bare CR or LF in a multi-line reply")
    return lines


def _decimal(word: bytes | str) -> int:
    if isinstance(word, str):
        word = word.encode("ascii", "replace")
    if not word or not word.isdigit() or len(word) > 20:
        raise ReplyLineError(f"expected a number, got {word[:40]!r}")
    return int(word)


def parse_stat(text: str) -> tuple[int, int]:
    """RFC 1939 §5 STAT: ``count octets`` at the start of the ``+OK`` text."""
    words = text.split(" ")
    if len(words) < 2:
        raise ReplyLineError("STAT reply without count and size")
    return _decimal(words[0]), _decimal(words[1])


def parse_scan(line: bytes | str) -> tuple[int, int]:
    """A scan listing (LIST): ``msg octets`` [ignored rest] (RFC 1939 §5)."""
    raw = line.encode("utf-8") if isinstance(line, str) else line
    words = raw.split(b" ")
    if len(words) < 2:
        raise ReplyLineError("scan listing without message number and size")
    return _decimal(words[0]), _decimal(words[1])


def parse_uid(line: bytes | str) -> tuple[int, str]:
    """A unique-id listing (UIDL): ``msg unique-id``, the id 0x21-0x7E (RFC 1939 §7)."""
    raw = line.encode("utf-8") if isinstance(line, str) else line
    words = raw.split(b" ")
    if len(words) < 2:
        raise ReplyLineError("unique-id listing without message number and id")
    uid = words[1]
    if not 1 <= len(uid) <= MAX_UID or any(c < 0x21 or c > 0x7E for c in uid):
        raise ReplyLineError("unique-id outside 0x21-0x7E or too long")
    return _decimal(words[0]), uid.decode("ascii")


def parse_listing(body: bytes, uid: bool) -> list[tuple[int, int]] | list[tuple[int, str]]:
    """A whole LIST (``uid=False``) or UIDL body."""
    lines = split_lines(body)
    if uid:
        return [parse_uid(line) for line in lines]
    return [parse_scan(line) for line in lines]


def parse_capabilities(body: bytes) -> dict[str, list[str]]:
    """RFC 2449 §5: one capability per line, ``TAG [args]``; tags upper-cased."""
    caps: dict[str, list[str]] = {}
    for line in split_lines(body):
        words = line.decode("utf-8", "replace").split()
        if words:
            caps[words[0].upper()] = words[1:]
    return caps
