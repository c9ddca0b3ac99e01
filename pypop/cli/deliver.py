"""``pypop deliver --user U < message``: a local delivery agent for an MTA.

For Postfix's ``mailbox_command`` (or any MTA that pipes a message to a command).
The message, read whole from standard input (bounded by ``--max-size``), goes to the
maildrop a login opens for ``--user`` (the name prepared with PRECIS, as the server
prepares a login's name), through the configured backend's
:class:`~pypop.backend.Deliverer` capability. The exit status follows sysexits.h so
that the MTA does the right thing:

==  ===============  ==================================================================
0   delivered        the message is durable in the store
65  EX_DATAERR       empty message, or larger than ``--max-size`` (bounced)
67  EX_NOUSER        no such maildrop, and the backend does not create one, or a name
                     no login can use (RFC 8265 PRECIS refuses it) (bounced)
69  EX_UNAVAILABLE   the store refused the message for good (bounced)
75  EX_TEMPFAIL      the store is down or busy, or anything unexpected: the MTA keeps
                     the message and retries
78  EX_CONFIG        bad configuration, or a backend without delivery (Postfix defers)
==  ===============  ==================================================================
"""

from __future__ import annotations

import argparse
import sys
from typing import BinaryIO

import trio

from pypop.auth.prep import try_username
from pypop.cli._store import (
    EX_DATAERR,
    EX_NOUSER,
    EX_TEMPFAIL,
    add_backend_flags,
    exit_status,
    open_deliverer,
)

__all__ = ["add_parser", "run"]

DEFAULT_MAX_SIZE = 100 * 1024 * 1024


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "deliver",
        help="store a message from standard input (a delivery agent for an MTA)",
        description=(__doc__ or "").split("\n\n")[0],
    )
    add_backend_flags(p)
    p.add_argument("-u", "--user", required=True, help="the recipient's maildrop")
    p.add_argument(
        "--max-size",
        type=int,
        default=DEFAULT_MAX_SIZE,
        metavar="OCTETS",
        help=f"refuse larger messages with EX_DATAERR (default {DEFAULT_MAX_SIZE})",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="print the new UIDL")
    p.set_defaults(run=run)


def read_message(stream: BinaryIO, limit: int) -> bytes | None:
    """All of ``stream``, or None if it holds more than ``limit`` octets."""
    data = stream.read(limit + 1)
    return None if len(data) > limit else data


def run(args: argparse.Namespace) -> int:
    def fail(status: int, text: str) -> int:
        print(f"pypop deliver: {text}", file=sys.stderr)
        return status

    try:
        message = read_message(sys.stdin.buffer, args.max_size)
    except OSError as exc:
        return fail(EX_TEMPFAIL, f"cannot read the message: {exc.strerror or exc}")
    if message is None:
        return fail(EX_DATAERR, f"message larger than {args.max_size} octets")
    if not message:
        return fail(EX_DATAERR, "empty message")
    # The name a login opens the maildrop under (the session prepares it so): mail
    # for a variant of it (decomposed, full-width) must reach the same maildrop.
    user = try_username(args.user)
    if user is None:
        return fail(EX_NOUSER, f"{args.user!r}: no such user")
    try:
        backend, deliverer = open_deliverer(args)
    except Exception as exc:
        return fail(exit_status(exc), str(exc))

    async def deliver() -> str:
        try:
            return await deliverer.deliver(user, message)
        finally:
            with trio.CancelScope(shield=True):
                await backend.aclose()

    try:
        uid = trio.run(deliver)
    except Exception as exc:
        leaf: BaseException = exc
        while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
            leaf = leaf.exceptions[0]
        return fail(exit_status(leaf), f"{user}: {leaf}")
    if args.verbose:
        print(uid)
    return 0
