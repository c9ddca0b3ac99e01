"""A scripted IMAP server on 127.0.0.1 for fault tests: it answers each command line
with whatever bytes the test chooses (a hostile or broken upstream) and records
every octet the backend sent."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import trio

# (tag, command line without the tag) -> the bytes to send back (b"" sends nothing),
# or a list of them to send one after another
Script = Callable[[bytes, bytes], "bytes | list[bytes]"]
Answer = Callable[[bytes, bytes], bytes]

GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN UIDPLUS ID] fake ready\r\n"


def mailbox(messages: dict[int, bytes], validity: int = 7) -> Answer:
    """A well-behaved server of ``messages`` (UID -> content) to build scripts on."""

    def answer(tag: bytes, line: bytes) -> bytes:
        verb = line.split(b" ", 1)[0].upper()
        if verb in (b"EXAMINE", b"SELECT"):
            rw = b"READ-ONLY" if verb == b"EXAMINE" else b"READ-WRITE"
            return b"* %d EXISTS\r\n* OK [UIDVALIDITY %d] ok\r\n%s OK [%s] done\r\n" % (
                len(messages),
                validity,
                tag,
                rw,
            )
        if line.upper().startswith(b"UID FETCH 1:*"):
            out = b"".join(
                b"* %d FETCH (UID %d RFC822.SIZE %d)\r\n" % (seq, uid, len(body))
                for seq, (uid, body) in enumerate(sorted(messages.items()), 1)
            )
            return out + tag + b" OK done\r\n"
        if line.upper().startswith(b"UID FETCH "):
            uid = int(line.split(b" ")[2])
            seq = sorted(messages).index(uid) + 1 if uid in messages else 0
            if not seq:
                return tag + b" OK done\r\n"
            body = messages[uid]
            return b"* %d FETCH (UID %d BODY[] {%d}\r\n%s)\r\n%s OK done\r\n" % (
                seq,
                uid,
                len(body),
                body,
                tag,
            )
        if verb == b"LOGOUT":
            return b"* BYE bye\r\n" + tag + b" OK done\r\n"
        return tag + b" OK done\r\n"

    return answer


@dataclass
class Fake:
    port: int = 0
    received: bytearray = field(default_factory=bytearray)
    connections: int = 0
    closed: int = 0

    @property
    def commands(self) -> list[bytes]:
        """The command lines received, tags removed."""
        return [
            line.split(b" ", 1)[1] if b" " in line else line
            for line in bytes(self.received).split(b"\r\n")
            if line
        ]


async def start_fake(nursery: trio.Nursery, script: Script, greeting: bytes = GREETING) -> Fake:
    """Serve ``script`` on 127.0.0.1 (a free port) until ``nursery`` is cancelled."""
    fake = Fake()

    async def handle(stream: trio.SocketStream) -> None:
        fake.connections += 1
        try:
            await stream.send_all(greeting)
            buf = b""
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                fake.received += data
                buf += data
                while b"\r\n" in buf:
                    line, buf = buf.split(b"\r\n", 1)
                    tag, _, rest = line.partition(b" ")
                    reply = script(tag, rest)
                    for part in [reply] if isinstance(reply, bytes) else reply:
                        if part:
                            await stream.send_all(part)
        except trio.BrokenResourceError:
            pass
        finally:
            fake.closed += 1
            await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    fake.port = listeners[0].socket.getsockname()[1]
    return fake
