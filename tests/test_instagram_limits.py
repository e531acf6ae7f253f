"""The shared rate limiter (workers/ratelimit.py) and the Instagram circuit
breaker (workers/instagram_breaker.py), against a real Redis.

Several limiter clients race like workers do: each one honours the wait it is
answered (that is the protocol: arq defers the job by it) and asks again. What
is checked is the record of admissions: never more than the limit in any
window of one period, every job admitted in the end, in the order they came.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from tests.talkbot_rig import until
from workers.instagram_breaker import Breaker
from workers.ratelimit import RateLimiter, seconds_text


def limiter(redis: Redis, **kw: float) -> RateLimiter:
    args = {"limit": 3, "room_limit": 2, "period": 60.0, "grace": 30.0} | kw
    return RateLimiter(redis, "t", "ig", **args)  # type: ignore[arg-type]


async def admissions(redis: Redis, lim: RateLimiter) -> list[tuple[str, int]]:
    rows = await redis.zrange(f"{lim.base}:log", 0, -1, withscores=True)
    return [(m.decode(), int(s)) for m, s in rows]


async def test_the_room_limit_then_the_global_one(redis: Redis) -> None:
    lim = limiter(redis)
    assert await lim.acquire("a1", "room-a") == 0
    assert await lim.acquire("a2", "room-a") == 0
    wait = await lim.acquire("a3", "room-a")  # the room's two are used
    assert 59 < wait <= 60
    assert await lim.acquire("b1", "room-b") == 0  # another room: the global limit (3) has one left
    wait_b2 = await lim.acquire("b2", "room-b")
    assert 59 < wait_b2 <= 60
    assert await lim.admitted_in_window() == 3
    assert await lim.admitted_in_window("room-a") == 2 and await lim.admitted_in_window("room-b") == 1


async def test_waiting_jobs_keep_their_place_and_are_told_longer_waits(redis: Redis) -> None:
    lim = limiter(redis, limit=2, room_limit=10)
    assert await lim.acquire("j1", "r") == 0
    assert await lim.acquire("j2", "r") == 0
    waits = [await lim.acquire(f"j{i}", "r") for i in range(3, 8)]
    # j3, j4 get the two slots j1 and j2 free after one period; j5, j6 the next round...
    assert 59 < waits[0] <= 60 and 59 < waits[1] <= 60
    assert 119 < waits[2] <= 120 and 119 < waits[3] <= 120
    assert 179 < waits[4] <= 180
    # asking again keeps the place: the same answer (less the time gone by), not the end of the line
    again = await lim.acquire("j5", "r")
    assert waits[2] - 1 < again <= waits[2]
    # one that leaves the line moves those behind it up
    await lim.leave("j3", "r")
    assert 59 < await lim.acquire("j5", "r") <= 60


async def test_no_more_than_the_limit_in_any_window_and_all_admitted_in_order(redis: Redis) -> None:
    period_ms, limit = 600, 3
    lim = limiter(redis, limit=limit, room_limit=2, period=period_ms / 1000, grace=5.0)
    seen: dict[str, int] = {}
    order: list[str] = []

    async def job(name: str, room: str) -> None:
        order.append(name)
        while (wait := await lim.acquire(name, room)) > 0:  # noqa: ASYNC110 (the wait is the protocol, as arq's defer)
            await asyncio.sleep(wait)  # arq's defer: the job is run again after the wait it was told
        for member, score in await admissions(redis, lim):  # this admission is in the log now
            seen[member] = score

    jobs = [job(f"j{i:02d}", f"room{i % 3}") for i in range(14)]
    await asyncio.wait_for(asyncio.gather(*jobs), timeout=60)
    times = sorted(seen.values())
    assert sorted(m.split("@")[0] for m in seen) == sorted(order)  # every job admitted, once
    for first, later in zip(times, times[limit:], strict=False):
        assert later - first >= period_ms, times  # never limit+1 within one period
    by_room: dict[str, list[int]] = {}
    for member, score in seen.items():
        by_room.setdefault(f"room{int(member[1:3]) % 3}", []).append(score)
    for scores in by_room.values():
        scores.sort()
        for first, later in zip(scores, scores[2:], strict=False):
            assert later - first >= period_ms
    # first come, first served within a room: a job that asked later may start
    # before an earlier one only in the same release of slots, never a period ahead
    admitted_at = {member.split("@")[0]: score for member, score in seen.items()}
    for room in range(3):
        names = [n for n in order if int(n[1:]) % 3 == room]
        for i, earlier in enumerate(names):
            for later in names[i + 1 :]:
                assert admitted_at[earlier] - admitted_at[later] < period_ms, (earlier, later, admitted_at)


async def test_a_job_that_never_comes_back_loses_its_place(redis: Redis) -> None:
    lim = limiter(redis, limit=1, room_limit=5, period=0.3, grace=0.2)
    assert await lim.acquire("alive", "r") == 0
    assert await lim.acquire("dead", "r") > 0  # queued, and never asks again
    assert await lim.acquire("late", "r") > 0  # behind "dead"
    # "dead" had its wait plus the grace to come back; then "late" goes first
    await until(lambda: _admitted(lim, "late", "r"), within=10, what="the job behind a dead one admitted")
    assert await lim.acquire("dead", "r") > 0  # back at last: at the end of the line


async def _admitted(lim: RateLimiter, job: str, room: str) -> bool:
    return await lim.acquire(job, room) == 0


async def test_every_key_expires(redis: Redis) -> None:
    lim = limiter(redis, limit=1, room_limit=1)
    await lim.acquire("a", "r")
    await lim.acquire("b", "r")
    keys = await redis.keys("t:rl:*")
    assert len(keys) >= 4
    assert all(ttl > 0 for ttl in [await redis.pttl(k) for k in keys])


async def test_limiters_are_independent_by_name_and_prefix(redis: Redis) -> None:
    one = RateLimiter(redis, "t", "ig", limit=1, room_limit=1)
    other = RateLimiter(redis, "t", "llm", limit=1, room_limit=1)
    elsewhere = RateLimiter(redis, "u", "ig", limit=1, room_limit=1)
    assert [await x.acquire("j", "r") for x in (one, other, elsewhere)] == [0, 0, 0]


def test_waits_are_told_in_seconds_then_minutes() -> None:
    assert [seconds_text(s) for s in (0.2, 5, 12.1, 89, 91, 600)] == ["1 s", "5 s", "13 s", "89 s", "2 min", "10 min"]


# the breaker ------------------------------------------------------------------------


async def test_the_breaker_opens_for_everyone_and_backs_off(redis: Redis) -> None:
    breaker = Breaker(redis, "t", base=0.3, cap=0.5, probe_seconds=5)
    gate = await breaker.check("j1")
    assert gate.fetch and not gate.probe
    trip = await breaker.trip("j1", gate.now)
    assert trip.counted and trip.trips == 1 and trip.wait == 0.3
    # a fetch that was already running fails the same way: the same episode
    late = await breaker.trip("j0", gate.now - 1)
    assert not late.counted and late.trips == 1
    assert await breaker.success("j9", gate.now - 1) == 0  # an old fetch's success proves nothing
    closed = await breaker.check("j2")
    assert not closed.fetch and 0 < closed.wait <= 0.3
    # once the backoff has run out, one job is the probe; the others wait for it
    probe = await until(lambda: _probe(breaker, "j2"), within=10, what="half-open")
    assert probe.fetch and probe.probe
    assert not (await breaker.check("j3")).fetch
    again = await breaker.trip("j2", probe.now)  # the probe fails: twice as long, but capped
    assert again.counted and again.trips == 2 and again.wait == 0.5
    probe = await until(lambda: _probe(breaker, "j3"), within=10, what="half-open again")
    assert await breaker.success("j3", probe.now) == 2  # closed: the trips it ends
    gate = await breaker.check("j4")
    assert gate.fetch and not gate.probe


async def test_a_probe_that_vanishes_is_replaced(redis: Redis) -> None:
    breaker = Breaker(redis, "t", base=0.1, cap=0.1, probe_seconds=0.3)
    gate = await breaker.check("j1")
    await breaker.trip("j1", gate.now)
    assert (await until(lambda: _probe(breaker, "dead"), within=10, what="a probe")).probe
    # "dead" never reports back; after its probe time another job probes
    assert (await until(lambda: _probe(breaker, "next"), within=10, what="a new probe")).probe


async def _probe(breaker: Breaker, job: str):  # type: ignore[no-untyped-def]
    gate = await breaker.check(job)
    return gate if gate.probe else None
