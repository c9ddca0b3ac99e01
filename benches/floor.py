"""The Trio floor: what one Trio task per connection costs with no POP3 work at all.

``python -m benches.floor --port P --eml DIR --passwd FILE`` serves the suite's
fixture with every reply computed at start-up: a command is a dictionary lookup and
its reply one ``send``. No engine, no backend, no auth beyond a string compare, no
logs, no metrics, no limits, no timeouts. The I/O is pypop's own fast path (a raw
non-blocking socket, ``wait_readable`` only when a read would block, a yield every
few operations), so the figure it reaches under the load generator is the ceiling
for any server built as the design asks: Trio, one task per connection. pypop's
distance from it is the protocol layer's cost; the floor's distance from the
issue's goals is the event loop's and the kernel's.

Not a POP3 server: it answers only the load generator's commands, in order, and
trusts its peer. ``python -m benches.profile SCENARIO --backend trio-floor`` runs it.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

import trio
from trio.lowlevel import cancel_shielded_checkpoint, wait_readable, wait_writable

from benches.fixtures import wire_size

YIELD_EVERY = 16  # as pypop.server.listeners


def _stuff(message: bytes) -> bytes:
    """The wire form of LF mail: CRLF line ends, dot-stuffed, terminated."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(out) + b"\r\n.\r\n"


def _top0(message: bytes) -> bytes:
    header = message.split(b"\n\n", 1)[0]
    return _stuff(header + b"\n\n")


class Box:
    """One user's replies, all made at start-up."""

    def __init__(self, messages: list[bytes]) -> None:
        sizes = [wire_size(m) for m in messages]
        self.stat = b"+OK %d %d\r\n" % (len(sizes), sum(sizes))
        self.list = (
            b"+OK\r\n" + b"".join(b"%d %d\r\n" % (i, s) for i, s in enumerate(sizes, 1)) + b".\r\n"
        )
        self.uidl = b"+OK\r\n" + b"".join(b"%d u%d\r\n" % (i, i) for i in range(1, len(sizes) + 1))
        self.uidl += b".\r\n"
        self.retr = {
            b"%d" % i: b"+OK %d octets\r\n" % s + _stuff(m)
            for i, (m, s) in enumerate(zip(messages, sizes, strict=True), 1)
        }
        self.top = {b"%d 0" % i: b"+OK\r\n" + _top0(m) for i, m in enumerate(messages, 1)}


def load(eml: Path, passwd: Path) -> tuple[dict[bytes, bytes], dict[bytes, Box]]:
    passwords = {}
    for line in passwd.read_text().splitlines():
        user, _, rest = line.partition(":")
        passwords[user.encode()] = rest.split(":")[0].removeprefix("{PLAIN}").encode()
    boxes = {}
    for folder in sorted(eml.iterdir()):
        messages = [p.read_bytes() for p in sorted(folder.glob("*.eml"))]
        boxes[folder.name.encode()] = Box(messages)
    return passwords, boxes


async def _send(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await wait_writable(sock)


async def connection(
    sock: socket.socket, passwords: dict[bytes, bytes], boxes: dict[bytes, Box]
) -> None:
    sock.setblocking(False)
    budget = YIELD_EVERY
    user = b""
    box: Box | None = None
    buf = b""
    try:
        await _send(sock, b"+OK floor ready\r\n")
        while True:
            await wait_readable(sock)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data
            out: list[bytes] = []
            quit_ = False
            while (end := buf.find(b"\r\n")) >= 0:
                verb, _, arg = buf[:end].partition(b" ")
                buf = buf[end + 2 :]
                if box is not None and verb == b"RETR":
                    out.append(box.retr[arg])
                elif box is not None and verb == b"TOP":
                    out.append(box.top[arg])
                elif box is not None and verb == b"STAT":
                    out.append(box.stat)
                elif box is not None and verb == b"LIST":
                    out.append(box.list)
                elif box is not None and verb == b"UIDL":
                    out.append(box.uidl)
                elif box is not None and verb in (b"DELE", b"RSET", b"NOOP"):
                    out.append(b"+OK\r\n")  # (nothing to delete: the script's RSET follows)
                elif verb == b"USER":
                    user = arg
                    out.append(b"+OK\r\n")
                elif verb == b"PASS" and passwords.get(user) == arg:
                    box = boxes[user]
                    out.append(b"+OK\r\n")
                elif verb == b"QUIT":
                    out.append(b"+OK bye\r\n")
                    quit_ = True
                    break
                else:
                    out.append(b"-ERR\r\n")
            await _send(sock, out[0] if len(out) == 1 else b"".join(out))
            if quit_:
                return
            budget -= 1
            if budget <= 0:
                budget = YIELD_EVERY
                await cancel_shielded_checkpoint()
    except (BrokenPipeError, ConnectionResetError):
        return
    finally:
        sock.close()


async def serve(port: int, passwords: dict[bytes, bytes], boxes: dict[bytes, Box]) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.setblocking(False)
    async with trio.open_nursery() as nursery:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                await wait_readable(listener)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(connection, sock, passwords, boxes)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benches.floor")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--eml", type=Path, required=True, help="the fixture's eml/ folder")
    parser.add_argument("--passwd", type=Path, required=True)
    args = parser.parse_args()
    passwords, boxes = load(args.eml, args.passwd)
    trio.run(serve, args.port, passwords, boxes)


if __name__ == "__main__":
    main()
