"""``pypop import``: copy mail from a Maildir tree or an mbox into the configured store.

The destination is the configured backend (``-c``, ``--backend``, ``-o``), which must
take deliveries (:class:`~pypop.backend.Deliverer`). Sources:

- ``--maildir DIR --user U``: one Maildir (``DIR/cur``, ``DIR/new``) into U's maildrop.
- ``--maildir-root ROOT``: every ``ROOT/<user>`` that is a Maildir, each into the
  maildrop of that name.
- ``--mbox FILE --user U``: an mbox file.

A Maildir is read through the ``maildir`` backend (pypop3-maildir), read-only
(no flag updates, no size cache), so every message keeps the UIDL that pypop-maildir
and Dovecot (``pop3_uidl_format = %f``) served: clients do not download everything
again. ``-O save_uidl=true`` also honours a ``pypop-uidlist`` file. An mbox message
keeps its ``X-UIDL`` header as UIDL when valid (Dovecot's ``pop3_reuse_xuidl``).
The octets are copied exactly. A message whose UIDL is already in the destination
is skipped, so an interrupted import can simply be run again. A message whose UIDL
the destination cannot keep is stored under a new one, with a line on standard error.
"""

from __future__ import annotations

import argparse
import calendar
import mailbox
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32

import trio

from pypop.auth.prep import try_username
from pypop.backend import Backend, Deliverer, is_valid_uid
from pypop.cli._store import (
    EX_NOINPUT,
    EX_NOUSER,
    EX_USAGE,
    add_backend_flags,
    exit_status,
    open_deliverer,
)
from pypop.cli.serve import _key_value
from pypop.errors import DuplicateUid
from pypop.registry import create_backend

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "import",
        help="copy a Maildir tree or an mbox into the configured store, keeping UIDLs",
        description=(__doc__ or "").split("\n\n")[0],
    )
    add_backend_flags(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--maildir", metavar="DIR", help="one Maildir (needs --user)")
    src.add_argument("--maildir-root", metavar="ROOT", help="every ROOT/<user> Maildir")
    src.add_argument("--mbox", metavar="FILE", help="an mbox file (needs --user)")
    p.add_argument("-u", "--user", help="the destination maildrop")
    p.add_argument(
        "-O",
        "--source-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option for the maildir backend that reads the source (e.g. save_uidl=true)",
    )
    p.set_defaults(run=run)


@dataclass
class Counts:
    imported: int = 0
    present: int = 0


@dataclass(frozen=True)
class Item:
    data: bytes
    uid: str | None
    received: float | None


async def _maildir_items(source: Backend, folder_user: str) -> AsyncIterator[Item]:
    box = await source.open_mailbox(folder_user)
    try:
        for i, info in enumerate(box.messages):
            data = b"".join([block async for block in box.retrieve(i)])
            yield Item(data, info.uid, None)
    finally:
        await box.aclose()  # never commit: the source is left as it was


def _from_line_time(from_line: str) -> float | None:
    """The date of an mbox ``From sender Thu Jan  1 00:00:00 2026`` line, as UTC."""
    parts = from_line.split()
    if len(parts) < 6:
        return None
    try:
        return float(calendar.timegm(time.strptime(" ".join(parts[-5:]), "%a %b %d %H:%M:%S %Y")))
    except ValueError:
        return None


def _mbox_items(path: str) -> Iterator[Item]:
    # Not locked: the table of contents is read once, so mail appended meanwhile is
    # simply not imported, and a read-only import needs no write access to the folder.
    box = mailbox.mbox(path, create=False)
    try:
        seen: set[str] = set()
        headers = BytesHeaderParser(policy=compat32)
        for key in box.iterkeys():
            data = box.get_bytes(key)
            from_line = box.get_message(key).get_from()
            xuidl = headers.parsebytes(data).get("X-UIDL")
            uid = str(xuidl).strip() if xuidl is not None else None
            if uid is not None and (not is_valid_uid(uid) or uid in seen):
                uid = None
            if uid is not None:
                seen.add(uid)
            yield Item(data, uid, _from_line_time(from_line))
    finally:
        box.close()


async def _store(deliverer: Deliverer, user: str, items: AsyncIterator[Item]) -> Counts:
    counts = Counts()
    number = 0
    async for item in items:
        number += 1
        try:
            await deliverer.deliver(user, item.data, uid=item.uid, received=item.received)
        except DuplicateUid:
            counts.present += 1
            continue
        except ValueError as exc:
            # A UIDL this store cannot keep (a maildir file name cannot hold "/", and
            # a mapped "pypop/..." UIDL or a sender's X-UIDL can): the message still
            # goes in, under a new UIDL, rather than the import stopping here.
            if item.uid is None:
                raise
            print(
                f"pypop import: {user}: message {number}: its UIDL cannot be kept here "
                f"({exc}): stored with a new UIDL",
                file=sys.stderr,
            )
            await deliverer.deliver(user, item.data, received=item.received)
        counts.imported += 1
    return counts


async def _aiter(items: Iterator[Item]) -> AsyncIterator[Item]:
    for item in items:
        yield item


def _maildir_users(root: str) -> list[str]:
    return sorted(
        name
        for name in os.listdir(root)
        if not name.startswith(".")
        and all(os.path.isdir(os.path.join(root, name, d)) for d in ("cur", "new"))
    )


def run(args: argparse.Namespace) -> int:
    def fail(status: int, text: str) -> int:
        print(f"pypop import: {text}", file=sys.stderr)
        return status

    if (args.maildir or args.mbox) and not args.user:
        return fail(EX_USAGE, "--maildir and --mbox need --user")
    if args.maildir_root and args.user:
        return fail(EX_USAGE, "--maildir-root takes the users from the folder names")
    where = args.maildir or args.maildir_root or args.mbox
    if not os.path.exists(where):
        return fail(EX_NOINPUT, f"{where}: no such file or directory")
    # Into the maildrop a login opens: the session prepares a login's name (PRECIS,
    # RFC 8265), so "jose" + U+0301 must land where "jos\u00e9" logs in.
    user: str | None = None
    if args.user:
        user = try_username(args.user)
        if user is None:
            return fail(EX_NOUSER, f"{args.user!r}: not a name a login can use")
    refused: list[str] = []  # --maildir-root folders whose names no login can use

    try:
        backend, deliverer = open_deliverer(args)
        source: Backend | None = None
        jobs: list[tuple[str, str]] = []  # (destination user, source folder name)
        if args.mbox is None:
            root = os.path.abspath(args.maildir_root or os.path.dirname(args.maildir.rstrip("/")))
            options: dict[str, object] = {
                "root": root,
                "template": "%u",
                "flag_updates": False,
                "size_cache": False,
                "autocreate": False,
                "fsync": False,
            }
            for item in args.source_option:
                key, value = _key_value("--source-option", item)
                options[key] = value
            source = create_backend("maildir", options)
            if args.maildir:
                assert user is not None
                jobs = [(user, os.path.basename(args.maildir.rstrip("/")))]
            else:
                for folder in _maildir_users(root):
                    name = try_username(folder)
                    if name is None:
                        refused.append(folder)
                    else:
                        jobs.append((name, folder))
    except Exception as exc:
        return fail(exit_status(exc), str(exc))

    async def main() -> int:
        try:
            if source is None:
                assert user is not None
                counts = await _store(deliverer, user, _aiter(_mbox_items(args.mbox)))
                print(f"{user}: {counts.imported} imported, {counts.present} already there")
                return 0
            for dest, folder in jobs:
                counts = await _store(deliverer, dest, _maildir_items(source, folder))
                print(f"{dest}: {counts.imported} imported, {counts.present} already there")
            for folder in refused:  # the others are in; the admin must rename these
                fail(EX_NOUSER, f"{folder!r}: not a name a login can use: not imported")
            return EX_NOUSER if refused else 0
        finally:
            with trio.CancelScope(shield=True):
                if source is not None:
                    await source.aclose()
                await backend.aclose()

    try:
        return trio.run(main)
    except Exception as exc:
        leaf: BaseException = exc
        while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
            leaf = leaf.exceptions[0]
        return fail(exit_status(leaf), str(leaf))
