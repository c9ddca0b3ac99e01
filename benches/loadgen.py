"""Building and running the Rust load generator (rust/pop3-load)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benches.servers import REPO, pin_prefix

__all__ = ["LoadResult", "build", "run"]


def build(quick: bool = False) -> Path:
    """``cargo build --release -p pop3-load``; returns the binary's path."""
    env = dict(os.environ)
    cmd = ["cargo", "build", "--release", "-p", "pop3-load"]
    if quick:
        cmd.append("--quiet")
    subprocess.run(cmd, cwd=REPO, check=True, env=env, timeout=1800)
    target = Path(env.get("CARGO_TARGET_DIR", REPO / "target"))
    if not target.is_absolute():
        target = REPO / target
    binary = target / "release" / "pop3-load"
    if not binary.exists():
        raise FileNotFoundError(binary)
    return binary


@dataclass
class LoadResult:
    ok: bool
    data: dict[str, Any]
    stderr: str
    returncode: int


def run(binary: Path, args: list[str], timeout: float) -> LoadResult:
    """Run one load-generator invocation pinned to core 1; parse its JSON line.

    Every fixture message ends with a line end, so RETR must deliver exactly the LIST
    size (``--exact-sizes``; without it pop3-load allows the 2 octets a server adds
    to a message without a final newline)."""
    cmd = [*pin_prefix(1), str(binary), *args, "--exact-sizes"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return LoadResult(
            False,
            {"errors": 1, "error_samples": ["load generator timed out"]},
            str(exc.stderr or ""),
            -1,
        )
    data: dict[str, Any] = {}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            data = json.loads(line)
            break
    ok = p.returncode == 0 and bool(data) and data.get("errors", 1) == 0
    if not data:
        data = {"errors": 1, "error_samples": [p.stderr.strip()[-500:]]}
    return LoadResult(ok, data, p.stderr, p.returncode)
