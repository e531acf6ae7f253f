"""Two daemons on one Redis: accounts spread over them, per-room order holds,
and the survivor takes over everything when one is killed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as sync_redis

from tests.helpers import (
    Daemon,
    RedisServer,
    api_pair_config,
    free_port,
    has_sentinel,
    post_pair_sentinel,
    through_sentinel,
    wait_for,
)

HEADERS_A = {"Authorization": "Bearer token-a"}
HEADERS_B = {"Authorization": "Bearer token-b"}
TOTAL = 300
KILL_AFTER = 100


def states(port: int) -> dict[str, str]:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).json().get("accounts", {})
    except httpx.HTTPError:
        return {}


def connected(port: int) -> list[str]:
    return [account for account, state in states(port).items() if state == "connected"]


@pytest.fixture
def pair(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[dict[int, Daemon], int, int]]:
    """Two instances, balanced: each owns one of the two api accounts."""
    sync_redis.Redis.from_url(redis_server.url).flushall()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    path1, (pa, pb, http1) = api_pair_config(tmp_path / "one", redis_server.url)
    http2 = free_port()
    path2, _ = api_pair_config(tmp_path / "two", redis_server.url, ports=(pa, pb, http2))
    daemons = {
        http1: Daemon(path1, http1, tmp_path / "one.log").start(),
        http2: Daemon(path2, http2, tmp_path / "two.log").start(ready=False),
    }
    try:
        # The first instance took both; it hands one to the newcomer.
        wait_for(
            lambda: len(connected(http1)) == 1 and len(connected(http2)) == 1 and connected(http1) != connected(http2),
            timeout=30,
            interval=0.1,
            what="one account on each instance",
        )
        yield daemons, pa, pb
    finally:
        for daemon in daemons.values():
            daemon.stop()


def test_order_and_exactly_once_across_a_killed_delivery_owner(pair) -> None:
    daemons, pa, pb = pair
    [b_owner] = [port for port in daemons if connected(port) == ["api.b"]]
    [survivor] = [port for port in daemons if port != b_owner]
    acked: list[int] = []

    def post_all() -> None:
        # api.a's owner survives: every POST is answered; none is ambiguous.
        with httpx.Client(base_url=f"http://127.0.0.1:{pa}", headers=HEADERS_A, timeout=10) as client:
            for i in range(TOTAL):
                resp = client.post("/api/message", json={"text": f"m{i:03d}", "username": "alice", "gateway": "g"})
                assert resp.status_code == 200, resp.text
                acked.append(i)

    poster = threading.Thread(target=post_all)
    poster.start()
    wait_for(lambda: len(acked) >= KILL_AFTER, interval=0.001, what="the first posts")
    daemons[b_owner].kill()  # delivery to api.b is in flight now
    poster.join(60)
    assert len(acked) == TOTAL
    # The survivor takes api.b over once its lease expires, and delivers the rest.
    wait_for(lambda: sorted(connected(survivor)) == ["api.a", "api.b"], timeout=30, interval=0.1, what="takeover")
    received: list[str] = []

    def drain() -> int:
        received.extend(m["text"] for m in httpx.get(f"http://127.0.0.1:{pb}/api/messages", headers=HEADERS_B).json())
        return len(received)

    wait_for(lambda: drain() >= TOTAL, timeout=60, interval=0.05, what="every message at api.b")
    # a late duplicate arrives before a sentinel posted last
    received = through_sentinel(lambda: post_pair_sentinel(pa), lambda: (drain(), received)[1], has_sentinel)
    assert received == [f"m{i:03d}" for i in range(TOTAL)]  # all, once each, in order


def test_survivor_takes_over_the_sending_side_too(pair) -> None:
    daemons, pa, pb = pair
    [a_owner] = [port for port in daemons if connected(port) == ["api.a"]]
    [survivor] = [port for port in daemons if port != a_owner]
    before = httpx.post(
        f"http://127.0.0.1:{pa}/api/message", json={"text": "before", "gateway": "g"}, headers=HEADERS_A
    )
    assert before.status_code == 200
    daemons[a_owner].kill()
    daemons[survivor].wait_ready(timeout=30)  # both accounts connected on the survivor
    after = httpx.post(f"http://127.0.0.1:{pa}/api/message", json={"text": "after", "gateway": "g"}, headers=HEADERS_A)
    assert after.status_code == 200
    got: list[str] = []

    def drain() -> int:
        got.extend(m["text"] for m in httpx.get(f"http://127.0.0.1:{pb}/api/messages", headers=HEADERS_B).json())
        return len(got)

    wait_for(lambda: drain() >= 2, timeout=30, what="messages through the new owner")
    got = through_sentinel(lambda: post_pair_sentinel(pa), lambda: (drain(), got)[1], has_sentinel)
    assert got == ["before", "after"]
