"""A deployment upgraded in place keeps its data (bridge/migrate_keys.py):
the keys of the layout before bridge/keys.py — an inbound stream with the
router's group and its pending entries, receive cursors, an adapter's own
state, the api buffer — are moved when a daemon takes the account over, once."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import redis as sync_redis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from bridge.bus import FIELD, ROUTER_GROUP, Bus, BusSettings
from bridge.events import Event, EventKind, event_from_wire, event_to_wire
from bridge.keys import account_key, inbound_key, key_layout_key, rooms_key
from bridge.migrate_keys import migrate_account
from tests.helpers import (
    Daemon,
    RedisServer,
    api_pair_config,
    has_sentinel,
    post_pair_sentinel,
    through_sentinel,
    wait_for,
)

LOG = logging.getLogger("test")
OLD_IN = "tb:in:api.a"
OLD_FENCE_COPY = "{tb:in:api.a}:fence"
OLD_CURSOR = "{tb:in:api.a}:talk-cursors"
OLD_SEEN = "tb:acct:api.a:seen:r4nd0m"
OLD_ROOMS = "tb:acct:api.b:rooms"
OLD_BUFFER = "tb:apibuf:{api.b}"


def wire(text: str) -> bytes:
    event = Event(kind=EventKind.MESSAGE, account="api.a", channel="api", sender_name="alice", text=text, gateway="g")
    return event_to_wire(event)


def write_old_layout(client: sync_redis.Redis) -> None:
    """What the daemon before bridge/keys.py left: api.a's stream, where the
    router acknowledged one entry, holds one read but not acknowledged (the
    daemon died) and one not read yet; a cursor and the fence's copy in the
    stream's slot; a Talk bot's ``seen:`` random; api.b's rooms set and a
    message waiting in its buffer."""
    acked = client.xadd(OLD_IN, {FIELD: wire("acknowledged before the upgrade")})
    client.xadd(OLD_IN, {FIELD: wire("pending at the upgrade")})
    client.xgroup_create(OLD_IN, ROUTER_GROUP, id="0")
    assert len(client.xreadgroup(ROUTER_GROUP, "old-instance", {OLD_IN: ">"})[0][1]) == 2
    client.xack(OLD_IN, ROUTER_GROUP, acked)
    client.xadd(OLD_IN, {FIELD: wire("unread at the upgrade")})
    client.set(OLD_FENCE_COPY, "7")
    client.hset(OLD_CURSOR, "room", "41")
    client.set(OLD_SEEN, "1", px=600_000)
    client.sadd(OLD_ROOMS, "api")
    client.xadd(OLD_BUFFER, {"d": b'{"text":"buffered before the upgrade","gateway":"g"}'})


def texts_at(port: int) -> list[str]:
    resp = httpx.get(f"http://127.0.0.1:{port}/api/messages", headers={"Authorization": "Bearer token-b"}, timeout=5)
    resp.raise_for_status()
    return [m["text"] for m in resp.json()]


def state(client: sync_redis.Redis) -> dict[str, object]:
    """The moved keys as they are now."""
    stream = inbound_key("tb", "api.a")
    [group] = client.xinfo_groups(stream)
    return {
        "cursor": client.hgetall(account_key("tb", "api.a", "talk-cursors")),
        "seen": client.get(account_key("tb", "api.a", "seen", "r4nd0m")),
        "rooms": client.smembers(rooms_key("tb", "api.b")),
        "group": (group["name"], group["pending"], group["last-delivered-id"]),
        "old": sorted(k for k in (OLD_IN, OLD_FENCE_COPY, OLD_CURSOR, OLD_SEEN, OLD_ROOMS, OLD_BUFFER)
                      if client.exists(k)),
    }  # fmt: skip


@pytest.fixture
def client(store: sync_redis.Redis) -> sync_redis.Redis:
    """conftest's ``store`` (the session's Redis, emptied), named for what the tests do with it."""
    return store


def test_an_upgraded_deployment_keeps_its_data_and_relays_each_event_once(
    tmp_path: Path, redis_server: RedisServer, client: sync_redis.Redis
) -> None:
    write_old_layout(client)
    path, (pa, pb, http) = api_pair_config(tmp_path, redis_server.url)
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    got: list[str] = []
    try:
        # nothing more: the acknowledged entry stays done (a sentinel posted after
        # the run follows the moved entries through the same stream and room)
        got = through_sentinel(lambda: post_pair_sentinel(pa), lambda: (got.extend(texts_at(pb)), got)[1], has_sentinel)
        assert sorted(got) == ["buffered before the upgrade", "pending at the upgrade", "unread at the upgrade"]
        wait_for(lambda: state(client)["group"][1] == 0, what="the router acknowledging what it took over")
        before = state(client)
        assert before["cursor"] == {b"room": b"41"} and before["seen"] == b"1" and before["rooms"] == {b"api"}
        assert before["group"][0] == ROUTER_GROUP.encode() and before["old"] == []
        assert 0 < client.pttl(account_key("tb", "api.a", "seen", "r4nd0m")) <= 600_000
        assert "api.a: moved 4 keys to the current key layout" in daemon.log()  # stream, cursor, random, fence copy
        assert "api.b: moved 2 keys to the current key layout" in daemon.log()  # rooms, buffer
    finally:
        daemon.stop()
    # a second start: everything is in place, nothing is moved or relayed again
    client.set(OLD_FENCE_COPY, "8")  # as if an old daemon had run meanwhile: the mark says it is done
    daemon.start()
    try:
        again: list[str] = []
        assert (
            through_sentinel(
                lambda: post_pair_sentinel(pa), lambda: (again.extend(texts_at(pb)), again)[1], has_sentinel
            )
            == []
        )
        after = state(client)
        # the same but for the sentinel's entry, which the router read and acknowledged past the old ones
        assert {**after, "group": after["group"][:2]} == {
            **before,
            "group": before["group"][:2],
            "old": [OLD_FENCE_COPY],
        }
        assert after["group"][2] > before["group"][2]
        assert daemon.log().count("to the current key layout") == 2  # the first start's
    finally:
        daemon.stop()


async def test_where_both_names_exist_sets_and_streams_are_merged_and_the_rest_keeps_the_new(redis: Redis) -> None:
    """An upgraded instance admitted a webhook (rooms set, a random) and
    published an event under the new names before the owner moved the old
    ones: no room, no unfinished event is lost."""
    new_in = inbound_key("tb", "api.a")
    await redis.xadd(new_in, {FIELD: wire("published under the new name")})
    await redis.xadd(OLD_IN, {FIELD: wire("done")})
    await redis.xgroup_create(OLD_IN, ROUTER_GROUP, id="0")
    await redis.xreadgroup(ROUTER_GROUP, "old", {OLD_IN: ">"})
    await redis.xack(OLD_IN, ROUTER_GROUP, (await redis.xrange(OLD_IN))[0][0])
    await redis.xadd(OLD_IN, {FIELD: wire("unfinished")})
    await redis.sadd("tb:acct:api.a:rooms", "old-room")
    await redis.sadd(rooms_key("tb", "api.a"), "new-room")
    await redis.set("tb:acct:api.a:self", "old")
    await redis.set(account_key("tb", "api.a", "self"), "new")
    assert await migrate_account(redis, "tb", "api.a", LOG) == 3
    assert [event_from_wire(f[FIELD]).text for _i, f in await redis.xrange(new_in)] == [
        "published under the new name",
        "unfinished",
    ]
    assert await redis.smembers(rooms_key("tb", "api.a")) == {b"old-room", b"new-room"}
    assert await redis.get(account_key("tb", "api.a", "self")) == b"new"
    assert await redis.exists(OLD_IN, "tb:acct:api.a:rooms", "tb:acct:api.a:self") == 0
    assert await redis.get(key_layout_key("tb", "api.a")) is not None
    assert await migrate_account(redis, "tb", "api.a", LOG) == 0


async def test_on_redis_cluster_keys_move_across_slots_with_their_groups_and_ttls(cluster: RedisCluster) -> None:
    redis: Redis = cluster  # type: ignore[assignment]
    await redis.xadd(OLD_IN, {FIELD: wire("pending")})
    await redis.xgroup_create(OLD_IN, ROUTER_GROUP, id="0")
    await redis.xreadgroup(ROUTER_GROUP, "old", {OLD_IN: ">"})
    await redis.set(OLD_FENCE_COPY, "3")
    await redis.hset(OLD_CURSOR, "room", "9")
    await redis.set(OLD_SEEN, "1", px=600_000)
    assert await migrate_account(redis, "tb", "api.a", LOG) == 4
    new_in = inbound_key("tb", "api.a")
    pending = await redis.xpending(new_in, ROUTER_GROUP)
    assert pending["pending"] == 1
    assert await redis.hgetall(account_key("tb", "api.a", "talk-cursors")) == {b"room": b"9"}
    assert 0 < await redis.pttl(account_key("tb", "api.a", "seen", "r4nd0m")) <= 600_000
    for old in (OLD_IN, OLD_FENCE_COPY, OLD_CURSOR, OLD_SEEN):
        assert await redis.exists(old) == 0


async def test_a_dead_letter_of_the_old_inbound_stream_is_replayed_onto_the_new_one(redis: Redis) -> None:
    bus = Bus(redis, BusSettings())
    await bus.dead_letter(OLD_IN, "1-0", wire("failed before the upgrade"), "boom", 1)
    await bus.dead_letter(bus.outbound("api.b"), "2-0", b"a delivery", "boom", 1)
    assert await bus.replay() == 2
    assert [event_from_wire(f[FIELD]).text for _i, f in await redis.xrange(inbound_key("tb", "api.a"))] == [
        "failed before the upgrade"
    ]
    assert [f[FIELD] for _i, f in await redis.xrange(bus.outbound("api.b"))] == [b"a delivery"]
    assert await redis.exists(OLD_IN) == 0
