"""A scripted POP3 peer on 127.0.0.1 for fault injection: it answers each command
line from a table, records everything the client sent, and can misbehave."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Mapping


class FakeServer:
    """``replies`` maps a command keyword (``"CAPA"``, ``"QUIT"``) to the bytes sent back;
    a callable gets the whole line. Unknown commands get ``-ERR``."""

    def __init__(
        self,
        replies: Mapping[str, bytes | Callable[[bytes], bytes]],
        greeting: bytes = b"+OK fake ready\r\n",
    ) -> None:
        self.replies = dict(replies)
        self.greeting = greeting
        self.received = b""
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(4)
        self.port = int(self._sock.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            if self.greeting:
                conn.sendall(self.greeting)
            buf = b""
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                self.received += data
                buf += data
                while b"\r\n" in buf:
                    line, buf = buf.split(b"\r\n", 1)
                    keyword = line.split(b" ", 1)[0].decode("ascii", "replace").upper()
                    reply = self.replies.get(keyword, b"-ERR unknown\r\n")
                    out = reply(line) if callable(reply) else reply
                    if out:
                        conn.sendall(out)
                    if keyword == "QUIT":
                        return

    def close(self) -> None:
        self._sock.close()
        self._thread.join(5)
