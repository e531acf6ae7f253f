"""Crash safety: SIGKILL the daemon mid-stream, restart it, lose and repeat nothing.

1,000 messages are POSTed one after another; once 500 have been
acknowledged the daemon is killed with SIGKILL (routing and delivery are
still in flight then), restarted, and the rest are posted. Every
acknowledged message must come out of the other side exactly once and in
order. The one POST that may have been cut off by the kill is ambiguous to
its client (like any HTTP request): it may appear at most once, in its place.
Right after the kill the test reads the daemon's streams (the external Redis,
or a copy of the embedded one's append-only file) and requires work in flight
there, so a run that killed an idle daemon fails instead of passing; and a
sentinel posted last, not a quiet window, bounds the wait for a duplicate.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest
import redis as sync_redis

from bridge.keys import inbound_key, outbound_key
from tests.helpers import (
    Daemon,
    RedisServer,
    api_pair_config,
    has_sentinel,
    post_pair_sentinel,
    start_redis_server,
    through_sentinel,
    wait_for,
)

TOTAL = 1000
KILL_AFTER = 500
MAX_KILLS, KILL_STEP = 8, 15  # kill points tried until one finds work in flight


def post_all(base: str, start: int, stop: int, acked: list[int], ambiguous: list[int], halt: threading.Event) -> None:
    headers = {"Authorization": "Bearer token-a"}
    with httpx.Client(base_url=base, headers=headers, timeout=5) as client:
        for i in range(start, stop):
            if halt.is_set():
                return
            try:
                resp = client.post("/api/message", json={"text": f"m{i:04d}", "username": "alice", "gateway": "g"})
            except httpx.HTTPError:
                ambiguous.append(i)  # sent or not: the kill cut the connection
                return
            assert resp.status_code == 200, resp.text
            acked.append(i)


# The daemon's work queues (bridge/bus.py): api.a's inbound stream, read by the
# router group, and api.b's outbound stream, read by the deliver group.
QUEUES = ((inbound_key("tb", "api.a"), "router"), (outbound_key("tb", "api.b"), "deliver"))


def in_flight(redis_url: str) -> int:
    """Entries a consumer group has not finished: read and not acknowledged
    (pending), or not read yet. Redis 6.2 has no ``lag`` in XINFO GROUPS, so
    the unread ones are counted after the group's last-delivered-id."""
    client = sync_redis.Redis.from_url(redis_url)
    try:
        total = 0
        for stream, group in QUEUES:
            if not client.exists(stream):
                continue
            for info in client.xinfo_groups(stream):
                if info["name"].decode() == group:
                    last = info["last-delivered-id"].decode()
                    total += info["pending"] + len(client.xrange(stream, min="(" + last, max="+"))
        return total
    finally:
        client.close()


def in_flight_embedded(data_dir: Path, pid: int, scratch: Path) -> int:
    """``in_flight`` of an embedded Redis (process ``pid``, read before the
    kill: it removes its pidfile as it goes) that died with the daemon: its
    append-only file, copied, loaded by a redis-server of the test's own."""
    wait_for(lambda: not _alive(pid), what="the embedded redis-server gone with the daemon")
    copy = scratch / "data-at-the-kill"  # scratch: a new directory per kill
    shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("*.sock", "*.pid", "*.log"))
    server = start_redis_server(copy, None, "--appendonly", "yes")
    try:
        return in_flight(server.url)
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_crash(tmp_path: Path, redis_url: str | None, kill_after: int = KILL_AFTER) -> None:
    path, (pa, pb, http) = api_pair_config(tmp_path, redis_url, buffer=4000)
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    acked: list[int] = []
    ambiguous: list[int] = []
    halt = threading.Event()
    poster = threading.Thread()
    resume = 0
    try:
        # The daemon is dead after a kill: Redis holds what it was doing then.
        # Nothing there means an idle daemon was killed (a fast daemon keeps up
        # with one poster now and then): that kill proved nothing, so the run
        # goes on to the next kill point, and fails if no kill found work.
        for kill in range(MAX_KILLS):
            halt = threading.Event()
            args = (f"http://127.0.0.1:{pa}", resume, TOTAL, acked, ambiguous, halt)
            poster = threading.Thread(target=post_all, args=args)
            poster.start()
            target = kill_after + kill * KILL_STEP
            wait_for(lambda: len(acked) >= target, timeout=60, interval=0.001, what="acknowledged posts")  # noqa: B023
            if redis_url:
                daemon.kill()
                busy = in_flight(redis_url)
            else:
                pid = int((tmp_path / "data" / "redis.pid").read_text())
                daemon.kill()
                busy = in_flight_embedded(tmp_path / "data", pid, tmp_path / f"k{kill}")
            halt.set()
            poster.join(10)
            assert not poster.is_alive()
            daemon.start()
            resume = max(acked + ambiguous) + 1
            if busy:
                break
        else:
            raise AssertionError(f"nothing was in flight at any of {MAX_KILLS} kills: the crash tested nothing")
        post_all(f"http://127.0.0.1:{pa}", resume, TOTAL, acked, [], threading.Event())
        assert acked[-1] == TOTAL - 1

        received: list[str] = []
        headers = {"Authorization": "Bearer token-b"}

        def drain() -> int:
            resp = httpx.get(f"http://127.0.0.1:{pb}/api/messages", headers=headers, timeout=5)
            received.extend(m["text"] for m in resp.json())
            return len(received)

        wait_for(lambda: drain() >= len(acked), timeout=120, interval=0.05, what="every acknowledged message")
        # A straggler (a duplicate would be one) arrives before a sentinel posted last.
        received = through_sentinel(lambda: post_pair_sentinel(pa), lambda: (drain(), received)[1], has_sentinel)
        expected = [f"m{i:04d}" for i in sorted(acked + ambiguous)]
        got_ints = sorted(int(t[1:]) for t in received)
        assert len(received) == len(set(received)), "a message was delivered twice"
        assert received == sorted(received), "messages arrived out of order"
        assert set(acked) <= set(got_ints), f"lost: {sorted(set(acked) - set(got_ints))[:10]}"
        assert set(received) <= set(expected)
    finally:
        halt.set()
        poster.join(10)
        daemon.stop()


@pytest.mark.parametrize("kill_after", [137, KILL_AFTER, 863])
def test_sigkill_with_external_redis_loses_and_repeats_nothing(
    tmp_path: Path, redis_server: RedisServer, kill_after: int
) -> None:
    sync_redis.Redis.from_url(redis_server.url).flushall()
    run_crash(tmp_path, redis_server.url, kill_after)


def test_sigkill_with_embedded_redis_loses_and_repeats_nothing(tmp_path: Path) -> None:
    # The daemon's own Redis dies with it (PDEATHSIG) and comes back from its AOF.
    run_crash(tmp_path, None)
    assert (tmp_path / "data").is_dir()


def test_embedded_redis_killed_is_restarted_and_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL the daemon's own redis-server mid-stream: the daemon restarts it
    from its append-only file, answers 503 meanwhile, and carries on."""
    import os
    import signal
    import time

    path, (pa, pb, http) = api_pair_config(tmp_path, None, buffer=4000)
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    total, kill_after = 600, 300
    retried: set[int] = set()  # saw a 503: stored or not, the client cannot know
    try:
        pidfile = tmp_path / "data" / "redis.pid"
        first_pid = int(pidfile.read_text())
        with httpx.Client(base_url=f"http://127.0.0.1:{pa}", headers={"Authorization": "Bearer token-a"}) as client:
            for i in range(total):
                if i == kill_after:
                    os.kill(first_pid, signal.SIGKILL)
                deadline = time.monotonic() + 30
                while True:
                    resp = client.post("/api/message", json={"text": f"m{i:04d}", "gateway": "g"}, timeout=5)
                    if resp.status_code == 200:
                        break
                    assert resp.status_code == 503, resp.text
                    retried.add(i)
                    assert time.monotonic() < deadline, "the embedded Redis did not come back"
                    time.sleep(0.01)  # a client's retry pace, not synchronization
        assert int(pidfile.read_text()) != first_pid  # a new server, restarted by the daemon
        received: list[str] = []

        def drain() -> int:
            resp = httpx.get(f"http://127.0.0.1:{pb}/api/messages", headers={"Authorization": "Bearer token-b"})
            received.extend(m["text"] for m in resp.json())
            return len(received)

        wait_for(lambda: drain() >= total and len(set(received)) >= total, timeout=60, what="every message")
        # a late duplicate arrives before a sentinel posted last
        received = through_sentinel(lambda: post_pair_sentinel(pa), lambda: (drain(), received)[1], has_sentinel)
        indices = [int(t[1:]) for t in received]
        assert sorted(set(indices)) == list(range(total))  # nothing lost
        assert indices == sorted(indices)  # in order
        repeated = {i for i in indices if indices.count(i) > 1}
        assert repeated <= retried  # only a message whose POST failed can appear twice
    finally:
        daemon.stop()
