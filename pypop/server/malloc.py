"""glibc's malloc, tuned for a server that streams mail in large blocks.

Every RETR of a large message allocates blocks of 64 KiB to a few MiB (a file read, a
database row, its stuffed copy) and frees them a moment later. With glibc's defaults
a block over the mmap threshold is its own ``mmap``, and a freed heap top over the
trim threshold goes back to the kernel (``brk``, or ``madvise`` in a worker thread's
arena): the next block page-faults every page in again, zeroed (docs/performance.md:
Maildir's 1 MiB RETR went from 547 to 1,114 MB/s without that).

:func:`tune` raises both thresholds once at start-up, so such blocks are reused from
the heap. The cost is memory a busy process keeps instead of returning: at most
``TRIM_THRESHOLD`` of free heap top per arena. An administrator's own settings win:
with ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES`` in
the environment nothing is changed. Other C libraries (musl) are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Final

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune", "tuned"]

log = logging.getLogger(__name__)

# Above the largest block the server streams (1 MiB file reads, plus stuffing).
MMAP_THRESHOLD: Final = 4 << 20
TRIM_THRESHOLD: Final = 16 << 20

# <malloc.h>
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3

_ENV: Final = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_tuned = False


def tuned() -> bool:
    """True once :func:`tune` succeeded in this process: code that allocates a fresh
    large block per read (SQLite's blob reads) may rely on the heap reusing it."""
    return _tuned


def tune() -> bool:
    """Raise glibc's mmap and trim thresholds; True if this process now has them."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _ENV):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        # Only glibc has this; musl's mallopt exists but does nothing.
        libc.gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done: bool = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
    log.debug(
        "malloc: mmap threshold %d, trim threshold %d: %s", MMAP_THRESHOLD, TRIM_THRESHOLD, done
    )
    global _tuned
    _tuned = _tuned or done
    return done
