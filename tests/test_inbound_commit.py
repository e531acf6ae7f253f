"""What the receiving adapters (a Talk user account, Matrix) write with
their cursors goes through the bus: ``[bus] StreamMaxLen`` caps it, and the
lease token is checked in the same script as the write, so a stale owner
writes nothing — not even when the lease changes hands while its commit is
in flight (the old check was a GET followed by a separate MULTI)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from adapters.matrix import Matrix
from adapters.nctalk import TalkUser
from bridge.bus import Bus, BusSettings, Write
from bridge.events import Event, EventKind, event_from_wire
from bridge.idmap import Fenced
from bridge.keys import account_key, fence_key, inbound_key
from bridge.lease import Lease, lease_key
from tests.adapter_rig import connected_parts
from tests.matrix_rig import ACCOUNT as MATRIX_ACCOUNT
from tests.matrix_rig import MatrixRig, api_section, matrix_section, new_room
from tests.nctalk_rig import PASSWORD, UserRig, gateway, load, user_section
from tests.synapse_rig import SynapseServer
from tests.talkbot_rig import until, write_config
from tests.talkserver import TalkServer
from tests.talkserver.state import Actor

TALK_ACCOUNT = "nctalk.cloud"
ROOM = "room1234"
TALK_VERSION = 19  # the conftest's talk speaks it
MAX_LEN = 5
NODE_ENTRIES = 10  # the test server's stream-node-max-entries while capping: trimming is by whole nodes
POSTED = 40


class TakeoverRedis(Redis):
    """A client that lets another instance take the account's lease over
    while a commit is in flight: right after the client reads the fence key
    (a check made before the write) or right before it sends the script that
    writes the account's inbound stream — whichever comes first once armed."""

    takeover: Callable[[], Awaitable[None]] | None = None
    fence_key = ""
    stream = ""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = str(args[0]).upper()
        if self.takeover is not None and name in ("EVALSHA", "EVAL"):
            keys = [k.decode() if isinstance(k, bytes) else str(k) for k in args[3 : 3 + int(args[2])]]
            if self.stream in keys:
                await self._take_over()
        result = await super().execute_command(*args, **options)
        if self.takeover is not None and name == "GET" and args[1] == self.fence_key:
            await self._take_over()
        return result

    async def _take_over(self) -> None:
        hook, self.takeover = self.takeover, None
        assert hook is not None
        await hook()


@pytest.fixture
async def takeover_redis(redis: Redis) -> AsyncIterator[TakeoverRedis]:
    """The adapter's client (the same server as ``redis``, flushed by it)."""
    kw = redis.connection_pool.connection_kwargs
    client = TakeoverRedis(host=kw["host"], port=kw["port"])
    try:
        yield client
    finally:
        await client.aclose()


async def owned(redis: Redis, account: str, owner: str = "first") -> Lease:
    lease = Lease(redis, "tb", account, owner, 30)
    assert await lease.acquire()
    return lease


async def successor_takes(redis: Redis, account: str) -> Lease:
    """The first owner's lease expires (it stalled) and another instance takes it."""
    await redis.delete(lease_key("tb", account))
    return await owned(redis, account, "successor")


async def events_of(redis: Redis, account: str) -> list[Event]:
    return [event_from_wire(f[b"d"]) for _i, f in await redis.xrange(inbound_key("tb", account))]


async def capped_within(redis: Redis, stream: str) -> int:
    """The most entries an approximate MAXLEN leaves: Redis trims whole
    nodes, so under ``MAX_LEN`` plus one node."""
    [node] = (await redis.config_get("stream-node-max-entries")).values()
    return MAX_LEN + int(node) - 1


@pytest.fixture
async def small_stream_nodes(redis: Redis) -> AsyncIterator[None]:
    """Small stream nodes, so an approximate cap shows with few messages (restored after)."""
    [before] = (await redis.config_get("stream-node-max-entries")).values()
    await redis.config_set("stream-node-max-entries", NODE_ENTRIES)
    try:
        yield
    finally:
        await redis.config_set("stream-node-max-entries", before)


def message(text: str) -> Event:
    return Event(kind=EventKind.MESSAGE, account="acct", channel="c", sender_name="a", text=text)


# the bus --------------------------------------------------------------------------------
async def test_a_commit_appends_the_events_and_writes_the_cursor_together(redis: Redis) -> None:
    bus = Bus(redis, BusSettings())
    lease = await owned(redis, "acct")
    stream = bus.inbound("acct")
    cursor = account_key("tb", "acct", "cursor")
    events = [message(f"m{i}") for i in range(3)]
    ids = await bus.commit_inbound("acct", events, [Write.hset(cursor, "room", 7)], lease.fence)
    rows = await redis.xrange(stream)
    assert [i.decode() for i, _ in rows] == ids
    assert [event_from_wire(f[b"d"]).text for _, f in rows] == ["m0", "m1", "m2"]
    assert await redis.hget(cursor, "room") == b"7"


async def test_a_stale_token_commits_nothing(redis: Redis) -> None:
    bus = Bus(redis, BusSettings())
    stale = await owned(redis, "acct")
    stale_fence = stale.fence
    await successor_takes(redis, "acct")
    stream = bus.inbound("acct")
    event = message("late")
    cursor, sync = account_key("tb", "acct", "cursor"), account_key("tb", "acct", "sync")
    writes = [Write.hset(cursor, "room", 9), Write.set(sync, "s9")]
    with pytest.raises(Fenced):
        await bus.commit_inbound("acct", [event], writes, stale_fence)
    assert await redis.exists(stream, cursor, sync) == 0


async def test_a_commit_checks_the_leases_own_fence_key_no_copy_of_it(redis: Redis) -> None:
    """The stream, the cursors and the fence share the account's Cluster slot
    (bridge/keys.py): taking the lease writes the lease and its token, nothing
    else, and a commit is fenced by that token."""
    stale = await owned(redis, "acct")
    successor = await successor_takes(redis, "acct")
    assert {k.decode() for k in await redis.keys("*")} == {lease_key("tb", "acct"), fence_key("tb", "acct")}
    bus = Bus(redis, BusSettings())
    event = message("x")
    with pytest.raises(Fenced):
        await bus.commit_inbound("acct", [event], (), stale.fence)
    assert len(await bus.commit_inbound("acct", [event], (), successor.fence)) == 1


async def test_a_cursor_outside_the_streams_cluster_slot_is_refused(redis: Redis) -> None:
    bus = Bus(redis, BusSettings())
    with pytest.raises(ValueError, match="slot"):
        await bus.commit_inbound("acct", [], [Write.set("tb:acct:acct:cursor", "1")])  # untagged
    with pytest.raises(ValueError, match="slot"):
        await bus.commit_inbound("acct", [], [Write.set(account_key("tb", "other", "cursor"), "1")])
    with pytest.raises(ValueError):
        Write("DEL", account_key("tb", "acct", "cursor"), ("x",))
    assert await redis.dbsize() == 0


# a Talk user account ----------------------------------------------------------------------------
def bridged_room(talk: TalkServer) -> Actor:
    """The bridge's user and alice in ``ROOM``; returns alice."""
    bridge = talk.add_user("bridge", "Bridge Bot", password=PASSWORD)
    alice = talk.add_user("alice", "Alice")
    talk.create_room("Bridged", ROOM, (alice, bridge))
    return alice


def talk_config(tmp_path: Path, talk: TalkServer, bus: str = "") -> Any:
    body = user_section("cloud", talk.url, RoomRetryMinSeconds=0.05, RoomRetryMaxSeconds=0.2, PollTimeout=2)
    body += '[api.a]\nBindAddress = "127.0.0.1:0"\nToken = "t"\n' + bus
    return load(tmp_path, body + gateway("g", (TALK_ACCOUNT, ROOM), ("api.a", "api")))


async def talk_rig(config: Any, redis: Redis, lease: Lease | None = None) -> UserRig:
    fence = (lambda: lease.fence) if lease is not None else (lambda: None)
    rig = UserRig(*await connected_parts(TalkUser, config, TALK_ACCOUNT, redis, fence=fence))
    rig.start()
    await until(lambda: _has_cursor(rig), what="the room's first cursor")
    return rig


async def test_stream_max_len_caps_what_a_talk_user_account_publishes(
    tmp_path: Path, talk: TalkServer, redis: Redis, small_stream_nodes: None
) -> None:
    alice = bridged_room(talk)
    rig = await talk_rig(talk_config(tmp_path, talk, f"[bus]\nStreamMaxLen = {MAX_LEN}\n"), redis)
    try:
        posted = [await talk.post(ROOM, alice, f"m{i}") for i in range(POSTED)]
        await until(lambda: _cursor_at(rig, posted[-1].id), what="the last message passed")
        stream = rig.bus.inbound(TALK_ACCOUNT)
        assert MAX_LEN <= await redis.xlen(stream) <= await capped_within(redis, stream)
        assert (await rig.texts())[-1] == f"m{POSTED - 1}"  # the newest are kept
    finally:
        await rig.close()


async def _has_cursor(rig: UserRig) -> bool:
    return await rig.cursor(ROOM) is not None


async def _cursor_at(rig: UserRig, message_id: int) -> bool:
    return await rig.cursor(ROOM) == message_id


async def test_a_talk_commit_in_flight_when_the_lease_changes_hands_writes_nothing(
    tmp_path: Path, talk: TalkServer, redis: Redis, takeover_redis: TakeoverRedis
) -> None:
    alice = bridged_room(talk)
    lease = await owned(redis, TALK_ACCOUNT)
    rig = await talk_rig(talk_config(tmp_path, talk), takeover_redis, lease)
    try:
        cursor = await rig.cursor(ROOM)
        arm(takeover_redis, redis, TALK_ACCOUNT)
        await talk.post(ROOM, alice, "written by the stale owner?")
        task = rig.task
        assert task is not None
        await until(lambda: task.done() or events_of(redis, TALK_ACCOUNT), what="the commit or its refusal")
        assert takeover_redis.takeover is None  # the lease did change hands during the commit
        await until(task.done, what="the fenced receive loop ended")  # what it wrote, it wrote before
        assert await events_of(redis, TALK_ACCOUNT) == []
        assert await rig.cursor(ROOM) == cursor
        assert isinstance(await rig.stop_receiving(), Fenced)
    finally:
        await rig.close()


def arm(client: TakeoverRedis, redis: Redis, account: str) -> None:
    async def take_over() -> None:
        await successor_takes(redis, account)

    client.fence_key = fence_key("tb", account)
    client.stream = inbound_key("tb", account)
    client.takeover = take_over


# a Matrix account ----------------------------------------------------------------------------
def matrix_config(tmp_path: Path, room: Any, bus: str = "") -> Any:
    body = matrix_section("test", room.synapse.url, login=room.bot_login) + api_section() + bus
    body += gateway("g", (MATRIX_ACCOUNT, room.room_id), ("api.a", "api"))
    return write_config(tmp_path / "talkbridge.toml", body)


async def matrix_rig(config: Any, redis: Redis, lease: Lease | None = None) -> MatrixRig:
    fence = (lambda: lease.fence) if lease is not None else (lambda: None)
    rig = MatrixRig(*await connected_parts(Matrix, config, MATRIX_ACCOUNT, redis, fence=fence))
    rig.start()
    await until(rig.synced, what="the first sync")
    return rig


async def _join_synced(rig: MatrixRig, room: Any) -> bool:
    return bool(await rig.redis.sismember(rig.adapter.joined_key, room.room_id))


async def test_stream_max_len_caps_what_a_matrix_account_publishes(
    tmp_path: Path, redis: Redis, synapse: SynapseServer, small_stream_nodes: None
) -> None:
    room = new_room(synapse)
    rig = await matrix_rig(matrix_config(tmp_path, room, f"[bus]\nStreamMaxLen = {MAX_LEN}\n"), redis)
    try:
        await until(lambda: _join_synced(rig, room), what="the bot's join synced")
        await asyncio.to_thread(lambda: [room.alice.text(room.room_id, f"m{i}") for i in range(POSTED)])
        await until(lambda: _newest_is(rig, f"m{POSTED - 1}"), within=30, what="the last message")
        stream = rig.bus.inbound(MATRIX_ACCOUNT)
        assert MAX_LEN <= await redis.xlen(stream) <= await capped_within(redis, stream)
    finally:
        await rig.close()


async def _newest_is(rig: MatrixRig, text: str) -> bool:
    texts = await rig.texts()
    return bool(texts) and texts[-1] == text


async def test_a_matrix_commit_in_flight_when_the_lease_changes_hands_writes_nothing(
    tmp_path: Path, redis: Redis, takeover_redis: TakeoverRedis, synapse: SynapseServer
) -> None:
    room = new_room(synapse)
    lease = await owned(redis, MATRIX_ACCOUNT)
    rig = await matrix_rig(matrix_config(tmp_path, room), takeover_redis, lease)
    try:
        await until(lambda: _join_synced(rig, room), what="the bot's join synced")
        since = await redis.get(rig.adapter.sync_key)
        arm(takeover_redis, redis, MATRIX_ACCOUNT)
        room.alice.text(room.room_id, "written by the stale owner?")
        task = rig.task
        assert task is not None
        await until(lambda: task.done() or events_of(redis, MATRIX_ACCOUNT), what="the commit or its refusal")
        assert takeover_redis.takeover is None  # the lease did change hands during the commit
        await until(task.done, what="the fenced receive loop ended")  # what it wrote, it wrote before
        assert await events_of(redis, MATRIX_ACCOUNT) == []
        assert await redis.get(rig.adapter.sync_key) == since
        assert isinstance(await rig.stop_receiving(), Fenced)
    finally:
        await rig.close()


# on Redis Cluster (the one-node cluster: tests/conftest.py) ------------------------------------------
async def test_on_redis_cluster_a_talk_user_account_commits_and_a_stale_one_is_fenced(
    tmp_path: Path, talk: TalkServer, cluster: RedisCluster
) -> None:
    alice = bridged_room(talk)
    lease = await owned(cluster, TALK_ACCOUNT)  # type: ignore[arg-type]
    rig = await talk_rig(talk_config(tmp_path, talk), cluster, lease)  # type: ignore[arg-type]
    try:
        first = await talk.post(ROOM, alice, "one")
        await until(lambda: _cursor_at(rig, first.id), what="the first message passed")
        assert await rig.texts() == ["one"]
        await successor_takes(cluster, TALK_ACCOUNT)  # type: ignore[arg-type]
        await talk.post(ROOM, alice, "two")
        task = rig.task
        assert task is not None
        await until(task.done, what="the stale owner's refusal")
        assert isinstance(await rig.stop_receiving(), Fenced)
        assert await rig.texts() == ["one"] and await rig.cursor(ROOM) == first.id
    finally:
        await rig.close()
