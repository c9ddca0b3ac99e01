"""Abuse control: failure penalties, LOGIN-DELAY, per-client fairness."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from pypop.auth import AuthPenalty, LoginDelay, PerClientLimiter, client_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_client_key() -> None:
    assert client_key("192.0.2.1") == "192.0.2.1"
    assert client_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2::99") == client_key("2001:db8:1:2:ffff::1")
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("unix-socket") == "unix-socket"


def test_penalty_grows_2_4_8_15() -> None:
    clock = Clock()
    p = AuthPenalty(clock=clock)
    assert p.delay("192.0.2.1") == 0
    delays = []
    for i in range(6):
        assert p.record_failure("192.0.2.1", "alice", f"guess{i}") == 2.0  # before -ERR
        delays.append(p.delay("192.0.2.1"))
    assert delays == [2, 4, 8, 15, 15, 15]
    assert p.delay("192.0.2.2") == 0  # other clients are not affected


def test_same_wrong_password_does_not_raise_it() -> None:
    p = AuthPenalty(clock=Clock())
    for _ in range(10):
        p.record_failure("192.0.2.1", "alice", "stale-password")
    assert p.level("192.0.2.1") == 1
    p.record_failure("192.0.2.1", "alice", "another")
    assert p.level("192.0.2.1") == 2
    p.record_failure("192.0.2.1", "alice", "stale-password")  # still remembered
    assert p.level("192.0.2.1") == 2
    # Same password against another user is a new attempt (password spraying).
    p.record_failure("192.0.2.1", "bob", "stale-password")
    assert p.level("192.0.2.1") == 3
    # Mechanisms that do not show the secret count every failure.
    p.record_failure("192.0.2.1", "bob", None)
    p.record_failure("192.0.2.1", "bob", None)
    assert p.level("192.0.2.1") == 5


def test_only_fingerprints_are_kept() -> None:
    p = AuthPenalty(clock=Clock(), key=b"k" * 32)
    p.record_failure("192.0.2.1", "alice", "hunter2")
    entry = p._clients["192.0.2.1"]
    assert all(len(fp) == 16 for fp in entry.fingerprints)
    assert b"hunter2" not in b"".join(entry.fingerprints)
    assert "hunter2" not in repr(entry)


def test_success_resets_and_time_decays() -> None:
    clock = Clock()
    p = AuthPenalty(clock=clock, decay_after=300)
    for i in range(4):
        p.record_failure("192.0.2.1", "a", str(i))
    assert p.delay("192.0.2.1") == 15
    p.record_success("192.0.2.1")
    assert p.delay("192.0.2.1") == 0
    for i in range(4):
        p.record_failure("192.0.2.1", "a", str(i))
    clock.now += 299
    assert p.level("192.0.2.1") == 4
    clock.now += 1
    assert p.level("192.0.2.1") == 3
    clock.now += 600
    assert p.level("192.0.2.1") == 1
    clock.now += 300
    assert p.level("192.0.2.1") == 0
    assert len(p) == 0  # forgotten


def test_penalty_memory_is_bounded() -> None:
    p = AuthPenalty(clock=Clock(), max_clients=100)
    for i in range(1000):
        p.record_failure(f"10.0.{i // 256}.{i % 256}", "u", None)
    assert len(p) == 100
    assert p.level("10.0.3.231") == 1  # the newest are kept
    assert p.level("10.0.0.0") == 0


def test_ipv6_neighbours_share_a_penalty() -> None:
    p = AuthPenalty(clock=Clock())
    p.record_failure("2001:db8::1", "u", None)
    p.record_failure("2001:db8::2", "u", None)
    assert p.delay("2001:db8::ffff") == 4


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        AuthPenalty(initial_delay=20, max_delay=15)
    with pytest.raises(ValueError):  # noqa: PT011
        LoginDelay(-1)
    with pytest.raises(ValueError):  # noqa: PT011
        PerClientLimiter(0)


async def test_penalty_with_trio_autojump_clock(autojump_clock: trio.testing.MockClock) -> None:
    """A session-shaped loop: the attacker's attempts slow down, a neighbour's do not."""
    p = AuthPenalty(clock=trio.current_time)
    limiter = PerClientLimiter(per_client=1)

    async def attempt(ip: str, password: str, correct: str) -> tuple[bool, float]:
        start = trio.current_time()
        async with limiter.slot(ip):
            await trio.sleep(p.delay(ip))
            ok = password == correct
            if ok:
                p.record_success(ip)
            else:
                await trio.sleep(p.record_failure(ip, "alice", password))
        return ok, trio.current_time() - start

    took = [(await attempt("198.51.100.7", f"guess{i}", "x"))[1] for i in range(5)]
    assert took == [2, 4, 6, 10, 17]  # wait(level) + 2 s before each -ERR
    ok, neighbour = await attempt("198.51.100.8", "x", "x")
    assert ok
    assert neighbour == 0
    # Parallel connections from the attacker queue behind one another (per_client=1).
    results: list[float] = []

    async def run(i: int) -> None:
        results.append((await attempt("198.51.100.7", f"p{i}", "x"))[1])

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(run, i)
    assert trio.current_time() - start == 3 * 17
    assert len(limiter) == 0


def test_login_delay() -> None:
    clock = Clock()
    d = LoginDelay(60, per_user={"vip": 0}, clock=clock)
    assert d.varies_per_user
    assert d.seconds_for("alice") == 60
    assert d.try_login("alice") == 0
    clock.now += 10
    assert d.try_login("alice") == 50
    assert d.remaining("alice") == 50
    assert d.try_login("bob") == 0  # per user
    assert d.try_login("vip") == 0
    assert d.try_login("vip") == 0
    clock.now += 50
    assert d.try_login("alice") == 0
    clock.now += 59
    assert d.remaining("alice") == 1


def test_login_delay_zero_records_nothing() -> None:
    """LOGIN-DELAY 0 (the default) keeps no entry per login; a user database's own
    delay for one user still applies, counted from that user's first login under it."""
    clock = Clock()
    d = LoginDelay(0, clock=clock)
    for i in range(100):
        assert d.try_login(f"u{i}") == 0
    assert len(d) == 0
    assert d.try_login("z", 0) == 0
    assert d.try_login("z", 60) == 0  # the first login under a delay
    assert len(d) == 1
    clock.now += 15
    assert d.try_login("z", 60) == 45
    assert d.try_login("z", 0) == 0  # the database dropped it
    assert d.try_login("y") == 0
    assert len(d) == 1


def test_login_delay_memory() -> None:
    clock = Clock()
    d = LoginDelay(60, clock=clock, max_users=10)
    for i in range(50):
        d.try_login(f"u{i}")
    assert len(d) == 10
    clock.now += 61
    d.try_login("late")
    assert len(d) == 1  # expired entries are dropped


async def test_per_client_limiter_counts(autojump_clock: trio.testing.MockClock) -> None:
    limiter = PerClientLimiter(per_client=2)
    inside = 0
    peak = 0

    async def work(ip: str) -> None:
        nonlocal inside, peak
        async with limiter.slot(ip):
            inside += 1
            peak = max(peak, inside)
            await trio.sleep(1)
            inside -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(work, "203.0.113.5")
        await trio.sleep(0.5)
        assert limiter.active("203.0.113.5") == 6
    assert peak == 2
    assert len(limiter) == 0
    assert limiter.active("203.0.113.5") == 0


async def test_per_client_limiter_hands_slots_over_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Waiters get a released slot in the order they came; a waiter cancelled while
    it waits takes no slot with it; a free slot is taken without a schedule point."""
    limiter = PerClientLimiter(per_client=1)
    ip = "198.51.100.9"
    order: list[str] = []

    async def attempt(name: str, hold: float) -> None:
        async with limiter.slot(ip):
            order.append(name)
            await trio.sleep(hold)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(attempt, "first", 1)
        await trio.sleep(0.1)
        nursery.start_soon(attempt, "second", 1)
        await trio.sleep(0.1)
        cancelled = trio.CancelScope()

        async def impatient() -> None:
            with cancelled:
                await attempt("impatient", 1)

        nursery.start_soon(impatient)
        await trio.sleep(0.1)
        nursery.start_soon(attempt, "third", 1)
        await trio.sleep(0.1)
        assert limiter.active(ip) == 4
        cancelled.cancel()  # leaves the queue without a slot
        await trio.sleep(0.1)
        assert limiter.active(ip) == 3
    assert order == ["first", "second", "third"]
    assert len(limiter) == 0

    # A free slot: no other task runs while it is taken.
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        async with limiter.slot(ip):
            assert ran == []
    assert ran == ["other"]
