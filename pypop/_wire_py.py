"""Pure-Python twin of the Rust wire codec ``pypop._wire``.

Same API (``pypop/_wire.pyi``) and same behaviour (``docs/wire.md``) as the extension,
octet for octet and call for call. ``pypop.wire`` falls back to this module when the
extension does not import, and ``PYPOP_PUREPYTHON=1`` forces it.

Speed: every hot path works on whole chunks with C-level ``bytes`` methods (``find``,
``count``, ``split``, ``replace``); Python code runs per chunk, or per line only where
the API returns lines (the framer). No loop here walks octets one by one.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import operator
import os
import re
import secrets
import stat
import struct
from collections.abc import Callable, Sequence
from typing import Final

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

DEFAULT_MAX_LINE: Final[int] = 255
"""255: RFC 2449 §4 command-line limit, line end included."""

HEADER_SCAN_LIMIT: Final[int] = 256 * 1024
"""How much of a header without an empty line the server's 8-bit check judges."""

IMPLEMENTATION: Final[str] = "python"
""""rust" in the extension, "python" here."""

MAX_TOP_LINES: Final[int] = 1 << 32
"""TOP's line count is capped here (a larger count sends the whole body anyway)."""

PROXY_HEADER_MAX: Final[int] = 1024
"""The default bound of a PROXY header, v2 TLVs included."""

_CR: Final = 13
_LF: Final = 10
_DOT: Final = 46


def _as_bytes(data: bytes) -> bytes:
    """Accept any bytes-like object, as the Rust side does (``str`` raises TypeError)."""
    if type(data) is bytes:
        return data
    return memoryview(data).tobytes()


# --------------------------------------------------------------------------------------
# LineFramer: command lines (server side; lenient line ends, RFC 2449 §4 length limit)
# --------------------------------------------------------------------------------------


class LineFramer:
    """Splits a byte stream into command lines (server side, lenient line ends).

    A line ends at LF, with one optional CR before it; the limit counts the line *with*
    its line end. Overlong lines give one ``None`` each and are skipped through their LF
    without being buffered.
    """

    __slots__ = ("_buf", "_max", "_skip")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 2:
            raise ValueError("max_line must be at least 2")
        self._max = max_line
        self._buf = bytearray()  # octets of an incomplete line, always < max_line
        self._skip = False  # inside an overlong line, waiting for its LF

    @property
    def max_line(self) -> int:
        return self._max

    @property
    def buffered(self) -> int:
        """Octets held for an incomplete line (0 while skipping an overlong one)."""
        return len(self._buf)

    def clear(self) -> None:
        """Forget buffered input and any overlong-skip state (used at STLS)."""
        self._buf.clear()
        self._skip = False

    def feed(self, data: bytes) -> list[bytes | None]:
        """Every line completed by ``data``, without its line end; ``None``: overlong."""
        if type(data) is not bytes:
            data = _as_bytes(data)
        limit = self._max
        # One C-level pass over the chunk; the buffered part is never rescanned.
        pieces = data.split(b"\n")
        tail = pieces.pop()  # after the last LF: an incomplete line (maybe b"")
        if not pieces:  # no LF in this chunk
            if self._skip:
                return []
            buf = self._buf
            if len(buf) + len(tail) >= limit:  # max_line octets and still no LF
                buf.clear()
                self._skip = True
                return [None]
            buf += tail
            return []

        out: list[bytes | None] = []
        first = pieces[0]
        if self._skip:  # the first LF ends the overlong line being skipped
            self._skip = False
        elif self._buf:
            buf = self._buf
            if len(buf) + len(first) >= limit:
                out.append(None)
            else:
                buf += first
                out.append(bytes(buf[:-1]) if buf[-1:] == b"\r" else bytes(buf))
            buf.clear()
        elif len(first) >= limit:
            out.append(None)
        else:
            out.append(first[:-1] if first[-1:] == b"\r" else first)

        if len(pieces) > 1:
            rest = pieces[1:]
            if max(map(len, pieces)) < limit:  # the common case: no overlong line
                out.extend([p[:-1] if p[-1:] == b"\r" else p for p in rest])
            else:
                out.extend(
                    [None if len(p) >= limit else (p[:-1] if p[-1:] == b"\r" else p) for p in rest]
                )

        if len(tail) >= limit:
            out.append(None)
            self._skip = True
        elif tail:
            self._buf += tail
        return out


# --------------------------------------------------------------------------------------
# DotStuffer / SizeCounter: message -> multi-line response body (RFC 1939 §3, §7, §11)
# --------------------------------------------------------------------------------------


def _is_crlf_only(data: bytes) -> bool:
    """True when every CR in ``data`` starts a CRLF and every LF ends one."""
    n = data.count(b"\r")
    return n == data.count(b"\n") and n == data.count(b"\r\n")


def _to_lf(data: bytes) -> bytes:
    """Every line end (CRLF, bare LF, bare CR) as a single LF; ``data`` has no held CR."""
    if b"\r" in data:
        return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return data


def _double_dots(data: bytes, bol: bool) -> bytes:
    """One more "." before every "." that begins a line (``bol``: ``data`` begins one).

    A ``find`` loop over the (few) hits: cheaper than ``bytes.replace``, which scans
    twice (count, then copy) and trips over every LF as a candidate.
    """
    find = data.find
    hit = find(b"\n.")
    if hit < 0:
        return b"." + data if bol and data[:1] == b"." else data
    parts = [b"."] if bol and data[:1] == b"." else []
    start = 0
    while hit >= 0:
        hit += 1  # the "."
        parts.append(data[start:hit])
        parts.append(b".")
        start = hit
        hit = find(b"\n.", hit + 1)
    parts.append(data[start:])
    return b"".join(parts)


class DotStuffer:
    """Streams a stored message as a multi-line response body (RFC 1939 §3).

    Every line end goes out as CRLF (a bare LF or bare CR becomes CRLF), every line that
    begins with ``.`` gets one more, and with ``top_lines`` the output stops after the
    header, its blank line and at most ``top_lines`` body lines (RFC 1939 §7).
    """

    __slots__ = ("_bol", "_cr", "_done", "_finished", "_in_header", "_left", "_top")

    def __init__(self, top_lines: int | None = None) -> None:
        if top_lines is not None and top_lines < 0:
            raise ValueError("top_lines must not be negative")
        self._top = top_lines
        self._bol = True  # the next octet begins a line
        self._cr = False  # a CR ended the last chunk: CRLF or bare CR, next octet decides
        self._done = False
        self._finished = False
        self._in_header = True
        self._left = top_lines if top_lines is not None else 0

    @property
    def done(self) -> bool:
        """True once a TOP cut is complete; further input is ignored."""
        return self._done

    def feed(self, data: bytes) -> bytes:
        if self._finished:
            raise ValueError("DotStuffer fed after finish()")
        if self._done:
            return b""
        if type(data) is not bytes:
            data = _as_bytes(data)
        if self._cr:
            self._cr = False
            data = b"\r" + data
        if data[-1:] == b"\r":
            self._cr = True
            data = data[:-1]
        if not data:
            return b""
        if self._top is not None:
            return self._feed_top(_to_lf(data))
        if b"\r" in data and _is_crlf_only(data):
            # Canonical CRLF (nearly all stored mail): stuff in place, one pass.
            out = _double_dots(data, self._bol)
            self._bol = data[-1] == _LF
            return out
        return self._stuff_lf(_to_lf(data))

    def _stuff_lf(self, s: bytes) -> bytes:
        """Stuff and CRLF-encode ``s``, whose line ends are all single LFs."""
        if not s:
            return b""
        out = _double_dots(s.replace(b"\n", b"\r\n"), self._bol)
        self._bol = s[-1] == _LF
        return out

    def _feed_top(self, s: bytes) -> bytes:
        """The TOP cut over ``s`` (LF line ends only)."""
        pos = 0
        if self._in_header:
            if self._bol and s[0] == _LF:
                pos = 1
            else:
                i = s.find(b"\n\n")
                if i < 0:
                    return self._stuff_lf(s)  # still in the header
                pos = i + 2
            self._in_header = False  # the blank line (ending at pos) is sent
        left = self._left
        if left:
            count = s.count(b"\n", pos)
            if count < left:
                self._left = left - count
                return self._stuff_lf(s)
            # The cut falls in this chunk: find the left-th LF from pos (left <= count).
            for _ in range(left):
                pos = s.index(b"\n", pos) + 1
            self._left = 0
        self._done = True
        self._cr = False  # input after the cut is ignored, a held CR included
        out = self._stuff_lf(s[:pos])
        self._bol = True
        return out

    def finish(self) -> bytes:
        """Pending octets, a CRLF if the output does not end a line, then ".\\r\\n"."""
        if self._finished:
            raise ValueError("DotStuffer.finish() called twice")
        self._finished = True
        if self._done:
            return b".\r\n"
        out = b""
        if self._cr:  # a held CR with nothing after it is a bare CR: a line end
            self._cr = False
            out = self._feed_top(b"\n") if self._top is not None else self._stuff_lf(b"\n")
        elif not self._bol:
            out = b"\r\n"
        self._bol = True
        return out + b".\r\n"


class SizeCounter:
    """Counts a message's POP3 size (RFC 1939 §11) without producing output.

    The size is the message as stored with every line end made CRLF (a bare CR is a
    line end and counts 2). Not counted: stuffing, the terminator, and the CRLF the
    stuffer adds before it to a message without a final line end.
    """

    __slots__ = ("_cr", "_finished", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._cr = False
        self._finished = False

    def feed(self, data: bytes) -> None:
        if self._finished:
            raise ValueError("SizeCounter fed after finish()")
        if type(data) is not bytes:
            data = _as_bytes(data)
        start = 0
        end = len(data)
        if self._cr:
            if not end:
                return
            self._cr = False
            self._size += 2  # CRLF or bare CR: either way one CRLF on the wire
            if data[0] == _LF:
                start = 1
        if end > start and data[end - 1] == _CR:
            self._cr = True
            end -= 1
        if end <= start:
            return
        # Each bare LF and each bare CR gains one octet; a CRLF stays two.
        lf = data.count(b"\n", start, end)
        cr = data.count(b"\r", start, end)
        crlf = data.count(b"\r\n", start, end) if cr and lf else 0
        self._size += end - start + lf + cr - 2 * crlf

    def finish(self) -> int:
        if self._finished:
            raise ValueError("SizeCounter.finish() called twice")
        self._finished = True
        if self._cr:  # a bare CR at the very end: one CRLF on the wire, counted
            self._size += 2
        self._cr = False
        return self._size


# --------------------------------------------------------------------------------------
# Unstuffer: multi-line response body -> message (client side; strict CRLF)
# --------------------------------------------------------------------------------------


class Unstuffer:
    """Client side: multi-line reply bytes in, message bytes out (strict CRLF).

    Only CRLF ends a line; the terminator is ``.\\r\\n`` at a line start; any other line
    beginning with ``.`` loses that ``.``. Octets whose meaning depends on the next chunk
    (``.`` or ``.\\r`` at a line start, a trailing CR) are held back until it arrives.
    """

    __slots__ = ("_bol", "_done", "_held")

    def __init__(self) -> None:
        self._held = b""
        self._bol = True
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """(message octets, None) until the terminator; then (octets, bytes after it)."""
        if self._done:
            raise ValueError("Unstuffer fed after the terminator")
        if type(data) is not bytes:
            data = _as_bytes(data)
        if self._held:
            data = self._held + data
            self._held = b""
        elif not data:
            return b"", None
        bol = self._bol
        if bol and data[:3] == b".\r\n":
            self._done = True
            return b"", data[3:]
        i = data.find(b"\r\n.\r\n")
        if i >= 0:
            self._done = True
            return _unstuff_lines(data[: i + 2], bol), data[i + 5 :]
        n = len(data)
        hold = 0
        last = data[-1:]
        if last == b"\r":
            # ".\r" at a line start (the terminator, or a stuffed line), else a lone
            # trailing CR (a line end, or data).
            dot_cr = data[-2:-1] == b"." and (data[-4:-2] == b"\r\n" or (n == 2 and bol))
            hold = 2 if dot_cr else 1
        elif last == b"." and (data[-3:-1] == b"\r\n" or (n == 1 and bol)):
            hold = 1  # "." at a line start: the terminator, or a stuffed line
        if hold:
            self._held = data[-hold:]
            data = data[:-hold]
            if not data:
                return b"", None
        self._bol = data[-2:] == b"\r\n"
        return _unstuff_lines(data, bol), None


def _unstuff_lines(data: bytes, bol: bool) -> bytes:
    """Drop the first ``.`` of every line in ``data`` (CRLF lines; ``bol``: starts one)."""
    if bol and data[:1] == b".":
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n")


# --------------------------------------------------------------------------------------
# Whole-message helpers
# --------------------------------------------------------------------------------------


def stuff(message: bytes, top_lines: int | None = None) -> bytes:
    """Whole-message DotStuffer: feed(message) + finish()."""
    stuffer = DotStuffer(top_lines)
    return stuffer.feed(message) + stuffer.finish()


def wire_size(message: bytes) -> int:
    """Whole-message SizeCounter."""
    counter = SizeCounter()
    counter.feed(message)
    return counter.finish()


def wire_header_is_ascii(wire: bytes, limit: int = HEADER_SCAN_LIMIT) -> bool:
    """See the stub: is the header of this wire-form message US-ASCII?"""
    wire = _as_bytes(wire)
    limit = operator.index(limit)
    if not 0 <= limit < 1 << 64:
        raise OverflowError("limit must be between 0 and 2**64 - 1")
    if wire.startswith(b"\r\n"):
        return True  # an empty header
    end = wire.find(b"\r\n\r\n", 0, limit)
    return (wire[:end] if end >= 0 else wire[:limit]).isascii()


def unstuff(data: bytes) -> tuple[bytes, bytes]:
    """Whole-buffer Unstuffer; raises ValueError if the terminator is missing."""
    payload, rest = Unstuffer().feed(data)
    if rest is None:
        raise ValueError("multi-line response without its terminating line")
    return payload, rest


# --------------------------------------------------------------------------------------
# Digests (RFC 1939 §7 APOP, RFC 2195 CRAM-MD5) and challenges
# --------------------------------------------------------------------------------------


def constant_time_eq(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(_as_bytes(a), _as_bytes(b))


def _hex_eq(expected_hex: str, digest: bytes) -> bool:
    """Constant-time compare of a lower-case hex digest with one in either hex case."""
    return hmac.compare_digest(expected_hex.encode("ascii"), _as_bytes(digest).lower())


def apop_digest(timestamp: bytes, secret: bytes) -> str:
    # MD5 is what RFC 1939 §7 prescribes; it is not our choice.
    return hashlib.md5(_as_bytes(timestamp) + _as_bytes(secret)).hexdigest()  # noqa: S324


def apop_verify(timestamp: bytes, secret: bytes, digest: bytes) -> bool:
    return _hex_eq(apop_digest(timestamp, secret), digest)


def cram_md5_digest(secret: bytes, challenge: bytes) -> str:
    return hmac.new(_as_bytes(secret), _as_bytes(challenge), "md5").hexdigest()


def cram_md5_verify(secret: bytes, challenge: bytes, digest: bytes) -> bool:
    return _hex_eq(cram_md5_digest(secret, challenge), digest)


# MD5 (RFC 1321) compression function, needed only to start from a stored state.
_MASK: Final = 0xFFFFFFFF
_MD5_IV: Final = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_MD5_SHIFT: Final = tuple(
    r
    for rounds in ((7, 12, 17, 22), (5, 9, 14, 20), (4, 11, 16, 23), (6, 10, 15, 21))
    for r in rounds * 4
)
_MD5_K: Final = (
    0xD76AA478, 0xE8C7B756, 0x242070DB, 0xC1BDCEEE, 0xF57C0FAF, 0x4787C62A, 0xA8304613,
    0xFD469501, 0x698098D8, 0x8B44F7AF, 0xFFFF5BB1, 0x895CD7BE, 0x6B901122, 0xFD987193,
    0xA679438E, 0x49B40821, 0xF61E2562, 0xC040B340, 0x265E5A51, 0xE9B6C7AA, 0xD62F105D,
    0x02441453, 0xD8A1E681, 0xE7D3FBC8, 0x21E1CDE6, 0xC33707D6, 0xF4D50D87, 0x455A14ED,
    0xA9E3E905, 0xFCEFA3F8, 0x676F02D9, 0x8D2A4C8A, 0xFFFA3942, 0x8771F681, 0x6D9D6122,
    0xFDE5380C, 0xA4BEEA44, 0x4BDECFA9, 0xF6BB4B60, 0xBEBFBC70, 0x289B7EC6, 0xEAA127FA,
    0xD4EF3085, 0x04881D05, 0xD9D4D039, 0xE6DB99E5, 0x1FA27CF8, 0xC4AC5665, 0xF4292244,
    0x432AFF97, 0xAB9423A7, 0xFC93A039, 0x655B59C3, 0x8F0CCC92, 0xFFEFF47D, 0x85845DD1,
    0x6FA87E4F, 0xFE2CE6E0, 0xA3014314, 0x4E0811A1, 0xF7537E82, 0xBD3AF235, 0x2AD7D2BB,
    0xEB86D391,
)  # fmt: skip
_MD5_INDEX: Final = tuple(
    i if i < 16 else (5 * i + 1) % 16 if i < 32 else (3 * i + 5) % 16 if i < 48 else 7 * i % 16
    for i in range(64)
)
_Md5State = tuple[int, int, int, int]


def _md5_compress(state: _Md5State, block: bytes) -> _Md5State:
    """One 64-octet MD5 block applied to ``state``."""
    x = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f = d ^ (b & (c ^ d))
        elif i < 32:
            f = c ^ (d & (b ^ c))
        elif i < 48:
            f = b ^ c ^ d
        else:
            f = c ^ (b | (~d & _MASK))
        f = (f + a + _MD5_K[i] + x[_MD5_INDEX[i]]) & _MASK
        s = _MD5_SHIFT[i]
        a, d, c = d, c, b
        b = (b + ((f << s) | (f >> (32 - s)))) & _MASK
    return (
        (state[0] + a) & _MASK,
        (state[1] + b) & _MASK,
        (state[2] + c) & _MASK,
        (state[3] + d) & _MASK,
    )


def _md5_resume(state: _Md5State, data: bytes, done: int) -> bytes:
    """MD5 digest of (``done`` octets that led to ``state``) + ``data``; done % 64 == 0."""
    total = done + len(data)
    data += b"\x80" + b"\0" * ((55 - total) % 64) + struct.pack("<Q", (total * 8) & (2**64 - 1))
    for off in range(0, len(data), 64):
        state = _md5_compress(state, data[off : off + 64])
    return struct.pack("<4I", *state)


def _hmac_md5_pads(secret: bytes) -> tuple[bytes, bytes]:
    """The HMAC-MD5 inner and outer pad blocks (RFC 2104) for ``secret``."""
    if len(secret) > 64:
        secret = hashlib.md5(secret).digest()  # noqa: S324 (RFC 2104 key hashing)
    key = secret.ljust(64, b"\0")
    return key.translate(_IPAD), key.translate(_OPAD)


_IPAD: Final = bytes(i ^ 0x36 for i in range(256))
_OPAD: Final = bytes(i ^ 0x5C for i in range(256))


def cram_md5_context(secret: bytes) -> bytes:
    """Dovecot's stored ``{CRAM-MD5}`` state: outer a,b,c,d then inner a,b,c,d (u32 LE).

    The order and encoding of ``hmac_md5_get_cram_context`` (dovecot src/lib/hmac-cram-md5.c).
    """
    ipad, opad = _hmac_md5_pads(_as_bytes(secret))
    outer = _md5_compress(_MD5_IV, opad)
    inner = _md5_compress(_MD5_IV, ipad)
    return struct.pack("<8I", *outer, *inner)


def cram_md5_verify_context(context: bytes, challenge: bytes, digest: bytes) -> bool:
    """Verify a CRAM-MD5 response from a stored context alone (constant-time compare)."""
    context = _as_bytes(context)
    if len(context) != 32:
        raise ValueError("a CRAM-MD5 context is 32 octets")
    words = struct.unpack("<8I", context)
    outer: _Md5State = words[0:4]
    inner: _Md5State = words[4:8]
    inner_digest = _md5_resume(inner, _as_bytes(challenge), 64)
    expected = _md5_resume(outer, inner_digest, 64).hex()
    return _hex_eq(expected, digest)


_counter = itertools.count(1)
_BAD_HOST: Final = re.compile(r"[<>@\s\x00-\x1f\x7f-\x9f]")


def make_challenge(host: str) -> str:
    """``<PID.COUNTER.RANDOM@host>``: unique on the host, 64 random bits from the OS."""
    if not host or _BAD_HOST.search(host):
        raise ValueError("host must be non-empty, without <>@, whitespace or controls")
    return f"<{os.getpid()}.{next(_counter)}.{secrets.token_hex(8)}@{host}>"


# --------------------------------------------------------------------------------------
# PROXY protocol header, v1 and v2 (HAProxy's proxy-protocol.txt)
# --------------------------------------------------------------------------------------

PROXY_V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_PROXY_V1_MAX: Final = 107
_V1_IPV4: Final = re.compile(rb"[0-9.]{1,15}")
_V1_IPV6: Final = re.compile(rb"[0-9A-Fa-f:.]{1,45}")
_V1_PORT: Final = re.compile(rb"0|[1-9][0-9]{0,4}")
_ProxyTuple = tuple[int, int, bool, bytes, int, bytes, int, bool]


def parse_proxy_header(data: bytes, max_len: int = PROXY_HEADER_MAX) -> _ProxyTuple | None:
    """See the stub: None while incomplete, the header as a tuple, or ValueError."""
    data = _as_bytes(data)
    if max_len < 0:
        raise OverflowError("max_len must not be negative")
    if not data:
        return None
    head = data[:6]
    if b"PROXY "[: len(head)] == head:
        return _proxy_v1(data, max_len)
    head = data[:12]
    if PROXY_V2_SIGNATURE[: len(head)] == head:
        return _proxy_v2(data, max_len)
    raise ValueError("not a PROXY protocol header")


def _v1_address(text: bytes, v6: bool) -> bytes:
    import ipaddress

    if not (_V1_IPV6 if v6 else _V1_IPV4).fullmatch(text):
        raise ValueError("malformed PROXY v1 header")
    try:
        if v6:
            return ipaddress.IPv6Address(text.decode("ascii")).packed
        return ipaddress.IPv4Address(text.decode("ascii")).packed
    except ValueError:
        raise ValueError("malformed PROXY v1 header") from None


def _v1_port(text: bytes) -> int:
    if not _V1_PORT.fullmatch(text) or int(text) > 65535:
        raise ValueError("malformed PROXY v1 header")
    return int(text)


def _proxy_v1(data: bytes, max_len: int) -> _ProxyTuple | None:
    limit = min(_PROXY_V1_MAX, max_len)
    end = data.find(b"\n", 0, limit)
    if end < 0:
        if len(data) >= limit:
            raise ValueError(
                "PROXY header too long" if limit < _PROXY_V1_MAX else "malformed PROXY v1 header"
            )
        return None
    if end == 0 or data[end - 1] != _CR:
        raise ValueError("malformed PROXY v1 header")
    line = data[6 : end - 1]
    length = end + 1
    if line == b"UNKNOWN" or line.startswith(b"UNKNOWN "):
        return (length, 1, False, b"", 0, b"", 0, False)
    family, *fields = line.split(b" ")
    if len(fields) != 4 or family not in (b"TCP4", b"TCP6"):
        raise ValueError("malformed PROXY v1 header")
    v6 = family == b"TCP6"
    source = _v1_address(fields[0], v6)
    destination = _v1_address(fields[1], v6)
    return (length, 1, False, source, _v1_port(fields[2]), destination, _v1_port(fields[3]), False)


# Address family and transport octet -> length of the address block.
_V2_ADDRESSES: Final = {0x00: 0, 0x11: 12, 0x21: 36, 0x31: 216}


def _proxy_v2(data: bytes, max_len: int) -> _ProxyTuple | None:
    if len(data) < 16:
        return None
    ver_cmd, fam, body_len = data[12], data[13], int.from_bytes(data[14:16], "big")
    if ver_cmd >> 4 != 2 or ver_cmd & 0x0F > 1:
        raise ValueError("malformed PROXY v2 header")
    local = ver_cmd & 0x0F == 0
    length = 16 + body_len
    if length > max_len:
        raise ValueError("PROXY header too long")
    if len(data) < length:
        return None
    body = data[16:length]
    addr_len = _V2_ADDRESSES.get(fam)
    if addr_len is None:
        if not local:
            raise ValueError("malformed PROXY v2 header")
        addr_len = 0
    if len(body) < addr_len:
        raise ValueError("malformed PROXY v2 header")
    source = destination = b""
    sport = dport = 0
    if not local and fam == 0x11:
        source, destination = body[0:4], body[4:8]
        sport, dport = struct.unpack_from(">HH", body, 8)
    elif not local and fam == 0x21:
        source, destination = body[0:16], body[16:32]
        sport, dport = struct.unpack_from(">HH", body, 32)
    ssl = False
    pos = addr_len
    while pos < len(body):
        if len(body) - pos < 3:
            raise ValueError("malformed PROXY v2 header")
        kind = body[pos]
        size = int.from_bytes(body[pos + 1 : pos + 3], "big")
        value = body[pos + 3 : pos + 3 + size]
        if len(value) < size:
            raise ValueError("malformed PROXY v2 header")
        if kind == 0x20:  # PP2_TYPE_SSL: client flags, verify, sub-TLVs
            if size < 5:
                raise ValueError("malformed PROXY v2 header")
            ssl = not local and bool(value[0] & 0x01)
        pos += 3 + size
    return (length, 2, local, source, sport, destination, dport, ssl)


# --------------------------------------------------------------------------------------
# Whole small files (a backend's read-ahead)
# --------------------------------------------------------------------------------------

# O_NOFOLLOW: a symbolic link is refused; O_NONBLOCK: a FIFO opens at once.
_READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


_STATS = struct.Struct("<QqQ")


def files_unchanged(directory: str, names: bytes, stats: bytes) -> bool:
    """See the stub: do the named files still have these size, mtime and inode?"""
    if not isinstance(names, bytes) or not isinstance(stats, bytes):
        raise TypeError("names and stats must be bytes")
    if names and not names.endswith(b"\0"):
        raise ValueError("names must end with a NUL")
    parts = names.split(b"\0")[:-1]
    if len(stats) != len(parts) * _STATS.size:
        raise ValueError("stats must hold 24 octets per name")
    base = os.fsencode(directory)
    for k, name in enumerate(parts):
        if not name:
            return False
        try:
            st = os.lstat(os.path.join(base, name))
        except (OSError, ValueError):
            return False
        if (st.st_size, st.st_mtime_ns, st.st_ino) != _STATS.unpack_from(stats, k * _STATS.size):
            return False
    return True


def read_small_files(
    paths: Sequence[str],
    limit: int,
    stuffed: bool = False,
    dir_fds: Sequence[int] | None = None,
) -> list[bytes]:
    """See the stub: the contents of the leading paths that are whole small files."""
    if isinstance(paths, str):
        raise TypeError("paths must be a sequence of str, not a str")
    if not 0 <= limit < 1 << 64:
        raise OverflowError("limit must be between 0 and 2**64 - 1")
    names = [os.fspath(p) for p in paths]
    if not all(isinstance(p, str) for p in names):
        raise TypeError("paths must be str or os.PathLike[str]")
    fds: list[int | None]
    if dir_fds is None:
        fds = [None] * len(names)
    else:
        fds = [_dir_fd(fd) for fd in dir_fds]
        # Checked before any I/O, as the extension does.
        if len(fds) != len(names):
            raise ValueError("dir_fds must hold one descriptor per path")
        if any(fd < 0 for fd in fds if fd is not None):
            raise ValueError("negative file descriptor")
        if any("/" in name for name in names):
            raise ValueError("with dir_fds, paths must be names without '/'")
    out = []
    for path, fd in zip(names, fds, strict=True):
        data = _read_small_file(path, limit, dir_fd=fd)
        if data is None:
            break
        out.append(stuff(data) if stuffed else data)
    return out


def _dir_fd(fd: int) -> int:
    """A descriptor as the extension takes it (a C int, by ``__index__``)."""
    fd = operator.index(fd)
    if not -(1 << 31) <= fd < 1 << 31:
        raise OverflowError("descriptor out of range for a C int")
    return fd


def read_file_now(
    path: str | os.PathLike[str], limit: int, dir_fd: int | None = None
) -> bytes | None:
    """See the stub: the whole regular file if the kernel has it in memory, else None.
    (Python cannot ask for a path resolved from caches alone: the open may wait.)"""
    if not 0 <= limit < 1 << 64:
        raise OverflowError("limit must be between 0 and 2**64 - 1")
    name = os.fspath(path)
    if not isinstance(name, str):
        raise TypeError("path must be str or os.PathLike[str]")
    if dir_fd is not None:
        dir_fd = _dir_fd(dir_fd)
        if dir_fd < 0:
            raise ValueError("negative file descriptor")
        if "/" in name:
            raise ValueError("with a dir_fd, the name must have no '/'")
    return _read_small_file(name, limit, now=True, dir_fd=dir_fd)


def read_at_now(fd: int, offset: int, size: int) -> bytes | None:
    """See the stub: ``size`` octets of ``fd`` from ``offset`` if all are in memory."""
    if fd < 0:
        raise ValueError("negative file descriptor")
    if not (0 <= offset < 1 << 64 and 0 <= size < 1 << 64):
        raise OverflowError("offset and size must be between 0 and 2**64 - 1")
    if offset + size >= 1 << 63 or size >= 1 << 63:
        raise OverflowError("offset and size past 2**63 - 1")
    try:
        return _read_now(fd, size, offset)
    except OSError:  # BlockingIOError: not all in memory
        return None


def _read_small_file(
    path: str, limit: int, *, now: bool = False, dir_fd: int | None = None
) -> bytes | None:
    """A regular file below ``limit`` octets, or None. ``now``: read_file_now's reads
    (the page cache alone, to the size fstat gave); else read_small_files'. With
    ``dir_fd``, ``path`` is a name in that directory (never walked to by its path)."""
    try:
        fd = os.open(path, _READ_FLAGS, dir_fd=dir_fd)
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return None
    try:
        st = os.fstat(fd)
        size = st.st_size
        if not stat.S_ISREG(st.st_mode) or size >= limit:
            return None
        return _read_now(fd, size) if now else _read_whole(fd, size)
    except OSError:  # (BlockingIOError: not all in memory)
        return None
    finally:
        os.close(fd)


def _read_now(fd: int, size: int, offset: int = 0) -> bytes | None:
    buf = bytearray(size)
    with memoryview(buf) as view:
        got = 0
        while got < size:
            n = os.preadv(fd, [view[got:]], offset + got, os.RWF_NOWAIT)
            if n == 0:
                return None  # shorter than fstat said
            got += n
    return bytes(buf)


def _read_whole(fd: int, size: int) -> bytes | None:
    parts = []
    got = 0
    while got < size:
        more = os.read(fd, size + 1 - got)
        if not more:
            break  # shorter than fstat said: what is there
        parts.append(more)
        got += len(more)
    if got > size:
        return None  # grew since fstat
    return b"".join(parts)


# ---- the engine's TRANSACTION-state quick path --------------------------------------

_TOP_OK: Final = b"+OK\r\n"
_OCTETS: Final = b"+OK %d octets\r\n"

_Fetches = tuple[int, int, int, int, "set[int] | None", "tuple[int, int | None] | None", int, int]


def _size(sizes: list[int], i: int) -> int | None:
    """A message's size, or None where it is not an octet count (as the extension
    reads it: an int by ``__index__`` in 0..2**64-1)."""
    try:
        size = operator.index(sizes[i])
    except TypeError:
        return None
    return size if 0 <= size < 1 << 64 else None


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
) -> _Fetches:
    answered = retrs = octets = queued = deletes = deleted_octets = 0
    miss = None
    end = min(len(lines), at + budget)
    while at < end and queued < room:
        line = lines[at]
        if line is None:
            break
        head = line[:5].upper()
        dele = head == b"DELE "
        if dele or head == b"RETR ":
            arg = line[5:]
            if not arg.isdigit():
                break
            msg, top = int(arg), None
        elif head[:4] == b"TOP ":
            m, sep, n = line[4:].partition(b" ")
            if not (sep and m.isdigit() and n.isdigit()):
                break
            msg, top = int(m), min(int(n), MAX_TOP_LINES)
        else:
            break
        i = msg - 1
        if not 0 <= i < len(sizes) or i >= len(deleted) or deleted[i]:
            break
        if dele:
            if not dele_ok:
                break
            size = _size(sizes, i)
            if size is None:
                break
            deleted[i] = 1
            deletes += 1
            deleted_octets += size
            queued += len(dele_ok)
            out.append(dele_ok)
            answered += 1
            at += 1
            continue
        size = 0
        if top is None:
            if not octets_line:
                break
            got = _size(sizes, i)
            if got is None:
                break
            size = got
        try:
            wire = source(i, top)
        except Exception:
            wire = None
        if type(wire) is not bytes or (check_ascii and not wire_header_is_ascii(wire)):
            miss = (i, top)
            break
        if top is None:
            header = _OCTETS % size
            retrs += 1
            octets += size
            if retrieved is None:
                retrieved = set()
            retrieved.add(i)
        else:
            header = _TOP_OK
        queued += len(header) + len(wire)
        out.append(header)
        out.append(wire)
        answered += 1
        at += 1
    return answered, retrs, octets, queued, retrieved, miss, deletes, deleted_octets
