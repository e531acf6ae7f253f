"""Group commit against a real Redis: batching, and errors kept to their caller."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from bridge.groupcommit import GroupCommit


async def test_concurrent_callers_each_get_their_own_results(redis: Redis) -> None:
    commits = GroupCommit(redis)
    results = await asyncio.gather(
        *(commits.run([("incr", ("counter",), {}), ("get", ("counter",), {})]) for _ in range(50))
    )
    assert sorted(r[0] for r in results) == list(range(1, 51))
    assert all(int(r[1]) >= r[0] for r in results)
    assert int(await redis.get("counter")) == 50


async def test_one_callers_error_does_not_fail_the_others(redis: Redis) -> None:
    await redis.set("a-string", "x")
    commits = GroupCommit(redis)
    good, bad = await asyncio.gather(
        commits.run([("set", ("k", "v"), {})]),
        commits.run([("lpush", ("a-string", "y"), {})]),  # WRONGTYPE
        return_exceptions=True,
    )
    assert good == [True]
    assert isinstance(bad, ResponseError) and "WRONGTYPE" in str(bad)
    assert await redis.get("k") == b"v"


async def test_connection_failure_reaches_every_caller() -> None:
    dead = Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    commits = GroupCommit(dead)
    outcomes = await asyncio.gather(*(commits.run([("ping", (), {})]) for _ in range(3)), return_exceptions=True)
    assert len(outcomes) == 3 and all(isinstance(o, RedisConnectionError) for o in outcomes)
    await dead.aclose()
