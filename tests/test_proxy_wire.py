"""The PROXY protocol header parser (``parse_proxy_header``) against both codecs.

HAProxy's proxy-protocol.txt, rule by rule: v1 (text, at most 107 octets, CRLF),
v2 (binary: signature, version/command, family, length, addresses, TLVs), and what a
parser must refuse. The hypothesis properties check Rust == twin on random and on
mutated valid headers, that a prefix of a valid header is "need more", never an error,
and that nothing after the header is taken.
"""

from __future__ import annotations

import importlib
import ipaddress
import struct
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .strategies import octets

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.fixture(scope="module", params=["pypop._wire", "pypop._wire_py"], ids=["rust", "python"])
def wire(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module(request.param)


def v2(
    cmd: int = 0x21,
    fam: int = 0x11,
    addresses: bytes = b"",
    tlvs: bytes = b"",
    length: int | None = None,
) -> bytes:
    body = addresses + tlvs
    size = struct.pack(">H", len(body) if length is None else length)
    return SIG + bytes([cmd, fam]) + size + body


def tcp4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack(">HH", sport, dport)
    )


def ssl_tlv(client: int = 0x01) -> bytes:
    value = bytes([client]) + b"\x00\x00\x00\x00" + b"\x21\x00\x07TLSv1.3"
    return b"\x20" + struct.pack(">H", len(value)) + value


IP = ipaddress.ip_address


# ---- v1 ------------------------------------------------------------------------------------


def test_v1_tcp4_and_what_follows_is_left(wire: ModuleType) -> None:
    header = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 110\r\n"
    assert wire.parse_proxy_header(header + b"CAPA\r\n") == (
        len(header), 1, False, IP("192.0.2.7").packed, 56324, IP("198.51.100.1").packed, 110, False
    )  # fmt: skip


def test_v1_tcp6(wire: ModuleType) -> None:
    header = b"PROXY TCP6 2001:db8::7 2001:db8::1 1 65535\r\n"
    parsed = wire.parse_proxy_header(header)
    assert parsed == (
        len(header), 1, False, IP("2001:db8::7").packed, 1, IP("2001:db8::1").packed, 65535, False
    )  # fmt: skip


def test_v1_unknown_carries_no_address(wire: ModuleType) -> None:
    assert wire.parse_proxy_header(b"PROXY UNKNOWN\r\n") == (15, 1, False, b"", 0, b"", 0, False)
    junk = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
    assert wire.parse_proxy_header(junk)[0] == len(junk)


def test_v1_prefixes_need_more(wire: ModuleType) -> None:
    header = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 110\r\n"
    for n in range(len(header)):
        assert wire.parse_proxy_header(header[:n]) is None, n


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 110\n",  # bare LF
        b"PROXY TCP4 192.0.2.07 198.51.100.1 1 2\r\n",  # leading zero in an octet
        b"PROXY TCP4 192.0.2.7 198.51.100.1 056324 110\r\n",  # leading zero in a port
        b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 110\r\n",  # port out of range
        b"PROXY TCP4 192.0.2.7  198.51.100.1 1 110\r\n",  # two spaces
        b"PROXY TCP4 192.0.2.7 198.51.100.1 1 110 \r\n",  # trailing space
        b"PROXY TCP6 192.0.2.7 198.51.100.1 1 110\r\n",  # family mismatch
        b"PROXY TCP4 2001:db8::1 198.51.100.1 1 110\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 110\r\n",  # zone index
        b"PROXY UDP4 192.0.2.7 198.51.100.1 1 110\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 +1 110\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 1\r\n",
        b"PROXY \r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",
    ],
)
def test_v1_refusals(wire: ModuleType, line: bytes) -> None:
    with pytest.raises(ValueError, match="malformed PROXY v1 header"):
        wire.parse_proxy_header(line)


def test_v1_is_at_most_107_octets(wire: ModuleType) -> None:
    longest = b"PROXY UNKNOWN " + b"x" * (107 - 16) + b"\r\n"
    assert len(longest) == 107
    assert wire.parse_proxy_header(longest)[0] == 107
    with pytest.raises(ValueError, match="malformed PROXY v1 header"):
        wire.parse_proxy_header(b"PROXY UNKNOWN " + b"x" * 200)  # no line end in 107
    with pytest.raises(ValueError, match="too long"):
        wire.parse_proxy_header(longest, 50)


def test_not_a_header(wire: ModuleType) -> None:
    for data in (b"USER bob\r\n", b"proxy TCP4", b"\r\n\r\n\x00\r\nQUIT\r", b"\x16\x03\x01"):
        with pytest.raises(ValueError, match="not a PROXY protocol header"):
            wire.parse_proxy_header(data)
    assert wire.parse_proxy_header(b"") is None


# ---- v2 ------------------------------------------------------------------------------------


def test_v2_tcp4_with_ssl_tlv(wire: ModuleType) -> None:
    header = v2(addresses=tcp4("192.0.2.7", "10.0.0.1", 4000, 995), tlvs=ssl_tlv())
    parsed = wire.parse_proxy_header(header + b"\x16\x03\x01 ClientHello")
    assert parsed == (
        len(header), 2, False, IP("192.0.2.7").packed, 4000, IP("10.0.0.1").packed, 995, True
    )  # fmt: skip
    for n in range(len(header)):
        assert wire.parse_proxy_header(header[:n]) is None


def test_v2_ssl_flag_needs_the_client_bit(wire: ModuleType) -> None:
    header = v2(addresses=tcp4("192.0.2.7", "10.0.0.1", 1, 2), tlvs=ssl_tlv(client=0x00))
    assert wire.parse_proxy_header(header)[7] is False


def test_v2_tcp6(wire: ModuleType) -> None:
    src, dst = IP("2001:db8::7").packed, IP("2001:db8::1").packed
    header = v2(fam=0x21, addresses=src + dst + struct.pack(">HH", 5, 6))
    assert wire.parse_proxy_header(header) == (len(header), 2, False, src, 5, dst, 6, False)


def test_v2_local_is_a_health_check(wire: ModuleType) -> None:
    """LOCAL: the proxy speaks for itself; any addresses and TLVs are ignored."""
    assert wire.parse_proxy_header(v2(cmd=0x20, fam=0x00)) == (16, 2, True, b"", 0, b"", 0, False)
    with_addr = v2(cmd=0x20, addresses=tcp4("192.0.2.7", "10.0.0.1", 1, 2), tlvs=ssl_tlv())
    assert wire.parse_proxy_header(with_addr) == (len(with_addr), 2, True, b"", 0, b"", 0, False)


def test_v2_unix_and_unspec_carry_no_address(wire: ModuleType) -> None:
    assert wire.parse_proxy_header(v2(fam=0x00))[3] == b""
    unix = v2(fam=0x31, addresses=b"\x00" * 216)
    assert wire.parse_proxy_header(unix) == (len(unix), 2, False, b"", 0, b"", 0, False)


@pytest.mark.parametrize(
    "header",
    [
        v2(cmd=0x11, addresses=tcp4("1.2.3.4", "5.6.7.8", 1, 2)),  # version 1 in binary
        v2(cmd=0x22, addresses=tcp4("1.2.3.4", "5.6.7.8", 1, 2)),  # command 2
        v2(fam=0x12, addresses=tcp4("1.2.3.4", "5.6.7.8", 1, 2)),  # UDP
        v2(fam=0x41, addresses=tcp4("1.2.3.4", "5.6.7.8", 1, 2)),  # unknown family
        v2(addresses=b"\x01\x02\x03\x04"),  # address block cut short
        v2(addresses=tcp4("1.2.3.4", "5.6.7.8", 1, 2), tlvs=b"\x04\x00"),  # partial TLV
        v2(addresses=tcp4("1.2.3.4", "5.6.7.8", 1, 2), tlvs=b"\x04\x00\x05ab"),  # TLV overrun
        v2(addresses=tcp4("1.2.3.4", "5.6.7.8", 1, 2), tlvs=b"\x20\x00\x02\x01\x00"),  # SSL < 5
    ],
)
def test_v2_refusals(wire: ModuleType, header: bytes) -> None:
    with pytest.raises(ValueError, match="malformed PROXY v2 header"):
        wire.parse_proxy_header(header)


def test_v2_length_is_bounded_before_the_body_arrives(wire: ModuleType) -> None:
    header = SIG + b"\x21\x11\xff\xff"  # announces 65535 octets
    with pytest.raises(ValueError, match="PROXY header too long"):
        wire.parse_proxy_header(header)
    big = v2(addresses=tcp4("1.2.3.4", "5.6.7.8", 1, 2), tlvs=b"\x04\x01\x00" + b"x" * 256)
    assert wire.parse_proxy_header(big, 1024)[0] == len(big)
    with pytest.raises(ValueError, match="PROXY header too long"):
        wire.parse_proxy_header(big, 200)
    assert wire.PROXY_HEADER_MAX == 1024


def test_the_v2_signature_as_pop3_lines_ends_in_quit() -> None:
    """Why v2 is safe against a server that does not expect it: its signature framed
    as command lines is two empty lines, a NUL line, then QUIT."""
    from pypop.wire import LineFramer

    assert LineFramer().feed(SIG) == [b"", b"", b"\x00", b"QUIT"]


# ---- Rust == twin --------------------------------------------------------------------------


def _outcome(module: ModuleType, data: bytes, max_len: int) -> object:
    try:
        return module.parse_proxy_header(data, max_len)
    except ValueError as exc:
        return ("error", str(exc))


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """Valid headers of every shape, then maybe mutated, cut or extended."""
    kind = draw(st.sampled_from(["v1-4", "v1-6", "v1-unknown", "v2-4", "v2-6", "v2-local"]))
    port = st.integers(0, 65535)
    if kind == "v1-4":
        a, b = (str(IP(draw(st.integers(0, 2**32 - 1)))) for _ in range(2))
        data = f"PROXY TCP4 {a} {b} {draw(port)} {draw(port)}\r\n".encode()
    elif kind == "v1-6":
        a, b = (str(ipaddress.IPv6Address(draw(st.integers(0, 2**128 - 1)))) for _ in range(2))
        data = f"PROXY TCP6 {a} {b} {draw(port)} {draw(port)}\r\n".encode()
    elif kind == "v1-unknown":
        data = b"PROXY UNKNOWN" + draw(octets(max_size=100)) + b"\r\n"
    else:
        fam = {"v2-4": 0x11, "v2-6": 0x21, "v2-local": 0x00}[kind]
        size = {0x11: 12, 0x21: 36, 0x00: 0}[fam]
        tlvs = b"".join(
            bytes([t]) + struct.pack(">H", len(v)) + v
            for t, v in draw(st.lists(st.tuples(st.integers(0, 255), octets(max_size=20))))
        )
        cmd = 0x20 if kind == "v2-local" else 0x21
        addresses = draw(octets(size, size))
        data = v2(cmd=cmd, fam=fam, addresses=addresses, tlvs=tlvs)
    if draw(st.booleans()):
        pos = draw(st.integers(0, len(data) - 1))
        data = data[:pos] + bytes([draw(st.integers(0, 255))]) + data[pos + 1 :]
    cut = draw(st.integers(0, len(data)))
    return data[:cut] + draw(octets(max_size=8)) if draw(st.booleans()) else data


@settings(max_examples=1500, deadline=None)
@given(data=headers(), max_len=st.sampled_from([16, 60, 107, 200, 1024]))
def test_rust_and_twin_agree(data: bytes, max_len: int) -> None:
    rust = importlib.import_module("pypop._wire")
    twin = importlib.import_module("pypop._wire_py")
    assert _outcome(rust, data, max_len) == _outcome(twin, data, max_len)


@settings(max_examples=500, deadline=None)
@given(data=octets(max_size=300))
def test_rust_and_twin_agree_on_noise(data: bytes) -> None:
    rust = importlib.import_module("pypop._wire")
    twin = importlib.import_module("pypop._wire_py")
    for prefix in (b"", b"PROXY ", SIG, SIG + b"\x21\x11"):
        assert _outcome(rust, prefix + data, 1024) == _outcome(twin, prefix + data, 1024)


@settings(max_examples=500, deadline=None)
@given(data=headers(), tail=octets(max_size=20))
def test_a_complete_header_takes_only_itself(data: bytes, tail: bytes) -> None:
    """Whatever follows a complete header is not part of it, and every shorter
    prefix of it is "need more"."""
    wire = importlib.import_module("pypop.wire")
    try:
        parsed = wire.parse_proxy_header(data)
    except ValueError:
        return
    if parsed is None:
        return
    length = parsed[0]
    assert wire.parse_proxy_header(data[:length] + tail) == parsed
    for n in range(length):
        assert wire.parse_proxy_header(data[:n]) is None
