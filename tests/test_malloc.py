"""pypop.server.malloc: glibc keeps large blocks in the heap once tuned.

Each check runs in a fresh interpreter: the thresholds belong to the process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pypop.server.malloc import MMAP_THRESHOLD, TRIM_THRESHOLD

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc only",
)

# mallinfo2().hblks: the number of blocks glibc holds as their own mmap. A 2 MiB
# bytes object is one with the defaults, and comes from the heap once tuned.
_PROBE = r"""
import ctypes, json, os, sys
from pypop.server.malloc import tune, tuned as is_tuned

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
tuned = tune() if sys.argv[1] == "tune" else None
before = libc.mallinfo2().hblks
block = bytes(2 << 20)
during = libc.mallinfo2().hblks
del block
print(json.dumps({"tuned": tuned, "mmapped": during - before, "says": is_tuned()}))
"""


def _clean_env() -> dict[str, str]:
    """This environment without the variables that would stop tune()."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUN"))}


def _probe(mode: str, **env: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env={**_clean_env(), **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_defaults_mmap_a_large_block() -> None:
    assert _probe("plain") == {"tuned": None, "mmapped": 1, "says": False}


def test_tuned_large_blocks_come_from_the_heap() -> None:
    assert _probe("tune") == {"tuned": True, "mmapped": 0, "says": True}


@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_MMAP_THRESHOLD_": "131072"},
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"},
    ],
)
def test_the_administrators_settings_win(env: dict[str, str]) -> None:
    assert _probe("tune", **env) == {"tuned": False, "mmapped": 1, "says": False}


def test_pypop_serve_tunes_itself(tmp_path: Path) -> None:
    """The server process says so in its debug log, before it listens."""
    (tmp_path / "passwd").write_text("alice:{PLAIN}pw::::::\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pypop", "serve", "--listen", "127.0.0.1:0",
         "--passwd-file", str(tmp_path / "passwd"), "--log-level", "DEBUG"],
        stderr=subprocess.PIPE, text=True, env=_clean_env(),
    )  # fmt: skip
    assert proc.stderr is not None
    log = ""
    try:
        while line := proc.stderr.readline():
            log += line
            if "listening on 127.0.0.1:" in line:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    want = f"malloc: mmap threshold {MMAP_THRESHOLD}, trim threshold {TRIM_THRESHOLD}: True"
    assert want in log, log
