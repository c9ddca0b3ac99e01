"""The one state table (RFC 1939 §3): which command is legal in which state."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from pypop.protocol.commands import (
    Apop,
    Auth,
    Capa,
    Command,
    Dele,
    Lang,
    List,
    Noop,
    Pass,
    Quit,
    Retr,
    Rset,
    Stat,
    Stls,
    Top,
    Uidl,
    User,
    Utf8,
)

__all__ = ["ALLOWED", "State", "allowed"]


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"

    # Members compare by identity: hash them so too, in C (Enum's own __hash__ is a
    # Python call, paid on every command's state check).
    __hash__ = object.__hash__


_AUTH = frozenset({State.AUTHORIZATION})
_TRANS = frozenset({State.TRANSACTION})
_BOTH = _AUTH | _TRANS

ALLOWED: Final[Mapping[type[Command], frozenset[State]]] = {
    User: _AUTH,  # §7
    Pass: _AUTH,  # §7
    Apop: _AUTH,  # §7
    Auth: _AUTH,  # RFC 5034 §4
    Stls: _AUTH,  # RFC 2595 §4
    Capa: _BOTH,  # RFC 2449 §5
    Quit: _BOTH,  # §4, §6
    Noop: _TRANS,  # §5
    Stat: _TRANS,
    List: _TRANS,
    Retr: _TRANS,
    Dele: _TRANS,
    Rset: _TRANS,
    Top: _TRANS,  # §7
    Uidl: _TRANS,  # §7
    Utf8: _AUTH,  # RFC 6856 §2.1
    Lang: _BOTH,  # RFC 6856 §3.1
}


def allowed(command: Command, state: State) -> bool:
    return state in ALLOWED[type(command)]
