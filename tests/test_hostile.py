"""Hostile clients against a real server over real sockets (issue 15 item 12).

Each test replays one repro from issue 15: floods of pipelined commands, drip-fed
lines, descriptor exhaustion, SCRAM probing and aborts, overlong SASL lines and
nonces, counters, and a client that drops and reconnects. Each is bounded in time
(a few seconds at most); memory is read from /proc for a ``pypop serve`` process.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from pypop.backend import Mailbox
from pypop.backends.memory import MemoryBackend, MemoryMailbox, sample_message
from pypop.server.limits import ConnectionLimits
from pypop.server.listeners import Peer
from pypop.wire import stuff

from .conftest import ServerStarter
from .test_sasl_e2e import b64, challenge
from .test_server import port_of
from .test_tls import Client

AUTH_FAILED = b"-ERR [AUTH] Authentication failed\r\n"
IN_USE = b"-ERR [IN-USE] Mailbox is locked by another session\r\n"
CAPA_OK = b"+OK Capability list follows\r\n"
MESSAGE = b"From: a@example.org\nSubject: flood\n\nbody\n"


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """DESIGN rule 12: no peer input produces a traceback in the log."""
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert "Traceback" not in caplog.text


# ---- a pypop serve process, for memory figures ------------------------------------------


def populate(root: Path, user: str, count: int) -> None:
    for sub in ("cur", "new", "tmp"):
        (root / user / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (root / user / "cur" / f"{1700000000 + i}.M{i}P1.flood:2,S").write_bytes(MESSAGE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@contextlib.contextmanager
def pypop_serve(tmp_path: Path, users: dict[str, int], *args: str) -> Iterator[tuple[int, int]]:
    """``pypop serve`` on a maildir of ``users`` (name -> message count); yields
    (port, pid)."""
    pytest.importorskip("pypop_maildir")
    root = tmp_path / "mail"
    for user, count in users.items():
        populate(root, user, count)
    (tmp_path / "passwd").write_text("".join(f"{u}:{{PLAIN}}secret\n" for u in users))
    port = free_port()
    log_file = (tmp_path / "serve.log").open("ab")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "pypop", "serve", "--backend", "maildir",
            "-o", f"root={root}", "-o", "flag_updates=false",
            "--passwd-file", str(tmp_path / "passwd"),
            "--listen", f"127.0.0.1:{port}", "--log-level", "WARNING", "--workers", "1", *args,
        ],
        stderr=log_file,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "pypop serve did not start"
                time.sleep(0.05)
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()
        err = (tmp_path / "serve.log").read_text(errors="replace")
        assert "Traceback" not in err, err


async def login(port: int, user: str, password: str = "secret") -> Client:  # noqa: S107
    c = await Client.connect(port)
    assert (await c.line()).startswith(b"+OK")
    assert await c.cmd(f"USER {user}\r\n".encode()) == b"+OK\r\n"
    assert (await c.cmd(f"PASS {password}\r\n".encode())).startswith(b"+OK maildrop has")
    return c


async def flood(port: int, data: bytes, user: str | None = None) -> socket.socket:
    """A connection that sends ``data`` (as far as the socket takes it) and never reads."""
    sock = socket.create_connection(("127.0.0.1", port))
    if user is not None:
        sock.sendall(f"USER {user}\r\nPASS secret\r\n".encode())
    sock.setblocking(False)
    view = memoryview(data)
    with contextlib.suppress(BlockingIOError):
        while view:
            view = view[sock.send(view) :]
    return sock


async def noop_round_trips(c: Client, seconds: float, limit: float) -> list[float]:
    """NOOP round trips for ``seconds``; each must come back within ``limit``."""
    trips = []
    end = trio.current_time() + seconds
    while trio.current_time() < end:
        start = trio.current_time()
        with trio.fail_after(limit):
            assert await c.cmd(b"NOOP\r\n") == b"+OK\r\n"
        trips.append(trio.current_time() - start)
        await trio.sleep(0.05)
    return trips


# ---- item 1: pipelined floods ---------------------------------------------------------


async def test_uidl_flood_memory_and_latency(tmp_path: Path) -> None:
    """Issue 15 item 1 repro: 5,000 messages, UIDL\\n x 20,000 in one write, nothing
    read. Before: +1.8 GiB and every session stalled ~45 s. Now the server stops
    answering until the peer reads: its peak RSS grows by a few MiB (mostly the
    maildrop snapshot) and another client's NOOPs come back at once."""
    with pypop_serve(tmp_path, {"flooder": 5000, "probe": 1}) as (port, pid):
        warm = await login(port, "flooder")
        assert await warm.cmd(b"QUIT\r\n") == b"+OK Logging out\r\n"
        await warm.aclose()
        probe = await login(port, "probe")
        before = status_kib(pid, "VmHWM")
        sock = await flood(port, b"UIDL\n" * 20000, user="flooder")
        try:
            trips = await noop_round_trips(probe, 3.0, limit=5.0)
            growth = status_kib(pid, "VmHWM") - before
        finally:
            sock.close()
        await probe.aclose()
    assert growth < 8 * 1024, f"peak RSS grew by {growth} KiB for one flooding session"
    assert len(trips) >= 5


async def test_unauthenticated_capa_floods(tmp_path: Path) -> None:
    """Issue 15 item 1: 20 connections sending CAPA\\n x 100,000 without reading cost
    3.5 MiB each before; now each holds at most about one read and one output slice."""
    with pypop_serve(tmp_path, {"probe": 1}) as (port, pid):
        probe = await login(port, "probe")
        before = status_kib(pid, "VmHWM")
        socks = [await flood(port, b"CAPA\n" * 100_000) for _ in range(20)]
        try:
            await noop_round_trips(probe, 2.0, limit=5.0)
            growth = status_kib(pid, "VmHWM") - before
        finally:
            for s in socks:
                s.close()
        await probe.aclose()
    assert growth / 20 < 1024, f"peak RSS grew by {growth / 20:.0f} KiB per session"


# ---- item 3: slow and numerous clients ------------------------------------------------


async def test_drip_fed_line_is_cut_off(
    start_server: ServerStarter, caplog: pytest.LogCaptureFixture
) -> None:
    """A line that never ends used to hold its slot for ~14 h (every octet reset the
    idle timer). Now it must be complete within limits.line_timeout."""
    caplog.set_level(logging.INFO, logger="pypop.session")
    server = await start_server(line_timeout=1.0)
    c = await Client.connect(port_of(server))
    assert (await c.line()).startswith(b"+OK")
    start = trio.current_time()
    closed = False
    with trio.move_on_after(6):
        for byte in b"CAPA" * 100:
            try:
                await c.send(bytes([byte]))
            except trio.BrokenResourceError:
                closed = True
                break
            with trio.move_on_after(0.2):
                if not await c.stream.receive_some(100):
                    closed = True
                    break
    assert closed
    assert 0.9 <= trio.current_time() - start < 3
    assert "end=line timeout" in caplog.text
    await c.aclose()


async def test_slow_but_complete_lines_are_fine(start_server: ServerStarter) -> None:
    server = await start_server(line_timeout=1.0)
    c = await Client.connect(port_of(server))
    assert (await c.line()).startswith(b"+OK")
    for _ in range(4):  # 2.4 s in all, each line within 0.6 s
        await c.send(b"CA")
        await trio.sleep(0.3)
        await c.send(b"PA\r\n")
        assert await c.line() == CAPA_OK
        while await c.line() != b".\r\n":
            pass
        await trio.sleep(0.3)
    await c.aclose()


async def test_a_partial_line_then_eof_is_a_disconnection(
    start_server: ServerStarter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pypop.session")
    server = await start_server(line_timeout=5.0)
    c = await Client.connect(port_of(server))
    await c.line()
    await c.send(b"CA")
    await c.aclose()
    for _ in range(500):
        if "end=" in caplog.text:
            break
        await trio.sleep(0.01)
    assert "end=disconnected" in caplog.text


def test_per_client_limit_counts_an_ipv6_64() -> None:
    """Issue 15 item 3: one host cannot multiply its share by walking its /64."""
    limits = ConnectionLimits(100, 2)
    assert limits.try_open(Peer("2001:db8:1:2::1"))
    assert limits.try_open(Peer("2001:db8:1:2:ffff:ffff:ffff:fffe"))
    assert not limits.try_open(Peer("2001:db8:1:2::abcd"))
    assert limits.try_open(Peer("2001:db8:1:3::1"))  # the next /64 is another client
    assert limits.try_open(Peer("192.0.2.1"))
    assert limits.try_open(Peer("::ffff:192.0.2.1"))  # IPv4-mapped counts as IPv4
    assert not limits.try_open(Peer("192.0.2.1"))
    limits.close(Peer("2001:db8:1:2::1"))
    assert limits.try_open(Peer("2001:db8:1:2::77"))


async def test_per_client_limit_over_ipv6(start_server: ServerStarter) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    server = await start_server(listen=[("::1", 0)], max_connections_per_ip=2)
    port = port_of(server)
    held = [await trio.open_tcp_stream("::1", port) for _ in range(2)]
    for s in held:
        assert (await s.receive_some(100)).startswith(b"+OK")
    third = await trio.open_tcp_stream("::1", port)
    assert await third.receive_some(100) == (
        b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    )
    for s in [*held, third]:
        await s.aclose()


# ---- item 4: descriptors ----------------------------------------------------------------


def _serve_with_nofile(tmp_path: Path, soft: int, hard: int, *args: str) -> subprocess.Popen[str]:
    (tmp_path / "passwd").write_text("bob:{PLAIN}secret\n")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return subprocess.Popen(
        [
            sys.executable, "-m", "pypop", "serve", "--passwd-file", str(tmp_path / "passwd"),
            "--listen", f"127.0.0.1:{free_port()}", *args,
        ],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit,
    )  # fmt: skip


def test_max_connections_above_the_hard_file_limit_is_refused(tmp_path: Path) -> None:
    proc = _serve_with_nofile(tmp_path, 256, 256, "--max-connections", "1000")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "limits.max_connections = 1000 needs at least 1064 open files" in err
    assert "hard limit 256" in err
    assert "Traceback" not in err


def test_soft_file_limit_is_raised_at_start_up(tmp_path: Path) -> None:
    proc = _serve_with_nofile(tmp_path, 256, 8192, "--max-connections", "1000")
    try:
        deadline = time.monotonic() + 30
        soft = 0
        while time.monotonic() < deadline and proc.poll() is None:
            for line in Path(f"/proc/{proc.pid}/limits").read_text().splitlines():
                if line.startswith("Max open files"):
                    soft = int(line.split()[3])
            if soft != 256:
                break
            time.sleep(0.05)
        assert soft == 5 * 1000 + 64  # FDS_PER_CONNECTION per connection plus the reserve
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "open-file limit raised from 256 to 5064" in err


async def test_out_of_descriptors_refuses_and_backs_off(
    start_server: ServerStarter, caplog: pytest.LogCaptureFixture
) -> None:
    """EMFILE in accept: the waiting client is refused with the spare descriptor and
    the loop backs off, logging once, instead of ~10 lines a second while the client
    hangs."""
    server = await start_server()
    port = port_of(server)
    client = socket.socket()
    client.setblocking(False)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hoard: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 32, hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                hoard.append(os.open(os.devnull, os.O_RDONLY))
        with contextlib.suppress(BlockingIOError):
            client.connect(("127.0.0.1", port))
        await trio.sleep(1.5)
        errors = [r for r in caplog.records if r.getMessage().startswith("accept failed")]
    finally:
        for fd in hoard:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    client.setblocking(True)
    client.settimeout(5)
    refused = client.recv(200)
    client.close()
    assert refused == b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "Too many open files" in errors[0].getMessage()
    c = await Client.connect(port)  # served again at once
    assert (await c.line()).startswith(b"+OK POP3 server ready")
    await c.aclose()


# ---- items 6 and 8: SCRAM probing --------------------------------------------------------


def _salt_from(port: int, user: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s, s.makefile("rb") as f:
        f.readline()
        s.sendall(b"AUTH SCRAM-SHA-256 " + b64(f"n,,n={user},r=abc") + b"\r\n")
        first = challenge(f.readline())
        s.sendall(b"*\r\n")
        attrs = dict(kv.split("=", 1) for kv in first.decode().split(","))
        return base64.b64decode(attrs["s"]) + b"/" + attrs["i"].encode()


def test_fake_scram_salts_survive_a_restart(tmp_path: Path) -> None:
    """Issue 15 item 6: the fake salt of an unknown user came from a per-process key,
    so a restart changed it while real users' salts stayed: now both are keyed with
    the server secret, created 0600 next to the passwd-file."""
    config = tmp_path / "pypop.toml"
    config.write_text("[limits]\nauth_failure_delay = 0\nauth_penalty_max = 0\n")
    salts = []
    for _ in range(2):
        with pypop_serve(tmp_path, {"alice": 1}, "-c", str(config)) as (port, _):
            salts.append((_salt_from(port, "alice"), _salt_from(port, "nobody")))
    assert salts[0] == salts[1]
    assert salts[0][0] != salts[0][1]
    secret = tmp_path / "passwd.secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert len(bytes.fromhex(secret.read_text())) == 32


async def test_scram_aborts_count_toward_the_limits(start_server: ServerStarter) -> None:
    """Issue 15 item 6: "*" after the server-first message was free (1,000 salt probes
    a second on one connection). Now an abort is a failed attempt: it raises the
    per-client penalty and counts toward max_auth_failures."""
    server = await start_server(max_auth_failures=3)
    c = await Client.connect(port_of(server))
    await c.line()
    for n, user in enumerate(["alice", "nobody", "bob"]):
        first = await c.cmd(b"AUTH SCRAM-SHA-256 " + b64(f"n,,n={user},r=abc") + b"\r\n")
        assert first.startswith(b"+ ")
        assert await c.cmd(b"*\r\n") == b"-ERR Authentication cancelled\r\n"
        assert server.context.penalty.level("127.0.0.1") == n + 1
    assert await c.eof()
    await c.aclose()


@pytest.mark.parametrize("nonce_length", [256, 322, 2000, 12000])
async def test_long_scram_nonce_is_refused(
    start_server: ServerStarter, caplog: pytest.LogCaptureFixture, nonce_length: int
) -> None:
    """Issue 15 item 8: a long client nonce made the server-first message pass 512
    octets. Now it is -ERR [AUTH], counted, the session goes on, nothing is logged
    with a traceback."""
    server = await start_server(max_auth_failures=2)
    c = await Client.connect(port_of(server))
    await c.line()
    assert await c.cmd(b"AUTH SCRAM-SHA-256\r\n") == b"+ \r\n"
    first = b64("n,,n=alice,r=" + "x" * nonce_length)
    assert await c.cmd(first + b"\r\n") == AUTH_FAILED
    assert await c.multiline(b"CAPA\r\n") != b""
    assert await c.cmd(b"AUTH SCRAM-SHA-256\r\n") == b"+ \r\n"
    first = b64("n,,n=alice,r=" + "y" * 255)  # 255 characters are still fine
    assert (await c.cmd(first + b"\r\n")).startswith(b"+ ")
    assert await c.cmd(b"*\r\n") == b"-ERR Authentication cancelled\r\n"
    assert await c.eof()  # the long nonce and the abort: two failures
    await c.aclose()
    no_tracebacks(caplog)


# ---- item 9: one reply per overlong SASL line ---------------------------------------


async def test_overlong_sasl_line_gets_one_err(
    start_server: ServerStarter, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server()
    c = await Client.connect(port_of(server))
    await c.line()
    assert await c.cmd(b"AUTH PLAIN\r\n") == b"+ \r\n"
    await c.send(b"A" * (1 << 20) + b"\r\nCAPA\r\n")
    assert await c.line() == b"-ERR Line too long\r\n"
    assert await c.line() == CAPA_OK
    while await c.line() != b".\r\n":
        pass
    assert await c.cmd(b"NOOP\r\n") == b"-ERR Command not valid in this state\r\n"
    await c.aclose()
    no_tracebacks(caplog)


# ---- item 13: numbers, counters, locks ----------------------------------------------------


async def test_padded_and_huge_numbers(
    start_server: ServerStarter, memory_backend: MemoryBackend
) -> None:
    server = await start_server()
    c = await login(port_of(server), "alice", "wonderland")
    message = sample_message("alice", 1)
    assert await c.cmd(b"LIST 000000000000000000001\r\n") == f"+OK 1 {len(message)}\r\n".encode()
    top = await c.multiline(b"TOP 1 999999999999999999999\r\n")
    assert top == b"+OK\r\n" + stuff(message)  # RFC 1939 §7: the whole message
    top3 = await c.multiline(b"TOP 1 00000000000000000000000000003\r\n")
    assert top3 == b"+OK\r\n" + stuff(message, 3)
    await c.aclose()


async def test_probing_for_extensions_is_not_cut_off(start_server: ServerStarter) -> None:
    """Bad commands are counted in a row (Dovecot): 19 unknown commands, then a good
    one, three times over, is 57 bad commands and no disconnection."""
    server = await start_server()
    c = await Client.connect(port_of(server))
    await c.line()
    for _ in range(3):
        await c.send(b"XTND XMIT\r\n" * 19)
        for _ in range(19):
            assert await c.line() == b"-ERR Unknown command\r\n"
        assert await c.multiline(b"CAPA\r\n") != b""
    assert await c.cmd(b"QUIT\r\n") == b"+OK Logging out\r\n"
    await c.aclose()


async def test_in_use_does_not_count_as_a_failed_login(start_server: ServerStarter) -> None:
    server = await start_server(max_auth_failures=2, lock_wait=0.0)
    holder = await login(port_of(server), "alice", "wonderland")
    c = await Client.connect(port_of(server))
    await c.line()
    for _ in range(4):
        assert await c.cmd(b"USER alice\r\n") == b"+OK\r\n"
        assert await c.cmd(b"PASS wonderland\r\n") == IN_USE
    assert await c.multiline(b"CAPA\r\n") != b""  # still connected
    await holder.aclose()
    await c.aclose()


class SlowRelease(MemoryBackend):
    """Releases a maildrop the way a backend with a thread hop or a remote lock does:
    not at once."""

    async def open_mailbox(self, user: str) -> Mailbox:
        box = await super().open_mailbox(user)
        assert isinstance(box, MemoryMailbox)
        release = box.release

        async def slow() -> None:
            await trio.sleep(0.2)
            await release()

        box.release = slow  # type: ignore[method-assign]
        return box


@pytest.fixture
def slow_backend() -> SlowRelease:
    backend = SlowRelease()
    backend.deliver("alice", sample_message("alice", 1))
    return backend


async def test_drop_and_reconnect_is_not_in_use(
    start_server: ServerStarter, slow_backend: SlowRelease
) -> None:
    """Issue 15 item 13: a client that drops its connection and logs in again at once
    waits (briefly) for its old session's lock instead of getting [IN-USE]."""
    server = await start_server(backend=slow_backend)
    for _ in range(3):
        old = await login(port_of(server), "alice", "wonderland")
        await old.aclose()  # no QUIT: the old session must notice, then release
        new = await login(port_of(server), "alice", "wonderland")
        assert await new.cmd(b"QUIT\r\n") == b"+OK Logging out\r\n"
        await new.aclose()


async def test_a_lock_that_stays_held_is_in_use_after_lock_wait(
    start_server: ServerStarter, slow_backend: SlowRelease
) -> None:
    server = await start_server(backend=slow_backend, lock_wait=0.5)
    holder = await login(port_of(server), "alice", "wonderland")
    c = await Client.connect(port_of(server))
    await c.line()
    await c.cmd(b"USER alice\r\n")
    start = trio.current_time()
    assert await c.cmd(b"PASS wonderland\r\n") == IN_USE
    assert 0.45 <= trio.current_time() - start < 3
    await holder.aclose()
    await c.aclose()


async def test_a_waiting_login_wakes_when_the_holder_lets_go(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A login that finds the maildrop locked by a session of this server wakes the
    moment that session lets go, not at its next poll; the Event it waits on is made
    by the waiter, so a session that nobody waits for holds none."""
    from pypop.errors import MailboxLocked
    from pypop.server.logins import MaildropHolders

    holders = MaildropHolders(10.0)
    hold = holders.hold("alice")
    assert holders._released["alice"].event is None  # (not narrowing hold.event)
    locked = True

    box = MemoryMailbox(MemoryBackend(), "alice", [], [])

    class Backend:
        async def open_mailbox(self, user: str) -> Mailbox:
            if locked:
                raise MailboxLocked(user)
            return box

    async def release_later() -> None:
        nonlocal locked
        await trio.sleep(0.3)  # between two polls (0.15 and 0.31 s)
        locked = False
        holders.let_go("alice", hold)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_later)
        opened = await holders.open(Backend(), "alice")  # type: ignore[arg-type]
    assert opened is box
    assert trio.current_time() - start == pytest.approx(0.3, abs=1e-6)
    assert hold.event is not None
    assert hold.event.is_set()
    assert "alice" not in holders._released


async def test_no_traceback_from_any_hostile_line(
    start_server: ServerStarter, caplog: pytest.LogCaptureFixture
) -> None:
    """A catalogue of the hostile lines above, one connection each: every reply is a
    well-formed line and the log holds no traceback."""
    server = await start_server(mechanisms=["SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5"])
    lines = [
        b"AUTH SCRAM-SHA-256 " + b64("n,,n=alice,r=" + "z" * 180) + b"\r\n",
        b"AUTH PLAIN " + b"=" * 240 + b"\r\n",
        b"AUTH CRAM-MD5 =\r\n",
        b"AUTH LOGIN " + b64("\x00" * 100) + b"\r\n",
        b"\xff" * 300 + b"\r\n",
        b"TOP 1 " + b"9" * 240 + b"\r\n",
        b"\r\n" * 19,
        # RFC 6856: language tags, UTF8 twice, names and passwords PRECIS refuses or
        # that are not UTF-8 at all, long UTF-8 names.
        b"LANG " + b"a-" * 120 + b"\r\nLANG \xff\xfe\r\nLANG *\r\n",
        b"UTF8\r\nUTF8\r\nLANG de\r\nLANG es-419\r\nFOO\r\nLANG en\r\n",
        b"USER \xc3\x28\r\nPASS \xff\xfe\r\n",
        "UTF8\r\nUSER {}\r\nPASS {}\r\n".format("ü" * 120, "ß" * 120).encode(),
        "USER jürgen\u202e\r\nPASS pässwörd\u0007\r\n".encode(),
        b"UTF8\r\nAUTH PLAIN " + b64("\x00\u1100\x00\ufffe") + b"\r\n",
    ]
    with caplog.at_level(logging.INFO):
        for line in lines:
            c = await Client.connect(port_of(server))
            await c.line()
            await c.send(line + b"QUIT\r\n")
            with trio.fail_after(10):
                while True:
                    reply = await c.line()
                    assert reply.startswith((b"+OK", b"-ERR", b"+ ")), reply
                    assert len(reply) <= 512
                    if reply == b"+OK Logging out\r\n":
                        break
            await c.aclose()
    no_tracebacks(caplog)
