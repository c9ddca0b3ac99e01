"""Instructions per operation on the server, a cost figure that noise cannot move.

``python -m benches.instructions`` runs ``pypop serve`` under ``valgrind
--tool=callgrind`` (instrumentation off during start-up), drives it with a fixed
session script from one client, and reads the server's instruction count (all its
threads, user space only: the kernel's work in system calls is not counted) around
each phase with ``callgrind_control``:

- ``login``: USER, PASS, STAT, QUIT (the suite's login scenario);
- ``retr``: log in, STAT, RETR every message one at a time, QUIT;
- ``pipelined``: log in, STAT, every RETR in one write, QUIT;
- ``pipelined-dele``: log in, STAT, ``RETR k`` and ``DELE k`` for every message in one
  write, RSET, QUIT (a download that deletes, with nothing deleted in the end);
- ``retr-1m``: ``retr`` over users whose messages are 1 MiB each (LF line ends on
  disk, a dot line every 17 lines: the suite's large mail), against ``login-1m``, the
  login of those users;
- ``tls-login`` and ``tls-retr``: ``login`` and ``retr`` on the implicit-TLS port
  (a full handshake per session, no resumption; ``--no-tls`` leaves them out);
- ``loaded-login`` (``--loaded N``): ``login`` from the suite's load generator, N
  sessions eight at a time. One client at a time finds the server idle between
  sessions; under load, the event loop serves several sessions per wake-up and a
  session's log line and metrics go out in batches (pypop.server.sessionlog), which
  the scripted phases cannot see. Under callgrind the server runs some 30 times
  slower, so its batches hold fewer sessions than at full speed.

Each phase runs ``--sessions`` sessions over users that were all opened once before
(the warm-up), as in the suite, and waits :data:`SETTLE` before its count is read (the
server's session lines go out up to 0.1 s late). Per RETR = (instructions per retr
session - per login session) / messages; the same for pipelined, per RETR of 1 MiB
from the two ``-1m`` phases and per TLS RETR from the two TLS phases. OpenSSL's
instructions count too. Valgrind's CPU has AES-NI and AVX2, not AVX-512, so OpenSSL's
and the codec's code paths may differ from the machine's. Every reply is checked (+OK,
the terminator, the unstuffed length = the LIST size).

``--backends trio-floor`` runs the same script (without TLS) against benches/floor.py,
a server that does no POP3 work: what the event loop and the sockets cost, the part of
each figure no change to pypop can remove.

``--check FILE`` compares with a committed baseline (benches/instructions-baseline.json)
and exits 1 if instructions per RETR (one at a time, pipelined or of 1 MiB) rose by more than
``--tolerance`` (15%): CI's regression check, which times nothing. ``--write FILE``
records a new baseline. Needs valgrind (Debian: ``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benches import loadgen
from benches.fixtures import Fixture, UserSet
from benches.servers import REPO, floor_command, free_port, make_cert

__all__ = ["main", "measure", "server_toml", "warm_up"]

BASELINE = Path(__file__).resolve().parent / "instructions-baseline.json"
LOADED_USERS = 32  # loaded-login's users, eight of them in a session at a time
CHECKED = ("retr", "pipelined", "pipelined-dele", "retr-1m")  # figures the regression check judges
# The 1 MiB phases: users, messages each, sessions per phase. Eight sessions, not
# two: with two, the memory backend's figure was 153,000 in some runs and 232,000 in
# others (some work of the server's fell into the short phase or did not).
LARGE_USERS, LARGE_MESSAGES, LARGE_SIZE, LARGE_SESSIONS = 2, 4, 1 << 20, 8
# The server writes its session lines up to 0.1 s late, in batches
# (pypop.server.sessionlog): a phase waits this long before its counters are read, so
# that each counts its own lines (without it, lines of one phase were counted in the
# next: the memory backend's RETR of 1 MiB read 232,000 instead of 190,000).
SETTLE = 0.5


class ScriptError(RuntimeError):
    pass


class Client:
    """A blocking POP3 client that checks every reply it reads."""

    def __init__(self, port: int, timeout: float, tls: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
        self.buf = b""
        self.status()

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ScriptError("server closed the connection")
        self.buf += data

    def status(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        if not line.startswith(b"+OK"):
            raise ScriptError(f"expected +OK, got {line[:80]!r}")
        return line

    def body(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n.\r\n")
            if end >= 0 or self.buf.startswith(b".\r\n"):
                break
            self._fill()
        if self.buf.startswith(b".\r\n"):
            data, self.buf = b"", self.buf[3:]
        else:
            data, self.buf = self.buf[: end + 2], self.buf[end + 5 :]
        lines = data.split(b"\r\n")
        return b"\r\n".join(ln[1:] if ln.startswith(b".") else ln for ln in lines)

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.status()

    def close(self) -> None:
        self.sock.close()


def session(
    port: int,
    user: str,
    password: str,
    kind: str,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> int:
    """One scripted session; returns the number of messages retrieved."""
    c = Client(port, timeout, tls)
    try:
        c.command(b"USER " + user.encode())
        c.command(b"PASS " + password.encode())
        count = int(c.command(b"STAT").split()[1])
        got = 0
        if kind != "login":
            c.command(b"LIST")
            sizes = [int(ln.split()[1]) for ln in c.body().split(b"\r\n") if ln]
            if kind == "retr":
                for k in range(1, count + 1):
                    c.command(b"RETR %d" % k)
                    got += _check(c.body(), sizes[k - 1], k)
            elif kind == "pipelined":
                c.sock.sendall(b"".join(b"RETR %d\r\n" % k for k in range(1, count + 1)))
                for k in range(1, count + 1):
                    c.status()
                    got += _check(c.body(), sizes[k - 1], k)
            else:  # pipelined-dele
                c.sock.sendall(
                    b"".join(b"RETR %d\r\nDELE %d\r\n" % (k, k) for k in range(1, count + 1))
                )
                for k in range(1, count + 1):
                    c.status()
                    got += _check(c.body(), sizes[k - 1], k)
                    c.status()
                c.command(b"RSET")  # the maildrop stays as it was
        c.command(b"QUIT")
        return got
    finally:
        c.close()


def _check(body: bytes, size: int, k: int) -> int:
    if len(body) != size:
        raise ScriptError(f"RETR {k}: {len(body)} octets, LIST said {size}")
    return 1


class Callgrind:
    """A server process under callgrind, and its counters."""

    def __init__(self, cmd: list[str], out_dir: Path, log: Path) -> None:
        self.out_dir = out_dir
        self.valgrind = shutil.which("valgrind")
        self.control = shutil.which("callgrind_control")
        if self.valgrind is None or self.control is None:
            raise ScriptError("valgrind is not installed (apt-get install valgrind)")
        out = log.open("wb")
        self.proc = subprocess.Popen(
            [
                self.valgrind,
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={out_dir}/callgrind.out.%p",
                *cmd,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            cwd=REPO,  # `python -m benches.floor` from any directory
        )
        out.close()

    def _ctl(self, *args: str) -> str:
        assert self.control is not None
        p = subprocess.run(
            [self.control, *args, str(self.proc.pid)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if p.returncode != 0:
            raise ScriptError(f"callgrind_control {' '.join(args)}: {p.stderr or p.stdout}")
        return p.stdout

    def instrument(self) -> None:
        self._ctl("--instr=on")

    def zero(self) -> None:
        self._ctl("--zero")

    def dump(self, label: str) -> int:
        """Dump the counters since the last zero; returns the instructions (Ir)."""
        before = set(self.out_dir.iterdir())
        self._ctl(f"--dump={label}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            new = [p for p in self.out_dir.iterdir() if p not in before]
            for path in new:
                m = re.search(r"^totals:\s+(\d+)", path.read_text(errors="replace"), re.M)
                if m:
                    return int(m.group(1))
            time.sleep(0.1)
        raise ScriptError("callgrind wrote no dump")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _wait_port(port: int, proc: subprocess.Popen[bytes], limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ScriptError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                if s.recv(512).startswith(b"+OK"):
                    return
        except OSError:
            time.sleep(0.2)
    raise ScriptError("server did not start")


def server_toml(
    port: int, passwd: Path, section: str, server_tls: str = "", tls_table: str = ""
) -> str:
    """The server's config: one process (callgrind follows the server it starts, not
    worker children), plaintext logins, ``section`` as the [backend] table's lines."""
    return (
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nhostname = "bench.invalid"\nworkers = 1\n'
        f"{server_tls}"
        f'[auth]\npasswd_file = "{passwd}"\nallow_plaintext = true\n'
        f"[backend]\n{section}{tls_table}"
    )


def warm_up(
    port: int, creds: list[list[str]], timeout: float, tls: ssl.SSLContext | None = None
) -> None:
    """Every mailbox read and opened once: Maildir folders changed by the reads (Seen
    flags) settle before the listing cache trusts them, then every mailbox is opened
    once more, so that what follows measures the steady state, as the suite's 10-second
    runs mostly do."""
    for user, password in creds:
        session(port, user, password, "retr", timeout, tls)
    time.sleep(2.5)
    for user, password in creds:
        session(port, user, password, "login", timeout, tls)
    time.sleep(SETTLE)


def _creds(fx: Fixture, name: str) -> list[list[str]]:
    """A user set's names and passwords (the fixture's users file)."""
    return [line.split("\t") for line in fx.users_file(name).read_text().splitlines()]


def _section(backend: str, fx: Fixture) -> str:
    """The [backend] table's lines (none for the floor)."""
    if backend == "trio-floor":
        return ""
    if backend == "memory":
        return f'name = "memory"\nseed = "{fx.eml}"\n'
    section = f'name = "maildir"\nroot = "{fx.maildir("pypop")}"\n'
    return section + os.environ.get("PYPOP_INSTR_EXTRA", "")


def measure(
    backend: str,
    *,
    users: int,
    messages: int,
    sessions: int,
    work: Path,
    tls: bool = True,
    loaded: tuple[Path, int] | None = None,
) -> dict[str, Any]:
    """Instructions per login, per RETR and per pipelined RETR for one backend (and per
    TLS login and TLS RETR with ``tls``, from a second server that listens on TLS
    too: the plain figures stay those of a server without TLS)."""
    sets = [UserSet("small", "user", users, messages, 4096)]
    if backend != "trio-floor":  # the floor serves one small message to everyone
        sets.append(UserSet("large", "large", LARGE_USERS, LARGE_MESSAGES, LARGE_SIZE))
    fx = Fixture(work / "fixture", sets)
    fx.build(["pypop"])
    creds = {s.name: _creds(fx, s.name) for s in sets}
    section = _section(backend, fx)
    if backend == "trio-floor":  # benches/floor.py: no POP3 work, and no TLS
        tls = False
    run = _Run(backend, fx.passwd, section, creds, messages, sessions, work, fx.eml)
    plain = ("login", "retr", "pipelined", "pipelined-dele")
    per_session = run.phases(
        plain if "large" not in creds else (*plain, "login-1m", "retr-1m"), None
    )
    if loaded is not None:
        # A server of its own, with more users than sessions at once (no [IN-USE]),
        # so that the phases above keep the server and the fixture they always had.
        many = Fixture(work / "fixture-loaded", [UserSet("loaded", "many", LOADED_USERS, 20, 4096)])
        many.build(["pypop"])
        (work / "loaded").mkdir()
        per_session |= _Run(
            backend,
            many.passwd,
            _section(backend, many),
            {"loaded": _creds(many, "loaded")},
            20,
            sessions,
            work / "loaded",
            many.eml,
            (*loaded, many.users_file("loaded")),
        ).phases(("loaded-login",), None)
    if tls:
        ca, cert, key = make_cert(work / "cert")
        per_session |= run.phases(
            ("tls-login", "tls-retr"), (ssl.create_default_context(cafile=str(ca)), cert, key)
        )
    result: dict[str, Any] = {"backend": backend, "messages": messages, "sessions": sessions}
    if "loaded-login" in per_session:
        result["loaded-login"] = round(per_session["loaded-login"])
    for login, kinds, count in (
        ("login", ("retr", "pipelined", "pipelined-dele"), messages),
        ("login-1m", ("retr-1m",), LARGE_MESSAGES),
        ("tls-login", ("tls-retr",), messages),
    ):
        if login in per_session:
            result[login] = round(per_session[login])
            for kind in kinds:
                result[kind] = round((per_session[kind] - per_session[login]) / count)
    return result


@dataclass(frozen=True)
class _Run:
    """Phases of scripted sessions against one backend, each server under callgrind."""

    backend: str
    passwd: Path
    section: str  # the [backend] table's lines
    creds: dict[str, list[list[str]]]  # by user set: "small", and "large" but for the floor
    messages: int
    sessions: int
    work: Path
    eml: Path  # the fixture's messages (what the floor serves)
    # loaded-login: pop3-load, its sessions, and its users file (the fixture's).
    loaded: tuple[Path, int, Path] | None = None

    def command(self, conf: Path, port: int) -> list[str]:
        if self.backend == "trio-floor":
            return floor_command(sys.executable, port, self.eml, self.passwd)
        return [sys.executable, "-m", "pypop", "serve", "--config", str(conf)]

    def phases(
        self, phases: tuple[str, ...], tls: tuple[ssl.SSLContext, Path, Path] | None
    ) -> dict[str, float]:
        """Instructions per session of each phase (``tls-`` phases on the TLS port)."""
        port = free_port()
        tls_port = free_port() if tls is not None else None
        ctx: ssl.SSLContext | None = None
        server_tls = tls_table = ""
        name = self.backend
        if tls is not None:
            ctx, cert, key = tls
            server_tls = f'listen_tls = ["127.0.0.1:{tls_port}"]\n'
            tls_table = f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
            name += "-tls"
        conf = self.work / f"{name}.toml"
        conf.write_text(server_toml(port, self.passwd, self.section, server_tls, tls_table))
        out_dir = self.work / f"cg-{name}"
        out_dir.mkdir()
        server = Callgrind(
            self.command(conf, port),
            out_dir,
            self.work / f"{name}.log",
        )
        timeout = 120.0
        where = port if tls_port is None else tls_port
        try:
            _wait_port(port, server.proc, 300)
            server.instrument()
            large = any(p.endswith("-1m") for p in phases)
            everyone = [
                c for name, cs in self.creds.items() if large or name != "large" for c in cs
            ]
            warm_up(where, everyone, timeout, ctx)
            per_session: dict[str, float] = {}
            for phase in phases:
                server.zero()
                if phase == "loaded-login":
                    per_session[phase] = self._loaded(server, where)
                    continue
                kind = phase.removeprefix("tls-").removesuffix("-1m")
                creds = self.creds["large" if phase.endswith("-1m") else "small"]
                sessions = LARGE_SESSIONS if phase.endswith("-1m") else self.sessions
                messages = LARGE_MESSAGES if phase.endswith("-1m") else self.messages
                got = 0
                for k in range(sessions):
                    user, password = creds[k % len(creds)]
                    got += session(where, user, password, kind, timeout, ctx)
                if got != (0 if kind == "login" else sessions * messages):
                    raise ScriptError(f"{phase}: retrieved {got} messages")
                time.sleep(SETTLE)
                per_session[phase] = server.dump(phase) / sessions
            return per_session
        finally:
            server.stop()

    def _loaded(self, server: Callgrind, port: int) -> float:
        """Instructions per session of the load generator's login scenario."""
        assert self.loaded is not None
        binary, count, users = self.loaded
        cmd = [str(binary), "--port", str(port), "--scenario", "login", "--users", str(users)]
        cmd += ["--concurrency", "8", "--count", str(count), "--timeout", "120"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        try:
            result = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise ScriptError(f"loaded-login: pop3-load said {p.stderr.strip()!r}") from None
        if result.get("sessions") != count or result.get("errors"):
            raise ScriptError(f"loaded-login: {result}")
        time.sleep(SETTLE)
        return server.dump("loaded-login") / count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benches.instructions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--backends",
        default="memory,maildir",
        help="comma list of memory, maildir and trio-floor (benches/floor.py: the same "
        "script against a server that does no POP3 work, the event loop's share)",
    )
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--messages", type=int, default=20, help="messages per user (4 KiB each)")
    p.add_argument("--sessions", type=int, default=24, help="sessions per phase")
    p.add_argument("--check", type=Path, nargs="?", const=BASELINE, metavar="BASELINE")
    p.add_argument("--tolerance", type=float, default=0.15)
    p.add_argument("--write", type=Path, nargs="?", const=BASELINE, metavar="BASELINE")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--no-tls", action="store_true", help="leave out the TLS phases")
    p.add_argument(
        "--loaded",
        type=int,
        default=0,
        metavar="N",
        help="add loaded-login: N logins from the load generator, eight at a time",
    )
    p.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="keep the callgrind dumps here (callgrind_annotate DIR/BACKEND/cg-BACKEND/*)",
    )
    args = p.parse_args(argv)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    results: dict[str, dict[str, Any]] = {}
    loaded = (loadgen.build(quick=True), args.loaded) if args.loaded > 0 else None
    with tempfile.TemporaryDirectory(prefix="pypop-instr-") as tmp:
        for backend in [b for b in args.backends.split(",") if b]:
            work = (args.keep or Path(tmp)) / backend
            work.mkdir(parents=True)
            t0 = time.monotonic()
            try:
                r = measure(
                    backend,
                    users=args.users,
                    messages=args.messages,
                    sessions=args.sessions,
                    work=work,
                    tls=not args.no_tls,
                    loaded=loaded,
                )
            except (ScriptError, OSError, subprocess.SubprocessError) as exc:
                print(f"benches.instructions: {backend}: {exc}", file=sys.stderr)
                return 1
            r["wall_s"] = round(time.monotonic() - t0, 1)
            results[backend] = r
    print(f"instructions on the server (callgrind, user space; commit {commit or '?'})")
    head = f"{'backend':<10} {'per login':>12} {'per RETR':>12} {'per pipelined RETR':>20}"
    head += f" {'per RETR+DELE':>14} {'per RETR of 1 MiB':>18}"
    print(head + ("" if args.no_tls else f" {'per TLS login':>14} {'per TLS RETR':>13}"))
    for name, r in results.items():
        row = f"{name:<10} {r['login']:>12,} {r['retr']:>12,} {r['pipelined']:>20,}"
        row += f" {r['pipelined-dele']:>14,}"
        row += f" {r['retr-1m']:>18,}" if "retr-1m" in r else f" {'-':>18}"
        if "tls-login" in r:
            row += f" {r['tls-login']:>14,} {r['tls-retr']:>13,}"
        print(row)
    if loaded is not None:
        print(f"per login under load ({loaded[1]} from pop3-load, eight at a time):")
        for name, r in results.items():
            print(f"{name:<10} {r['loaded-login']:>12,}")
    doc = {"commit": commit, "python": sys.version, "results": results}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    if args.write:
        args.write.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"baseline written: {args.write}")
    if args.check:
        recorded = json.loads(args.check.read_text())
        if recorded.get("python") != sys.version:
            # Another interpreter build runs other code: its counts are not comparable.
            print(
                f"check skipped: the baseline was recorded with Python {recorded.get('python')!r}, "
                f"this is {sys.version!r}; record one here with --write"
            )
            return 0
        base = recorded["results"]
        failed = []
        for name, r in results.items():
            for kind in CHECKED:
                if name not in base or kind not in base[name]:
                    continue
                ratio = r[kind] / base[name][kind]
                verdict = "ok" if ratio <= 1 + args.tolerance else "REGRESSION"
                print(
                    f"check {name}/{kind}: {r[kind]:,} vs baseline {base[name][kind]:,} "
                    f"({ratio:.2f}x, limit {1 + args.tolerance:.2f}x): {verdict}"
                )
                if verdict != "ok":
                    failed.append(f"{name}/{kind}")
        if failed:
            print(f"FAILED: instructions per RETR rose over the baseline: {', '.join(failed)}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
