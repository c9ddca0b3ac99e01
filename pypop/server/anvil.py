"""Limits for the whole server, however many workers serve it (Dovecot's anvil).

With ``--workers N`` an attacker whose connections land on different workers must
not get N times the tries, nor N times the connections. So one process (the
supervisor, :mod:`pypop.server.workers`) keeps the shared counters, and the workers
ask it over a Unix socket pair each:

- connection caps: ``limits.max_connections`` (the whole server) and
  ``limits.max_connections_per_ip`` (per IPv4 address, per IPv6 /64);
- the auth penalty (:class:`~pypop.auth.penalty.AuthPenalty`);
- concurrent-auth slots (``limits.max_auth_per_client``), granted in order.

Both sides speak :class:`Limits`; a single process uses :class:`LocalLimits`, the
same objects without the socket. What crosses the socket: client keys (addresses),
never passwords: a failure carries the keyed fingerprint of the attempt (the key is
the supervisor's, handed to each worker), so identical retries still count once.

Cost: a login asks twice and waits (connection admitted, auth slot granted with the
current penalty); releases, successes and closes are one-way. A failure waits for
its acknowledgement, so the next attempt, on any worker, sees it. When a worker dies
the anvil releases what it held. When the anvil goes away (the supervisor died) the
worker refuses new connections, applies the maximum penalty, and shuts down.

The protocol: ASCII lines, ``<op> <id> <key> [<arg>]``; answers ``<id> <value>``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Final, Protocol

import trio

from pypop.auth import AuthPenalty, PerClientLimiter
from pypop.auth.penalty import client_key
from pypop.server.limits import ConnectionLimits
from pypop.server.listeners import Peer

__all__ = ["AnvilClient", "AnvilServer", "Limits", "LocalLimits"]

log = logging.getLogger("pypop.anvil")

MAX_LINE: Final = 512  # longest anvil line (a key is an address)
HEARTBEAT_EVERY: Final = 1.0  # a ready worker says it is alive this often


class Limits(Protocol):
    """What the server and its sessions ask before letting a client do something."""

    async def open(self, peer: Peer) -> str | None:
        """Admit a connection; None, or the name of the limit that refuses it."""

    def close(self, peer: Peer) -> None:
        """The end of an admitted connection."""

    def auth(self, ip: str, *, delay: bool = True) -> AbstractAsyncContextManager[float]:
        """``async with limits.auth(ip) as wait:`` one authentication step of ``ip``,
        holding one of its slots; ``wait`` is the penalty to serve before verifying
        (0.0 with ``delay=False``)."""

    async def failure(self, ip: str, user: str | None, secret: bytes | str | None) -> float:
        """Count a failed attempt; the seconds to wait before the ``-ERR``."""

    def success(self, ip: str) -> None:
        """A successful login clears the client's penalty."""


class LocalLimits:
    """:class:`Limits` for one process: the objects themselves."""

    def __init__(
        self, connections: ConnectionLimits, penalty: AuthPenalty, per_client: PerClientLimiter
    ) -> None:
        self.connections = connections
        self.penalty = penalty
        self.per_client = per_client

    async def open(self, peer: Peer) -> str | None:
        return self.connections.admit(peer.key)

    def close(self, peer: Peer) -> None:
        self.connections.release(peer.key)

    def auth(self, ip: str, *, delay: bool = True) -> AbstractAsyncContextManager[float]:
        return _LocalAuth(self, ip, delay)

    async def failure(self, ip: str, user: str | None, secret: bytes | str | None) -> float:
        return self.penalty.record_failure(ip, user, secret)

    def success(self, ip: str) -> None:
        self.penalty.record_success(ip)


class _LocalAuth:
    """:meth:`LocalLimits.auth` (a class, not a generator: it runs on every login)."""

    __slots__ = ("_delay", "_ip", "_limits", "_slot")

    def __init__(self, limits: LocalLimits, ip: str, delay: bool) -> None:
        self._limits = limits
        self._ip = ip
        self._delay = delay
        self._slot = limits.per_client.slot(ip)

    async def __aenter__(self) -> float:
        await self._slot.__aenter__()
        return self._limits.penalty.delay(self._ip) if self._delay else 0.0

    async def __aexit__(self, *exc: object) -> None:
        await self._slot.__aexit__(*exc)


# ---- the socket: non-blocking writes with a backlog, line reads ----------------------------


class _Channel:
    """One end of a worker's socket pair: ``write`` never blocks (what the socket
    does not take at once waits in order in a buffer for the writer task)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._backlog = bytearray()
        self._wake = trio.Event()
        self.broken = False

    def write(self, data: bytes) -> None:
        if self.broken:
            return
        if self._backlog:
            self._backlog += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.broken = True
            self._wake.set()
            return
        if sent < len(data):
            self._backlog += data[sent:]
            self._wake.set()

    def write_soon(self, data: bytes) -> None:
        """``write`` for what nobody waits for: sent by the writer task once this
        tick is over, together with whatever else the worker's sessions said."""
        if not self.broken:
            self._backlog += data
            self._wake.set()

    async def writer(self) -> None:
        while not self.broken:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._backlog and not self.broken:
                try:
                    sent = self.sock.send(self._backlog)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock)
                    continue
                except OSError:
                    self.broken = True
                    break
                del self._backlog[:sent]

    async def lines(self) -> AsyncIterator[list[bytes]]:
        """Batches of complete lines until EOF (or a line over MAX_LINE: a bug)."""
        buf = b""
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.EBADF):
                    log.error("anvil socket: %s", exc.strerror or exc)
                data = b""
            if not data:
                self.broken = True
                self._wake.set()
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            if len(buf) > MAX_LINE:
                self.broken = True
                self._wake.set()
                log.error("anvil socket: overlong line, closing")
                return
            if lines:
                yield lines


def _key(ip: str) -> str:
    key = client_key(ip)
    # An address never holds these; anything else is made harmless.
    return key if " " not in key and "\n" not in key else key.replace(" ", "_").replace("\n", "_")


# ---- the worker's side -----------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    event: trio.Event = field(default_factory=trio.Event)
    value: str = ""
    abandoned_key: str | None = None  # an auth slot nobody waits for any more


class AnvilClient:
    """:class:`Limits` of a worker: the anvil in the supervisor decides."""

    def __init__(
        self, sock: socket.socket, *, fingerprint_key: bytes, failure_delay: float, max_delay: float
    ) -> None:
        self._chan = _Channel(sock)
        self._pending: dict[int, _Pending] = {}
        self._next = 0
        self._failure_delay = failure_delay
        self._max_delay = max_delay
        # Only for AuthPenalty.fingerprint: the counters live in the anvil.
        self._fp = AuthPenalty(key=fingerprint_key)
        self.lost = trio.Event()

    async def run(self, on_lost: Callable[[], None]) -> None:
        """Read answers until the anvil goes away; then call ``on_lost``."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._chan.writer)
                async for lines in self._chan.lines():
                    for line in lines:
                        self._answer(line)
                nursery.cancel_scope.cancel()
        finally:
            self._chan.broken = True
            self._chan.sock.close()
        self.lost.set()
        for pending in self._pending.values():
            pending.event.set()
        self._pending.clear()
        on_lost()

    def _answer(self, line: bytes) -> None:
        ident, _, value = line.decode("ascii", "replace").partition(" ")
        pending = self._pending.pop(int(ident), None)
        if pending is None:
            return
        if pending.abandoned_key is not None:
            self._chan.write(f"a 0 {pending.abandoned_key}\n".encode())
            return
        pending.value = value
        pending.event.set()

    def _send(self, op: str, key: str, arg: str = "") -> None:
        # One-way: batched with the other sessions' (one write, one anvil wake-up).
        self._chan.write_soon(f"{op} 0 {key}{' ' if arg else ''}{arg}\n".encode())

    async def _ask(self, op: str, key: str, arg: str = "") -> str | None:
        """The answer, or None if the anvil is gone."""
        if self.lost.is_set():
            return None
        self._next += 1
        ident = self._next
        pending = self._pending[ident] = _Pending()
        self._chan.write(f"{op} {ident} {key}{' ' if arg else ''}{arg}\n".encode())
        try:
            await pending.event.wait()
        except BaseException:
            if op == "A":
                # Cancelled while queued: give the slot back when it comes.
                pending.abandoned_key = key
            else:
                self._pending.pop(ident, None)
            raise
        return None if self.lost.is_set() else pending.value

    async def open(self, peer: Peer) -> str | None:
        answer = await self._ask("O", _key(peer.host))
        if answer is None:
            return "shutting_down"
        return None if answer == "ok" else answer

    def close(self, peer: Peer) -> None:
        # One-way, like success() and a slot's release: ordered after this worker's
        # earlier requests, not after another worker's later ones.
        self._send("o", _key(peer.host))

    @contextlib.asynccontextmanager
    async def auth(self, ip: str, *, delay: bool = True) -> AsyncIterator[float]:
        key = _key(ip)
        answer = await self._ask("A", key, "1" if delay else "0")
        if answer is None:
            yield self._max_delay if delay else 0.0  # no anvil: assume the worst
            return
        try:
            yield float(answer)
        finally:
            self._send("a", key)

    async def failure(self, ip: str, user: str | None, secret: bytes | str | None) -> float:
        fp = "-" if secret is None else self._fp.fingerprint(user or "", secret).hex()
        await self._ask("F", _key(ip), fp)
        return self._failure_delay

    def success(self, ip: str) -> None:
        self._send("S", _key(ip))

    def ready(self) -> None:
        """Tell the supervisor that this worker serves and takes signals."""
        self._send("R", "-")

    async def heartbeat(self) -> None:
        """Say every HEARTBEAT_EVERY seconds that this worker's event loop runs: one
        that stops (a blocking call, a deadlock) is killed and replaced."""
        while not self.lost.is_set():
            self._send("H", "-")
            await trio.sleep(HEARTBEAT_EVERY)

    async def status(self, ip: str) -> dict[str, int]:
        """The anvil's view of one client: penalty level, connections, auth slots."""
        answer = await self._ask("L", _key(ip)) or ""
        return {k: int(v) for k, v in (item.split("=") for item in answer.split())}


# ---- the anvil: the supervisor's side ---------------------------------------------------------


@dataclass(slots=True)
class _Held:
    connections: Counter[str] = field(default_factory=Counter)
    slots: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class _Slots:
    held: int = 0
    waiting: deque[tuple[_Channel, _Held, int, bool]] = field(default_factory=deque)


class AnvilServer:
    """The shared counters; :meth:`serve` answers one worker until its socket closes."""

    def __init__(
        self, connections: ConnectionLimits, penalty: AuthPenalty, per_client: int
    ) -> None:
        self.connections = connections
        self.penalty = penalty
        self.per_client = per_client
        self._slots: dict[str, _Slots] = {}
        self.requests = 0

    async def serve(
        self,
        sock: socket.socket,
        ready: Callable[[], None] = lambda: None,
        beat: Callable[[], None] = lambda: None,
    ) -> None:
        """Answer one worker; ``ready`` is called when it says it serves, ``beat`` at
        each of its heartbeats."""
        chan = _Channel(sock)
        held = _Held()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(chan.writer)
                async for lines in chan.lines():
                    for line in lines:
                        if line == b"H 0 -":
                            beat()
                            continue
                        if line == b"R 0 -":
                            ready()
                            continue
                        self._handle(chan, held, line)
                nursery.cancel_scope.cancel()
        finally:
            self._forget(chan, held)
            sock.close()

    def _handle(self, chan: _Channel, held: _Held, line: bytes) -> None:
        self.requests += 1
        parts = line.decode("ascii", "replace").split(" ")
        if len(parts) < 3:
            log.error("anvil: bad request %r", line[:80])
            return
        op, ident, key = parts[0], parts[1], parts[2]
        arg = parts[3] if len(parts) > 3 else ""
        if op == "O":
            refused = self.connections.admit(key)
            if refused is None:
                held.connections[key] += 1
            chan.write(f"{ident} {refused or 'ok'}\n".encode())
        elif op == "o":
            if held.connections[key] > 0:
                held.connections[key] -= 1
                if not held.connections[key]:
                    del held.connections[key]
                self.connections.release(key)
        elif op == "A":
            slots = self._slots.get(key)
            if slots is None:
                slots = self._slots[key] = _Slots()
            if slots.held < self.per_client:
                self._grant(key, slots, chan, held, int(ident), arg == "1")
            else:
                slots.waiting.append((chan, held, int(ident), arg == "1"))
        elif op == "a":
            if held.slots[key] > 0:
                self._release_slot(key, held)
        elif op == "F":
            self.penalty.record_fingerprint(key, None if arg == "-" else bytes.fromhex(arg))
            chan.write(f"{ident} ok\n".encode())
        elif op == "S":
            self.penalty.record_success(key)
        elif op == "L":
            slots = self._slots.get(key)
            chan.write(
                f"{ident} level={self.penalty.level(key)} "
                f"connections={self.connections.of_key(key)} "
                f"auth={slots.held if slots else 0}\n".encode()
            )
        else:
            log.error("anvil: unknown request %r", line[:80])

    def _grant(
        self, key: str, slots: _Slots, chan: _Channel, held: _Held, ident: int, delay: bool
    ) -> None:
        slots.held += 1
        held.slots[key] += 1
        wait = self.penalty.delay(key) if delay else 0.0
        chan.write(f"{ident} {wait!r}\n".encode())

    def _release_slot(self, key: str, held: _Held) -> None:
        held.slots[key] -= 1
        if not held.slots[key]:
            del held.slots[key]
        slots = self._slots.get(key)
        if slots is None:
            return
        slots.held -= 1
        while slots.waiting:
            chan, who, ident, delay = slots.waiting.popleft()
            if not chan.broken:
                self._grant(key, slots, chan, who, ident, delay)
                return
        if slots.held <= 0:
            del self._slots[key]

    def _forget(self, chan: _Channel, held: _Held) -> None:
        """A worker is gone: what it held is free, what it waited for is void."""
        for key, n in held.connections.items():
            for _ in range(n):
                self.connections.release(key)
        for key in list(self._slots):
            slots = self._slots[key]
            slots.waiting = deque(w for w in slots.waiting if w[0] is not chan)
        for key, n in list(held.slots.items()):
            for _ in range(n):
                self._release_slot(key, held)
        chan.broken = True
