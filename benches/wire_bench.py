"""Throughput of the wire codec: the Rust extension against the pure-Python twin.

    python benches/wire_bench.py           # full run (about a minute)
    python benches/wire_bench.py --quick   # CI smoke run (a few seconds)

Cases, each for a 4 KiB and a 1 MiB buffer, fed the way the server feeds them (64 KiB
blocks, one fresh codec object per message, ``finish()`` included):

- frame:   a stream of POP3 command lines through ``LineFramer``;
- stuff:   realistic mail (~72-octet CRLF lines, some starting with ".") through
           ``DotStuffer``;
- unstuff: that mail's stuffed body through ``Unstuffer``.

MB/s counts input octets (10^6 octets per MB); each figure is the best (and median) of
several timed repeats with ``time.perf_counter``. No assertion on speed: the target to
check by eye is Rust stuffing at >= 1.5 GB/s on 1 MiB and >= 20x the twin.
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

# Run from a checkout without installing: the repository root before site-packages.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BLOCK = 64 * 1024
SIZES = {"4 KiB": 4 * 1024, "1 MiB": 1024 * 1024}


def commands(size: int, rng: random.Random) -> bytes:
    """A pipelined client stream of command lines, cut to ``size`` octets."""
    verbs = [
        b"STAT",
        b"NOOP",
        b"UIDL",
        b"LIST",
        b"CAPA",
        b"RETR %d",
        b"DELE %d",
        b"TOP %d 10",
        b"UIDL %d",
        b"LIST %d",
        b"USER someone.with.a.long.name@example.org",
        b"APOP alice c4c9334bac560ecc979e58001b3e22fb",
    ]
    out = bytearray()
    while len(out) < size:
        verb = rng.choice(verbs)
        out += (verb % rng.randint(1, 99_999) if b"%d" in verb else verb) + b"\r\n"
    return bytes(out[:size])


def mail(size: int, rng: random.Random) -> bytes:
    """A stored message: headers, then ~72-octet CRLF lines, about 1 in 40 starting "."."""
    words = [b"the", b"POP3", b"server", b"streams", b"mail", b"octets", b"to", b"a",
             b"client", b"over", b"TCP", b"and", b"dot-stuffs", b"each", b"line"]  # fmt: skip
    out = bytearray(
        b"Return-Path: <alice@example.org>\r\nFrom: Alice <alice@example.org>\r\n"
        b"To: Bob <bob@example.net>\r\nSubject: benchmark\r\nMessage-ID: <1@example.org>\r\n\r\n"
    )
    while len(out) < size:
        line = bytearray(b"." if rng.random() < 0.025 else b"")
        while len(line) < 66:
            line += rng.choice(words) + b" "
        out += bytes(line[:72]).rstrip() + b"\r\n"
    return bytes(out[:size])


def blocks(data: bytes) -> list[bytes]:
    return [data[i : i + BLOCK] for i in range(0, len(data), BLOCK)]


def run_frame(mod: ModuleType, chunks: list[bytes]) -> None:
    framer = mod.LineFramer()
    for chunk in chunks:
        framer.feed(chunk)


def run_stuff(mod: ModuleType, chunks: list[bytes]) -> None:
    stuffer = mod.DotStuffer()
    for chunk in chunks:
        stuffer.feed(chunk)
    stuffer.finish()


def run_unstuff(mod: ModuleType, chunks: list[bytes]) -> None:
    unstuffer = mod.Unstuffer()
    for chunk in chunks:
        unstuffer.feed(chunk)
    if not unstuffer.done:
        raise RuntimeError("benchmark input lost its terminator")


def measure(
    fn: Callable[[ModuleType, list[bytes]], None],
    mod: ModuleType,
    chunks: list[bytes],
    *,
    min_time: float,
    repeat: int,
) -> tuple[float, float]:
    """(best, median) MB/s over ``repeat`` samples of at least ``min_time`` seconds."""
    octets = sum(map(len, chunks))
    loops = 1
    while True:  # calibrate the loop count
        start = time.perf_counter()
        for _ in range(loops):
            fn(mod, chunks)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time / 4:
            break
        loops *= 2
    loops = max(1, int(loops * min_time / max(elapsed, 1e-9)))
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(loops):
            fn(mod, chunks)
        elapsed = time.perf_counter() - start
        rates.append(octets * loops / elapsed / 1e6)
    return max(rates), statistics.median(rates)


def load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        print(f"note: {name} unavailable ({exc}); its column shows n/a", file=sys.stderr)
        return None


def fmt(rate: tuple[float, float] | None) -> str:
    if rate is None:
        return "n/a"
    return f"{rate[0]:9.1f} ({rate[1]:7.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short CI smoke run")
    args = parser.parse_args(argv)
    min_time, repeat = (0.02, 3) if args.quick else (0.2, 7)

    rust, twin = load("pypop._wire"), load("pypop._wire_py")
    rng = random.Random(1939)
    cases: list[tuple[str, str, Callable[[ModuleType, list[bytes]], None], list[bytes]]] = []
    for label, size in SIZES.items():
        message = mail(size, rng)
        stuffed = importlib.import_module("pypop._wire_py").stuff(message)
        cases += [
            ("frame", label, run_frame, blocks(commands(size, rng))),
            ("stuff", label, run_stuff, blocks(message)),
            ("unstuff", label, run_unstuff, blocks(stuffed)),
        ]

    print(
        f"MB/s of input, best (median) of {repeat}; 64 KiB feeds; Python {sys.version.split()[0]}"
    )
    header = f"{'case':<8} {'size':<6} {'rust':>19} {'python twin':>19} {'rust/twin':>10}"
    print(header)
    print("-" * len(header))
    for name, label, fn, chunks in cases:
        r = measure(fn, rust, chunks, min_time=min_time, repeat=repeat) if rust else None
        p = measure(fn, twin, chunks, min_time=min_time, repeat=repeat) if twin else None
        ratio = f"{r[0] / p[0]:9.1f}x" if r and p else f"{'n/a':>10}"
        print(f"{name:<8} {label:<6} {fmt(r):>19} {fmt(p):>19} {ratio}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
