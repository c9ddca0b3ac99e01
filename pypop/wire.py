"""The wire codec, chosen in one place.

The Rust extension ``pypop._wire`` is used when it imports; ``PYPOP_PUREPYTHON=1``
forces the pure-Python twin ``pypop._wire_py`` (docs/wire.md: one behaviour, two
implementations). Type checkers see the stub ``pypop/_wire.pyi``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

__all__ = [
    "DEFAULT_MAX_LINE",
    "HEADER_SCAN_LIMIT",
    "IMPLEMENTATION",
    "MAX_TOP_LINES",
    "PROXY_HEADER_MAX",
    "DotStuffer",
    "LineFramer",
    "SizeCounter",
    "Unstuffer",
    "answer_fetches",
    "apop_digest",
    "apop_verify",
    "constant_time_eq",
    "cram_md5_context",
    "cram_md5_digest",
    "cram_md5_verify",
    "cram_md5_verify_context",
    "files_unchanged",
    "make_challenge",
    "parse_proxy_header",
    "read_at_now",
    "read_file_now",
    "read_small_files",
    "stuff",
    "unstuff",
    "wire_header_is_ascii",
    "wire_size",
]

if TYPE_CHECKING:
    from pypop._wire import (
        DEFAULT_MAX_LINE,
        HEADER_SCAN_LIMIT,
        IMPLEMENTATION,
        MAX_TOP_LINES,
        PROXY_HEADER_MAX,
        DotStuffer,
        LineFramer,
        SizeCounter,
        Unstuffer,
        answer_fetches,
        apop_digest,
        apop_verify,
        constant_time_eq,
        cram_md5_context,
        cram_md5_digest,
        cram_md5_verify,
        cram_md5_verify_context,
        files_unchanged,
        make_challenge,
        parse_proxy_header,
        read_at_now,
        read_file_now,
        read_small_files,
        stuff,
        unstuff,
        wire_header_is_ascii,
        wire_size,
    )
elif os.environ.get("PYPOP_PUREPYTHON", "") not in ("", "0"):
    from pypop._wire_py import *  # noqa: F403
else:
    try:
        from pypop._wire import *  # noqa: F403
    except ImportError:  # no compiled extension for this platform
        from pypop._wire_py import *  # noqa: F403
