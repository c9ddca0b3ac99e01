"""Where pypop's time goes, per scenario: ``python -m benches.profile SCENARIO``.

Starts ``pypop serve`` (``--backend memory``, ``maildir`` or ``sql-sqlite``; ``trio-floor``
runs benches/floor.py instead, the event loop's ceiling; the suite's fixture:
100 users x 50 x 4 KiB, or 10 x 20 x 1 MiB for retr-all-1m) pinned to core 0, warms
it up as the suite does, drives it with the load generator on core 1, and samples the
server with py-spy (``pip install py-spy``). Prints the throughput, then
the functions with the most samples of their own ("self": where the CPU is, a system
call shows up as the Python line that makes it) and in total. Worker threads are left
out: trio parks idle ones in a lock, which py-spy counts as busy.

docs/performance.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benches import loadgen
from benches.fixtures import Fixture, UserSet
from benches.servers import floor_command, free_port, make_cert, pin_prefix, wait_port

SCENARIOS = {
    # name: (load-generator scenario, users, messages, octets, clients)
    "login": ("login", 100, 50, 4096, 8),
    "retr-all-4k": ("retr-all", 100, 50, 4096, 8),
    "top": ("top", 100, 50, 4096, 8),
    "pipelined": ("pipelined", 100, 50, 4096, 8),
    "retr-all-1m": ("retr-all", 10, 20, 1 << 20, 4),
    # Messages of several 1 MiB blocks (Maildir's LARGE_BLOCK): not in the suite.
    "retr-all-5m": ("retr-all", 4, 5, 5 << 20, 4),
    "tls-login": ("tls-login", 100, 50, 4096, 8),
    "tls-retr-all-1m": ("tls-retr-all", 10, 20, 1 << 20, 4),
}


def _fixture(root: Path, users: int, messages: int, octets: int) -> Fixture:
    """The suite's fixture (benches.fixtures): LF mail, ``,W=`` names, one set."""
    fx = Fixture(root / "fixture", [UserSet("bench", "user", users, messages, octets)])
    fx.build(["pypop"])
    return fx


# Where idle worker threads wait (py-spy counts some of these waits as busy).
_IDLE = {"IOThreads._work", "IOThreads._watch", "WorkerThread._work", "Condition.wait"}


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def summarize(raw: Path, top: int) -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    workers: Counter[str] = Counter()
    n = nw = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        frames = stack.split(";")
        if "Thread._bootstrap" in stack:
            # A worker thread; waiting for work is not work.
            if frames[-1].split(" (")[0] in _IDLE:
                continue
            nw += k
            workers[frames[-1]] += k
            continue
        n += k
        own[frames[-1]] += k
        for f in set(frames):
            total[f] += k
    out = [f"{n} samples of the event-loop thread", "--- self"]
    out += [f"{100 * c / n:5.1f}%  {f}" for f, c in own.most_common(top)]
    out.append("--- total")
    out += [f"{100 * c / n:5.1f}%  {f}" for f, c in total.most_common(top)]
    out.append(f"--- worker threads: {nw} samples ({100 * nw / max(1, n):.1f}% of the loop's)")
    out += [f"{100 * c / max(1, nw):5.1f}%  {f}" for f, c in workers.most_common(top // 2)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.profile")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument(
        "--backend",
        choices=("memory", "maildir", "sql-sqlite", "trio-floor"),
        default="memory",
        help="trio-floor: benches/floor.py, no POP3 work (the event loop's ceiling)",
    )
    parser.add_argument(
        "-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="backend option"
    )
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-spy", action="store_true", help="throughput only")
    args = parser.parse_args()
    spy = shutil.which("py-spy")
    if spy is None and not args.no_spy:
        print("py-spy is not installed (pip install py-spy), or use --no-spy", file=sys.stderr)
        return 2
    lg_scenario, users, messages, octets, clients = SCENARIOS[args.scenario]
    binary = loadgen.build(quick=True)
    with tempfile.TemporaryDirectory(prefix="pypop-profile-") as tmp:
        root = Path(tmp)
        fx = _fixture(root, users, messages, octets)
        users_file = fx.users_file("bench")
        if args.backend == "memory":
            backend = f'name = "memory"\nseed = "{fx.eml}"\n'
        elif args.backend == "sql-sqlite":
            from benches.servers import load_sql

            url = f"sqlite://{root / 'mail.db'}"
            load_sql(url, fx, {"synchronous": "normal"})
            backend = f'name = "sql"\nurl = "{url}"\n'
        else:
            backend = f'name = "maildir"\nroot = "{fx.maildir("pypop")}"\n'
        for opt in args.option:
            key, _, value = opt.partition("=")
            backend += f"{key} = {json.dumps(value)}\n"
        port = free_port()
        tls = lg_scenario.startswith("tls-")
        tls_conf = listen_tls = ""
        tls_port = 0
        tls_args: list[str] = []
        if tls:
            ca, cert, key = make_cert(root / "tls")
            tls_port = free_port()
            listen_tls = f'listen_tls = ["127.0.0.1:{tls_port}"]\n'
            tls_conf = f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
            tls_args = ["--ca", str(ca), "--sni", "localhost"]
        conf = root / "pypop.toml"
        conf.write_text(
            f'[server]\nlisten = ["127.0.0.1:{port}"]\n{listen_tls}'
            "[limits]\nmax_connections = 1000\nmax_connections_per_ip = 1000\n"
            f'[auth]\npasswd_file = "{fx.passwd}"\nallow_plaintext = true\n'
            f"{tls_conf}[backend]\n{backend}"
        )
        log = root / "server.log"
        command = [sys.executable, "-m", "pypop", "serve", "--config", str(conf)]
        if args.backend == "trio-floor":
            command = floor_command(sys.executable, port, fx.eml, fx.passwd)
        with log.open("wb") as out:
            server = subprocess.Popen(
                [*pin_prefix(0), *command],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_port(port, server, 120, log)
            # Warm-up as in the suite: every mailbox opened and read once.
            warm = loadgen.run(
                binary,
                [
                    *("--port", str(port), "--scenario", "retr-all", "--users", str(users_file)),
                    *("--concurrency", str(clients), "--count", str(users), "--timeout", "30"),
                ],
                timeout=300,
            )
            if not warm.ok:
                print(f"warm-up failed: {warm.data.get('error_samples')}", file=sys.stderr)
                return 1
            sampler = None
            raw = root / "profile.txt"
            if not args.no_spy:
                assert spy is not None
                sampler = subprocess.Popen(
                    [
                        spy,
                        "record",
                        "-o",
                        str(raw),
                        "-f",
                        "raw",
                        "-r",
                        "500",
                        "-d",
                        str(int(args.duration + 1)),
                        "-p",
                        str(server.pid),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(0.5)
            cpu_before = cpu_seconds(server.pid)
            result = loadgen.run(
                binary,
                [
                    *tls_args,
                    "--port",
                    str(tls_port if tls else port),
                    "--scenario",
                    lg_scenario,
                    "--concurrency",
                    str(clients),
                    "--users",
                    str(users_file),
                    "--duration",
                    str(args.duration),
                    "--server-pid",
                    str(server.pid),
                ],
                timeout=args.duration + 120,
            )
            cpu_after = cpu_seconds(server.pid)
            user = cpu_after[0] - cpu_before[0]
            system = cpu_after[1] - cpu_before[1]
            cpu = user + system
            if sampler is not None:
                sampler.wait(timeout=60)
        finally:
            server.terminate()
            server.wait(timeout=60)
        d = result.data
        print(
            json.dumps(
                {
                    k: d.get(k)
                    for k in (
                        "sessions",
                        "messages",
                        "errors",
                        "ops_per_s",
                        "messages_per_s",
                        "mb_per_s",
                        "server_cpu_util",
                    )
                }
                # CPU per unit of work moves less with the machine's noise than
                # throughput does (a sampler, if any, adds to it).
                | {
                    "server_cpu_us_per_message": 1e6 * cpu / max(1, d.get("messages") or 0),
                    "server_cpu_us_per_session": 1e6 * cpu / max(1, d.get("sessions") or 0),
                    # The kernel's share (system calls, loopback TCP): what no
                    # change to the Python side can remove.
                    "server_system_share": system / cpu if cpu else 0.0,
                }
            )
        )
        if not result.ok:
            print(f"load generator failed: {d.get('error_samples')}", file=sys.stderr)
            return 1
        if sampler is not None and raw.exists():
            print(summarize(raw, args.top))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
