"""Two daemons on one Redis: accounts spread over them, and the survivor takes
over everything when one is killed."""

from __future__ import annotations

from pathlib import Path

import httpx
import redis as sync_redis

from tests.helpers import Daemon, RedisServer, api_pair_config, free_port, wait_for


def test_second_instance_takes_over_a_killed_owner(tmp_path: Path, redis_server: RedisServer) -> None:
    sync_redis.Redis.from_url(redis_server.url).flushall()
    first_dir, second_dir = tmp_path / "one", tmp_path / "two"
    first_dir.mkdir()
    second_dir.mkdir()
    path1, (pa, pb, http1) = api_pair_config(first_dir, redis_server.url)
    http2 = free_port()
    path2, _ = api_pair_config(second_dir, redis_server.url, ports=(pa, pb, http2))
    first = Daemon(path1, http1, tmp_path / "one.log").start()
    second = Daemon(path2, http2, tmp_path / "two.log").start(ready=False)
    try:
        # Balanced: the first instance hands one account to the newcomer.
        def states(port: int) -> dict[str, str]:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).json().get("accounts", {})
            except httpx.HTTPError:
                return {}

        def balanced() -> bool:
            one, two = states(http1), states(http2)
            mine = [a for a, s in one.items() if s == "connected"]
            theirs = [a for a, s in two.items() if s == "connected"]
            return len(mine) == 1 and len(theirs) == 1 and set(mine) != set(theirs)

        wait_for(balanced, timeout=30, interval=0.1, what="one account on each instance")
        headers_a = {"Authorization": "Bearer token-a"}
        headers_b = {"Authorization": "Bearer token-b"}
        before = httpx.post(
            f"http://127.0.0.1:{pa}/api/message", json={"text": "before", "gateway": "g"}, headers=headers_a
        )
        assert before.status_code == 200
        first.kill()
        # Within the lease time the standby owns both accounts and serves the api ports.
        second.wait_ready(timeout=30)
        after = httpx.post(
            f"http://127.0.0.1:{pa}/api/message", json={"text": "after", "gateway": "g"}, headers=headers_a
        )
        assert after.status_code == 200
        got: list[str] = []

        def both() -> bool:
            got.extend(m["text"] for m in httpx.get(f"http://127.0.0.1:{pb}/api/messages", headers=headers_b).json())
            return len(got) >= 2

        wait_for(both, timeout=30, what="messages through the new owner")
        assert got == ["before", "after"]
    finally:
        second.stop()
        first.stop()
