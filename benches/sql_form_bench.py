"""Which form should pypop-sql store: the octets as delivered, CRLF, or the wire form?

What a stored form can save is the server's work between the stored octets and the
socket: ``pypop.wire.stuff`` (CRLF line ends, dot-stuffing, the terminator). This times
that step per message for the benchmark's own messages (benches/fixtures.py: LF line
ends, as Maildir and most MTAs hand them over) in three stored forms:

- as delivered (LF): ``stuff(data)``, what pypop-sql does;
- CRLF: ``stuff(data)`` on CRLF input (no line-end rewriting left);
- wire: already stuffed, CRLF and terminated: only the bytes object itself (0 work).

Compare the microseconds with the whole per-message cost in the suite's table
(1 / messages per second of retr-all-4k; 1 MiB / MB/s of retr-all-1m).

    python benches/sql_form_bench.py
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benches.fixtures import make_message
from pypop.wire import IMPLEMENTATION, stuff


def per_call(fn: object, data: bytes, budget: float = 0.5) -> float:
    assert callable(fn)
    n, best = 1, float("inf")
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn(data)
        dt = time.perf_counter() - t0
        if dt > budget / 5:
            break
        n *= 2
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn(data)
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def main() -> int:
    rng = random.Random(1939)
    print(f"stored form -> wire, per message (wire codec: {IMPLEMENTATION}); best of 5, µs")
    print(f"{'message':<8} {'as delivered (LF)':>18} {'CRLF':>8} {'wire':>6}")
    for label, size in (("4 KiB", 4096), ("1 MiB", 1 << 20)):
        lf = make_message("user1", 1, size, rng)
        crlf = lf.replace(b"\n", b"\r\n")
        assert stuff(lf) == stuff(crlf)
        t_lf = per_call(stuff, lf)
        t_crlf = per_call(stuff, crlf)
        print(f"{label:<8} {t_lf:>18.2f} {t_crlf:>8.2f} {0:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
