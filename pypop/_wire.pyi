"""Stub of the compiled wire codec (rust/pypop-ext), checked with mypy.stubtest.

The pure-Python twin in ``pypop._wire_py`` has exactly this API and behaviour;
docs/wire.md is the specification both follow.
"""

from collections.abc import Callable, Sequence
from os import PathLike
from typing import Final, Self, final

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

DEFAULT_MAX_LINE: Final[int]
"""255: RFC 2449 §4 command-line limit, line end included."""

HEADER_SCAN_LIMIT: Final[int]
"""256 KiB: how much of a header without an empty line the server's 8-bit check judges."""

IMPLEMENTATION: Final[str]
""""rust" here, "python" in the twin."""
MAX_TOP_LINES: Final[int]
"""TOP's line count is capped here (a larger count sends the whole body anyway)."""

@final
class LineFramer:
    """Splits a byte stream into command lines (server side, lenient line ends)."""

    def __new__(cls, max_line: int = 255) -> Self: ...
    @property
    def max_line(self) -> int: ...
    @property
    def buffered(self) -> int:
        """Octets held for an incomplete line (0 while skipping an overlong one)."""

    def feed(self, data: bytes) -> list[bytes | None]:
        """Every line completed by ``data``, without its line end.

        ``None`` marks an overlong line."""

    def clear(self) -> None:
        """Forget buffered input and any overlong-skip state (used at STLS)."""

@final
class DotStuffer:
    """Streams a stored message as a multi-line response body (RFC 1939 §3)."""

    def __new__(cls, top_lines: int | None = None) -> Self: ...
    @property
    def done(self) -> bool:
        """True once a TOP cut is complete; further input is ignored."""

    def feed(self, data: bytes) -> bytes: ...
    def finish(self) -> bytes:
        """Pending octets, a CRLF if the output does not end a line, then ".\\r\\n"."""

@final
class SizeCounter:
    """Counts a message's POP3 size (RFC 1939 §11) without producing output.

    The message with every line end made CRLF (a bare CR counts 2); the CRLF added
    before the terminator to a message without a final line end is not counted.
    """

    def __new__(cls) -> Self: ...
    def feed(self, data: bytes) -> None: ...
    def finish(self) -> int: ...

@final
class Unstuffer:
    """Client side: multi-line reply bytes in, message bytes out (strict CRLF)."""

    def __new__(cls) -> Self: ...
    @property
    def done(self) -> bool: ...
    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """(message octets, None) until the terminator; then (octets, bytes after it)."""

def stuff(message: bytes, top_lines: int | None = None) -> bytes:
    """Whole-message DotStuffer: feed(message) + finish()."""

def wire_size(message: bytes) -> int:
    """Whole-message SizeCounter."""

def wire_header_is_ascii(wire: bytes, limit: int = ...) -> bool:
    """RFC 6856: is the header of this wire-form message (CRLF line ends, stuffed)
    US-ASCII? The header ends before the first empty line; without one within
    ``limit`` octets, the first ``limit`` octets are judged. Only the header is read."""

def unstuff(data: bytes) -> tuple[bytes, bytes]:
    """Whole-buffer Unstuffer; raises ValueError if the terminator is missing."""

def constant_time_eq(a: bytes, b: bytes) -> bool: ...
def apop_digest(timestamp: bytes, secret: bytes) -> str: ...
def apop_verify(timestamp: bytes, secret: bytes, digest: bytes) -> bool: ...
def cram_md5_digest(secret: bytes, challenge: bytes) -> str: ...
def cram_md5_verify(secret: bytes, challenge: bytes, digest: bytes) -> bool: ...
def cram_md5_context(secret: bytes) -> bytes: ...
def cram_md5_verify_context(context: bytes, challenge: bytes, digest: bytes) -> bool: ...
def make_challenge(host: str) -> str: ...

PROXY_HEADER_MAX: Final[int]
"""1024: the default bound of a PROXY header, v2 TLVs included."""

def parse_proxy_header(
    data: bytes, max_len: int = 1024
) -> tuple[int, int, bool, bytes, int, bytes, int, bool] | None:
    """The PROXY protocol header (v1 or v2) at the start of ``data``.

    None while what is there is a valid beginning; else ``(length, version, local,
    source, source_port, destination, destination_port, ssl)``: addresses as 4 or 16
    octets, or b"" when the header carries none (v1 UNKNOWN, v2 LOCAL, AF_UNSPEC,
    AF_UNIX). ValueError for anything else, or for more than ``max_len`` octets."""

def read_small_files(
    paths: Sequence[str],
    limit: int,
    stuffed: bool = False,
    dir_fds: Sequence[int] | None = None,
) -> list[bytes]:
    """The contents of ``paths``, in order, while each is a whole small file; with
    ``stuffed``, each in wire form (``stuff(contents)``, its terminator included).

    Stops at the first path that cannot be opened (a symbolic link is never followed),
    is not a regular file, cannot be read, has ``limit`` octets or more, or grew while
    read: the result is the contents of the paths before it. Each file is read with one
    system call when it is as large as fstat says. The extension releases the GIL once
    for the whole list (the stuffing included).

    With ``dir_fds`` (one directory descriptor per path), each path is a plain name
    opened with ``openat(dir_fds[i], name, O_NOFOLLOW ...)``: the file in the very
    directory the caller holds, whatever its path leads to by now. ValueError, before
    any I/O, for a length that differs from ``paths``', a negative descriptor, or a
    name with a ``/``. TypeError for a path that is not ``str``, OverflowError for a
    negative ``limit``."""

def read_file_now(path: str | PathLike[str], limit: int, dir_fd: int | None = None) -> bytes | None:
    """The whole contents of the regular file at ``path`` (fewer than ``limit`` octets)
    if the kernel can give them without waiting: the path resolved from its caches
    alone (``openat2`` with ``RESOLVE_CACHED``), every octet in the page cache
    (``preadv2`` with ``RWF_NOWAIT``), the file read to the size ``fstat`` gave. None
    for anything else: not in memory, not a regular file, a symbolic link (never
    followed), ``limit`` octets or more, shorter than ``fstat`` said, an error, or a
    kernel without these calls; the caller then reads it where waiting is harmless (a
    worker thread). The extension releases the GIL for the read.

    With ``dir_fd``, ``path`` is a plain name opened relative to that directory
    descriptor (and kept beneath it, ``RESOLVE_BENEATH``: ``..`` reads as None), never
    through the directory's path; ValueError for a negative ``dir_fd`` or a name with a
    ``/``. TypeError for a path that is not ``str``, OverflowError for a ``limit``
    outside 0..2**64 - 1."""

def read_at_now(fd: int, offset: int, size: int) -> bytes | None:
    """``size`` octets of the open file ``fd`` from ``offset`` if every one is in the
    page cache (``preadv2`` with ``RWF_NOWAIT``; the extension releases the GIL for
    it); None if any is not, the file ends before them, a read fails, or the call is
    not supported here (the caller then reads them in a worker thread). The file's
    position does not move. ValueError for a negative ``fd``, OverflowError for an
    ``offset`` or ``size`` below 0 or one that ends past 2**63 - 1."""

def files_unchanged(directory: str, names: bytes, stats: bytes) -> bool:
    """Whether each file named in ``names`` (paths relative to ``directory``, each
    ended by a NUL) still has the size, mtime in ns and inode packed in ``stats``
    (``struct.pack("<QqQ", ...)`` per name), by ``lstat``.

    False at the first difference, or if a file cannot be stat-ed (the caller reads
    the folder again and meets the failure there). ValueError if ``names`` does not
    end with a NUL or ``stats`` is not 24 octets per name; True for no names. The
    extension releases the GIL for all of them."""

def answer_fetches(
    lines: list[bytes | None],
    at: int,
    budget: int,
    sizes: list[int],
    deleted: bytearray,
    source: Callable[[int, int | None], bytes | None],
    out: list[bytes],
    room: int,
    octets_line: bool,
    check_ascii: bool,
    retrieved: set[int] | None,
    dele_ok: bytes,
) -> tuple[int, int, int, int, set[int] | None, tuple[int, int | None] | None, int, int]:
    """The server engine's quick path in TRANSACTION (docs/wire.md): answers
    ``lines[at:]`` while each is a plain ``RETR n`` / ``TOP n m`` / ``DELE n``
    (pypop.protocol's ``parse_command`` quick shapes) of a message
    ``1 <= n <= len(sizes)`` not marked in ``deleted``, at most ``budget`` lines, and
    only while fewer than ``room`` octets were queued. A RETR or TOP appends its
    first line (``+OK <sizes[n-1]> octets`` for RETR, ``+OK`` for TOP) and
    ``source(n - 1, top)`` (``top`` capped at MAX_TOP_LINES) to ``out``, and a RETR
    adds ``n - 1`` to ``retrieved`` (a new set if None); a DELE marks ``n - 1`` in
    ``deleted`` and appends ``dele_ok``. It stops before any other line, before a
    RETR if not ``octets_line`` (a custom text), before a DELE if ``dele_ok`` is
    empty, and before a RETR or DELE whose size is not an int in 0..2**64-1. A RETR
    or TOP whose source call returns something other than ``bytes``, raises an
    Exception, or (``check_ascii``) has an 8-bit header is taken but not answered:
    it is the ``miss``, (index, top), and ends the call.

    Returns (lines answered, RETRs among them, their sizes' sum, octets queued,
    ``retrieved``, miss or None, DELEs among the lines answered, their sizes' sum)."""
