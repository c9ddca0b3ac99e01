"""The cost of the IMAP hop: Dovecot's own POP3 against pypop's imap backend in front
of Dovecot's IMAP, in one run, on one fixture, on one Dovecot instance.

``python benches/imap_bench.py [--quick]`` (as root, after ``sh benches/setup.sh``):

- ``dovecot``: POP3 clients talk to Dovecot's POP3 service directly;
- ``pypop-imap``: POP3 clients talk to pypop (``[backend] name = "imap"``, the
  passthrough: each POP3 login is an IMAP login with the user's password), which
  talks IMAP to the same Dovecot, over loopback without TLS;
- ``pypop-imap-noreuse``: the same with ``reuse_idle = 0`` (every POP3 login is a
  fresh upstream connection and login; no logged-in connection kept for the next one).

Dovecot and pypop share core 0 (``taskset -c 0``): the figures are what the hop costs
on the same hardware. The load generator (``rust/pop3-load``) runs on core 1 and
checks every reply. Scenarios: login (8 clients), retr-all of 4 KiB messages (8
clients) and of 1 MiB messages (4 clients). Prints a table with ratios to Dovecot
direct (higher is better) and writes JSON to ``benches/results/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benches import loadgen
from benches.fixtures import Fixture, UserSet
from benches.servers import (
    REPO,
    DovecotServer,
    PypopServer,
    Server,
    ServerError,
    dovecot_available,
    make_cert,
    pin_prefix,
)

RESULTS = Path(__file__).resolve().parent / "results"

SCENARIOS = [
    # key, pop3-load scenario, fixture set, clients, metric, unit
    ("login", "login", "small", 8, "ops_per_s", "sessions/s"),
    ("retr-all-4k", "retr-all", "small", 8, "messages_per_s", "messages/s"),
    ("retr-all-1m", "retr-all", "large", 4, "mb_per_s", "MB/s"),
]


class ImapPypopServer(PypopServer):
    """pypop with the imap backend in front of ``dovecot``'s IMAP listener."""

    def __init__(
        self, name: str, workdir: Path, fixture: Fixture, dovecot: DovecotServer, **extra: object
    ) -> None:
        super().__init__("imap", workdir, fixture, dovecot.cert, dovecot.key)
        self.name = name
        self.dovecot = dovecot
        self.extra = extra

    def config_text(self) -> str:
        extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.extra.items())
        return f"""# Throwaway pypop config written by benches/imap_bench.py.
[server]
listen = ["127.0.0.1:{self.port}"]
hostname = "bench.invalid"

[limits]
max_connections = 2000
max_connections_per_ip = 2000

[auth]
allow_plaintext = true

[backend]
name = "imap"
host = "127.0.0.1"
port = {self.dovecot.imap_port}
tls = "none"
{extra}"""


def run_load(
    binary: Path, srv: Server, fx: Fixture, key: str, scenario: str, user_set: str,
    clients: int, duration: float,
) -> loadgen.LoadResult:  # fmt: skip
    args = [
        "--port", str(srv.port), "--scenario", scenario,
        "--users", str(fx.users_file(user_set)), "--concurrency", str(clients),
        "--server-pid", str(srv.pid), "--timeout", "30", "--label", f"{srv.name}/{key}",
        "--duration", str(duration),
    ]  # fmt: skip
    if pin_prefix(0):
        args += ["--server-core", "0"]
    return loadgen.run(binary, args, duration + 180)


def warm_up(binary: Path, srv: Server, fx: Fixture) -> None:
    for set_name, clients in (("small", 8), ("large", 4)):
        n = fx.get(set_name).users
        res = loadgen.run(
            binary,
            ["--port", str(srv.port), "--scenario", "retr-all",
             "--users", str(fx.users_file(set_name)), "--concurrency", str(clients),
             "--count", str(n), "--timeout", "30"],
            600,
        )  # fmt: skip
        if not res.ok:
            raise ServerError(f"warm-up of {srv.name} failed: {res.data.get('error_samples')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny fixture, 1 s runs")
    p.add_argument("--repeats", type=int, help="runs per scenario (default 3; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per run (default 10; quick 1)")
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    duration = args.duration or (1.0 if args.quick else 10.0)
    ok, why = dovecot_available()
    if not ok or not any(
        Path(d, "imap").exists() for d in ("/usr/lib/dovecot", "/usr/libexec/dovecot")
    ):
        print(f"imap_bench: skipped: {why if not ok else 'dovecot-imapd is not installed'}")
        return 0
    sets = (
        [UserSet("small", "user", 16, 10, 4096), UserSet("large", "big", 4, 3, 1 << 20)]
        if args.quick
        else [UserSet("small", "user", 100, 50, 4096), UserSet("large", "big", 10, 20, 1 << 20)]
    )
    binary = loadgen.build(quick=args.quick)
    work = Path(tempfile.mkdtemp(prefix="pypop-imapbench-"))
    os.chmod(work, 0o755)  # noqa: S103 - Dovecot's unprivileged users read it
    results: dict[str, dict[str, list[float]]] = {}
    failures: list[str] = []
    try:
        fx = Fixture(work / "fixture", sets)
        fx.build(["dovecot"])
        _, cert, key = make_cert(work / "tls")
        dovecot = DovecotServer(work / "dovecot", fx, cert, key, imap=True)
        dovecot.start()
        try:
            warm_up(binary, dovecot, fx)
            servers: list[Server] = [
                dovecot,
                ImapPypopServer("pypop-imap", work / "pypop-imap", fx, dovecot),
                ImapPypopServer(
                    "pypop-imap-noreuse", work / "pypop-noreuse", fx, dovecot, reuse_idle=0
                ),
            ]
            for srv in servers:
                if srv is not dovecot:
                    srv.start()
                    # Through IMAP once too: Dovecot adds the fields IMAP asks for to
                    # its cache files on first use, which must not fall into a run.
                    warm_up(binary, srv, fx)
                try:
                    for key_, scenario, user_set, clients, metric, _ in SCENARIOS:
                        for _k in range(repeats):
                            res = run_load(
                                binary, srv, fx, key_, scenario, user_set, clients, duration
                            )
                            value = res.data.get(metric)
                            if not res.ok or not isinstance(value, int | float):
                                failures.append(
                                    f"{srv.name}/{key_}: {res.data.get('error_samples')}"
                                )
                                continue
                            results.setdefault(key_, {}).setdefault(srv.name, []).append(
                                float(value)
                            )
                            print(f"  {srv.name:20} {key_:12} {value:10.1f}", file=sys.stderr)
                finally:
                    if srv is not dovecot:
                        srv.stop()
        finally:
            dovecot.stop()
    except (ServerError, OSError, subprocess.SubprocessError) as exc:
        failures.append(str(exc))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    names = ["dovecot", "pypop-imap", "pypop-imap-noreuse"]
    print(
        f"\nIMAP backend vs Dovecot POP3 ({'quick' if args.quick else 'full'}; median of "
        f"{repeats} x {duration:g} s; pypop and Dovecot share core 0, the load generator "
        "runs on core 1; ratio = pypop / Dovecot direct, higher is better)"
    )
    head = f"{'scenario':12} {'unit':11}" + "".join(f"{n:>20}" for n in names)
    print(head + f"{'imap/dovecot':>14}{'noreuse/dovecot':>17}")
    summary: dict[str, dict[str, float]] = {}
    for key_, *_rest, unit in SCENARIOS:
        cells = {n: statistics.median(v) for n, v in results.get(key_, {}).items() if v}
        summary[key_] = cells
        row = f"{key_:12} {unit:11}" + "".join(
            f"{cells[n]:20,.1f}" if n in cells else f"{'-':>20}" for n in names
        )
        base = cells.get("dovecot")
        for n, width in (("pypop-imap", 14), ("pypop-imap-noreuse", 17)):
            row += f"{cells[n] / base:{width}.2f}x" if base and n in cells else f"{'-':>{width}}"
        print(row)
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"imap-{'quick' if args.quick else 'full'}-{stamp}.json"
    doc: dict[str, Any] = {"summary": summary, "runs": results, "failures": failures}
    out.write_text(json.dumps(doc, indent=2))
    print(f"JSON: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    if failures:
        print(f"FAILED: {len(failures)} problem(s):")
        for f in failures[:10]:
            print(f"  {f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
