"""Fenced leases: an owner frozen past its lease (SIGSTOP: a GC pause, a
frozen VM) and then resumed must not deliver alongside its successor.

Two daemons on one Redis, one api account each. Messages flow from api.a to
api.b while the owner of api.b is stopped for longer than ``LeaseSeconds``;
the other instance takes api.b over (a new fencing token) and the stopped one
is resumed with deliveries in flight. Each instance serves api.b on its own
port (as behind a load balancer), so the successor really delivers while the
stale owner is frozen holding its listener. Whatever the stale owner tries to
write with its old token is refused; over repeated cycles api.b receives
every message once, in order.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as sync_redis
from redis.asyncio import Redis

from bridge.bus import Bus, BusSettings
from bridge.delivery import DeliveryLoop, RetryPolicy
from bridge.idmap import Fenced, IdMap
from bridge.keys import lease_key
from bridge.lease import Lease
from bridge.metrics import Metrics
from tests.helpers import Daemon, RedisServer, api_pair_config, free_port, wait_for, wait_quiet
from tests.test_bus import LOG, RecordingAdapter, enqueue, make_delivery
from tests.test_scale_out import HEADERS_A, HEADERS_B, connected

PER_CYCLE = 150
STOP_AFTER = 40
CYCLES = 2


@pytest.fixture
def pair(
    tmp_path: Path, redis_server: RedisServer
) -> Iterator[tuple[dict[int, Daemon], int, tuple[int, int], sync_redis.Redis]]:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    path1, (pa, pb, http1) = api_pair_config(tmp_path / "one", redis_server.url)
    pb2, http2 = free_port(), free_port()
    path2, _ = api_pair_config(tmp_path / "two", redis_server.url, ports=(pa, pb2, http2))
    daemons = {
        http1: Daemon(path1, http1, tmp_path / "one.log").start(),
        http2: Daemon(path2, http2, tmp_path / "two.log").start(ready=False),
    }
    try:
        yield daemons, pa, (pb, pb2), client
    finally:
        for daemon in daemons.values():
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGCONT)
            daemon.stop()
        client.close()


def balanced(daemons: dict[int, Daemon]) -> bool:
    owned = [connected(port) for port in daemons]
    return sorted(len(o) for o in owned) == [1, 1] and owned[0] != owned[1]


def holder_pid(client: sync_redis.Redis, account: str) -> int | None:
    value = client.get(lease_key("tb", account))
    if value is None:
        return None
    return int(value.decode().rsplit("-", 2)[1])  # HOST-PID-RANDOM


class Receiver:
    """Polls api.b's buffer through every instance that may serve it."""

    def __init__(self, ports: tuple[int, ...]) -> None:
        self.urls = [f"http://127.0.0.1:{port}/api/messages" for port in ports]
        self.got: list[str] = []

    def poll(self) -> int:
        """Drain every instance's buffer; the count received so far."""
        for url in self.urls:
            try:
                # Polled only once the stale owner runs again. The read is destructive: a short
                # timeout would drop an answer the server already took its messages out for.
                resp = httpx.get(url, headers=HEADERS_B, timeout=10)
            except httpx.HTTPError:
                continue
            if resp.status_code == 200:
                self.got.extend(m["text"] for m in resp.json())
        return len(self.got)


def test_a_resumed_stale_owner_delivers_nothing_twice(pair) -> None:
    daemons, pa, pbs, client = pair
    receiver = Receiver(pbs)
    sent: list[str] = []
    for cycle in range(CYCLES):
        wait_for(lambda: balanced(daemons), timeout=60, interval=0.1, what="one account on each instance")
        pid = holder_pid(client, "api.b")
        [stale] = [d for d in daemons.values() if d.proc is not None and d.proc.pid == pid]
        [successor] = [d for d in daemons.values() if d is not stale]
        acked: list[str] = []

        def post_all(cycle: int = cycle, acked: list[str] = acked) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{pa}", headers=HEADERS_A, timeout=10) as http:
                for i in range(PER_CYCLE):
                    text = f"c{cycle}-m{i:03d}"
                    resp = http.post("/api/message", json={"text": text, "username": "alice", "gateway": "g"})
                    assert resp.status_code == 200, resp.text
                    acked.append(text)

        poster = threading.Thread(target=post_all)
        poster.start()
        wait_for(lambda acked=acked: len(acked) >= STOP_AFTER, interval=0.001, what="the first posts")
        assert stale.proc is not None and successor.proc is not None
        stale.proc.send_signal(signal.SIGSTOP)  # frozen with deliveries in flight
        try:
            wait_for(
                lambda successor=successor: holder_pid(client, "api.b") == successor.proc.pid,
                timeout=30,
                interval=0.05,
                what="the successor's lease on api.b",
            )
        finally:
            stale.proc.send_signal(signal.SIGCONT)  # resumes believing it still owns api.b
        poster.join(60)
        assert len(acked) == PER_CYCLE
        sent.extend(acked)
        wait_for(lambda: receiver.poll() >= len(sent), timeout=60, what="every message")
        # a late duplicate would arrive now; a window, as the stale owner's sends are in no order with the
        # successor's, so a sentinel the successor delivers would not come after them
        wait_quiet(receiver.poll, what="api.b's buffers")
        assert receiver.got == sent  # all, once each, in order
    assert all(d.proc is not None and d.proc.poll() is None for d in daemons.values())  # nobody crashed


async def test_a_stale_owner_sends_nothing_to_a_network_redis_cannot_fence(redis: Redis) -> None:
    """Talk's HTTP post cannot carry the fence: the loop checks its token
    right before the send, so a stale owner stops with nothing sent and the
    entry still pending for its successor (docs/talk-bot.md: the window left)."""
    lease = Lease(redis, "tb", "api.b", "old-owner", 5)
    assert await lease.acquire()
    stale = lease.fence
    await redis.incr(lease.fence_key)  # another instance's tenure began
    adapter = RecordingAdapter()
    await enqueue(redis, make_delivery("hello"))
    bus = Bus(redis, BusSettings())
    loop = DeliveryLoop(
        bus, IdMap(redis, "tb", 3600), adapter, "api.b", "old-owner", Metrics(), LOG,
        RetryPolicy(3, 0.01, 0.05), fence=lambda: stale,
    )  # fmt: skip
    with pytest.raises(Fenced):
        async with asyncio.timeout(15):
            await loop.run()
    assert adapter.calls == 0
    assert (await redis.xpending(bus.outbound("api.b"), "deliver"))["pending"] == 1
