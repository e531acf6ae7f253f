"""Per-room lanes: one failing room never holds up the others (issue 6).

In-process against a real Redis (and the Talk test server for the Talk bot),
then as real processes: a daemon SIGKILLed while a room is parked with
deliveries queued behind it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis as sync_redis
from redis.asyncio import Redis

from bridge.adapter import AccountFailed, Adapter, ServerUnavailable, TransientError
from bridge.bus import DELIVER_GROUP, Bus, BusSettings
from bridge.delivery import AccountStopped, DeliveryLoop, RetryPolicy
from bridge.events import Delivery, Event, EventKind
from bridge.idmap import IdMap
from bridge.keys import dead_letters_key, outbound_key
from bridge.metrics import Metrics
from tests.helpers import SENTINEL, ConfigToml, Daemon, RedisServer, free_port, has_sentinel, through_sentinel, wait_for
from tests.talkbot_rig import SECRET, Rig, bot_section, start_rig, until, until_sentinel, write_config
from tests.talkserver import TalkServer, ThreadedTalkServer

LOG = logging.getLogger("test.lanes")
TALK = "nctalkbot.talk"


def delivery(account: str, room: str, text: str, **kw) -> Delivery:
    event = Event(kind=EventKind.MESSAGE, account="api.a", channel="api", sender_name="bob", text=text, **kw)
    return Delivery(event=event, account=account, channel=room, gateway="g", username="", text=text)


async def enqueue(bus: Bus, *deliveries: Delivery) -> None:
    for d in deliveries:
        await bus.redis.xadd(bus.outbound(d.account), {b"d": d.to_wire()})


async def backlog(redis: Redis, stream: str, group: str = DELIVER_GROUP) -> tuple[int, int]:
    """(pending, unread) of a consumer group, read while the loop runs: one
    XINFO answer, so the two agree ((-1, -1) before the group exists)."""
    info = next((g for g in await redis.xinfo_groups(stream) if g["name"] in (group, group.encode())), None)
    if info is None:
        return -1, -1
    last = info["last-delivered-id"]
    last = last.decode() if isinstance(last, bytes) else last
    return info["pending"], len(await redis.xrange(stream, min="(" + last, max="+"))


async def settled(loop: DeliveryLoop) -> bool:
    """Everything in the stream read and acknowledged."""
    return await backlog(loop.redis, loop.stream) == (0, 0)


async def backoff(_: float) -> None:
    await asyncio.sleep(0.005)  # the retry pause, shortened: not a synchronization


def make_loop(bus: Bus, adapter: Adapter, account: str, consumer: str = "c1", attempts: int = 100_000) -> DeliveryLoop:
    return DeliveryLoop(
        bus, IdMap(bus.redis, bus.prefix, 3600), adapter, account, consumer, Metrics(), LOG,
        RetryPolicy(attempts, 0.01, 0.05), sleep=backoff,
    )  # fmt: skip


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# the Talk bot in-process ---------------------------------------------------------------
@pytest.fixture
async def rig(tmp_path: Path, redis: Redis, talk: TalkServer) -> AsyncIterator[Rig]:
    config = write_config(tmp_path / "talkbridge.toml", bot_section("talk", talk.url))
    r = await start_rig(config, TALK, redis)
    try:
        yield r
    finally:
        await r.close()


async def test_a_failing_talk_room_does_not_hold_up_the_others(talk: TalkServer, rig: Rig, redis: Redis) -> None:
    rooms = [f"room{i:04d}" for i in range(4)]
    alice = talk.add_user("alice", "Alice")
    bot = talk.install_bot("Bridge", SECRET, rig.url)
    for token in rooms:
        talk.create_room(token, token, (alice,))
        assert await talk.enable_bot(bot, token)
    bad, good = rooms[0], rooms[1:]
    talk.fail_room(bad, 503)
    per_room = 25
    await enqueue(
        rig.bus, *[delivery(TALK, r, f"{r}-{i:02d}", native_id=f"{r}-{i}") for i in range(per_room) for r in rooms]
    )

    def texts(token: str, sentinels: bool = False) -> list[str]:
        posted = [m.message for m in talk.bot_messages(token, bot)]
        return [text for text in posted if sentinels or not has_sentinel(text)]

    loop = make_loop(rig.bus, rig.adapter, TALK)
    task = asyncio.create_task(loop.run())
    try:
        await until(lambda: all(len(texts(r)) == per_room for r in good), what="the healthy rooms' messages")
        # ... all delivered while the failing room still fails, and has been retried meanwhile
        assert texts(bad) == []
        failed = [r for r in talk.requests(f"/bot/{bad}/message") if r.status == 503]
        assert failed
        for r in good:
            assert texts(r) == [f"{r}-{i:02d}" for i in range(per_room)]
        talk.heal_room(bad)
        await until(lambda: len(texts(bad)) >= per_room, what="the failing room's messages after it healed")
        await until(lambda: settled(loop), what="every entry acknowledged")
        # a late duplicate arrives before a sentinel enqueued after the run, in each room
        await until_sentinel(lambda: enqueue(rig.bus, *[delivery(TALK, r, SENTINEL) for r in rooms]),
                             lambda: [t for r in rooms for t in texts(r, sentinels=True)], has_sentinel,
                             count=len(rooms), what="a sentinel in each room")  # fmt: skip
        for r in rooms:
            assert texts(r) == [f"{r}-{i:02d}" for i in range(per_room)]  # in order, once each
        assert await rig.bus.dead_letters() == []
    finally:
        await stop(task)


# a network with many rooms, each failing or not as the test says -------------------
class Rooms(Adapter):
    protocol = "rooms"

    def __init__(self) -> None:
        self.sent: dict[str, list[str]] = {}
        self.failing: set[str] = set()
        self.loop: DeliveryLoop | None = None
        self.most_held = 0
        self.gate: asyncio.Event | None = None  # a send to a room in ``hang`` waits on it
        self.hang: set[str] = set()
        self.cancelled: list[str] = []
        self.in_flight: list[str] = []
        self.fatal: set[str] = set()
        self.away: set[str] = set()  # rooms whose server takes no request (ServerUnavailable)
        self.calls = 0

    async def connect(self) -> None:
        pass

    async def disconnect(self) -> None:
        pass

    async def send(self, d: Delivery) -> str | None:
        self.calls += 1
        if self.loop is not None:
            self.most_held = max(self.most_held, self.loop.in_memory)
        if d.channel in self.fatal:
            raise AccountFailed("401")
        if d.channel in self.hang and self.gate is not None:
            self.in_flight.append(d.text)
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled.append(d.text)
                raise
        if d.channel in self.away:
            raise ServerUnavailable("connection refused")
        if d.channel in self.failing:
            raise TransientError("500 for this room")
        self.sent.setdefault(d.channel, []).append(d.text)
        return f"{d.channel}:{d.text}"


async def test_a_parked_room_spills_to_redis_and_memory_stays_bounded(redis: Redis) -> None:
    """Far more deliveries for the failing room than the read-ahead window
    holds: the other rooms still get everything, the failing room costs one
    entry of memory while parked, and its backlog arrives in order later."""
    bus = Bus(redis, BusSettings(batch_size=5))  # read-ahead window: 20 entries
    net = Rooms()
    net.failing.add("bad")
    loop = make_loop(bus, net, "rooms.x")
    net.loop = loop
    good = ["g1", "g2", "g3"]
    batch = [delivery("rooms.x", "bad", f"bad-{i:03d}") for i in range(30)]
    for i in range(40):
        batch += [delivery("rooms.x", r, f"{r}-{i:03d}") for r in good]
        batch += [delivery("rooms.x", "bad", f"bad-{30 + i:03d}")]
    await enqueue(bus, *batch)
    task = asyncio.create_task(loop.run())
    try:
        await until(lambda: all(len(net.sent.get(r, [])) == 40 for r in good), what="the healthy rooms")

        async def only_bad_pending() -> bool:
            return await backlog(redis, loop.stream) == (70, 0)

        await until(only_bad_pending, what="all read, the healthy rooms acknowledged")
        assert loop.in_memory == 1  # the failing room's head; the 69 behind it wait in Redis
        assert net.sent.get("bad") is None
        # never more in memory than the window, one read and the parked head
        assert net.most_held <= loop.read_ahead + 5 + 1
        net.failing.clear()
        await until(lambda: settled(loop), what="the backlog delivered")
        assert net.sent["bad"] == [f"bad-{i:03d}" for i in range(70)]
        for r in good:
            assert net.sent[r] == [f"{r}-{i:03d}" for i in range(40)]
        assert loop.in_memory == 0
    finally:
        await stop(task)


async def test_a_server_away_far_longer_than_the_retry_budget_loses_and_dead_letters_nothing(redis: Redis) -> None:
    """ServerUnavailable spends no attempts: a room whose server is down (a
    restart, Nextcloud's maintenance mode) waits for it however many retries
    that takes, then gets everything in order; an ordinary failure in the
    same loop still ends in the dead letters after the budget."""
    bus = Bus(redis, BusSettings(batch_size=5))
    net = Rooms()
    net.away.add("down")
    net.failing.add("broken")
    loop = make_loop(bus, net, "rooms.x", attempts=3)
    await enqueue(bus, *[delivery("rooms.x", "down", f"down-{i}") for i in range(5)])
    await enqueue(bus, delivery("rooms.x", "broken", "never"), delivery("rooms.x", "up", "fine"))
    task = asyncio.create_task(loop.run())
    try:
        await until(lambda: net.calls >= 20, what="many more retries than the budget of 3")
        assert net.sent.get("down") is None and net.sent["up"] == ["fine"]
        assert loop.parked_rooms() == ["down"]  # shown as failing (alerted after FailedMinutes)
        [letter] = await bus.dead_letters()  # only the ordinary failure
        assert letter.error.startswith("TransientError: 500") and letter.attempts == 3
        net.away.clear()  # the server is back
        await until(lambda: settled(loop), what="the room's backlog delivered")
        assert net.sent["down"] == [f"down-{i}" for i in range(5)]
        assert len(await bus.dead_letters()) == 1
    finally:
        await stop(task)


async def test_a_new_owner_delivers_a_parked_rooms_backlog_in_order_once(redis: Redis) -> None:
    """The owner dies (its loop is gone, its entries pending) while a room is
    parked with deliveries behind it; the next owner claims them and delivers
    each once, in order — and nothing the first owner delivered again."""
    bus = Bus(redis, BusSettings(batch_size=4))
    first = Rooms()
    first.failing.add("bad")
    batch = []
    for i in range(25):
        batch += [delivery("rooms.x", "bad", f"bad-{i:02d}"), delivery("rooms.x", "ok", f"ok-{i:02d}")]
    await enqueue(bus, *batch)
    loop1 = make_loop(bus, first, "rooms.x", consumer="dead-owner")
    task = asyncio.create_task(loop1.run())
    await until(lambda: len(first.sent.get("ok", [])) == 25, what="the healthy room, first owner")

    async def only_bad_pending() -> bool:
        return await backlog(redis, loop1.stream) == (25, 0)

    await until(only_bad_pending, what="the healthy room acknowledged")
    await until(lambda: loop1.parked_rooms() == ["bad"], what="the failing room parked")
    await stop(task)  # gone without a word: everything of "bad" is still pending

    second = Rooms()
    await enqueue(bus, *[delivery("rooms.x", r, f"{r}-{i:02d}") for i in range(25, 30) for r in ("bad", "ok")])
    loop2 = make_loop(bus, second, "rooms.x", consumer="new-owner")
    task = asyncio.create_task(loop2.run())
    try:
        await until(lambda: settled(loop2), what="the new owner done")
        assert second.sent["bad"] == [f"bad-{i:02d}" for i in range(30)]
        assert second.sent["ok"] == [f"ok-{i:02d}" for i in range(25, 30)]
    finally:
        await stop(task)


async def test_a_refused_credential_stops_every_lane(redis: Redis) -> None:
    bus = Bus(redis, BusSettings(batch_size=10))
    net = Rooms()
    net.gate = asyncio.Event()  # never set: a send to "slow" is in flight until cancelled
    net.hang.add("slow")
    net.fatal.add("denied")
    await enqueue(bus, delivery("rooms.x", "ok", "o1"))
    loop = make_loop(bus, net, "rooms.x")
    task = asyncio.create_task(loop.run())
    await until(lambda: net.sent.get("ok") == ["o1"], what="the healthy room")
    await enqueue(bus, delivery("rooms.x", "slow", "s1"))
    await until(lambda: net.in_flight == ["s1"], what="a send in flight in another room")
    await enqueue(bus, delivery("rooms.x", "denied", "d1"), delivery("rooms.x", "ok", "o2"))
    with pytest.raises(AccountStopped):
        await asyncio.wait_for(task, 10)
    assert net.cancelled == ["s1"]  # the send in flight elsewhere was stopped too
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("lane:")]
    pending, unread = await backlog(redis, loop.stream)
    assert pending + unread >= 2  # s1 and d1 are still owed; nothing dead-lettered
    assert await bus.dead_letters() == []


class CheckCounting(DeliveryLoop):
    checked = 0

    async def _already_delivered(self, deliveries: list[Delivery]) -> list[bool]:
        found = await super()._already_delivered(deliveries)
        self.checked += len(deliveries)
        return found


async def test_a_refused_credential_costs_one_request_however_many_rooms_wait(redis: Redis) -> None:
    class Denied(Rooms):
        answer = asyncio.Event()

        async def send(self, d: Delivery) -> str | None:
            self.calls += 1
            await self.answer.wait()  # the 401 is on its way back
            raise AccountFailed("401")

    bus = Bus(redis, BusSettings(batch_size=10))
    net = Denied()  # a wrong secret: every room would answer 401
    rooms = ["r1", "r2", "r3", "r4"]
    await enqueue(bus, *[delivery("rooms.x", r, f"{r}-1") for r in rooms])
    loop = CheckCounting(
        bus, IdMap(redis, bus.prefix, 3600), net, "rooms.x", "c1", Metrics(), LOG, RetryPolicy(5, 0.01, 0.05)
    )
    task = asyncio.create_task(loop.run())
    # every room's delivery is ready to go (looked up, nothing left to await before its send)
    await until(lambda: loop.checked == len(rooms) and net.calls >= 1, what="every lane at its send")
    net.answer.set()
    with pytest.raises(AccountStopped):
        await asyncio.wait_for(task, 10)
    assert net.calls == 1  # the others waited for the first answer, then stopped


# real processes ------------------------------------------------------------------------
GATEWAYS = 3


def lanes_config(tmp_path: Path, redis_url: str, talk_url: str, http: int, api: int) -> Path:
    config = ConfigToml().general("<{NICK}> ").api("a", api, "api-token")
    config.raw(bot_section("talk", talk_url, WebhookURL=f"http://127.0.0.1:{http}/webhook/nextcloud/talk", Timeout=5))
    for n in range(GATEWAYS):
        config.gateway(f"g{n}", ("api.a", "api"), (TALK, f"room{n:04d}"))
    config.daemon(redis_url, http, LeaseSeconds=2, MaxDeliveries=100000, RetryBaseSeconds=0.05, RetryMaxSeconds=0.2)
    return config.write(tmp_path / "talkbridge.toml")


@pytest.fixture
def talk_thread() -> Iterator[ThreadedTalkServer]:
    server = ThreadedTalkServer().start()
    try:
        yield server
    finally:
        server.stop()


def test_sigkill_while_a_room_is_parked_loses_and_repeats_nothing(
    tmp_path: Path, redis_server: RedisServer, talk_thread: ThreadedTalkServer
) -> None:
    import httpx

    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    talk = talk_thread
    http, api = free_port(), free_port()
    daemon = Daemon(lanes_config(tmp_path, redis_server.url, talk.url, http, api), http, tmp_path / "d.log").start()
    rooms = [f"room{n:04d}" for n in range(GATEWAYS)]
    bad, good = rooms[0], rooms[1:]
    try:
        alice = talk.call("add_user", "alice", "Alice")
        bot = talk.call("install_bot", "Bridge", SECRET, f"http://127.0.0.1:{http}/webhook/nextcloud/talk")
        for token in rooms:
            talk.call("create_room", token, token, (alice,))
            talk.call("enable_bot", bot, token)
        talk.call("fail_room", bad, 503)

        def post(first: int, last: int, text: str = "m{i:02d}") -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{api}", headers={"Authorization": "Bearer api-token"}) as c:
                for i in range(first, last):
                    for n in range(GATEWAYS):
                        body = {"gateway": f"g{n}", "username": "bob", "text": text.format(i=i)}
                        resp = c.post("/api/message", json=body)
                        assert resp.status_code == 200, resp.text

        def texts(token: str, sentinels: bool = False) -> list[str]:
            posted = [m.message for m in talk.call("bot_messages", token, bot)]
            return [text for text in posted if sentinels or not has_sentinel(text)]

        def pending() -> int:
            summary = client.xpending(outbound_key("tb", TALK), DELIVER_GROUP)
            return summary["pending"] if summary else 0

        def failures(token: str) -> int:
            return sum(1 for r in talk.call("requests", f"/bot/{token}/message") if r.status == 503)

        post(0, 15)
        wait_for(lambda: all(len(texts(r)) == 15 for r in good), what="the healthy rooms before the kill")
        # the failing room is parked with its 15 deliveries pending; the others are all acknowledged
        wait_for(lambda: pending() == 15 and failures(bad) >= 2, what="only the failing room's entries pending")
        assert texts(bad) == []
        daemon.kill()
        daemon.start()
        post(15, 20)
        wait_for(lambda: all(len(texts(r)) == 20 for r in good), what="the healthy rooms after the restart")
        assert texts(bad) == []  # still failing, still parked: the others flowed past it
        talk.call("heal_room", bad)
        wait_for(lambda: len(texts(bad)) >= 20 and pending() == 0, timeout=30, what="the failing room's backlog")
        # a late duplicate arrives before a sentinel posted after the run, in each room
        through_sentinel(lambda: post(0, 1, SENTINEL), lambda: [t for r in rooms for t in texts(r, sentinels=True)],
                         has_sentinel, count=len(rooms), what="a sentinel in each room")  # fmt: skip
        expected = [f"<bob> m{i:02d}" for i in range(20)]
        for token in rooms:
            assert texts(token) == expected, token  # nothing lost, nothing twice, in order
        assert client.xlen(dead_letters_key("tb")) == 0
    finally:
        daemon.stop()
        client.close()
