"""CFPOP rows: one per message, from the stdlib ``email`` package (``policy.default``).

The columns are CFPOP's (MessageNumber, UID, Date, From, ReplyTo, Subject, CC, To,
Header, Body, TextBody, HtmlBody, Attachments, AttachmentFiles) plus MessageID, Size,
the Content-ID map for inline images and the parser's defects. Malformed mail never
raises: every field that cannot be decoded falls back to the raw text (decoded with
replacement) and says so in ``defects``.
"""

from __future__ import annotations

import datetime as dt
import email
import email.header
import email.utils
import mimetypes
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from pathlib import Path
from typing import Any

from pypop.client.attachments import save

__all__ = ["Row", "build_row", "header_block"]


@dataclass(slots=True)
class Row:
    """One message, as CFPOP's query row (attribute names in snake case; :meth:`cfpop`
    gives CFPOP's column names)."""

    message_number: int
    uid: str | None
    size: int | None
    date: dt.datetime | None
    """The Date header as an aware datetime in UTC; None if missing or unparseable."""
    date_header: str | None
    from_: str
    reply_to: str
    subject: str
    cc: str
    to: str
    message_id: str
    header: str
    body: str | None = None
    """The first part's text (None for headers-only rows)."""
    text_body: str | None = None
    html_body: str | None = None
    attachments: list[str] = field(default_factory=list)
    attachment_files: list[str] = field(default_factory=list)
    cids: dict[str, str] = field(default_factory=dict)
    """Content-ID (without ``<>``) -> saved file (or file name when not saved)."""
    defects: list[str] = field(default_factory=list)

    @property
    def attachments_string(self) -> str:
        """CFPOP's form: names joined by tabs."""
        return "\t".join(self.attachments)

    @property
    def attachment_files_string(self) -> str:
        return "\t".join(self.attachment_files)

    def cfpop(self) -> dict[str, Any]:
        """The row under CFPOP's column names (plus the extra ones)."""
        return {
            "MessageNumber": self.message_number,
            "UID": self.uid,
            "Date": self.date.isoformat() if self.date else None,
            "DateHeader": self.date_header,
            "From": self.from_,
            "ReplyTo": self.reply_to,
            "Subject": self.subject,
            "CC": self.cc,
            "To": self.to,
            "MessageID": self.message_id,
            "Size": self.size,
            "Header": self.header,
            "Body": self.body,
            "TextBody": self.text_body,
            "HtmlBody": self.html_body,
            "Attachments": self.attachments_string,
            "AttachmentFiles": self.attachment_files_string,
            "CIDs": dict(self.cids),
            "Defects": list(self.defects),
        }


def header_block(raw: bytes) -> bytes:
    """The header section of a message, through the empty line (for RETR fallback)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = raw.find(sep)
        if at >= 0:
            return raw[: at + len(sep)]
    return raw


def _parse(raw: bytes, defects: list[str]) -> Message:
    """``policy.default``; where the stdlib raises instead of recording a defect (it
    does on some hostile headers), the lenient compat32 parser, then its headers only."""
    try:
        return email.message_from_bytes(raw, policy=policy.default)
    except Exception as exc:
        defects.append(f"unparseable ({type(exc).__name__}): parsed leniently")
    try:
        return email.message_from_bytes(raw, policy=policy.compat32)
    except Exception:
        return BytesParser(policy=policy.compat32).parsebytes(raw, headersonly=True)


def _raw_header(msg: Message, name: str) -> str | None:
    for key, value in msg.raw_items() if isinstance(msg, EmailMessage) else msg.items():
        if key.lower() == name.lower():
            return str(value)
    return None


def _unstructured(raw: str) -> str:
    """Encoded words decoded without address parsing (for headers that do not parse)."""
    text = " ".join(raw.split())
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except Exception:
        return text


def _header(msg: Message, name: str, defects: list[str]) -> str:
    """A decoded header (encoded words and all). When the parser cannot make sense of
    it, the raw text with its encoded words decoded, and the defect noted."""
    raw = _raw_header(msg, name)
    if raw is None:
        return ""
    if not isinstance(msg, EmailMessage):  # the lenient compat32 fallback
        return _unstructured(raw)
    try:
        values = msg.get_all(name) or []
        found = [type(d).__name__ for v in values for d in getattr(v, "defects", ())]
        text = ", ".join(str(v) for v in values).strip()
    except Exception as exc:  # the header parser has had crash bugs on hostile input
        defects.append(f"{name}: {type(exc).__name__}")
        return _unstructured(raw)
    defects.extend(f"{name}: {d}" for d in dict.fromkeys(found))
    if "InvalidHeaderDefect" in found or (raw.strip() and not text.strip("<> ")):
        return _unstructured(raw)
    if "\ufffd" in text and "\ufffd" not in raw:
        defects.append(f"{name}: undecodable characters")
    return text


def _date(msg: Message, defects: list[str]) -> tuple[dt.datetime | None, str | None]:
    raw = _raw_header(msg, "Date")
    if raw is None:
        defects.append("Date: missing")
        return None, None
    raw = " ".join(raw.split())
    try:
        parsed = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError, OverflowError):
        defects.append("Date: unparseable")
        return None, raw
    if parsed.tzinfo is None:  # "-0000": UTC, origin unknown (RFC 5322 §3.3)
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC), raw


def _text_of(part: Message, defects: list[str]) -> str:
    """A text part's content in its charset. An unknown charset, or one the octets do
    not fit (8-bit data labelled us-ascii), falls back to UTF-8, then Latin-1 (which
    never fails), and the defect is noted."""
    payload = part.get_payload(decode=True)
    data = payload if isinstance(payload, bytes) else b""
    try:
        charset = part.get_content_charset() or "us-ascii"
    except ValueError:  # a NUL in an RFC 2231 charset: the codec lookup raises
        defects.append("charset: unreadable")
        charset = "us-ascii"
    try:
        text = data.decode(charset)
    except LookupError:
        defects.append(f"unknown charset {charset!r}")
        text = None
    except UnicodeDecodeError:
        defects.append(f"text is not {charset}")
        text = None
    if text is None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
    return text.replace("\r\n", "\n")


def _filename(part: Message, defects: list[str]) -> str | None:
    try:
        name = part.get_filename()
    except Exception as exc:
        defects.append(f"filename: {type(exc).__name__}")
        return None
    return str(name) if name else None


def _leaves(msg: Message) -> list[Message]:
    """Leaf parts in order, descending multiparts but not message/rfc822 (those are
    attachments as a whole)."""
    out: list[Message] = []
    stack = [msg]
    while stack:
        part = stack.pop()
        try:
            container = part.is_multipart() and part.get_content_maintype() == "multipart"
        except Exception:  # build_row notes it when the part is read
            container = False
        if container:
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend(p for p in reversed(payload) if isinstance(p, Message))
            continue
        out.append(part)
    return out


def _is_attachment(part: Message, defects: list[str]) -> bool:
    """Attachments: explicit ``attachment`` disposition, embedded messages, any
    non-text leaf (inline images, TNEF, ...), and text parts with a file name."""
    disposition = (part.get_content_disposition() or "").lower()
    if disposition == "attachment" or part.get_content_maintype() == "message":
        return True
    if part.get_content_type() in ("text/plain", "text/html"):
        return _filename(part, defects) is not None
    return True


def build_row(
    number: int,
    uid: str | None,
    raw: bytes,
    *,
    size: int | None = None,
    headers_only: bool = False,
    attachment_path: str | Path | None = None,
    unique_filenames: bool = False,
) -> Row:
    """Parse ``raw`` into a row; save attachments under ``attachment_path`` if given."""
    defects: list[str] = []
    msg = _parse(raw, defects)
    defects.extend(type(d).__name__ for d in msg.defects)
    date, date_raw = _date(msg, defects)
    head = header_block(raw).decode("utf-8", "replace").replace("\r\n", "\n")
    row = Row(
        message_number=number,
        uid=uid,
        size=size,
        date=date,
        date_header=date_raw,
        from_=_header(msg, "From", defects),
        reply_to=_header(msg, "Reply-To", defects),
        subject=_header(msg, "Subject", defects),
        cc=_header(msg, "Cc", defects),
        to=_header(msg, "To", defects),
        message_id=_header(msg, "Message-ID", defects),
        header=head.rstrip("\n"),
        defects=defects,
    )
    if headers_only:
        return row
    leaves = _leaves(msg)
    body_taken = False
    for index, part in enumerate(leaves):
        for d in part.defects:
            name = type(d).__name__
            if name not in defects:
                defects.append(name)
        try:
            ctype = part.get_content_type()
            if _is_attachment(part, defects):
                _attachment(row, part, index, attachment_path, unique_filenames, defects)
                continue
            text = _text_of(part, defects)
        except Exception as exc:  # header parser crash bugs: one part, not the row
            defects.append(f"part {index + 1}: {type(exc).__name__}")
            _opaque(row, part, index, attachment_path, unique_filenames, defects)
            continue
        if not body_taken:
            row.body, body_taken = text, True
        if ctype == "text/plain" and row.text_body is None:
            row.text_body = text
        elif ctype == "text/html" and row.html_body is None:
            row.html_body = text
    if row.body is None:
        row.body = ""
        defects.append("no text body")
    return row


def _opaque(
    row: Row,
    part: Message,
    index: int,
    attachment_path: str | Path | None,
    unique: bool,
    defects: list[str],
) -> None:
    """A part whose headers the parser raises on: kept under a made-up name."""
    name = f"attachment-{index + 1}.dat"
    row.attachments.append(name)
    if attachment_path is None:
        return
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        return
    data = payload if isinstance(payload, bytes) else b""
    _save(row, attachment_path, name, data, unique, defects)


def _save(
    row: Row, directory: str | Path, name: str, data: bytes, unique: bool, defects: list[str]
) -> str | None:
    """Save one attachment; its path (also in ``row.attachment_files``), or None with
    the failure in ``defects``."""
    try:
        path = str(save(directory, name, data, unique=unique))
    except OSError as exc:
        defects.append(f"attachment {name!r} not saved: {exc.strerror or exc}")
        return None
    row.attachment_files.append(path)
    return path


def _attachment(
    row: Row,
    part: Message,
    index: int,
    attachment_path: str | Path | None,
    unique: bool,
    defects: list[str],
) -> None:
    name = _filename(part, defects)
    ctype = part.get_content_type()
    if not name:
        ext = ".eml" if ctype == "message/rfc822" else (mimetypes.guess_extension(ctype) or ".dat")
        name = f"attachment-{index + 1}{ext}"
    row.attachments.append(name)
    cid = part.get("Content-ID")
    cid_key = str(cid).strip().strip("<>") if cid else None
    if attachment_path is None:
        if cid_key:
            row.cids[cid_key] = name
        return
    if part.get_content_maintype() == "message":
        inner = part.get_payload()
        sub = inner[0] if isinstance(inner, list) and inner else None
        data = sub.as_bytes() if isinstance(sub, Message) else b""
    else:
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
    path = _save(row, attachment_path, name, data, unique, defects)
    if path is not None and cid_key:
        row.cids[cid_key] = path
