"""``pypop serve --workers N``: a supervisor and N worker processes.

One pypop process uses one core (Python runs one thread at a time). The supervisor
binds every listener, then starts N workers (``python -m pypop.server.workers``)
that inherit the listening sockets and accept from them.

Why inherited sockets and not ``SO_REUSEPORT``:

- one accept queue per listener: a connection waiting in it is taken by whichever
  worker is free, and a worker that dies loses nothing but its own sessions. With
  ``SO_REUSEPORT`` each worker has its own queue, the kernel hashes a new connection
  to one of them, and the connections queued on a dead worker's socket are reset
  (Linux migrates them only with an eBPF program, ``tcp_migrate_req``);
- the kernel's hash ignores load: a busy worker keeps getting its share, while with
  one queue a busy worker simply accepts less often;
- binding happens once, before any worker runs: an address in use or a port below
  1024 fails at start-up with one message, port 0 means one port for all workers,
  and only the supervisor needs ``CAP_NET_BIND_SERVICE``; a restarted worker finds
  the sockets as they were, and systemd socket activation would hand over the same.

The classic cost of one shared queue, every idle worker woken for each new connection
(a "thundering herd"), is avoided: each worker waits for its listeners through a
private epoll registered with ``EPOLLEXCLUSIVE`` (pypop.server.listeners.Listener,
``shared=True``), so the kernel wakes one waiting worker per connection.

The supervisor also runs the anvil (pypop.server.anvil: the limits of the whole
server) and the metrics endpoint, and it:

- restarts a worker that dies, after 0.5 s doubling to 30 s while they keep dying
  within a minute of starting; a worker whose heartbeat (one a second, once it
  serves) stops for :data:`HANG_AFTER` seconds has hung: it is killed, so restarted
  (and a graceful stop does not wait for it); so is one still not ready
  :data:`HANG_AFTER` seconds into a stop;
- passes SIGTERM and SIGINT (graceful shutdown) and SIGHUP (reload the TLS
  certificate and the passwd-file) on to every worker; on the first SIGTERM/SIGINT it
  also closes its copies of the listeners, so that new connections are refused
  instead of waiting. A second SIGTERM/SIGINT is passed on too, as the other of the
  two (a worker would take a second signal of the same kind, pending before it read
  the first, as one), and the workers stop at once, cutting sessions without UPDATE;
  5 s later whatever is left is killed,
  except a worker still finishing an UPDATE (its heartbeat goes on), which is given
  up to :data:`UPDATE_GRACE` seconds more: a SIGKILL would leave the UPDATE half done.

Workers run in their own process group, so a terminal's Ctrl-C reaches only the
supervisor (which passes it on once). A worker whose supervisor disappears (its anvil
socket closes) shuts down gracefully.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import secrets
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from pypop.auth import AuthPenalty
from pypop.config import ConfigError, ServerConfig
from pypop.server.anvil import HEARTBEAT_EVERY, AnvilClient, AnvilServer
from pypop.server.limits import ConnectionLimits
from pypop.server.listeners import Listener, open_listeners

__all__ = ["Supervisor", "worker_main"]

log = logging.getLogger("pypop.supervisor")

BACKOFF_FIRST: Final = 0.5
BACKOFF_MAX: Final = 30.0
STABLE_AFTER: Final = 60.0  # a worker that lived this long resets the backoff
KILL_AFTER: Final = 5.0  # after the second signal
# A ready worker without a heartbeat (pypop.server.anvil) for this long has hung: its
# sessions are stuck, the connections it holds still count against the limits, and a
# graceful stop would wait for it for ever. It is killed (and restarted).
HANG_AFTER: Final = 30.0
# After a second signal, a worker still finishing an UPDATE (pypop.server.session's
# update_timeout, 60 s) is not killed for this long.
UPDATE_GRACE: Final = 65.0
_HANDSHAKE: Final = struct.Struct(">I")


@dataclass
class _Slot:
    index: int
    process: trio.Process | None = None
    ready: bool = False  # its signal handlers are in: signals may be passed on
    started: float = 0.0
    backoff: float = BACKOFF_FIRST
    restarts: int = 0
    pids: list[int] = field(default_factory=list)
    last_beat: float = 0.0  # (trio's clock) its last heartbeat, or when it became ready
    hup: bool = False  # a SIGHUP came while it was starting: passed on when it is ready


class Supervisor:
    """Binds, starts and keeps ``count`` workers; :meth:`run` returns the exit status."""

    def __init__(self, config: ServerConfig, count: int) -> None:
        self.config = config
        self.count = count
        self.slots = [_Slot(i) for i in range(count)]
        self.listeners: list[Listener] = []
        self.addresses: list[tuple[str, int]] = []
        self.tls_addresses: list[tuple[str, int]] = []
        self.stopping = False
        self.forced = False
        self._key = secrets.token_bytes(32)  # fingerprints of failed attempts
        penalty_max = config.auth_penalty_max
        self.anvil = AnvilServer(
            ConnectionLimits(config.max_connections, config.max_connections_per_ip),
            AuthPenalty(
                initial_delay=min(config.auth_penalty_initial, penalty_max),
                max_delay=penalty_max,
                failure_delay=config.auth_failure_delay,
                key=self._key,
            ),
            config.max_auth_per_client,
        )
        self._metrics_dir: str | None = None
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self._stopped_at: float | None = None  # (trio's clock) the first SIGTERM/SIGINT
        self._first_stop: int = signal.SIGTERM  # which of the two it was

    # -- state for /healthz and the metrics --

    @property
    def alive(self) -> int:
        return sum(1 for s in self.slots if s.process is not None and s.process.returncode is None)

    def health(self) -> str | None:
        if self.stopping:
            return "shutting down"
        if self.alive == 0:
            return "no worker running"
        return None

    # -- the run --

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> int:
        for host, port in self.config.listen:
            self.listeners += await open_listeners(host, port)
        for host, port in self.config.listen_tls:
            self.listeners += await open_listeners(host, port, implicit_tls=True)
        self.addresses = [lst.address for lst in self.listeners if not lst.implicit_tls]
        self.tls_addresses = [lst.address for lst in self.listeners if lst.implicit_tls]
        env = dict(os.environ)
        try:
            async with trio.open_nursery() as services:
                self._nursery = services
                if self.config.metrics_listen is not None:
                    self._metrics_dir = tempfile.mkdtemp(prefix="pypop-metrics-")
                    env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
                    await services.start(self._serve_metrics)
                services.start_soon(self._watch_signals)
                log.info(
                    "listening on %s with %d workers (pid %d supervises)",
                    ", ".join(_where(lst) for lst in self.listeners),
                    self.count,
                    os.getpid(),
                )
                task_status.started(self)
                async with trio.open_nursery() as keepers:
                    for slot in self.slots:
                        keepers.start_soon(self._keep, slot, env)
                services.cancel_scope.cancel()
        finally:
            for lst in self.listeners:
                lst.socket.close()
            if self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
        log.info("stopped%s", " (forced)" if self.forced else "")
        return 1 if self.forced else 0

    async def _serve_metrics(self, *, task_status: trio.TaskStatus[None]) -> None:
        from prometheus_client import Counter, Gauge

        from pypop.server.metrics import MetricsServer, multiprocess_registry

        assert self._metrics_dir is not None
        assert self.config.metrics_listen is not None
        registry = multiprocess_registry(self._metrics_dir)
        workers = Gauge("pypop_workers", "Worker processes running", registry=registry)
        workers.set_function(lambda: self.alive)
        self._restarts = Counter(
            "pypop_worker_restarts", "Workers restarted after dying", registry=registry
        )
        Gauge(
            "pypop_anvil_requests", "Requests the anvil answered since start", registry=registry
        ).set_function(lambda: self.anvil.requests)
        server = MetricsServer(self.config.metrics_listen, registry=registry, healthy=self.health)
        self.metrics = server
        await server.run(task_status=task_status)

    async def _keep(self, slot: _Slot, env: dict[str, str]) -> None:
        """Run one worker, and again after it dies, until the server stops."""
        while not self._stop.is_set():
            ours, theirs = socket.socketpair()
            listeners = self.listeners
            handshake = pickle.dumps(
                {
                    "config": self.config,
                    "listeners": [(lst.socket.fileno(), lst.implicit_tls) for lst in listeners],
                    "key": self._key,
                    "index": slot.index,
                }
            )
            fds = [lst.socket.fileno() for lst in self.listeners] + [theirs.fileno()]
            try:
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "pypop.server.workers", str(theirs.fileno())],
                    pass_fds=fds,
                    env=env,
                    process_group=0,
                )
            except OSError as exc:
                ours.close()
                theirs.close()
                log.error("cannot start worker %d: %s", slot.index, exc.strerror or exc)
                await self._pause(slot)
                continue
            finally:
                theirs.close()
            slot.process, slot.started, slot.ready = process, time.monotonic(), False
            slot.hup = False
            slot.pids.append(process.pid)
            ours.sendall(_HANDSHAKE.pack(len(handshake)) + handshake)
            log.info("worker %d started (pid %d)", slot.index, process.pid)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    self.anvil.serve, ours, lambda: self._ready(slot), lambda: self._beat(slot)
                )
                nursery.start_soon(self._watch, slot, process)
                status = await process.wait()
                nursery.cancel_scope.cancel()
            self._dead(process.pid)
            if self._stop.is_set():
                log.info("worker %d (pid %d) stopped", slot.index, process.pid)
                return
            how = f"killed by {_signame(-status)}" if status < 0 else f"exited with status {status}"
            if time.monotonic() - slot.started >= STABLE_AFTER:
                slot.backoff = BACKOFF_FIRST
            log.error(
                "worker %d (pid %d) %s; restarting in %gs",
                slot.index,
                process.pid,
                how,
                slot.backoff,
            )
            slot.restarts += 1
            restarts = getattr(self, "_restarts", None)
            if restarts is not None:
                restarts.inc()
            await self._pause(slot)

    async def _pause(self, slot: _Slot) -> None:
        with trio.move_on_after(slot.backoff):
            await self._stop.wait()
        slot.backoff = min(BACKOFF_MAX, slot.backoff * 2)

    def _dead(self, pid: int) -> None:
        if self._metrics_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self._metrics_dir)  # type: ignore[no-untyped-call]

    def _beat(self, slot: _Slot) -> None:
        slot.last_beat = trio.current_time()

    async def _watch(self, slot: _Slot, process: trio.Process) -> None:
        """Kill the worker if it is ready and its heartbeat stops (while serving or
        while stopping: SIGKILL works on a stopped or blocked process alike), or if
        the server stops and it is still not ready HANG_AFTER seconds later (it has
        no session to finish, and gets no signal before it is ready)."""
        tick = trio.current_time()
        while True:
            await trio.sleep(HEARTBEAT_EVERY)
            now, last = trio.current_time(), tick
            tick = now
            if now - last > 2 * HEARTBEAT_EVERY:
                # This loop itself stood still (the supervisor was stopped or starved):
                # the heartbeats wait unread in the socket. Judge from now on.
                slot.last_beat = max(slot.last_beat, now)
                continue
            if slot.ready:
                if now - slot.last_beat <= HANG_AFTER:
                    continue
                why = f"has not answered for {HANG_AFTER:g}s"
            elif self._stopped_at is not None and now - self._stopped_at > HANG_AFTER:
                why = f"did not start within {HANG_AFTER:g}s of the stop"
            else:
                continue
            log.error("worker %d (pid %d) %s: killing it", slot.index, process.pid, why)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            return

    def _ready(self, slot: _Slot) -> None:
        slot.ready = True
        slot.last_beat = trio.current_time()
        if slot.process is None:
            return
        # Started while the server began to stop: it stops too. A SIGHUP that came
        # while it started may postdate the files it read: it reads them again.
        signum = signal.SIGTERM if self.stopping else signal.SIGHUP if slot.hup else None
        slot.hup = False
        if signum is not None:
            with contextlib.suppress(ProcessLookupError):
                slot.process.send_signal(signum)

    def _send(self, signum: int) -> None:
        """Pass a signal on to every worker that can take it. One still starting
        may have no handler yet: it is told when ready (SIGHUP: it may have read its
        files before the change; SIGTERM, SIGINT: it has no session to finish);
        SIGKILL goes to all."""
        for slot in self.slots:
            proc = slot.process
            if proc is None or proc.returncode is not None:
                continue
            if not slot.ready and signum != signal.SIGKILL:
                slot.hup = slot.hup or signum == signal.SIGHUP
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: workers reload the TLS certificate and the passwd-file")
                    self._send(signum)
                    continue
                if self.stopping:
                    log.warning("second %s: workers stop now, open sessions are cut", name)
                    self.forced = True
                    # The other stop signal: a worker that has not yet read the first
                    # would take a second of the same kind as the same one (the kernel
                    # and trio both coalesce a pending signal), and only drain.
                    self._send(
                        signal.SIGINT if self._first_stop == signal.SIGTERM else signal.SIGTERM
                    )
                    assert self._nursery is not None
                    self._nursery.start_soon(self._kill_later)
                    continue
                log.info("%s: graceful shutdown of %d workers", name, self.alive)
                self.stopping = True
                self._first_stop = signum
                self._stopped_at = trio.current_time()
                self._stop.set()
                self._send(signum)
                # New connections are refused from now on instead of queueing.
                for lst in self.listeners:
                    lst.socket.close()

    async def _kill_later(self) -> None:
        """KILL_AFTER seconds after the second signal, kill what still runs, except
        a worker whose heartbeat goes on: its sessions are cut, so it is finishing
        an UPDATE (shielded, at most the session's update_timeout), and a SIGKILL
        there would leave it half done. It gets up to UPDATE_GRACE seconds more."""
        await trio.sleep(KILL_AFTER)
        until = trio.current_time() + UPDATE_GRACE
        while self.alive:
            now = trio.current_time()
            for slot in self.slots:
                proc = slot.process
                if proc is None or proc.returncode is not None:
                    continue
                if slot.ready and now - slot.last_beat <= 3 * HEARTBEAT_EVERY and now < until:
                    continue
                log.error("killing worker %d (pid %d): it did not stop", slot.index, proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await trio.sleep(HEARTBEAT_EVERY)


def _where(lst: Listener) -> str:
    host, port = lst.address
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return where + (" (implicit TLS)" if lst.implicit_tls else " (plain)")


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


# ---- the worker process ----------------------------------------------------------------------


def _read_handshake(sock: socket.socket) -> dict[str, Any]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise SystemExit("pypop worker: the supervisor went away")
            data += chunk
        return data

    (size,) = _HANDSHAKE.unpack(exactly(_HANDSHAKE.size))
    # From our own parent over a private socket pair: trusted.
    result: dict[str, Any] = pickle.loads(exactly(size))  # noqa: S301
    return result


async def _worker(config: ServerConfig, sock: socket.socket, hello: dict[str, Any]) -> int:
    from pypop.cli.serve import watch_signals
    from pypop.server import Server

    listeners = [
        Listener(socket.socket(fileno=fd), implicit_tls=tls, shared=True)
        for fd, tls in hello["listeners"]
    ]
    client = AnvilClient(
        sock,
        fingerprint_key=hello["key"],
        failure_delay=config.auth_failure_delay,
        max_delay=config.auth_penalty_max,
    )
    server = Server(config, limits=client, listeners=listeners)
    forced = trio.Event()

    def lost() -> None:
        if not server.shutting_down:
            log.warning("the supervisor is gone: shutting down")
            server.shutdown()

    # The link to the supervisor (the anvil, the heartbeat) outlives a forced stop's
    # cancel: an UPDATE still finishing (shielded) keeps reporting it is alive, and
    # is not killed half done.
    async with trio.open_nursery() as link:
        link.start_soon(client.run, lost)
        async with trio.open_nursery() as outer:
            await outer.start(watch_signals, server, outer.cancel_scope, forced)
            async with trio.open_nursery() as inner:
                await inner.start(server.run)
                # Until now a signal would have found the default action (SIGHUP
                # kills): the supervisor sends none before this.
                client.ready()
                link.start_soon(client.heartbeat)
            outer.cancel_scope.cancel()
        link.cancel_scope.cancel()
    return 1 if forced.is_set() else 0


def worker_main(argv: list[str]) -> int:
    from pypop.server.logsetup import configure
    from pypop.server.malloc import tune as tune_malloc

    sock = socket.socket(fileno=int(argv[0]))
    hello = _read_handshake(sock)
    config: ServerConfig = hello["config"]
    configure(config.log_target, config.log_format, config.log_level, with_pid=True)
    tune_malloc()
    try:
        return trio.run(_worker, config, sock, hello)
    except ConfigError as exc:
        print(f"pypop worker: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
