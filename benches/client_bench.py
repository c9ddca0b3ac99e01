"""Client benchmark: fetch N × 4 KiB messages from Dovecot into a fresh Maildir.

    python benches/client_bench.py            # 5,000 messages, 3 runs each
    python benches/client_bench.py --quick    # 300 messages, 1 run (CI smoke)

Three clients in the same run, against the same Dovecot (plain POP3 on 127.0.0.1,
USER/PASS, messages left on the server):

- ``pypop fetch --deliver maildir:DIR --keep`` (pipelined, fsync before commit);
- a stdlib ``poplib`` loop: login, LIST, then RETR + ``mailbox.Maildir.add`` per
  message (one round trip per message, no fsync);
- ``mpop`` (Debian package) with ``delivery maildir``, ``keep on``.

Each is a fresh process per run (interpreter start-up counts). Prints the median wall
time, messages/s, and the ratios pypop/poplib and pypop/mpop.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.popservers import (  # noqa: E402
    PASSWORD,
    Certs,
    PopServer,
    dovecot_missing,
    dovecot_server,
)

POPLIB_LOOP = """
import mailbox, poplib, sys
host, port, user, password, dest = sys.argv[1:]
box = mailbox.Maildir(dest, create=True)
pop = poplib.POP3(host, int(port))
pop.user(user)
pop.pass_(password)
count = len(pop.list()[1])
for n in range(1, count + 1):
    box.add(b"\\n".join(pop.retr(n)[1]) + b"\\n")
pop.quit()
print(count)
"""


def message(n: int, size: int = 4096) -> bytes:
    head = (
        f"From: Sender {n} <s{n}@example.org>\r\nTo: bench@example.org\r\n"
        f"Subject: benchmark message {n}\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: <bench-{n}@example.org>\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again. 0123456789\r\n"
    body = (line * (size // len(line) + 1))[: size - len(head) - 2] + b"\r\n"
    return head + body


def run_pypop(srv: PopServer, dest: Path, state: Path) -> int:
    env = dict(os.environ, PYPOP_PASSWORD=PASSWORD)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pypop",
            "fetch",
            f"pop://bench@127.0.0.1:{srv.port}",
            "--tls",
            "off",
            "--auth",
            "USER",
            "--deliver",
            f"maildir:{dest}",
            "--keep",
            "--state",
            str(state),
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode not in (0, 1):
        raise RuntimeError(f"pypop fetch failed: {out.stderr}")
    return len(os.listdir(dest / "new"))


def run_poplib(srv: PopServer, dest: Path, state: Path) -> int:
    subprocess.run(
        [
            sys.executable,
            "-c",
            POPLIB_LOOP,
            "127.0.0.1",
            str(srv.port),
            "bench",
            PASSWORD,
            str(dest),
        ],
        check=True,
        capture_output=True,
    )
    return len(os.listdir(dest / "new"))


def run_mpop(srv: PopServer, dest: Path, state: Path) -> int:
    for sub in ("cur", "new", "tmp"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    conf = state.with_suffix(".mpoprc")
    conf.write_text(
        f"account bench\nhost 127.0.0.1\nport {srv.port}\nuser bench\n"
        f"password {PASSWORD}\ntls off\nauth user\ndelivery maildir {dest}\nkeep on\n"
        f"uidls_file {state}\npipelining on\n"
    )
    os.chmod(conf, 0o600)
    out = subprocess.run(
        ["mpop", "-C", str(conf), "-q", "bench"], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"mpop failed ({out.returncode}): {out.stderr}")
    return len(os.listdir(dest / "new"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--messages", type=int)
    ap.add_argument("--repeats", type=int)
    args = ap.parse_args()
    count = args.messages or (300 if args.quick else 5000)
    repeats = args.repeats or (1 if args.quick else 3)
    why = dovecot_missing()
    if why:
        print(f"client_bench: skipped: {why}")
        return 0
    clients = {"pypop fetch": run_pypop, "poplib loop": run_poplib}
    if shutil.which("mpop"):
        clients["mpop"] = run_mpop
    else:
        print("client_bench: mpop not installed (benches/setup.sh installs it)")
    base = Path(tempfile.mkdtemp(prefix="pypop-client-bench-"))
    os.chmod(base, 0o755)  # noqa: S103 - Dovecot's users read it
    srv = dovecot_server(
        base / "dovecot", Certs.make(base / "certs"), {"bench": [message(n) for n in range(count)]}
    )
    times: dict[str, list[float]] = {name: [] for name in clients}
    try:
        # Warm-up: Dovecot builds its index on the first session.
        run_poplib(srv, base / "warm", base / "warm.state")
        for r in range(repeats):
            for name, fn in clients.items():
                dest, state = base / f"{name.split()[0]}-{r}", base / f"{name.split()[0]}-{r}.st"
                start = time.perf_counter()
                got = fn(srv, dest, state)
                elapsed = time.perf_counter() - start
                if got != count:
                    raise RuntimeError(f"{name}: {got} messages delivered, expected {count}")
                times[name].append(elapsed)
                shutil.rmtree(dest)
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"\nfetch {count} x 4 KiB from Dovecot (127.0.0.1, plain POP3) into a Maildir, "
        f"median of {repeats}\n"
    )
    print(f"{'client':<14}{'seconds':>9}{'msg/s':>9}{'best s':>9}   runs")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        runs = " ".join(f"{x:.2f}" for x in t)
        print(f"{name:<14}{med[name]:>9.2f}{count / med[name]:>9.0f}{min(t):>9.2f}   {runs}")
    print()
    for other in ("poplib loop", "mpop"):
        if other in med:
            best = min(times[other]) / min(times["pypop fetch"])
            print(
                f"pypop / {other}: {med[other] / med['pypop fetch']:.2f}x faster "
                f"(best runs: {best:.2f}x)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
