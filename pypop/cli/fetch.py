"""``pypop fetch URL``: CFPOP from the shell, and a mail retriever that loses nothing.

Without ``--deliver`` it prints rows (a table on a terminal, or ``--json``/``--csv``)
for ``--headers-only`` (default), ``--all`` or ``--delete``. With
``--deliver maildir:DIR`` or ``--deliver mbox:FILE`` it downloads (pipelined), stores
each message durably, records its UID in the account's state file, and only then
deletes it on the server (unless ``--keep``); ``--new`` skips UIDs already fetched.

Exit status as fetchmail documents it: 0 got mail, 1 no mail, 2 network error, 3
authentication failed, 4 protocol error, 5 bad arguments, 7 server error, 8 another
fetch holds this account's state, 9 mailbox locked by the server (IN-USE), 10 local
delivery failed; and 12 for TLS failures (certificate, or TLS required but not
offered), which fetchmail folds into 2.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from pypop.client import Client, Result, Row
from pypop.client.deliver import StateFile, open_deliverer, recorded_uids
from pypop.errors import (
    AuthError,
    ClientError,
    InUseError,
    NetworkError,
    ProtocolError,
    TLSError,
)

__all__ = ["add_parser", "run"]

EXIT_MAIL, EXIT_NOMAIL, EXIT_NETWORK, EXIT_AUTH, EXIT_PROTOCOL, EXIT_USAGE = 0, 1, 2, 3, 4, 5
EXIT_SERVER, EXIT_EXCLUDED, EXIT_LOCKED, EXIT_DELIVERY, EXIT_TLS = 7, 8, 9, 10, 12

BATCH_OCTETS = 8 * 1024 * 1024
"""A Maildir batch is committed (fsync, rename) at 256 messages or this many octets."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fetch",
        help="fetch mail from a POP3 server (CFPOP actions, or delivery to maildir/mbox)",
        description=(__doc__ or "").replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("url", help="pop://user[;AUTH=mech]@host[:port] or pops://...")
    act = p.add_mutually_exclusive_group()
    act.add_argument(
        "--headers-only",
        dest="action",
        action="store_const",
        const="headers",
        help="rows with the header columns (the default), by pipelined TOP n 0",
    )
    act.add_argument(
        "--all", dest="action", action="store_const", const="all", help="whole messages"
    )
    act.add_argument(
        "--delete",
        dest="action",
        action="store_const",
        const="delete",
        help="delete the messages chosen with --msg or --uid",
    )
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--msg", metavar="N,N", help="message numbers, comma-separated")
    sel.add_argument("--uid", metavar="U,U", help="unique ids (UIDL), comma-separated")
    p.add_argument("--start-row", type=int, default=1, metavar="N")
    p.add_argument("--max-rows", type=int, metavar="N")
    out = p.add_mutually_exclusive_group()
    out.add_argument(
        "--json", dest="format", action="store_const", const="json", help="rows as JSON"
    )
    out.add_argument("--csv", dest="format", action="store_const", const="csv", help="rows as CSV")
    p.add_argument("--attachments", metavar="DIR", help="save attachments here (with --all)")
    p.add_argument("--unique-names", action="store_true", help="never overwrite attachments")
    p.add_argument("--deliver", metavar="maildir:DIR|mbox:FILE", help="store messages locally")
    p.add_argument("--keep", action="store_true", help="leave delivered mail on the server")
    p.add_argument(
        "--new",
        action="store_true",
        help="only messages not fetched or listed before (with --deliver a message is "
        "never delivered twice anyway)",
    )
    p.add_argument(
        "--state",
        metavar="FILE",
        help="UIDL state file of --deliver (default: per account); --new without "
        "--deliver keeps what it listed in FILE.listed",
    )
    p.add_argument(
        "--auth",
        default="auto",
        help="USER, +APOP, a SASL name (GSSAPI: your Kerberos tickets, no password), or auto",
    )
    p.add_argument("--tls", choices=["implicit", "require", "auto", "off"])
    p.add_argument("--cafile", help="trust these CA certificates (PEM)")
    p.add_argument("--token-env", metavar="VAR", help="read an OAuth token from this variable")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")
    p.add_argument("--no-pipelining", action="store_true")
    p.add_argument(
        "--no-utf8",
        action="store_true",
        help="do not send UTF8 (RFC 6856) even if the server offers it",
    )
    p.add_argument("--batch", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    p.set_defaults(run=run, action=None, format=None)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"pypop fetch: --msg takes numbers, not {text!r}") from None


def _password(args: argparse.Namespace) -> tuple[str | None, str | None]:
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise SystemExit(f"pypop fetch: ${args.token_env} is empty")
        return None, token
    env = os.environ.get("PYPOP_PASSWORD")
    return env, None


def _default_state(client: Client) -> Path:
    opts = client.options
    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    account = f"{opts.user}@{opts.host}:{opts.port}"
    digest = hashlib.sha256(account.encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "@.-_" else "_" for c in account)[:80]
    return base / "pypop" / "uidl" / f"{safe}-{digest}"


class Progress:
    """tqdm when installed, else a one-line bar; only on a terminal (or when asked)."""

    def __init__(self, total: int, total_octets: int, enabled: bool) -> None:
        self.enabled = enabled and total > 0
        self.total, self.octets_total = total, total_octets
        self.done = self.octets = 0
        self._bar: Any = None
        self._last = 0.0
        self._start = time.monotonic()
        if self.enabled:
            try:
                from tqdm import tqdm  # type: ignore[import-untyped]
            except ImportError:
                return
            self._bar = tqdm(total=total, unit="msg", file=sys.stderr, leave=False)

    def update(self, octets: int) -> None:
        self.done += 1
        self.octets += octets
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            return
        now = time.monotonic()
        if now - self._last < 0.1 and self.done < self.total:
            return
        self._last = now
        width = max(10, min(40, shutil.get_terminal_size().columns - 40))
        filled = width * self.done // self.total
        rate = self.done / max(now - self._start, 1e-6)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{self.octets / 1e6:.1f} MB {rate:.0f} msg/s"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    password, token = _password(args)
    try:
        client = Client(
            args.url,
            password=password,
            token=token,
            auth=args.auth,
            tls=args.tls,
            cafile=args.cafile,
            timeout=args.timeout,
            pipelining=not args.no_pipelining,
            utf8=not args.no_utf8,
        )
    except ValueError as exc:
        print(f"pypop fetch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    kerberos = client.options.auth == "GSSAPI"  # the ticket cache, not a password
    if client.options.password is None and token is None and not kerberos and sys.stdin.isatty():
        client.options.password = getpass.getpass(
            f"Password for {client.options.user}@{client.options.host}: "
        )
    try:
        if args.deliver:
            return _deliver(client, args)
        return _rows(client, args)
    except AuthError as exc:
        return _fail(exc, EXIT_AUTH)
    except InUseError as exc:
        return _fail(exc, EXIT_LOCKED)
    except TLSError as exc:
        return _fail(exc, EXIT_TLS)
    except NetworkError as exc:
        return _fail(exc, EXIT_NETWORK)
    except ProtocolError as exc:
        return _fail(exc, EXIT_PROTOCOL)
    except ClientError as exc:
        return _fail(exc, EXIT_SERVER)
    except OSError as exc:  # the state file, attachments or mailbox on this side
        return _fail(exc, EXIT_DELIVERY)


def _fail(exc: Exception, status: int) -> int:
    print(f"pypop fetch: {_printable(str(exc))}", file=sys.stderr)  # may quote the server
    return status


_UNPRINTABLE = {c: "\ufffd" for c in [*range(0x20), *range(0x7F, 0xA0)]}
_UNPRINTABLE.update((c, "\ufffd") for c in (0x061C, 0x200E, 0x200F, 0x2028, 0x2029))
_UNPRINTABLE.update((c, "\ufffd") for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)])


def _printable(text: str) -> str:
    """Text a sender or the server chose, made safe for a terminal: C0 and C1 controls
    (ESC sequences, the 8-bit CSI, BEL), line separators and bidi overrides (a file
    name shown reversed) become U+FFFD, one character each, so widths hold."""
    return text.translate(_UNPRINTABLE)


# ---- CFPOP rows ----------------------------------------------------------------------


def _rows(client: Client, args: argparse.Namespace) -> int:
    messages = _ints(args.msg) if args.msg else None
    uids = [u for u in args.uid.split(",") if u] if args.uid else None
    action = args.action or "headers"
    state: StateFile | None = None
    with client as pop:
        if args.new and action != "delete":
            # Only UIDs not listed or delivered before. Listed ones go to a state file
            # of their own: --deliver takes its state for "stored here" and deletes.
            base = Path(args.state).expanduser() if args.state else _default_state(client)
            try:
                state = StateFile(base.with_name(base.name + ".listed"))
            except BlockingIOError:
                print("pypop fetch: another fetch is running for this account", file=sys.stderr)
                return EXIT_EXCLUDED
            seen = state.uids | recorded_uids(base)
            uidl = pop.uidl()
            chosen = set(messages) if messages is not None else None
            asked = set(uids) if uids is not None else None
            uids = [
                u
                for n, u in sorted(uidl.items())
                if u not in seen
                and (chosen is None or n in chosen)
                and (asked is None or u in asked)
            ]
        if action == "delete":
            if messages is None and uids is None:
                print("pypop fetch: --delete needs --msg or --uid", file=sys.stderr)
                return EXIT_USAGE
            result = pop.delete(messages, uids, start_row=args.start_row, max_rows=args.max_rows)
        elif action == "all":
            if args.attachments:
                Path(args.attachments).mkdir(parents=True, exist_ok=True)
            result = pop.get_all(
                messages,
                uids,
                start_row=args.start_row,
                max_rows=args.max_rows,
                attachment_path=args.attachments,
                generate_unique_filenames=args.unique_names,
            )
        else:
            result = pop.get_header_only(
                messages, uids, start_row=args.start_row, max_rows=args.max_rows
            )
    _print(result, args.format, sys.stdout, action)
    if state is not None:
        state.record(r.uid for r in result.rows if r.uid)
        state.close()
    if result.unknown_messages or result.unknown_uids:
        unknown = [str(n) for n in result.unknown_messages] + result.unknown_uids
        print(f"pypop fetch: not on the server: {', '.join(unknown)}", file=sys.stderr)
    if result.needs_utf8:
        listed = ", ".join(str(n) for n in result.needs_utf8)
        print(
            f"pypop fetch: the server sends these only to a client that uses UTF8 "
            f"(-ERR [UTF8], 8-bit headers; drop --no-utf8): {listed}",
            file=sys.stderr,
        )
    return EXIT_MAIL if (result.rows or result.deleted) else EXIT_NOMAIL


def _print(result: Result, fmt: str | None, out: IO[str], action: str) -> None:
    if action == "delete":
        if fmt == "json":
            json.dump({"deleted": result.deleted, "unknown": _unknown(result)}, out)
            out.write("\n")
        else:
            out.write(f"deleted {len(result.deleted)} message(s): {result.deleted}\n")
        return
    rows = [r.cfpop() for r in result.rows]
    if fmt == "json":
        json.dump({"rows": rows, "unknown": _unknown(result)}, out, indent=1, ensure_ascii=False)
        out.write("\n")
    elif fmt == "csv":
        fields = list(rows[0]) if rows else list(Row.__slots__)
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (json.dumps(v) if isinstance(v, dict | list) else v) for k, v in row.items()}
            )
    else:
        _table(result.rows, out)


def _unknown(result: Result) -> dict[str, list[Any]]:
    return {
        "messages": list(result.unknown_messages),
        "uids": list(result.unknown_uids),
        "needs_utf8": list(result.needs_utf8),
    }


def _table(rows: list[Row], out: IO[str]) -> None:
    width = shutil.get_terminal_size((100, 20)).columns
    head = ("#", "UID", "Date (UTC)", "From", "Subject")
    cells = [
        (
            str(r.message_number),
            r.uid or "",
            r.date.strftime("%Y-%m-%d %H:%M") if r.date else "?",
            _printable(r.from_),
            _printable(r.subject) + (f"  [{len(r.attachments)} att]" if r.attachments else ""),
        )
        for r in rows
    ]
    fixed = [
        max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
        for i, h in enumerate(head[:3])
    ]
    rest = max(20, width - sum(fixed) - 8)
    from_w = min(30, rest // 3)
    subj_w = max(10, rest - from_w)

    def fmt(c: tuple[str, ...]) -> str:
        return (
            f"{c[0]:>{fixed[0]}} {c[1]:<{fixed[1]}} {c[2]:<{fixed[2]}} "
            f"{c[3][:from_w]:<{from_w}} {c[4][:subj_w]}"
        ).rstrip()

    out.write(fmt(head) + "\n")
    for c in cells:
        out.write(fmt(c) + "\n")


# ---- delivery ------------------------------------------------------------------------


def _deliver(client: Client, args: argparse.Namespace) -> int:
    try:
        client.connect()
    except ClientError:
        client.close()
        raise
    account = f"{client.options.user}@{client.options.host}:{client.options.port}"
    state_path = Path(args.state).expanduser() if args.state else _default_state(client)
    try:
        state = StateFile(state_path)
    except BlockingIOError:
        client.close()
        print(f"pypop fetch: another fetch is running for {account}", file=sys.stderr)
        return EXIT_EXCLUDED
    try:
        try:
            deliverer = open_deliverer(args.deliver, account)
        except (ValueError, OSError) as exc:
            client.close()
            print(f"pypop fetch: {exc}", file=sys.stderr)
            return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_DELIVERY
        try:
            return _deliver_session(client, args, state, deliverer, account)
        finally:
            deliverer.close()
    finally:
        state.close()


def _deliver_session(
    client: Client, args: argparse.Namespace, state: StateFile, deliverer: Any, account: str
) -> int:
    pop = client
    try:
        sizes = pop.list()
        uidl = pop.uidl()
    except ClientError:
        client.close()
        raise
    # What an earlier, interrupted run delivered without recording it (begun, never
    # recorded: not any old tag, which a reused UID would match).
    begun = (u for u in uidl.values() if u in state.pending and u not in state.uids)
    recovered = deliverer.delivered(account, begun)
    state.record(sorted(recovered))
    numbers = sorted(sizes)
    if args.uid:
        wanted = set(args.uid.split(","))
        numbers = [n for n in numbers if uidl.get(n) in wanted]
    elif args.msg:
        chosen = set(_ints(args.msg))
        numbers = [n for n in numbers if n in chosen]
    done_before = [n for n in numbers if uidl.get(n) in state.uids]
    todo = [n for n in numbers if uidl.get(n) not in state.uids]
    if not args.new and not args.keep:
        pass  # delivered-but-not-deleted messages are deleted, never fetched twice
    todo = todo[args.start_row - 1 :]
    if args.max_rows is not None:
        todo = todo[: args.max_rows]
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    progress = Progress(len(todo), sum(sizes[n] for n in todo), show)
    batch_size = max(1, args.batch) if deliverer.batch_safe else 1
    delivered: list[int] = []
    started = time.monotonic()
    batch: list[tuple[int, str, bytes]] = []

    # Maildir batches are written by a worker thread while the next ones arrive (its
    # tagged names make that safe); mbox stays strictly one message at a time.
    writer = ThreadPoolExecutor(max_workers=1) if deliverer.batch_safe else None
    pending: deque[tuple[Future[None], list[tuple[int, str, bytes]]]] = deque()

    def finish(future: Future[None], items: list[tuple[int, str, bytes]]) -> None:
        try:
            future.result()
        except OSError as exc:
            raise _DeliveryFailed(str(exc)) from exc
        state.record(uid for _, uid, _ in items)
        delivered.extend(n for n, _, _ in items)

    def commit() -> None:
        items = batch.copy()
        batch.clear()
        job = [(uid, data) for _, uid, data in items]
        if writer is None:
            done: Future[None] = Future()
            try:
                deliverer.deliver(job)
                done.set_result(None)
            except OSError as exc:
                done.set_exception(exc)
            finish(done, items)
            return
        state.begin(uid for uid, _ in job)  # before any rename: what recovery may trust
        pending.append((writer.submit(deliverer.deliver, job), items))
        while len(pending) > 2:
            finish(*pending.popleft())

    batch_octets = 0
    try:
        try:
            for number, data in pop.retrieve(todo):
                uid = uidl.get(number) or f"#{number}"
                batch.append((number, uid, data))
                progress.update(len(data))
                batch_octets += len(data)
                if len(batch) >= batch_size or batch_octets >= BATCH_OCTETS:
                    batch_octets = 0
                    commit()
            if batch:
                commit()
            while pending:
                finish(*pending.popleft())
        finally:
            if writer is not None:
                writer.shutdown(wait=True)
    except _DeliveryFailed as exc:
        progress.close()
        client.close()  # no QUIT: nothing is deleted
        print(f"pypop fetch: delivery failed: {exc}", file=sys.stderr)
        return EXIT_DELIVERY
    except ClientError:
        progress.close()
        client.close()
        raise
    progress.close()
    deleted: list[int] = []
    if not args.keep:
        to_delete = sorted(done_before + delivered)
        refused: set[int] = set(pop.dele_many(to_delete)) if to_delete else set()
        deleted = [n for n in to_delete if n not in refused]
    pop.quit()  # UpdateError (exit 7) if the server did not remove them
    on_server = set(uidl.values()) - {uidl[n] for n in deleted if n in uidl}
    state.save(state.uids & on_server)
    elapsed = time.monotonic() - started
    octets = sum(sizes[n] for n in delivered)
    print(
        f"{len(delivered)} message(s) ({octets / 1e6:.1f} MB) fetched from {account} "
        f"in {elapsed:.2f} s, {len(deleted)} deleted on the server"
        + (f", {len(done_before)} already here" if done_before else ""),
        file=sys.stderr,
    )
    return EXIT_MAIL if delivered else EXIT_NOMAIL


class _DeliveryFailed(Exception):
    pass
