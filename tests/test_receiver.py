"""``bridge.receiver.Receiver`` (the pull adapters' shared receive loop) and
the context's health calls behind it (``AdapterContext.room_failed`` and the
like, bridge/health.py): each call sets the gauge, the degraded mark
``talkbridge status`` shows and the state the alert watch reads, together.
A real Redis and real metrics; the waits are recorded, not slept. The
adapters' own loops through it: tests/test_nctalk.py, tests/test_matrix.py."""

from __future__ import annotations

import logging
import random

import pytest
from redis.asyncio import Redis

from bridge.adapter import AccountFailed, AdapterContext
from bridge.config import AccountConfig
from bridge.events import Event
from bridge.idmap import Fenced
from bridge.metrics import Metrics
from bridge.receiver import HINT_MAX, Backoff, Receiver
from tests.helpers import metric

ACCOUNT = "pull.a"
MARK = "tb:degraded:{" + ACCOUNT + "}"


class Away(Exception):
    """The server is away (transient), maybe with the wait it asked for."""

    def __init__(self, what: str, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.retry_after = retry_after


class Pauses:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def context(redis: Redis) -> AdapterContext:
    async def publish(event: Event) -> str:
        raise AssertionError("nothing is published here")

    account = AccountConfig(name=ACCOUNT, protocol="pull", values={}, general={}, specs={})
    log = logging.getLogger(ACCOUNT)
    return AdapterContext(account=account, publish=publish, redis=redis, metrics=Metrics(), log=log)


class Plan:
    """A step that raises its planned exceptions in turn, then succeeds;
    while it runs the test looks at what was reported."""

    def __init__(self, ctx: AdapterContext, *failures: BaseException) -> None:
        self.ctx = ctx
        self.failures = list(failures)
        self.calls = 0
        self.seen: list[tuple[float, bytes | None]] = []  # (room gauge, mark) at each call

    async def __call__(self) -> None:
        self.calls += 1
        gauge = metric(self.ctx.metrics, "talkbridge_room_failed", account=ACCOUNT, room="r1")
        self.seen.append((gauge, await self.ctx.redis.get(MARK)))
        if self.failures:
            raise self.failures.pop(0)


def runs(times: int):
    """``until`` for ``times`` steps."""
    left = [times]

    def more() -> bool:
        left[0] -= 1
        return left[0] >= 0

    return more


async def test_a_failing_room_backs_off_is_reported_everywhere_and_recovers(redis: Redis, caplog) -> None:
    ctx, pauses = context(redis), Pauses()
    plan = Plan(ctx, Away("404"), Away("503"), Away("429", retry_after=7.0), Away("slow down", retry_after=1e6))
    receiver = Receiver(
        ctx, "room r1", room="r1", transient=(Away,), backoff=Backoff(0.5, 1.5, random.Random(1)), pause=pauses,
        retry_after=lambda exc: exc.retry_after if isinstance(exc, Away) else None,
    )  # fmt: skip
    await receiver.run(plan, until=runs(6))
    assert plan.calls == 6
    first, second, hinted, capped = pauses.delays
    assert 0.25 <= first <= 0.5 and 0.5 <= second <= 1.0  # doubling, drawn from each step's upper half
    assert (hinted, capped) == (7.0, HINT_MAX)  # the server's wait, up to the cap
    gauge, mark = plan.seen[4]  # while failing: the gauge, the mark, the watch's state
    assert gauge == 1 and mark == b"room r1: slow down"
    assert ctx.health.failing_rooms() == {}  # recovered at the fifth call's success
    assert plan.seen[5] == (0.0, None)
    alerts = [r.getMessage() for r in caplog.records if "ALERT" in r.getMessage()]
    assert alerts == [f"pull.a: ALERT: room r1 failing: 404; retrying in {first:.1f}s"]
    assert any("room r1 recovered after 4 failures" in r.getMessage() for r in caplog.records)


async def test_the_whole_accounts_loop_is_shown_degraded_and_no_room_fails(redis: Redis) -> None:
    ctx, pauses = context(redis), Pauses()
    seen: list[bytes | None] = []

    async def step() -> None:
        seen.append(await redis.get(MARK))
        if len(seen) == 1:
            raise Away("homeserver unreachable")

    receiver = Receiver(ctx, "sync", room=None, transient=(Away,), backoff=Backoff(1.0, 60.0), pause=pauses)
    await receiver.run(step, until=runs(3))
    assert seen[1] == b"receiving: homeserver unreachable" and seen[2] is None
    assert ctx.health.failing_rooms() == {} and len(pauses.delays) == 1


@pytest.mark.parametrize("stop", [Fenced("stale lease token"), AccountFailed("401"), RuntimeError("a bug")])
async def test_what_is_not_transient_ends_the_loop_at_once(redis: Redis, stop: BaseException) -> None:
    ctx, pauses = context(redis), Pauses()
    plan = Plan(ctx, stop)
    receiver = Receiver(ctx, "room r1", room="r1", transient=(Away,), backoff=Backoff(1.0, 60.0), pause=pauses)
    with pytest.raises(type(stop)):
        await receiver.run(plan)
    assert plan.calls == 1 and pauses.delays == [] and await redis.get(MARK) is None


async def test_refused_credentials_are_reported_together_and_accepted_again(redis: Redis) -> None:
    ctx = context(redis)
    await ctx.room_failed("r1", "Talk answered 404", 5.0)
    await ctx.credentials_refused("GET capabilities: 401", 900)
    assert metric(ctx.metrics, "talkbridge_account_failed", account=ACCOUNT) == 1
    assert ctx.health.refused == "GET capabilities: 401"
    assert await redis.get(MARK) == b"credentials refused (GET capabilities: 401); one probe every 900s"
    assert 900_000 < await redis.pttl(MARK) <= 960_000
    await ctx.credentials_accepted()
    assert metric(ctx.metrics, "talkbridge_account_failed", account=ACCOUNT) == 0 and ctx.health.refused is None
    assert await redis.get(MARK) == b"room r1: Talk answered 404"  # what still fails shows again
    await ctx.room_recovered("r1")
    assert await redis.get(MARK) is None


async def test_a_refusal_the_runner_pauses_leaves_the_mark_to_the_runner(redis: Redis) -> None:
    ctx = context(redis)
    await redis.set(MARK, "receive loop credentials refused (401); restart 1 in 3600.0s")  # the runner's
    await ctx.credentials_refused("401")  # no probe of the adapter's own: it raises AccountFailed
    await ctx.credentials_accepted()  # the runner's pause is over
    assert metric(ctx.metrics, "talkbridge_account_failed", account=ACCOUNT) == 0
    assert await redis.get(MARK) == b"receive loop credentials refused (401); restart 1 in 3600.0s"


async def test_many_failing_rooms_are_named_up_to_five_and_counted(redis: Redis) -> None:
    ctx = context(redis)
    for i in range(7):
        await ctx.room_failed(f"r{i}", "404", 1.0)
    await ctx.room_recovered("never-failed")  # changes nothing
    mark = (await redis.get(MARK) or b"").decode()
    assert mark == "; ".join(f"room r{i}: 404" for i in range(5)) + " (and 2 more)"
    assert 60_000 - 5_000 < await redis.pttl(MARK) <= 60_000  # at least a minute
