"""``python -m benches``: pypop against Dovecot's POP3 service, side by side.

Every server runs pinned to core 0 (``taskset -c 0``); the load generator runs on
core 1. Each server is started once with a fresh copy of the fixture, warmed up
(every user's mailbox opened once), measured on *idle* first (while its memory is
fresh), then on every other scenario ``--repeats`` times. ``trio-floor`` (benches/floor.py,
no POP3 work) runs the plain scenarios as the ceiling of the same run, and the table
gives each pypop server's share of it. Results: a table on
stdout, JSON and a PNG chart in ``benches/results/``. Exit status 1 if any run had
an error (a failed reply check, a server that would not start) or nothing ran.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benches import loadgen, report
from benches.fixtures import Fixture, UserSet
from benches.progress import Progress
from benches.servers import (
    FLOOR_SCENARIOS,
    REPO,
    DovecotServer,
    FloorServer,
    PypopPostgresServer,
    PypopServer,
    PypopSqliteServer,
    Server,
    ServerError,
    dovecot_available,
    make_cert,
    pin_prefix,
    pypop_available,
    pypop_maildir_available,
    pypop_sql_available,
)

__all__ = ["SCENARIOS", "Scenario", "main"]

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Scenario:
    key: str  # name in the table
    load: str  # pop3-load --scenario
    user_set: str  # fixture set
    concurrency: int
    metric: str  # key in pop3-load's JSON (idle: server_mem.rss_per_conn_kib)
    unit: str
    lower_is_better: bool = False
    derived_from: str = ""  # not run: another metric of that scenario's runs


SCENARIOS = [
    Scenario("idle", "idle", "idle", 64, "rss_per_conn_kib", "server RSS KiB/conn", True),
    # PSS beside RSS: Dovecot's processes share most of their pages, which the RSS sum
    # counts once per process and PSS (from smaps_rollup) divides among them.
    Scenario(
        "idle-pss", "idle", "idle", 64, "pss_per_conn_kib", "server PSS KiB/conn", True, "idle"
    ),
    Scenario("login", "login", "small", 8, "ops_per_s", "sessions/s"),
    Scenario("retr-all-4k", "retr-all", "small", 8, "messages_per_s", "messages/s"),
    Scenario("retr-all-1m", "retr-all", "large", 4, "mb_per_s", "MB/s"),
    Scenario("top", "top", "small", 8, "messages_per_s", "messages/s"),
    Scenario("pipelined", "pipelined", "small", 8, "messages_per_s", "messages/s"),
    Scenario("tls-login", "tls-login", "small", 8, "ops_per_s", "sessions/s"),
    Scenario("tls-retr-all-1m", "tls-retr-all", "large", 4, "mb_per_s", "MB/s"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benches",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (< 1 minute after the build): tiny fixture, 1 repeat",
    )
    p.add_argument(
        "--setup",
        action="store_true",
        help="first run benches/setup.sh (apt-get install dovecot-pop3d, pip deps)",
    )
    p.add_argument(
        "--servers",
        default="",
        help="comma list of dovecot,pypop-memory,pypop-maildir,pypop-sql-sqlite,"
        "pypop-sql-postgresql,trio-floor (default: all available; trio-floor is "
        "benches/floor.py, a server that does no POP3 work: the ceiling in the same run)",
    )
    p.add_argument(
        "--scenarios",
        default="",
        help="comma list of " + ",".join(s.key for s in SCENARIOS) + " (default: all)",
    )
    p.add_argument("--repeats", type=int, help="runs per scenario (default 3; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per run (default 10; quick 1)")
    p.add_argument(
        "--idle-connections",
        type=int,
        help="idle: connections held against pypop (default 10000; quick 200)",
    )
    p.add_argument(
        "--idle-connections-dovecot",
        type=int,
        help="idle: connections against Dovecot, a process each (default 1000; quick 200)",
    )
    p.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter that runs `python -m pypop serve` (default: this one)",
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="print the table (and redraw the PNG beside it) from an earlier run's JSON",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    args = p.parse_args(argv)
    q = args.quick
    args.repeats = args.repeats or (1 if q else 3)
    args.duration = args.duration or (1.0 if q else 10.0)
    args.idle_connections = args.idle_connections or (200 if q else 10000)
    args.idle_connections_dovecot = args.idle_connections_dovecot or (200 if q else 1000)
    if not 1 <= args.repeats <= 50 or not 0.2 <= args.duration <= 600:
        p.error("--repeats must be 1..50 and --duration 0.2..600 s")
    if not 1 <= args.idle_connections <= 15000 or not 1 <= args.idle_connections_dovecot <= 15000:
        p.error("idle connections must be 1..15000")
    return args


def fixture_sets(args: argparse.Namespace) -> list[UserSet]:
    idle_users = max(args.idle_connections, args.idle_connections_dovecot)
    if args.quick:
        return [
            UserSet("small", "user", 16, 10, 4096),
            UserSet("large", "big", 4, 3, 1 << 20),
            UserSet("idle", "idle", idle_users, 1, 1024),
        ]
    return [
        UserSet("small", "user", 100, 50, 4096),
        UserSet("large", "big", 10, 20, 1 << 20),
        UserSet("idle", "idle", idle_users, 1, 1024),
    ]


def raise_nofile(want: int = 65536) -> None:
    """Raise the open-files limit that the servers and the load generator inherit.

    10,000 idle sessions need over 20,000 descriptors in a server that keeps a lock
    file open per session (pypop-maildir), so as root also raise the hard limit;
    otherwise settle for the hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
        except (ValueError, OSError):
            pass
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def meta(
    args: argparse.Namespace, servers: list[str], skipped: dict[str, str], binary: Path
) -> dict[str, Any]:
    def cmd(*c: str) -> str:
        try:
            return subprocess.run(
                c, capture_output=True, text=True, timeout=10, cwd=REPO
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wire = cmd(args.python, "-c", "import pypop.wire as w; print(w.IMPLEMENTATION)")
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": cmd("git", "rev-parse", "--short", "HEAD"),
        "host": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "pinned": bool(pin_prefix(0)),
        "python": platform.python_version(),
        "loadavg_at_start": _loadavg(),
        "pypop_wire": wire,
        "dovecot": cmd("dovecot", "--version") if "dovecot" in servers else "",
        "quick": args.quick,
        "repeats": args.repeats,
        "duration_s": args.duration,
        "idle_connections": {
            "pypop": args.idle_connections,
            "dovecot": args.idle_connections_dovecot,
        },
        "servers": servers,
        "skipped": skipped,
        "load_generator": str(binary.relative_to(REPO))
        if binary.is_relative_to(REPO)
        else str(binary),
    }


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def load_args(
    sc: Scenario, srv: Server, fx: Fixture, ca: Path, args: argparse.Namespace, conns: int
) -> list[str]:
    a = [
        "--port",
        str(srv.tls_port if sc.load.startswith("tls-") else srv.port),
        "--scenario",
        sc.load,
        "--users",
        str(fx.users_file(sc.user_set)),
        "--concurrency",
        str(sc.concurrency),
        "--server-pid",
        str(srv.pid),
        "--timeout",
        "30",
        "--label",
        f"{srv.name}/{sc.key}",
    ]
    if pin_prefix(0):
        a += ["--server-core", "0"]
    if sc.load.startswith("tls-"):
        a += ["--ca", str(ca), "--sni", "localhost"]
    if sc.load == "idle":
        hold = max(args.duration, 1.0)
        a += [
            "--connections",
            str(conns),
            "--duration",
            str(hold),
            "--noop-interval",
            str(min(5.0, hold / 2)),
        ]
    else:
        a += ["--duration", str(args.duration)]
    return a


def metric_of(sc: Scenario, data: dict[str, Any]) -> float | None:
    v = data.get("server_mem", {}).get(sc.metric) if sc.load == "idle" else data.get(sc.metric)
    return float(v) if isinstance(v, int | float) else None


def derive_runs(runs: list[dict[str, Any]], wanted: list[Scenario]) -> list[dict[str, Any]]:
    """``runs`` plus a record per derived scenario in ``wanted`` that each run of its
    parent scenario lacks (JSON from before a derived metric existed gets it too)."""
    have = {(r["server"], r["scenario"], r["repeat"]) for r in runs}
    out = list(runs)
    for d in (s for s in wanted if s.derived_from):
        for r in runs:
            if r["scenario"] != d.derived_from or (r["server"], d.key, r["repeat"]) in have:
                continue
            value = metric_of(d, r["result"]) if r["ok"] else None
            out.append(
                {
                    **r,
                    "scenario": d.key,
                    "ok": r["ok"] and value is not None,
                    "value": value,
                    "unit": d.unit,
                    "lower_is_better": d.lower_is_better,
                }
            )
    return out


def rerender(path: Path) -> int:
    doc = json.loads(path.read_text())
    info = doc["meta"]
    runs = derive_runs(doc["runs"], SCENARIOS)
    order = [s.key for s in SCENARIOS if any(r["scenario"] == s.key for r in runs)]
    summary = report.summarize(runs)
    print(
        f"pypop benchmark ({'quick' if info['quick'] else 'full'}, {info['date']}, "
        f"{info['commit']}; median (min-max) of {info['repeats']} runs of "
        f"{info['duration_s']:g} s; pypop wire codec: {info['pypop_wire'] or '-'}; "
        "@N% = server's use of its core; ! = other work took over 10% of the server's core)"
    )
    print(report.format_table(summary, info["servers"], order))
    png = path.with_suffix(".png")
    title = f"pypop vs Dovecot POP3 - server on 1 core - median of {info['repeats']}"
    if report.write_chart(png, summary, info["servers"], order, f"{title} - {info['commit']}"):
        print(f"PNG:  {png}")
    return 1 if doc.get("failures") else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return rerender(args.report)
    if args.setup:
        subprocess.run(["sh", str(Path(__file__).resolve().parent / "setup.sh")], check=True)
    wanted = [s for s in args.servers.split(",") if s]
    picked = set(args.scenarios.split(",")) if args.scenarios else {s.key for s in SCENARIOS}
    scen = [s for s in SCENARIOS if s.key in picked or s.derived_from in picked]
    if not scen:
        print("no such scenario", file=sys.stderr)
        return 2

    skipped: dict[str, str] = {}
    servers: list[str] = []
    ok, why = dovecot_available()
    (servers.append("dovecot") if ok else skipped.__setitem__("dovecot", why))
    ok, why = pypop_available()
    if ok:
        servers.append("pypop-memory")
        ok, why = pypop_maildir_available()
        (servers.append("pypop-maildir") if ok else skipped.__setitem__("pypop-maildir", why))
        for engine in ("sqlite", "postgresql"):
            ok, why = pypop_sql_available(engine)
            sql_name = f"pypop-sql-{engine}"
            (servers.append(sql_name) if ok else skipped.__setitem__(sql_name, why))
        servers.append("trio-floor")
    else:
        for gone in (
            "pypop-memory",
            "pypop-maildir",
            "pypop-sql-sqlite",
            "pypop-sql-postgresql",
            "trio-floor",
        ):
            skipped[gone] = why
    if wanted:
        for s in servers:
            if s not in wanted:
                skipped[s] = "not selected (--servers)"
        servers = [s for s in servers if s in wanted]
    for name, why in skipped.items():
        print(f"benches: skipping {name}: {why}", file=sys.stderr)
    if "dovecot" in skipped and args.quick:
        print("benches: quick mode runs pypop only (no Dovecot to compare with)", file=sys.stderr)
    if not servers:
        print("benches: no server to benchmark", file=sys.stderr)
        return 1
    if not pin_prefix(0):
        print(
            "benches: warning: not pinning (need taskset and 2 cores); figures are rough",
            file=sys.stderr,
        )

    raise_nofile()
    load = _loadavg()
    if load and load[0] > 0.5:
        print(
            f"benches: warning: load average {load[0]:.2f} before start: other work on this "
            "machine will take CPU from the pinned server and the load generator",
            file=sys.stderr,
        )
    print(
        "benches: building the load generator (cargo build --release -p pop3-load)", file=sys.stderr
    )
    binary = loadgen.build(quick=args.quick)
    info = meta(args, servers, skipped, binary)  # before the runs: the codec in use now

    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="pypop-bench-"))
    os.chmod(work, 0o755)  # noqa: S103 - Dovecot\'s unprivileged users read it
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    try:
        fx = Fixture(work / "fixture", fixture_sets(args))
        copies = [
            c for c, n in (("dovecot", "dovecot"), ("pypop", "pypop-maildir")) if n in servers
        ]
        print(f"benches: writing fixtures under {work}", file=sys.stderr)
        fx.build(copies)
        ca, cert, key = make_cert(work / "tls")

        run_scen = [s for s in scen if not s.derived_from]
        steps_per_server = 1 + sum(1 if s.load == "idle" else args.repeats for s in run_scen)
        bar = Progress(steps_per_server * len(servers))
        for name in servers:
            srv: Server
            if name == "dovecot":
                srv = DovecotServer(
                    work / name, fx, cert, key, max_connections=args.idle_connections_dovecot + 200
                )
                conns = args.idle_connections_dovecot
            elif name == "trio-floor":
                srv = FloorServer(work / name, fx, python=args.python)
                conns = 0
            else:
                cls = {
                    "pypop-sql-sqlite": PypopSqliteServer,
                    "pypop-sql-postgresql": PypopPostgresServer,
                }.get(name, PypopServer)
                srv = cls(
                    name.removeprefix("pypop-"),
                    work / name,
                    fx,
                    cert,
                    key,
                    max_connections=args.idle_connections + 200,
                    python=args.python,
                )
                conns = args.idle_connections
                if name == "pypop-maildir" and any(s.key == "idle" for s in scen):
                    # A session holds its socket and its maildir lock file open.
                    cap = (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 500) // 2
                    if conns > cap:
                        note = (
                            f"pypop-maildir idle: {cap} connections, not {conns}: it needs two "
                            "descriptors per session (socket + maildir lock) and the open-files "
                            "limit cannot be raised here"
                        )
                        info.setdefault("notes", []).append(note)
                        bar.message(f"benches: {note}")
                        conns = cap
            info.setdefault("idle_connections_used", {})[name] = conns
            bar.start(f"{name}: starting")
            try:
                srv.start()
                # Warm-up: open every mailbox once (Dovecot builds its indexes).
                for set_name, conc in (("small", 8), ("large", 4)):
                    n = fx.get(set_name).users
                    w = loadgen.run(
                        binary,
                        [
                            "--port",
                            str(srv.port),
                            "--scenario",
                            "retr-all",
                            "--users",
                            str(fx.users_file(set_name)),
                            "--concurrency",
                            str(conc),
                            "--count",
                            str(n),
                            "--timeout",
                            "30",
                        ],
                        timeout=300,
                    )
                    if not w.ok:
                        raise ServerError(f"warm-up failed: {w.data.get('error_samples')}")
                bar.advance(f"{name}: started, warmed up")
            except (ServerError, OSError, subprocess.SubprocessError) as exc:
                failures.append(f"{name}: {exc}")
                bar.message(f"benches: {name} failed to start: {exc}")
                srv.stop()
                bar.done += steps_per_server
                continue
            try:
                for sc in run_scen:
                    if name == "trio-floor" and sc.load not in FLOOR_SCENARIOS:
                        # No TLS there, and an idle floor session measures nothing of
                        # pypop's: the floor's column has no figure for these.
                        for _ in range(1 if sc.load == "idle" else args.repeats):
                            bar.advance(f"{name}: {sc.key} not run")
                        continue
                    if sc.load == "idle" and name == "pypop-sql-postgresql":
                        # A session holds a PostgreSQL connection (its advisory lock):
                        # thousands of idle sessions would need thousands of backends.
                        note = (
                            "pypop-sql-postgresql idle: not run (a session holds one "
                            "PostgreSQL connection for its lock)"
                        )
                        if note not in info.setdefault("notes", []):
                            info["notes"].append(note)
                        bar.advance(f"{name}: idle skipped")
                        continue
                    reps = 1 if sc.load == "idle" else args.repeats
                    for k in range(reps):
                        bar.start(f"{name}: {sc.key} #{k + 1}")
                        t_lim = args.duration + 120 + conns / 50
                        # On a shared machine other work may take the server's core:
                        # run again (at most twice) when it took over 10% of it.
                        for _attempt in range(3):
                            res = loadgen.run(
                                binary, load_args(sc, srv, fx, ca, args, conns), t_lim
                            )
                            other = res.data.get("server_core_other_util") or 0.0
                            if not res.ok or other <= 0.10 or sc.load == "idle":
                                break
                            bar.message(
                                f"benches: {name}/{sc.key}: {100 * other:.0f}% of core 0 "
                                "went to other work; running it again"
                            )
                        value = metric_of(sc, res.data) if res.ok else None
                        runs.append(
                            {
                                "server": name,
                                "scenario": sc.key,
                                "repeat": k + 1,
                                "ok": res.ok,
                                "value": value,
                                "unit": sc.unit,
                                "lower_is_better": sc.lower_is_better,
                                "result": res.data,
                            }
                        )
                        if not res.ok:
                            msg = "; ".join(map(str, res.data.get("error_samples", [])[:3]))
                            failures.append(f"{name}/{sc.key}#{k + 1}: {msg}")
                            bar.message(f"benches: {name}/{sc.key} FAILED: {msg}")
                        if not srv.alive():
                            raise ServerError(f"{name} died during {sc.key}")
                        bar.advance(f"{name} {sc.key}: {value if value is not None else 'FAIL'}")
            except ServerError as exc:
                failures.append(str(exc))
                bar.message(f"benches: {exc}")
            finally:
                srv.stop()
        bar.close()
    finally:
        if args.keep:
            print(f"benches: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    order = [s.key for s in scen]
    runs = derive_runs(runs, scen)
    summary = report.summarize(runs)
    table = report.format_table(summary, servers, order)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = "quick" if args.quick else "full"
    doc: dict[str, Any] = {
        "meta": info,
        "summary": summary,
        "runs": runs,
        "failures": failures,
        "wall_s": time.monotonic() - t_start,
    }
    json_path = args.results_dir / f"bench-{tag}-{stamp}.json"
    png_path = args.results_dir / f"bench-{tag}-{stamp}.png"
    report.write_json(json_path, doc)
    title = (
        f"pypop vs Dovecot POP3 - server on 1 core - median of {args.repeats}"
        f"{' (quick smoke run)' if args.quick else ''} - {info['commit']}"
    )
    charted = report.write_chart(png_path, summary, servers, order, title)
    shutil.copyfile(json_path, args.results_dir / f"latest-{tag}.json")
    if charted:
        shutil.copyfile(png_path, args.results_dir / f"latest-{tag}.png")

    print()
    print(
        f"pypop benchmark ({tag}; median (min-max) of {args.repeats} runs of "
        f"{args.duration:g} s; idle: one run; MB = 10^6 octets; "
        f"pypop wire codec: {info['pypop_wire'] or '-'}; @N% = server's use of its core; "
        "! = other work took over 10% of the server's core)"
    )
    print(table)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    for note in info.get("notes", []):
        print(f"note: {note}")
    print(f"JSON: {json_path}")
    print(f"PNG:  {png_path}" if charted else "PNG:  not written (pip install matplotlib)")
    bad_cpu = [
        f"{sc}/{s}"
        for sc, cells in summary.items()
        for s, c in cells.items()
        if (c.get("cpu_ratio_max") or 0) > 0.5
    ]
    if bad_cpu:
        print(
            "warning: the load generator used over half the server's CPU in: " + ", ".join(bad_cpu)
        )
    if failures:
        print(f"FAILED: {len(failures)} problem(s):")
        for f in failures[:20]:
            print(f"  {f}")
        return 1
    return 0
