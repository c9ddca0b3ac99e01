"""What the anvil (pypop.server.anvil) costs per login.

    python benches/anvil_bench.py            # 20,000 logins per figure
    python benches/anvil_bench.py --quick    # 2,000 (scripts/test)

A login asks the limits four things: admit the connection, take an auth slot (with
the penalty to serve), clear the penalty (success), release the slot and the
connection. With one process that is :class:`LocalLimits` (dicts in the process);
with ``--workers N`` it is :class:`AnvilClient` talking over a Unix socket pair to
an :class:`AnvilServer` in another process (the supervisor's), exactly the code the
server runs. Two waits per login (admit, slot); the rest is one-way.

Printed per login: wall time one after another (the latency a login gains), wall time
with 64 logins in flight (the anvil's throughput; replies and one-way messages then
share socket writes), and the CPU time both processes spent (the cost on the machine).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pypop.auth import AuthPenalty, PerClientLimiter
from pypop.server.anvil import AnvilClient, Limits, LocalLimits
from pypop.server.limits import ConnectionLimits
from pypop.server.listeners import Peer

CHILD = """
import socket, sys, trio
from pypop.auth import AuthPenalty
from pypop.server.anvil import AnvilServer
from pypop.server.limits import ConnectionLimits
sock = socket.socket(fileno=int(sys.argv[1]))
anvil = AnvilServer(ConnectionLimits(100000, 100000), AuthPenalty(), per_client=2)
trio.run(anvil.serve, sock)
"""


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def logins(limits: Limits, count: int, parallel: int) -> None:
    async def one(n: int) -> None:
        for i in range(n):
            peer = Peer(f"192.0.2.{i % 200 + 1}", 40000 + i % 20000)
            assert await limits.open(peer) is None
            async with limits.auth(peer.host) as wait:
                assert wait == 0.0
            limits.success(peer.host)
            limits.close(peer)

    async with trio.open_nursery() as nursery:
        for _ in range(parallel):
            nursery.start_soon(one, count // parallel)


async def measure(make: type[LocalLimits] | None, count: int, parallel: int) -> tuple[float, float]:
    """(wall µs per login, CPU µs per login of both processes)."""
    if make is not None:
        limits: Limits = LocalLimits(
            ConnectionLimits(100000, 100000), AuthPenalty(), PerClientLimiter(2)
        )
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await logins(limits, count, parallel)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        return wall / count * 1e6, cpu / count * 1e6
    ours, theirs = socket.socketpair()
    child = await trio.lowlevel.open_process(
        [sys.executable, "-c", CHILD, str(theirs.fileno())], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    client = AnvilClient(ours, fingerprint_key=b"k" * 32, failure_delay=0.0, max_delay=0.0)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run, lambda: None)
            await logins(client, 200, 1)  # the child is up and warm
            await client.status("192.0.2.1")
            cpu0, child0, wall0 = time.process_time(), cpu_of(child.pid), time.perf_counter()
            await logins(client, count, parallel)
            await client.status("192.0.2.1")  # every one-way message is in
            wall = time.perf_counter() - wall0
            cpu = time.process_time() - cpu0 + cpu_of(child.pid) - child0
            nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(10):
            await child.wait()
    return wall / count * 1e6, cpu / count * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--count", type=int, default=20000)
    args = ap.parse_args(argv)
    count = 2000 if args.quick else args.count
    print(
        f"anvil cost per login ({count} logins per figure; load average {os.getloadavg()[0]:.1f})"
    )
    print(f"{'limits':<28} {'wall, one at a time':>20} {'wall, 64 in flight':>19} {'CPU':>10}")
    rows = [("LocalLimits (one process)", LocalLimits), ("AnvilClient -> AnvilServer", None)]
    for name, make in rows:
        seq_wall, seq_cpu = trio.run(measure, make, count, 1)
        par_wall, par_cpu = trio.run(measure, make, count, 64)
        print(
            f"{name:<28} {seq_wall:>17.1f} µs {par_wall:>16.1f} µs {min(seq_cpu, par_cpu):>7.1f} µs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
