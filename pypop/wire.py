"""The wire codec, chosen in one place.

The Rust extension ``pypop._wire`` is used when it imports; ``PYPOP_PUREPYTHON=1``
forces the pure-Python twin ``pypop._wire_py`` (docs/wire.md: one behaviour, two
implementations).
"""

from __future__ import annotations

import os
from types import ModuleType


def _load() -> ModuleType:
    if os.environ.get("PYPOP_PUREPYTHON", "") not in ("", "0"):
        from pypop import _wire_py

        return _wire_py
    try:
        from pypop import _wire
    except ImportError:  # no compiled extension for this platform
        from pypop import _wire_py

        return _wire_py
    return _wire


_impl = _load()

IMPLEMENTATION: str = _impl.IMPLEMENTATION
DEFAULT_MAX_LINE: int = _impl.DEFAULT_MAX_LINE
LineFramer = _impl.LineFramer
DotStuffer = _impl.DotStuffer
SizeCounter = _impl.SizeCounter
Unstuffer = _impl.Unstuffer
stuff = _impl.stuff
wire_size = _impl.wire_size
unstuff = _impl.unstuff
constant_time_eq = _impl.constant_time_eq
apop_digest = _impl.apop_digest
apop_verify = _impl.apop_verify
cram_md5_digest = _impl.cram_md5_digest
cram_md5_verify = _impl.cram_md5_verify
cram_md5_context = _impl.cram_md5_context
cram_md5_verify_context = _impl.cram_md5_verify_context
make_challenge = _impl.make_challenge
