"""pypop on every core: ``--workers 1`` vs ``--workers 2``, and HAProxy with two hosts.

    python benches/workers_bench.py            # 3 x 10 s per figure (about 3 minutes)
    python benches/workers_bench.py --quick    # smoke run (scripts/test)

Same fixture (100 users x 20 messages x 4 KiB, Maildir), same load generator
(rust/pop3-load, 16 sessions at a time, each on its own users), three set-ups:

- ``workers=1``: one process (no supervisor, no anvil);
- ``workers=2``: the supervisor, its anvil and two workers sharing the listener;
- ``haproxy-2-hosts``: HAProxy (PROXY v2, round robin) in front of two ``--workers 1``
  hosts on 127.0.0.2 and 127.0.0.3 sharing the Maildir.

Nothing is pinned: the servers and the load generator share the machine's cores, as
they would. Per set-up and scenario it prints sessions (or messages) per second, how
many cores the server side kept busy (its process tree's CPU time / wall time; for
HAProxy the tree includes HAProxy), the work per server CPU-second (per-core
efficiency), and the scaling against ``workers=1``. Figures, not judgements: there
is no pass or fail; the load generator's own CPU share is printed because on a
2-core machine it competes with the server for the second core.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benches import loadgen
from benches.fixtures import Fixture, UserSet

SET = UserSet("small", "u", 100, 20, 4096)
HOSTS = ("127.0.0.2", "127.0.0.3")
CONCURRENCY = int(os.environ.get("PYPOP_BENCH_CONCURRENCY", "16"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_greeting(
    host: str, port: int, proc: subprocess.Popen[bytes], limit: float = 60, source: str = ""
) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=2, source_address=(source, 0)) as s:
                if s.recv(100).startswith(b"+OK"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answers on {host}:{port}")


def pypop_config(fx: Fixture, host: str, port: int, workers: int, proxy: bool) -> str:
    return f"""[server]
listen = ["{host}:{port}"]
hostname = "bench.invalid"
workers = {workers}
{'proxy_from = ["127.0.0.1/32"]' if proxy else ""}

[limits]
max_connections = 4000
max_connections_per_ip = 4000

[log]
level = "WARNING"

[auth]
passwd_file = "{fx.passwd}"
allow_plaintext = true

[backend]
name = "maildir"
root = "{fx.maildir("pypop")}"
"""


@contextmanager
def group(commands: list[list[str]], work: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``commands`` under one shell, so that one process tree holds them all."""
    script = "\n".join(" ".join(f"'{a}'" for a in cmd) + " &" for cmd in commands) + "\nwait\n"
    (work / "group.sh").write_text(script)
    with (work / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            ["sh", str(work / "group.sh")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def setup(name: str, fx: Fixture, work: Path) -> Iterator[tuple[int, int]]:
    """Start one set-up; yields (port, pid of its process tree)."""
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "pypop", "serve", "--config"]
    if name.startswith("workers="):
        port = free_port()
        conf = work / "pypop.toml"
        conf.write_text(pypop_config(fx, "127.0.0.1", port, int(name.split("=")[1]), False))
        with group([[*py, str(conf)]], work) as proc:
            wait_greeting("127.0.0.1", port, proc)
            yield port, proc.pid
        return
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    ports = [free_port(h) for h in HOSTS]
    commands = []
    for n, (host, port) in enumerate(zip(HOSTS, ports, strict=True)):
        conf = work / f"host{n}.toml"
        conf.write_text(pypop_config(fx, host, port, 1, True))
        commands.append([*py, str(conf)])
    front = free_port()
    cfg = work / "haproxy.cfg"
    cfg.write_text(
        f"""global
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend pop3
    bind 127.0.0.1:{front}
    default_backend pypop
backend pypop
    balance roundrobin
    source 127.0.0.1
    server a {HOSTS[0]}:{ports[0]} send-proxy-v2
    server b {HOSTS[1]}:{ports[1]} send-proxy-v2
"""
    )
    commands.append([haproxy, "-db", "-f", str(cfg)])
    with group(commands, work) as proc:
        for host, port in zip(HOSTS, ports, strict=True):
            # From an address outside proxy_from: no PROXY header expected.
            wait_greeting(host, port, proc, source="127.0.0.5")
        wait_greeting("127.0.0.1", front, proc)
        yield front, proc.pid


def one_run(
    binary: Path, fx: Fixture, port: int, pid: int, scenario: str, seconds: float
) -> dict[str, float]:
    args = [
        "--port", str(port), "--scenario", scenario, "--users", str(fx.users_file("small")),
        "--concurrency", str(CONCURRENCY), "--server-pid", str(pid), "--duration", str(seconds),
        "--timeout", "30",
    ]  # fmt: skip
    # loadgen.run pins the load generator to core 1; here nothing is pinned.
    cmd = [str(binary), *args, "--exact-sizes"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    import json

    data = next(json.loads(x) for x in reversed(p.stdout.splitlines()) if x.startswith("{"))
    if p.returncode != 0 or data.get("errors"):
        raise RuntimeError(f"load generator failed: {data.get('error_samples')} {p.stderr[-500:]}")
    rate = data["ops_per_s"] if scenario == "login" else data["messages_per_s"]
    return {
        "rate": float(rate),
        "server_cores": float(data["server_cpu_util"]),
        "client_cores": float(data["client_cpu_s"]) / float(data["elapsed_s"]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 x 2 s per figure")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--setups",
        default="workers=1,workers=2,haproxy-2-hosts",
        help="comma-separated: workers=N, haproxy-2-hosts",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.repeats = 2.0, 1
    setups = args.setups.split(",")
    if "haproxy-2-hosts" in setups and not (
        shutil.which("haproxy") or os.path.exists("/usr/sbin/haproxy")
    ):
        print("haproxy not installed (benches/setup.sh): skipping haproxy-2-hosts")
        setups.remove("haproxy-2-hosts")
    binary = loadgen.build(quick=args.quick)
    scenarios = ["login", "retr-all"]
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="pypop-workers-bench-") as tmp:
        fx = Fixture(Path(tmp) / "fixture", [SET])
        fx.build(["pypop"])
        for name in setups:
            with setup(name, fx, Path(tmp) / name) as (port, pid):
                one_run(binary, fx, port, pid, "retr-all", 1.0)  # warm-up: page cache
                for scenario in scenarios:
                    runs = results[(name, scenario)] = []
                    for _ in range(args.repeats):
                        runs.append(one_run(binary, fx, port, pid, scenario, args.duration))
    cores = len(os.sched_getaffinity(0))
    print(f"\npypop workers benchmark: {cores} cores, {args.repeats} x {args.duration:g} s each,")
    print(
        f"{CONCURRENCY} sessions at a time, Maildir 100 users x 20 x 4 KiB; medians of the "
        f"runs; load average {os.getloadavg()[0]:.1f} at the end\n"
    )
    head = (
        f"{'set-up':<17} {'scenario':<9} {'rate/s':>9} {'server cores':>12} "
        f"{'per server core-s':>17} {'loadgen cores':>13} {'scaling':>8}"
    )
    print(head)
    print("-" * len(head))
    for scenario in scenarios:
        base = None
        for name in setups:
            runs = results[(name, scenario)]
            rate = statistics.median(r["rate"] for r in runs)
            server = statistics.median(r["server_cores"] for r in runs)
            client = statistics.median(r["client_cores"] for r in runs)
            base = rate if base is None else base
            unit = "sessions" if scenario == "login" else "msgs"
            print(
                f"{name:<17} {scenario:<9} {rate:>9.0f} {server:>12.2f} "
                f"{rate / server if server else 0:>17.0f} {client:>13.2f} {rate / base:>7.2f}x"
                f"  ({unit})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
