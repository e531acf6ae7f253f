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


class CountingRedis:
    """The real client, counting the round trips GroupCommit makes."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.pipelines = 0
        self.direct = 0

    def pipeline(self, transaction: bool = False):
        self.pipelines += 1
        return self.redis.pipeline(transaction=transaction)

    def __getattr__(self, name: str):
        self.direct += 1
        return getattr(self.redis, name)


async def test_concurrent_callers_share_one_pipeline(redis: Redis) -> None:
    counting = CountingRedis(redis)
    commits = GroupCommit(counting)
    await asyncio.gather(*(commits.run([("incr", ("n",), {})]) for _ in range(50)))
    # the first goes out at once, alone; the 49 that arrived meanwhile go together
    assert (counting.direct, counting.pipelines) == (1, 1)
    assert int(await redis.get("n")) == 50


async def test_a_lone_caller_goes_out_at_once_without_a_pipeline(redis: Redis) -> None:
    counting = CountingRedis(redis)
    commits = GroupCommit(counting)
    for i in range(3):
        assert await commits.run([("set", (f"k{i}", "v"), {})]) == [True]
    assert (counting.direct, counting.pipelines) == (3, 0)
