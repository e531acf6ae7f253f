"""``bridge.alerts_watch.DaemonWatch``: what a daemon's state turns into, condition
by condition, against a real Redis and the daemon's real metrics. The
runners are plain objects standing for ``AccountRunner`` (the watch only
reads their state), the adapters report through their real ``AccountHealth``
(what ``AdapterContext.room_failed`` and the like call); the clocks are the test's, so "for FailedMinutes" needs
no waiting. The same conditions through real daemons: tests/test_alerts_e2e.py."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

from bridge.alerts import Alerts, outbound_publisher
from bridge.alerts_watch import DaemonWatch
from bridge.bus import Bus, BusSettings
from bridge.health import AccountHealth
from bridge.keys import alerts_key, instances_key
from bridge.metrics import Metrics
from tests.test_alerts import ADMIN, Clock, config_text, load, room

BOT = "nctalkbot.ops"


@dataclass
class Runner:
    """An account as its runner shows it to the watch."""

    owned: bool = True
    connected: bool = True
    receive_down: str | None = None
    refused: str | None = None
    refused_at: float | None = None
    receive_since: float | None = None
    tenure: tuple[float, float] = (1.0, 0.0)
    receive_loop: bool = False
    parked: dict[str, str] = field(default_factory=dict)

    def has_receive_loop(self) -> bool:
        return self.receive_loop

    def failing_rooms(self) -> dict[str, str]:
        return self.parked


@dataclass
class Watched:
    watch: DaemonWatch
    alerts: Alerts
    runners: dict[str, Runner]
    metrics: Metrics
    health: dict[str, AccountHealth]
    bus: Bus
    mono: Clock
    wall: Clock
    redis: Redis

    async def active(self) -> dict[str, dict]:
        return await self.alerts.active()

    async def texts(self) -> list[str]:
        return await room(self.redis)


@pytest.fixture
def watched(redis: Redis, tmp_path: Path) -> Watched:
    config = load(tmp_path, config_text(alerts="FailedMinutes = 1\nDeadLetterWindowMinutes = 5\nRepeatMinutes = 0"))
    mono, wall = Clock(1000.0), Clock()
    bus = Bus(redis, BusSettings())
    alerts = Alerts(redis, "tb", config, "me", outbound_publisher(bus), clock=wall)
    runners = {BOT: Runner(), ADMIN: Runner(), "api.a": Runner()}
    metrics = Metrics()
    health = {name: AccountHealth(redis, "tb", name, metrics, logging.getLogger(name)) for name in runners}
    watch = DaemonWatch(
        alerts, runners, metrics, instances_key("tb"), bus.dlq, bus.entries_after, clock=mono, wall=wall,
        room_grace=30.0, health=health,
    )  # fmt: skip
    return Watched(watch, alerts, runners, metrics, health, bus, mono, wall, redis)


async def test_refused_credentials_alert_at_once_and_clear_once_traffic_goes_through(watched: Watched) -> None:
    w, bot = watched, watched.runners[BOT]
    bot.refused, bot.refused_at = "POST …/message: Talk answered 401", w.mono.now
    await w.watch.account_refused(BOT, bot.refused)  # the runner's AccountStopped path
    await w.watch.tick()
    await w.watch.tick()
    texts = await w.texts()
    assert len(texts) == 1 and texts[0].startswith(f"[talkbridge CRITICAL] {BOT}: credentials refused: POST")
    w.mono.now += 3600  # time alone proves nothing for an account without a receive loop
    await w.watch.tick()
    assert f"account:{BOT}:credentials" in await w.active() and bot.refused is not None
    w.metrics.events_out.labels(BOT).inc()  # a delivery went through
    await w.watch.tick()
    assert bot.refused is None and await w.active() == {}
    assert (await w.texts())[1].startswith(f"[talkbridge RESOLVED] {BOT}: credentials accepted again")


async def test_an_adapter_refused_by_itself_clears_once_its_receive_loop_ran_unrefused(watched: Watched) -> None:
    """The Talk user adapter probes on its own and reports the refusal meanwhile."""
    w, bot = watched, watched.runners[BOT]
    bot.receive_loop, bot.receive_since = True, w.mono.now
    await w.health[BOT].credentials_refused("GET capabilities: Talk answered 401", 900)
    await w.watch.tick()
    assert (await w.active())[f"account:{BOT}:credentials"]["severity"] == "critical"
    await w.health[BOT].credentials_accepted()  # accepted again
    w.mono.now += 30
    await w.watch.tick()
    assert f"account:{BOT}:credentials" in await w.active()  # not yet: 60 s unrefused
    w.mono.now += 31
    await w.watch.tick()
    assert await w.active() == {}
    assert len(await w.texts()) == 2


async def test_an_owner_that_took_over_clears_an_earlier_alert_only_on_proof(watched: Watched) -> None:
    w, bot = watched, watched.runners[BOT]
    await w.alerts.fire(f"account:{BOT}:credentials", "refused on the instance before", "critical")
    bot.tenure = (w.mono.now, 0.0)  # a new owner, nothing through yet
    await w.watch.tick()
    assert f"account:{BOT}:credentials" in await w.active()
    bot.owned = False  # not ours: never judged here, whatever the traffic
    w.metrics.events_in.labels(BOT).inc()
    await w.watch.tick()
    assert f"account:{BOT}:credentials" in await w.active()
    bot.owned = True
    await w.watch.tick()  # owned again, with an event since the tenure began
    assert await w.active() == {}


async def test_an_account_down_for_failed_minutes_alerts_and_clears_when_it_connects(watched: Watched) -> None:
    w, bot = watched, watched.runners[BOT]
    bot.connected = False
    await w.watch.tick()
    w.mono.now += 59
    await w.watch.tick()
    assert await w.active() == {}  # a minute is FailedMinutes here
    w.mono.now += 2
    await w.watch.tick()
    record = (await w.active())[f"account:{BOT}:down"]
    assert record["text"] == f"{BOT}: down for 1m 01s: not connected (its connect keeps failing)"
    bot.connected = True
    await w.watch.tick()
    assert await w.active() == {}
    assert [t.split("]")[0] for t in await w.texts()] == ["[talkbridge ERROR", "[talkbridge RESOLVED"]


async def test_a_failing_room_alerts_after_failed_minutes_and_clears_after_its_grace(watched: Watched) -> None:
    w, bot = watched, watched.runners[BOT]
    await w.health[BOT].room_failed("room1", "Talk answered 404", 5.0)  # receiving from it fails
    bot.parked = {"room2": "delivering to it keeps failing"}  # sending to it fails
    await w.watch.tick()
    w.mono.now += 20
    bot.parked = {}  # a retry in flight: not parked for a moment
    await w.watch.tick()
    bot.parked = {"room2": "delivering to it keeps failing"}
    w.mono.now += 41
    await w.watch.tick()
    assert sorted(await w.active()) == [f"room:{BOT}:room1", f"room:{BOT}:room2"]  # the flicker did not reset it
    await w.health[BOT].room_recovered("room1")
    bot.parked = {}
    w.mono.now += 10
    await w.watch.tick()
    assert len(await w.active()) == 2  # within the grace: maybe between two failures
    w.mono.now += 21
    await w.watch.tick()
    assert await w.active() == {}
    assert len(await w.texts()) == 4


async def test_the_watch_reads_what_adapters_report_not_the_gauges(watched: Watched) -> None:
    """The gauges are written by the health calls and never read back: one
    set by hand (an adapter going around its context) alerts nothing."""
    w = watched
    w.metrics.account_failed.labels(BOT).set(1)
    w.metrics.room_failed.labels(BOT, "room1").set(1)
    await w.watch.tick()
    w.mono.now += 3600
    await w.watch.tick()
    assert await w.active() == {}
    await w.health[BOT].room_failed("room1", "Talk answered 404", 5.0)
    await w.health["api.a"].room_failed("api", "owned elsewhere", 5.0)
    w.runners["api.a"].owned = False  # its owner judges it
    await w.watch.tick()
    w.mono.now += 61
    await w.watch.tick()
    assert list(await w.active()) == [f"room:{BOT}:room1"]


async def test_room_alerts_of_accounts_owned_elsewhere_are_left_to_their_owner(watched: Watched) -> None:
    w = watched
    await w.alerts.fire("room:api.a:api", "failing on its owner")
    await w.alerts.fire("room:malformed", "a worker's key of another shape")
    w.runners["api.a"].owned = False
    await w.watch.tick()
    assert sorted(await w.active()) == ["room:api.a:api", "room:malformed"]


async def test_dead_letters_growing_alert_once_and_clear_when_none_came_for_the_window(watched: Watched) -> None:
    w = watched
    for i in range(3):
        await w.bus.dead_letter(w.bus.outbound(BOT), f"1-{i}", b"{}", "PermanentError: 400", 5)
    w.wall.now = time.time()  # dead letters' ids are Redis's clock
    await w.watch.tick()
    await w.watch.tick()
    [record] = (await w.active()).values()
    assert record["key"] == "dead-letters"
    assert record["text"].startswith("dead letters growing: 3 in the last 5m 00s (3 in all)")
    w.wall.now += 301
    await w.watch.tick()
    assert await w.active() == {}
    assert (await w.texts())[
        1
    ] == "[talkbridge RESOLVED] no new dead letters for 5m 00s (3 in all) (after 5m 01s; dead-letters)"


async def test_an_instance_whose_heartbeat_lapsed_alerts_and_a_clean_leave_does_not(watched: Watched) -> None:
    w = watched
    w.wall.now = 2_000_000_000.0
    now_ms = w.wall.now * 1000
    await w.redis.zadd(
        instances_key("tb"), {"me": now_ms + 15_000, "crashed": now_ms + 5_000, "leaver": now_ms + 5_000}
    )
    await w.watch.tick()
    await w.redis.zrem(instances_key("tb"), "leaver")  # a clean stop removes itself before it lapses
    await w.watch.tick()
    assert await w.active() == {}
    w.wall.now += 6  # "crashed" never beat again: lapsed (and swept by someone's heartbeat)
    await w.redis.zadd(instances_key("tb"), {"me": w.wall.now * 1000 + 15_000})
    await w.redis.zrem(instances_key("tb"), "crashed")
    await w.watch.tick()
    record = (await w.active())["instance:crashed"]
    assert record["details"] == {"fleet": 2}
    assert record["text"].startswith("instance crashed stopped without leaving: its heartbeat lapsed at 2033-05-18 ")
    await w.redis.zadd(instances_key("tb"), {"newcomer": w.wall.now * 1000 + 15_000})
    await w.watch.tick()
    assert await w.active() == {}
    assert (await w.texts())[1].startswith("[talkbridge RESOLVED] crashed replaced: 2 instances alive")


async def test_the_admin_accounts_own_trouble_stays_out_of_its_room(watched: Watched) -> None:
    w, admin = watched, watched.runners[ADMIN]
    admin.refused, admin.refused_at = "401", w.mono.now
    await w.watch.tick()
    record = orjson.loads(await w.redis.hget(alerts_key("tb"), f"account:{ADMIN}:credentials"))
    assert record["notified"] == "silent"
    assert await w.texts() == []
