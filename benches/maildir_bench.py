"""STAT on a big maildrop with the maildir backend: open_mailbox + sum of sizes.

Three figures: cold cache (no ``pypop-sizes`` yet: every file is read once through
SizeCounter), warm cache (stat + cache lookup), and names carrying ``,W=`` (directory
listing only). Run ``python benches/maildir_bench.py`` for 100,000 messages, or
``--quick`` (2,000) in CI. Needs pypop3 and pypop3-maildir installed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import trio
from pypop_maildir import create

from pypop.wire import IMPLEMENTATION, wire_size

MESSAGE = (
    b"From: Sender <sender@example.org>\nTo: user@example.org\nSubject: bench\n\n"
    + b"A line of body text that is long enough to look like mail.\n" * 30
)


def populate(maildir: str, count: int, *, w_field: bool) -> None:
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)
    w = f",W={wire_size(MESSAGE)}" if w_field else ""
    for i in range(count):
        name = f"{1700000000 + i}.M{i % 1000000}P{i}.bench{w}:2,S"
        with open(os.path.join(maildir, "cur", name), "wb") as f:
            f.write(MESSAGE)


async def stat_once(root: str, user: str) -> tuple[int, int]:
    backend = create({"root": root, "flag_updates": False, "lock": "auto"})
    mb = await backend.open_mailbox(user)
    try:
        return len(mb.messages), sum(m.size for m in mb.messages)
    finally:
        await mb.aclose()


def timed(label: str, fn: Callable[[], tuple[int, int]], expect: tuple[int, int]) -> float:
    t0 = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - t0
    assert result == expect, (result, expect)
    print(f"{label:<34} {elapsed * 1000:10.1f} ms   ({result[0]} msgs, {result[1]} octets)")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="2,000 messages (CI)")
    parser.add_argument("--dir", help="where to build the maildrops (default: a temp dir)")
    args = parser.parse_args()
    count = 2_000 if args.quick else args.messages
    root = tempfile.mkdtemp(prefix="pypop-maildir-bench-", dir=args.dir)
    try:
        t0 = time.perf_counter()
        populate(os.path.join(root, "plain"), count, w_field=False)
        populate(os.path.join(root, "wsize"), count, w_field=True)
        print(
            f"wire codec: {IMPLEMENTATION}; message {len(MESSAGE)} octets on disk, "
            f"{wire_size(MESSAGE)} on the wire"
        )
        print(f"populated 2 x {count} messages in {time.perf_counter() - t0:.1f} s")
        expect = (count, count * wire_size(MESSAGE))

        def run(user: str) -> Callable[[], tuple[int, int]]:
            return lambda: trio.run(stat_once, root, user)

        timed("STAT cold cache (sizes computed)", run("plain"), expect)
        timed("STAT warm cache", run("plain"), expect)
        timed("STAT warm cache (again)", run("plain"), expect)
        timed("STAT ,W= in names", run("wsize"), expect)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
