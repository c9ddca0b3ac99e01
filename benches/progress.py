"""A small progress bar on stderr (no dependency): redraws in place on a terminal,
prints one line per step otherwise (CI logs)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None, width: int = 30) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.t0 = time.monotonic()
        self.tty = self.stream.isatty()
        self.label = ""

    def _eta(self) -> str:
        if self.done == 0:
            return "--:--"
        left = (time.monotonic() - self.t0) / self.done * (self.total - self.done)
        return f"{int(left) // 60:02d}:{int(left) % 60:02d}"

    def _line(self) -> str:
        fill = int(self.width * self.done / self.total)
        bar = "#" * fill + "." * (self.width - fill)
        return f"[{bar}] {self.done}/{self.total} ETA {self._eta()} {self.label}"

    def start(self, label: str) -> None:
        """Announce the step about to run."""
        self.label = label
        if self.tty:
            self.stream.write("\r\x1b[K" + self._line())
            self.stream.flush()

    def advance(self, note: str = "") -> None:
        self.done = min(self.done + 1, self.total)
        if self.tty:
            self.stream.write("\r\x1b[K" + self._line())
        else:
            self.stream.write(self._line() + (f"  {note}" if note else "") + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """Print a line above the bar."""
        if self.tty:
            self.stream.write("\r\x1b[K" + text + "\n" + self._line())
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
