"""Sans-I/O POP3: grammar, state table, events, responses. No trio, socket or ssl."""

from pypop.protocol.commands import Command, ParseError, parse_command
from pypop.protocol.connection import (
    NEED_DATA,
    ApopLogin,
    Closing,
    ConnectionClosed,
    Event,
    NeedData,
    PasswordLogin,
    ProtocolConfig,
    ProtocolError,
    Retrieve,
    SaslAborted,
    SaslResponse,
    SaslStart,
    ServerConnection,
    StartTLS,
    Update,
)
from pypop.protocol.state import ALLOWED, State

__all__ = [
    "ALLOWED",
    "NEED_DATA",
    "ApopLogin",
    "Closing",
    "Command",
    "ConnectionClosed",
    "Event",
    "NeedData",
    "ParseError",
    "PasswordLogin",
    "ProtocolConfig",
    "ProtocolError",
    "Retrieve",
    "SaslAborted",
    "SaslResponse",
    "SaslStart",
    "ServerConnection",
    "StartTLS",
    "State",
    "Update",
    "parse_command",
]
