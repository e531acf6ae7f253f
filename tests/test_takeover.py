"""Takeover in seconds: two real daemons on one Redis, one api account each,
``LeaseSeconds = 30`` — so a takeover sooner than that is the heartbeats'
doing (bridge/lease.py, Liveness), never a lease that expired.

- the owner of api.b is SIGKILLed mid-stream: the survivor connects api.b
  well within a lease and delivers every acknowledged message once, in order;
- the owner is frozen (SIGSTOP) past the takeover window, its successor takes
  over, and it is resumed with deliveries in flight: it delivers nothing twice
  (its token is stale: bridge/idmap.py's tb_fenced);
- the owner stops (SIGTERM): the survivor takes api.b at its next beat;
- Redis goes away for longer than the takeover window with both daemons
  alive (every alive key lapses at once) and comes back: no account changes
  owner.

Each instance serves api.b on its own port (as behind a load balancer), so a
successor really delivers while the other holds its listener.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as sync_redis

from bridge.keys import alive_key, fence_key, lease_key
from tests.helpers import (
    ConfigToml,
    Daemon,
    RedisServer,
    free_port,
    has_sentinel,
    post_pair_sentinel,
    start_redis_server,
    through_sentinel,
    wait_for,
    wait_quiet,
)
from tests.test_fencing import Receiver, balanced, holder_pid
from tests.test_scale_out import HEADERS_A, connected

LEASE = 30  # seconds: far longer than any wait below
TAKEOVER = 3  # the default
TOTAL = 300
KILL_AFTER = 100
OUTAGE = 4.0  # seconds Redis is away: longer than TakeoverSeconds (1 in that test), far shorter than the lease

Pair = tuple[dict[int, Daemon], int, tuple[int, int], sync_redis.Redis]


def pair_config(directory: Path, redis_url: str, ports: tuple[int, int, int], takeover: float) -> Path:
    a, b, http = ports
    config = ConfigToml().general()
    config.api("a", a, "token-a", Buffer=1000).api("b", b, "token-b", Buffer=1000)
    config.gateway("g", ("api.a", "api"), ("api.b", "api"))
    config.daemon(redis_url, http, LeaseSeconds=LEASE, TakeoverSeconds=takeover)
    return config.write(directory / "talkbridge.toml")


def start_pair(tmp_path: Path, redis_url: str, takeover: float) -> tuple[dict[int, Daemon], int, tuple[int, int]]:
    """Two instances: the first takes both accounts and hands one to the second."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    pa, pb1, pb2, http1, http2 = (free_port() for _ in range(5))
    path1 = pair_config(tmp_path / "one", redis_url, (pa, pb1, http1), takeover)
    path2 = pair_config(tmp_path / "two", redis_url, (pa, pb2, http2), takeover)
    daemons = {
        http1: Daemon(path1, http1, tmp_path / "one.log").start(),
        http2: Daemon(path2, http2, tmp_path / "two.log").start(ready=False),
    }
    return daemons, pa, (pb1, pb2)


def stop_all(daemons: dict[int, Daemon]) -> None:
    for daemon in daemons.values():
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGCONT)
        daemon.stop()


@pytest.fixture
def pair(tmp_path: Path, redis_server: RedisServer) -> Iterator[Pair]:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    daemons, pa, pbs = start_pair(tmp_path, redis_server.url, TAKEOVER)
    try:
        # the shed comes at the first instance's renewal and the take at the second's poll (a third of the lease each)
        wait_for(lambda: balanced(daemons), timeout=60, interval=0.1, what="one account on each instance")
        yield daemons, pa, pbs, client
    finally:
        stop_all(daemons)
        client.close()


def owner_and_other(daemons: dict[int, Daemon], client: sync_redis.Redis, account: str) -> tuple[Daemon, Daemon]:
    pid = holder_pid(client, account)
    [owner] = [d for d in daemons.values() if d.proc is not None and d.proc.pid == pid]
    [other] = [d for d in daemons.values() if d is not owner]
    return owner, other


def post_in_background(pa: int, texts: list[str], acked: list[str]) -> threading.Thread:
    def post_all() -> None:
        # api.a's owner survives: every POST is answered; none is ambiguous.
        with httpx.Client(base_url=f"http://127.0.0.1:{pa}", headers=HEADERS_A, timeout=10) as http:
            for text in texts:
                resp = http.post("/api/message", json={"text": text, "username": "alice", "gateway": "g"})
                assert resp.status_code == 200, resp.text
                acked.append(text)

    poster = threading.Thread(target=post_all)
    poster.start()
    return poster


def all_once_in_order(receiver: Receiver, pa: int, sent: list[str]) -> list[str]:
    wait_for(lambda: receiver.poll() >= len(sent), timeout=60, what="every message at api.b")
    # a late duplicate from the api.b queue arrives before a sentinel posted last
    return through_sentinel(lambda: post_pair_sentinel(pa), lambda: (receiver.poll(), receiver.got)[1], has_sentinel)


def test_a_killed_owner_is_replaced_long_before_its_lease_expires(pair: Pair) -> None:
    daemons, pa, pbs, client = pair
    owner, survivor = owner_and_other(daemons, client, "api.b")
    dead_id = client.get(lease_key("tb", "api.b")).decode()
    sent = [f"m{i:03d}" for i in range(TOTAL)]
    acked: list[str] = []
    poster = post_in_background(pa, sent, acked)
    wait_for(lambda: len(acked) >= KILL_AFTER, interval=0.001, what="the first posts")
    owner.kill()  # deliveries to api.b in flight; its lease has up to 30 s to run
    # a bound, not a timing claim: half the lease, so only the heartbeats can explain a takeover
    wait_for(lambda: "api.b" in connected(survivor.http_port), timeout=LEASE / 2, interval=0.05, what="takeover")
    poster.join(60)
    assert acked == sent
    got = all_once_in_order(Receiver(pbs), pa, sent)
    assert got == sent  # all, once each, in order
    metrics = httpx.get(f"http://127.0.0.1:{survivor.http_port}/metrics", timeout=5).text
    assert 'talkbridge_lease_takeovers_total{account="api.b"} 1.0' in metrics.splitlines()
    assert f"api.b: instance {dead_id} has not beaten for 3s: taking its lease over" in survivor.log()


def test_a_resumed_stale_owner_delivers_nothing_twice_after_a_takeover(pair: Pair) -> None:
    daemons, pa, pbs, client = pair
    stale, successor = owner_and_other(daemons, client, "api.b")
    assert stale.proc is not None and successor.proc is not None
    fence_before = int(client.get(fence_key("tb", "api.b")))
    sent = [f"m{i:03d}" for i in range(TOTAL)]
    acked: list[str] = []
    poster = post_in_background(pa, sent, acked)
    wait_for(lambda: len(acked) >= KILL_AFTER, interval=0.001, what="the first posts")
    stale.proc.send_signal(signal.SIGSTOP)  # frozen with deliveries in flight, holding a 30 s lease
    try:
        wait_for(
            lambda: holder_pid(client, "api.b") == successor.proc.pid,
            timeout=LEASE / 2,
            interval=0.05,
            what="the successor's lease on api.b",
        )
    finally:
        stale.proc.send_signal(signal.SIGCONT)  # resumes believing it still owns api.b
    assert int(client.get(fence_key("tb", "api.b"))) > fence_before  # a new tenure: the stale token is refused
    poster.join(60)
    assert acked == sent
    got = all_once_in_order(Receiver(pbs), pa, sent)
    assert got == sent  # all, once each, in order
    wait_for(lambda: "api.b: lease lost" in stale.log(), what="the stale owner stopping api.b")
    assert stale.proc.poll() is None and successor.proc.poll() is None  # nobody crashed


def test_a_stopped_owner_hands_its_account_over_at_once(pair: Pair) -> None:
    """SIGTERM: the owner hands its leases back and leaves the instances set;
    the survivor's next beat sees it gone and wakes its idle runners, rather
    than their next poll (a third of the lease: 10 s here) after the next
    count of the live instances."""
    daemons, pa, pbs, client = pair
    owner, survivor = owner_and_other(daemons, client, "api.b")
    assert owner.stop() == 0
    wait_for(lambda: "api.b" in connected(survivor.http_port), timeout=LEASE / 6, interval=0.05, what="the handover")
    got = all_once_in_order(Receiver(pbs), pa, [])
    assert got == []
    assert "taking its lease over" not in survivor.log()  # handed over, not taken


def redis_state(port: int) -> str:
    try:
        return str(httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).json().get("redis"))
    except httpx.HTTPError:
        return "no answer"


def test_a_redis_outage_longer_than_the_takeover_window_moves_no_account(tmp_path: Path) -> None:
    """Every alive key lapses at once while Redis is away; back, each instance
    judges nobody until its own beats have held for a window (bridge/lease.py),
    by when the other has beaten too."""
    port = free_port()
    data = tmp_path / "redis"
    data.mkdir()
    persistent = ("--appendonly", "yes", "--appendfsync", "always")  # the leases outlive the restart
    server = start_redis_server(data, port, *persistent)
    client = sync_redis.Redis(port=port)
    daemons, _, _ = start_pair(tmp_path, f"redis://127.0.0.1:{port}/0", takeover=1)
    try:
        wait_for(lambda: balanced(daemons), timeout=60, interval=0.1, what="one account on each instance")
        accounts = ("api.a", "api.b")

        def ownership() -> list[tuple[bytes | None, bytes | None]]:
            return [(client.get(lease_key("tb", a)), client.get(fence_key("tb", a))) for a in accounts]

        before = ownership()
        instances = [holder.decode() for holder, _ in before if holder is not None]
        assert len(set(instances)) == 2
        server.stop()
        wait_for(
            lambda: all(redis_state(p).startswith("unreachable") for p in daemons),
            what="both daemons seeing Redis gone",
        )
        time.sleep(OUTAGE)  # the outage itself (what is tested), not a wait for something to happen
        server = start_redis_server(data, port, *persistent)
        wait_for(
            lambda: all(client.exists(alive_key("tb", i)) for i in instances), timeout=30, what="both beating again"
        )
        # a wrong takeover would come within a window or two of the restart: watch three
        after = wait_quiet(ownership, quiet=3.0, what="the leases")
        assert after == before  # same owners, same tenures
        for daemon in daemons.values():
            assert "taking its lease over" not in daemon.log()
        assert sorted(a for d in daemons for a in connected(d)) == list(accounts)
    finally:
        stop_all(daemons)
        client.close()
        server.stop()
