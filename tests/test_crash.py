"""Crash safety: SIGKILL the daemon mid-stream, restart it, lose and repeat nothing.

1,000 messages are POSTed one after another; once 500 have been
acknowledged the daemon is killed with SIGKILL (routing and delivery are
still in flight then), restarted, and the rest are posted. Every
acknowledged message must come out of the other side exactly once and in
order. The one POST that may have been cut off by the kill is ambiguous to
its client (like any HTTP request): it may appear at most once, in its place.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from tests.helpers import Daemon, RedisServer, api_pair_config, wait_for, wait_quiet

TOTAL = 1000
KILL_AFTER = 500


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


def run_crash(tmp_path: Path, redis_url: str | None, kill_after: int = KILL_AFTER) -> None:
    path, (pa, pb, http) = api_pair_config(tmp_path, redis_url, buffer=4000)
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    acked: list[int] = []
    ambiguous: list[int] = []
    halt = threading.Event()
    poster = threading.Thread(target=post_all, args=(f"http://127.0.0.1:{pa}", 0, TOTAL, acked, ambiguous, halt))
    poster.start()
    try:
        wait_for(lambda: len(acked) >= kill_after, timeout=60, interval=0.001, what="acknowledged posts")
        daemon.kill()
        halt.set()
        poster.join(10)
        assert not poster.is_alive()
        daemon.start()
        resume = (ambiguous[-1] if ambiguous else acked[-1]) + 1
        post_all(f"http://127.0.0.1:{pa}", resume, TOTAL, acked, [], threading.Event())
        assert acked[-1] == TOTAL - 1

        received: list[str] = []
        headers = {"Authorization": "Bearer token-b"}

        def drain() -> int:
            resp = httpx.get(f"http://127.0.0.1:{pb}/api/messages", headers=headers, timeout=5)
            received.extend(m["text"] for m in resp.json())
            return len(received)

        wait_for(lambda: drain() >= len(acked), timeout=120, interval=0.05, what="every acknowledged message")
        # Let any straggler (a duplicate would be one) arrive before judging.
        wait_quiet(drain, what="api.b's buffer")
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
    import redis as sync_redis

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
        wait_quiet(drain, what="api.b's buffer")  # a late duplicate would arrive now
        indices = [int(t[1:]) for t in received]
        assert sorted(set(indices)) == list(range(total))  # nothing lost
        assert indices == sorted(indices)  # in order
        repeated = {i for i in indices if indices.count(i) > 1}
        assert repeated <= retried  # only a message whose POST failed can appear twice
    finally:
        daemon.stop()
