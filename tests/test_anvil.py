"""The anvil (pypop.server.anvil): one set of limits for every worker.

An AnvilServer and several AnvilClients ("workers") over real Unix socket pairs in
one Trio run: connection caps and per-IP caps count every worker's connections, the
penalty sees every worker's failures, auth slots are shared and granted in order,
and a worker that dies gives back what it held.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable

import pytest
import trio
import trio.testing

from pypop.auth import AuthPenalty
from pypop.server.anvil import AnvilClient, AnvilServer
from pypop.server.limits import ConnectionLimits
from pypop.server.listeners import Peer

KEY = b"k" * 32


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError("condition not met in 5 s")


class Cluster:
    def __init__(self, nursery: trio.Nursery, anvil: AnvilServer) -> None:
        self.nursery = nursery
        self.anvil = anvil
        self.lost: list[int] = []

    def worker(self) -> tuple[AnvilClient, socket.socket]:
        ours, theirs = socket.socketpair()
        self.nursery.start_soon(self.anvil.serve, ours)
        client = AnvilClient(theirs, fingerprint_key=KEY, failure_delay=2.0, max_delay=15.0)
        n = len(self.lost)
        self.lost.append(0)

        def on_lost() -> None:
            self.lost[n] += 1

        self.nursery.start_soon(client.run, on_lost)
        return client, theirs


@pytest.fixture
async def cluster(nursery: trio.Nursery) -> AsyncIterator[Cluster]:
    anvil = AnvilServer(
        ConnectionLimits(5, 2), AuthPenalty(clock=trio.current_time, key=KEY), per_client=2
    )
    yield Cluster(nursery, anvil)
    nursery.cancel_scope.cancel()


async def test_connection_caps_hold_across_workers(cluster: Cluster) -> None:
    (a, _), (b, _), (c, _) = cluster.worker(), cluster.worker(), cluster.worker()
    ip = Peer("192.0.2.7")
    assert await a.open(ip) is None
    assert await b.open(ip) is None
    assert await c.open(ip) == "max_connections_per_ip"
    # IPv6: one /64 is one client, whichever worker it reaches.
    assert await a.open(Peer("2001:db8::1")) is None
    assert await b.open(Peer("2001:db8::ffff")) is None
    assert await c.open(Peer("2001:db8::2")) == "max_connections_per_ip"
    assert await c.open(Peer("198.51.100.1")) is None  # 5: the server's cap
    assert await c.open(Peer("198.51.100.2")) == "max_connections"
    a.close(ip)
    await a.status(ip.host)  # one-way messages are ordered per worker: now it is done
    assert await c.open(ip) is None


async def test_the_penalty_sees_failures_from_every_worker(cluster: Cluster) -> None:
    workers = [cluster.worker()[0] for _ in range(4)]
    for n in range(50):
        assert await workers[n % 4].failure("192.0.2.7", "alice", f"guess-{n}") == 2.0
    status = await workers[0].status("192.0.2.7")
    assert status["level"] == 50
    # What the 51st attempt meets on any worker: the maximum.
    for w in workers:
        async with w.auth("192.0.2.7") as wait:
            assert wait == 15.0
    # An identical retry (same user and password) does not raise it, on any worker.
    await workers[1].failure("192.0.2.7", "alice", "guess-49")
    assert (await workers[2].status("192.0.2.7"))["level"] == 50
    workers[3].success("192.0.2.7")
    assert (await workers[3].status("192.0.2.7"))["level"] == 0


async def test_auth_slots_are_shared_and_granted_in_order(cluster: Cluster) -> None:
    a, _ = cluster.worker()
    b, _ = cluster.worker()
    order: list[str] = []
    release = [trio.Event() for _ in range(4)]

    async def attempt(client: AnvilClient, n: int) -> None:
        async with client.auth("192.0.2.7") as wait:
            assert wait == 0.0
            order.append(f"{n}")
            await release[n].wait()

    async with trio.open_nursery() as nursery:
        for n, client in enumerate([a, b, a, b]):
            nursery.start_soon(attempt, client, n)
            await trio.testing.wait_all_tasks_blocked()
        assert order == ["0", "1"]  # max_auth_per_client = 2, whichever worker asks
        assert (await a.status("192.0.2.7"))["auth"] == 2
        release[1].set()  # b's slot goes to the first in line: a's third attempt
        await until(lambda: len(order) >= 3)
        assert order == ["0", "1", "2"]
        for event in release:
            event.set()
    assert sorted(order) == ["0", "1", "2", "3"]
    await b.status("192.0.2.7")  # b's one-way releases are in before this answer
    assert (await a.status("192.0.2.7"))["auth"] == 0


async def test_a_dead_worker_gives_back_what_it_held(cluster: Cluster) -> None:
    a, a_sock = cluster.worker()
    b, _ = cluster.worker()
    ip = Peer("192.0.2.7")
    assert await a.open(ip) is None
    assert await a.open(ip) is None
    held = trio.Event()

    async def hold_slots() -> None:
        async with a.auth(ip.host), a.auth(ip.host):
            held.set()
            await trio.sleep_forever()

    granted: list[float] = []

    async def wait_for_slot() -> None:
        async with b.auth(ip.host) as wait:
            granted.append(wait)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold_slots)
        await held.wait()
        nursery.start_soon(wait_for_slot)
        await trio.testing.wait_all_tasks_blocked()
        assert granted == []
        a_sock.close()  # the worker dies
        await until(lambda: bool(granted))
        nursery.cancel_scope.cancel()
    assert await b.open(ip) is None  # a's two connections were released
    assert await b.open(ip) is None
    assert (await b.status(ip.host))["connections"] == 2


async def test_a_cancelled_wait_returns_its_slot(cluster: Cluster) -> None:
    a, _ = cluster.worker()
    async with a.auth("192.0.2.7"), a.auth("192.0.2.7"):
        with trio.move_on_after(0.05):
            async with a.auth("192.0.2.7"):
                pytest.fail("a third slot")
    for _ in range(500):
        if not (await a.status("192.0.2.7"))["auth"]:
            break
        await trio.sleep(0.01)
    assert not (await a.status("192.0.2.7"))["auth"]


async def test_without_the_anvil_a_worker_refuses_and_assumes_the_worst(
    cluster: Cluster,
) -> None:
    a, _ = cluster.worker()
    ours, theirs = socket.socketpair()
    lonely = AnvilClient(theirs, fingerprint_key=KEY, failure_delay=2.0, max_delay=15.0)
    lost = trio.Event()
    cluster.nursery.start_soon(lonely.run, lost.set)
    ours.close()
    with trio.fail_after(5):
        await lost.wait()
    assert await lonely.open(Peer("192.0.2.7")) == "shutting_down"
    async with lonely.auth("192.0.2.7") as wait:
        assert wait == 15.0
    assert await a.open(Peer("192.0.2.7")) is None  # the others are unaffected


async def test_no_password_crosses_the_socket(nursery: trio.Nursery) -> None:
    """What a worker sends for a failure: the client key and a keyed fingerprint."""
    ours, theirs = socket.socketpair()
    client = AnvilClient(theirs, fingerprint_key=KEY, failure_delay=2.0, max_delay=15.0)
    nursery.start_soon(client.run, lambda: None)
    nursery.start_soon(client.failure, "2001:db8::7", "alice", "hunter2-secret")
    await trio.testing.wait_all_tasks_blocked()
    line = ours.recv(4096)
    assert line.startswith(b"F 1 2001:db8::/64 ")
    assert b"hunter2" not in line
    assert b"alice" not in line
    assert len(line.split()[3]) == 32  # 16-octet fingerprint in hex
    ours.close()
