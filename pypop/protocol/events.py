"""What the sans-I/O engines hand out: events, and the error for misusing them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from pypop.protocol.replies import Text

__all__ = [
    "NEED_DATA",
    "SEND_DATA",
    "ApopLogin",
    "Closing",
    "ConnectionClosed",
    "Event",
    "LocalProtocolError",
    "NeedData",
    "PasswordLogin",
    "Retrieve",
    "SaslAborted",
    "SaslResponse",
    "SaslStart",
    "SendData",
    "StartTLS",
    "Update",
]


class LocalProtocolError(RuntimeError):
    """The *caller* broke the event protocol (a bug in our code, not the peer's)."""


class NeedData:
    """Feed more bytes (after sending what is queued)."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class SendData:
    """Backpressure: the queued output is over the bound. Send it, then ask again
    *without* reading: input is waiting to be answered (RFC 2449 §6.6: neither side
    may exceed the transport window)."""

    def __repr__(self) -> str:
        return "SEND_DATA"


SEND_DATA: Final = SendData()


@dataclass(frozen=True, slots=True)
class PasswordLogin:
    """USER + PASS (RFC 1939 §7). Complete with login_succeeded / login_failed."""

    user: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ApopLogin:
    """APOP name digest (RFC 1939 §7), with the greeting's timestamp."""

    user: str
    digest: bytes = field(repr=False)
    timestamp: bytes


@dataclass(frozen=True, slots=True)
class SaslStart:
    """AUTH mechanism [initial-response] (RFC 5034). Complete with sasl_challenge,
    login_succeeded or login_failed."""

    mechanism: str
    initial: bytes | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class SaslResponse:
    """A client line answering a SASL challenge, decoded."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class SaslAborted:
    """The client cancelled with "*", or sent bad base64 or an overlong line, in
    answer to a challenge. A failed authentication like any other: complete it with
    ``login_failed(None, text)`` (it counts toward ``max_auth_failures``)."""

    text: Text


@dataclass(frozen=True, slots=True)
class StartTLS:
    """STLS accepted by the grammar and state. Complete with start_tls or reply_err."""


@dataclass(frozen=True, slots=True)
class Retrieve:
    """RETR (top_lines None) or TOP. Complete with message_header + send_raw +
    message_done, or reply_err before the header."""

    index: int
    size: int
    top_lines: int | None


@dataclass(frozen=True, slots=True)
class Update:
    """QUIT in TRANSACTION: remove ``deleted`` (indices), then update_finished."""

    deleted: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Closing:
    """Send what is queued, then close the connection."""

    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side; no UPDATE."""


Event = (
    NeedData
    | SendData
    | PasswordLogin
    | ApopLogin
    | SaslStart
    | SaslResponse
    | SaslAborted
    | StartTLS
    | Retrieve
    | Update
    | Closing
    | ConnectionClosed
)
