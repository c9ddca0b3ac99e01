"""Sans-I/O POP3: grammar, state table, events, replies. No trio, socket or ssl."""

from pypop.protocol.client import Challenge, ClientConnection, Greeting, Reply
from pypop.protocol.commands import Command, ParseError, encode_command, parse_command
from pypop.protocol.events import (
    NEED_DATA,
    SEND_DATA,
    ApopLogin,
    Closing,
    ConnectionClosed,
    Event,
    LocalProtocolError,
    NeedData,
    PasswordLogin,
    Retrieve,
    SaslAborted,
    SaslResponse,
    SaslStart,
    SendData,
    StartTLS,
    Update,
)
from pypop.protocol.replies import StatusLine, Text, parse_status
from pypop.protocol.server import ProtocolConfig, ServerConnection
from pypop.protocol.state import ALLOWED, State

__all__ = [
    "ALLOWED",
    "NEED_DATA",
    "SEND_DATA",
    "ApopLogin",
    "Challenge",
    "ClientConnection",
    "Closing",
    "Command",
    "ConnectionClosed",
    "Event",
    "Greeting",
    "LocalProtocolError",
    "NeedData",
    "ParseError",
    "PasswordLogin",
    "ProtocolConfig",
    "Reply",
    "Retrieve",
    "SaslAborted",
    "SaslResponse",
    "SaslStart",
    "SendData",
    "ServerConnection",
    "StartTLS",
    "State",
    "StatusLine",
    "Text",
    "Update",
    "encode_command",
    "parse_command",
    "parse_status",
]
