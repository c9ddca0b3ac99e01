"""The lang work with the sql backend, through real ``pypop serve`` processes.

- RFC 6856: a client that never sent UTF8 gets ``-ERR [UTF8]`` for a message with
  8-bit header octets on every way the sql backend hands a message out: the
  read-ahead (its WireCache), a one-chunk read, a many-chunk stream, and TOP; a UTF8
  client gets the octets as delivered.
- EXPIRE enforced: the ``expire_days`` option (CAPA, removal at UPDATE only, the log
  line), on SQLite and PostgreSQL (the ``received`` column).
- Per-user policies from a passwd-file: ``expire``, ``nologin`` with a reason,
  ``userdb_mail=sql:NAME``, a location the backend cannot serve, a home that changes
  nothing.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import trio
from pypop.wire import stuff

from pypop_sql import SqlBackend
from tests.helpers import PASSWORD, open_engine, start_serve

DAY = 86400.0
ASCII = b"Subject: plain\r\n\r\nfirst\r\n"
EIGHT_BIT = "From: Jürgen <j@example.org>\r\nSubject: Grüße\r\n\r\nHallo\r\n".encode()
# 320 KB, two chunks (256 KiB each): streamed, never read ahead.
LARGE = "Subject: Größe\r\n\r\n".encode() + (b"y" * 78 + b"\r\n") * 4000
BODY_8BIT = "Subject: plain\r\n\r\nÜber den Körper\r\n".encode()
UTF8_NEEDED = b"-ERR [UTF8] Message has UTF-8 header fields; it needs a client that sends UTF8\r\n"


def talk(port: int, data: bytes) -> bytes:
    """Send ``data`` (ending in QUIT) and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), 30) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def login(user: str, password: str = PASSWORD) -> bytes:
    return f"USER {user}\r\nPASS {password}\r\n".encode()


def test_utf8_rule_on_every_sql_path(db_url: str, tmp_path: Path) -> None:
    with open_engine(db_url) as e:
        for n, data in enumerate((ASCII, EIGHT_BIT, LARGE, BODY_8BIT), 1):
            e.deliver("alice", data, f"m{n}", None)
    server = start_serve(tmp_path, db_url, "utf8")
    try:
        out = talk(
            server.port,
            login("alice")
            + b"RETR 1\r\nRETR 2\r\nTOP 2 0\r\nRETR 3\r\nTOP 3 1\r\nRETR 4\r\nQUIT\r\n",
        )
        assert out.split(b"\r\n", 3)[3] == (
            f"+OK {len(ASCII)} octets\r\n".encode()
            + stuff(ASCII)
            + UTF8_NEEDED  # RETR 2: from the read-ahead RETR 1 made (WireCache)
            + UTF8_NEEDED  # TOP 2 0: a one-chunk read
            + UTF8_NEEDED  # RETR 3: the many-chunk stream
            + UTF8_NEEDED  # TOP 3 1
            + f"+OK {len(BODY_8BIT)} octets\r\n".encode()
            + stuff(BODY_8BIT)  # only the header decides
            + b"+OK Logging out\r\n"
        )
        out = talk(
            server.port, b"UTF8\r\n" + login("alice") + b"RETR 1\r\nRETR 2\r\nRETR 3\r\nQUIT\r\n"
        )
        assert out.split(b"\r\n", 4)[4] == (
            f"+OK {len(ASCII)} octets\r\n".encode()
            + stuff(ASCII)
            + f"+OK {len(EIGHT_BIT)} octets\r\n".encode()
            + stuff(EIGHT_BIT)
            + f"+OK {len(LARGE)} octets\r\n".encode()
            + stuff(LARGE)
            + b"+OK Logging out\r\n"
        )
    finally:
        server.stop()


def test_read_ahead_is_the_wire_cache_path(db_url: str) -> None:
    """What the first test relies on: after RETR 1, message 2 comes from the
    read-ahead without a database call, so the session's check is what stops it."""
    with open_engine(db_url) as e:
        for n, data in enumerate((ASCII, EIGHT_BIT, LARGE), 1):
            e.deliver("alice", data, f"m{n}", None)

    async def main() -> None:
        backend = SqlBackend.from_options({"url": db_url})
        try:
            box = await backend.open_mailbox("alice")
            try:
                assert [b async for b in box.retrieve(0)] == [ASCII]
                assert box.wire_message(1) == stuff(EIGHT_BIT)
                assert box.wire_message(2) is None  # many chunks: never read ahead
            finally:
                await box.aclose()
        finally:
            await backend.aclose()

    trio.run(main)


PASSWD = f"""\
alice:{{PLAIN}}{PASSWORD}
bob:{{PLAIN}}{PASSWORD}::::::expire=NEVER
carol:{{PLAIN}}{PASSWORD}::::::nologin reason=Moved to pop.example.net
dave:{{PLAIN}}{PASSWORD}::::::userdb_mail=sql:shared
erin:{{PLAIN}}{PASSWORD}::::::userdb_mail=maildir:~/Maildir
frank:{{PLAIN}}{PASSWORD}:1000:1000::/home/frank::
"""


def _uids(url: str, user: str) -> list[str]:
    with open_engine(url) as e:
        handle, snapshot = e.open(user, True)
        e.release(handle)
        return [r.uidl for r in snapshot.rows]


def test_expire_days_and_per_user_policies(db_url: str, tmp_path: Path) -> None:
    now = time.time()
    with open_engine(db_url) as e:
        for user in ("alice", "bob", "frank"):
            e.deliver(user, ASCII, f"{user}-old", now - 40 * DAY)
            e.deliver(user, ASCII, f"{user}-new", now - 1 * DAY)
        e.deliver("shared", ASCII, "shared-1", None)
    server = start_serve(
        tmp_path, db_url, "expire", passwd_text=PASSWD, backend_extra="expire_days = 30"
    )
    try:
        port = server.port
        # A session that ends without QUIT removes nothing.
        with socket.create_connection(("127.0.0.1", port), 30) as s:
            s.sendall(login("alice") + b"STAT\r\n")
            got = b""
            while got.count(b"\r\n") < 4:
                got += s.recv(4096)
        time.sleep(0.5)  # the server sees the close and releases the lock
        assert _uids(db_url, "alice") == ["alice-old", "alice-new"]
        # RFC 2449 §6.7: USER before login (bob has his own), the user's value after.
        out = talk(port, b"CAPA\r\n" + login("alice") + b"CAPA\r\nQUIT\r\n")
        assert b"\r\nEXPIRE 30 USER\r\n" in out
        assert out.count(b"\r\nEXPIRE 30\r\n") == 1
        assert out.endswith(b"+OK Logging out\r\n")
        assert _uids(db_url, "alice") == ["alice-new"]
        out = talk(port, login("bob") + b"CAPA\r\nQUIT\r\n")
        assert b"\r\nEXPIRE NEVER\r\n" in out
        assert _uids(db_url, "bob") == ["bob-old", "bob-new"]
        # A home directory means nothing to named maildrops: frank's own, expired.
        out = talk(port, login("frank") + b"UIDL\r\nQUIT\r\n")
        assert b"+OK\r\n1 frank-old\r\n2 frank-new\r\n.\r\n" in out
        assert _uids(db_url, "frank") == ["frank-new"]
        out = talk(port, login("dave") + b"UIDL\r\nQUIT\r\n")
        assert b"+OK\r\n1 shared-1\r\n.\r\n" in out
        out = talk(port, login("carol") + b"QUIT\r\n")
        assert b"-ERR [SYS/PERM] Moved to pop.example.net\r\n" in out
        out = talk(port, login("erin") + b"QUIT\r\n")
        assert b"-ERR [SYS/PERM] Mailbox cannot be opened\r\n" in out
        log = server.tail()
        assert "expire: user=<alice> removed=1 days=30" in log
        assert "expire: user=<frank> removed=1 days=30" in log
        assert "expire: user=<bob>" not in log
    finally:
        server.stop()
