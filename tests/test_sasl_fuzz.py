"""Every SASL mechanism, driven through a real session with fields of random lengths
(issue 15 item 8): the server's log holds no traceback, and every reply is one
well-formed line (+OK, -ERR or a "+ base64" challenge, at most 512 octets with CRLF).

Hypothesis picks the mechanism, the lengths (biased towards the edges: 255, 256, the
512-octet reply line, the 16 KiB SASL line) and the shape of each client line: a
well-formed message of the mechanism with random fields, random bytes, "*", "=",
bad base64 or an overlong line.
"""

from __future__ import annotations

import base64
import logging
import os

import trio
import trio.testing
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pypop.auth import MemoryCredentialStore, StaticTokenVerifier
from pypop.auth.sasl import SaslChallenge, SaslContext, SaslFailure, SaslSuccess, ScramSha256Plus
from pypop.backends.memory import MemoryBackend, sample_message
from pypop.config import ServerConfig
from pypop.server import Server
from pypop.server.listeners import Peer
from pypop.server.session import Session

from .strategies import octets

EXAMPLES = 120 * int(os.environ.get("PYPOP_WIRE_EXAMPLES", "1"))
MECHANISMS = ["SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5", "OAUTHBEARER", "XOAUTH2"]
USERS = {"alice": "{PLAIN}wonderland"}
# A line starting like one of these would get a multi-line reply (not SASL's business).
MULTILINE = (b"CAPA", b"LIST", b"UIDL", b"AUTH", b"TOP", b"RETR")

lengths = st.one_of(
    st.sampled_from([0, 1, 2, 254, 255, 256, 321, 322, 360, 511, 512, 4096, 12000, 16384]),
    st.integers(0, 13000),
)


PRINTABLE = bytes(c for c in range(33, 127) if c not in b",=")


@st.composite
def text(draw: st.DrawFn, sizes: st.SearchStrategy[int] = lengths) -> bytes:
    """A field of a random length: mostly one that the mechanism would accept."""
    n = draw(sizes)
    kind = draw(st.sampled_from(["alpha", "alpha", "printable", "bytes"]))
    if kind == "alpha":
        return b"x" * n
    if kind == "printable":
        return (PRINTABLE * (n // len(PRINTABLE) + 1))[:n]
    return (draw(octets(min_size=1, max_size=64)) * (n // 1 + 1))[:n]


names = st.sampled_from([1, 2, 5, 254, 255, 256])


@st.composite
def message(draw: st.DrawFn, mechanism: str, step: int = 0) -> bytes:
    """A message of ``mechanism``'s shape for exchange ``step`` (0: the first), with
    random-length fields."""
    a, b, c = draw(text(names)), draw(text()), draw(text())
    match mechanism:
        case "SCRAM-SHA-256":
            shapes = [
                b"n,,n=" + a + b",r=" + b,
                b"c=biws,r=" + b + b",p=" + base64.b64encode(c[:64]),
                b"y,a=" + a + b",n=" + a + b",r=" + c,
            ]
            return shapes[0] if step == 0 and draw(st.booleans()) else draw(st.sampled_from(shapes))
        case "PLAIN":
            return a + b"\0" + b + b"\0" + c
        case "LOGIN":
            return a
        case "CRAM-MD5":
            return a + b" " + b[:32].hex().encode()
        case "OAUTHBEARER":
            return b"n,a=" + a + b",\x01auth=Bearer " + b + b"\x01\x01"
        case _:
            return b"user=" + a + b"\x01auth=Bearer " + b + b"\x01\x01"


@st.composite
def lines(draw: st.DrawFn, mechanism: str) -> list[bytes]:
    out: list[bytes] = []
    for step in range(draw(st.integers(1, 4))):
        kinds = ["message", "message", "message", "bytes", "*", "=", "junk", "long"]
        kind = draw(st.sampled_from(kinds))
        if kind == "message":
            out.append(base64.b64encode(draw(message(mechanism, step))))
        elif kind == "bytes":
            out.append(base64.b64encode(draw(text())))
        elif kind == "*":
            out.append(b"*")
        elif kind == "=":
            out.append(b"")
        elif kind == "junk":
            out.append(b"!!" + draw(text()).replace(b"\n", b"").replace(b"\r", b""))
        else:
            # Longer than a read (64 KiB) too: the rest comes in later reads.
            out.append(b"A" * draw(st.sampled_from([16384, 40000, 70000, 300000])))
    return out


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def check_reply(line: bytes) -> None:
    assert line.endswith(b"\r\n"), line
    body = line[:-2]
    assert b"\r" not in body, line
    assert b"\n" not in body, line
    assert len(line) <= 512, len(line)
    if body.startswith(b"+ "):
        base64.b64decode(body[2:], validate=True)
    else:
        assert body.startswith((b"+OK", b"-ERR")), line


async def drive(mechanism: str, initial: bytes | None, client_lines: list[bytes]) -> None:
    backend = MemoryBackend()
    backend.deliver("alice", sample_message("alice", 1))
    cfg = ServerConfig(
        listen=[("127.0.0.1", 0)],
        allow_plaintext=True,
        mechanisms=[*MECHANISMS],
        auth_failure_delay=0,
        auth_penalty_max=0,
        max_auth_failures=100,
        max_bad_commands=100,
    )
    server = Server(
        cfg,
        backend=backend,
        store=MemoryCredentialStore(USERS),
        token_verifier=StaticTokenVerifier({"alice": ["tok"]}),
    )
    server_side, client = trio.testing.memory_stream_pair()
    session = Session(server.context, server_side, Peer("192.0.2.9"))
    received = bytearray()

    async def reader() -> None:
        while data := await client.receive_some():
            received.extend(data)

    async def replies() -> list[bytes]:
        """Every complete line the server has sent since the last call (at least one:
        the session may be waiting for a hash thread)."""
        with trio.fail_after(10):
            await trio.testing.wait_all_tasks_blocked()
            while b"\r\n" not in received:
                await trio.sleep(0.001)
                await trio.testing.wait_all_tasks_blocked()
        complete = received[: received.rfind(b"\r\n") + 2]
        del received[: len(complete)]
        return [line + b"\r\n" for line in bytes(complete).split(b"\r\n")[:-1]]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        nursery.start_soon(reader)
        assert (await replies()) == [b"+OK POP3 server ready\r\n"]
        first = b"AUTH " + mechanism.encode()
        if initial is not None:
            first += b" " + (base64.b64encode(initial) if initial else b"=")
        for line in [first, *client_lines, b"*"]:
            await client.send_all(line + b"\r\n")
            got = await replies()
            assert len(got) == 1, got  # one reply per line
            check_reply(got[0])
        await client.send_all(b"QUIT\r\n")
        assert await replies() == [b"+OK Logging out\r\n"]
        nursery.cancel_scope.cancel()
    await client.aclose()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_every_mechanism_with_random_lengths(data: st.DataObject) -> None:
    mechanism = data.draw(st.sampled_from(MECHANISMS))
    initial = data.draw(st.one_of(st.none(), st.none(), st.just(b""), message(mechanism)))
    if initial is not None and len(base64.b64encode(initial)) > 200:
        initial = None  # RFC 5034 §4: it would not fit the 255-octet command line
    client_lines = data.draw(lines(mechanism))
    assume(not any(line[:4].upper().startswith(MULTILINE) for line in client_lines))
    handler = Records()
    logger = logging.getLogger("pypop")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        trio.run(drive, mechanism, initial, client_lines)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    tracebacks = [r for r in handler.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=message("SCRAM-SHA-256"), final=message("SCRAM-SHA-256"))
def test_scram_plus_with_random_lengths(first: bytes, final: bytes) -> None:
    """SCRAM-SHA-256-PLUS needs TLS 1.2 channel binding, so it is driven directly: every
    challenge it makes fits a 512-octet line, nothing raises."""

    async def run() -> None:
        ctx = SaslContext(
            store=MemoryCredentialStore(USERS),
            hostname="h",
            tls_active=True,
            channel_binding=b"binding",
        )
        mech = ScramSha256Plus(ctx)
        for data in (b"p=tls-unique,,n=alice,r=" + first[:300], final, first):
            result = await mech.step(data)
            assert isinstance(result, SaslChallenge | SaslSuccess | SaslFailure)
            if isinstance(result, SaslChallenge):
                assert len(b"+ " + base64.b64encode(result.data) + b"\r\n") <= 512

    trio.run(run)
