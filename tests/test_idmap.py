"""The id map against a real Redis: copies found from any side, delivered-markers,
the per-room bound, compact encoding, and fencing of every write."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from bridge.events import Delivery, Event, EventKind
from bridge.idmap import Fenced, IdMap, canonical_of
from bridge.keys import outbound_key
from bridge.lease import Lease

STREAM = outbound_key("tb", "api.b")


def message(account: str, channel: str, native_id: str | None, kind: EventKind = EventKind.MESSAGE) -> Event:
    return Event(kind=kind, account=account, channel=channel, text="hi", native_id=native_id)


def copy(event: Event, account: str, channel: str) -> Delivery:
    return Delivery(event=event, account=account, channel=channel, gateway="g", username="u", text=event.text)


async def test_a_copy_resolves_from_every_side(redis: Redis) -> None:
    idmap = IdMap(redis, "tb", 3600)
    src = message("api.a", "x", "src-1")
    await idmap.commit(None, STREAM, "deliver", [], [(copy(src, "api.b", "y"), "n-1"), (copy(src, "talk", "t"), "7")])
    # from the original to its copies
    assert await idmap.resolve("api.a", "x", "src-1", "api.b", "y") == "n-1"
    assert await idmap.resolve("api.a", "x", "src-1", "talk", "t") == "7"
    # from a copy back to the original, and across to the other copy
    assert await idmap.resolve("api.b", "y", "n-1", "api.a", "x") == "src-1"
    assert await idmap.resolve("talk", "t", "7", "api.b", "y") == "n-1"
    # nothing known: None, not the id itself
    assert await idmap.resolve("api.a", "x", "other", "api.b", "y") is None
    assert await idmap.resolve("api.b", "y", "unknown", "talk", "t") is None


async def test_markers_for_messages_and_for_other_events(redis: Redis) -> None:
    idmap = IdMap(redis, "tb", 3600)
    msg = copy(message("api.a", "x", "m1"), "api.b", "y")
    edit = copy(message("api.a", "x", None, EventKind.EDIT), "api.b", "y")
    other_room = copy(msg.event, "api.b", "z")
    assert await idmap.delivered([msg, edit, other_room]) == [False, False, False]
    await idmap.commit(None, STREAM, "deliver", [], [(msg, "n1"), (edit, None)])
    assert await idmap.delivered([msg, edit, other_room]) == [True, True, False]


async def test_a_copy_whose_id_is_learned_later(redis: Redis) -> None:
    """A Talk bot post: delivered (marker) with no id; Talk shows the id later."""
    idmap = IdMap(redis, "tb", 3600)
    src = message("api.a", "api", "s1")
    d = copy(src, "talk", "room")
    await idmap.commit(None, STREAM, "deliver", [], [(d, None)])
    assert await idmap.delivered([d]) == [True]
    assert await idmap.resolve("api.a", "api", "s1", "talk", "room") is None
    canonical = canonical_of(d)
    assert canonical is not None
    await idmap.learn(canonical, "talk", "room", "42")
    assert await idmap.resolve("api.a", "api", "s1", "talk", "room") == "42"
    assert await idmap.resolve("talk", "room", "42", "api.a", "api") == "s1"


async def test_a_room_keeps_its_last_copies_within_the_bound(redis: Redis) -> None:
    idmap = IdMap(redis, "tb", 3600, per_room=40)
    events = [message("api.a", "x", f"s{i}") for i in range(400)]
    for i, event in enumerate(events):
        await idmap.commit(None, STREAM, "deliver", [], [(copy(event, "api.b", "y"), f"n{i}")])
    found = [await idmap.resolve("api.a", "x", f"s{i}", "api.b", "y") for i in range(400)]
    kept = [i for i, value in enumerate(found) if value is not None]
    assert kept == list(range(kept[0], 400))  # the newest, contiguous
    assert 40 <= len(kept) <= 50  # at least MessageMapPerRoom, at most 1.25 times it
    assert all(found[i] == f"n{i}" for i in kept)
    # dropped generations are deleted, not left to expire
    keys = [k async for k in redis.scan_iter(match="tb:m:*")]
    assert len(keys) <= 1 + 5 * idmap.buckets


async def test_fields_live_in_small_compact_hashes(redis: Redis) -> None:
    """The point of the layout: Redis keeps each hash as a listpack (ziplist on 6.2)."""
    idmap = IdMap(redis, "tb", 3600)  # the default bound: 5,000 per room
    for start in range(0, 6000, 200):
        records = [(copy(message("api.a", "x", f"s{i}"), "api.b", "y"), f"{i:016x}") for i in range(start, start + 200)]
        await idmap.commit(None, STREAM, "deliver", [], records)
    buckets = [k async for k in redis.scan_iter(match="tb:m:*") if not k.endswith(b"\x1fn")]
    assert buckets
    encodings = {await redis.object("encoding", k) for k in buckets}
    assert encodings <= {b"listpack", b"ziplist"}, encodings
    assert all([await redis.ttl(k) > 0 for k in buckets])  # idle rooms expire


async def test_a_stale_fence_writes_nothing(redis: Redis) -> None:
    first = Lease(redis, "tb", "api.b", "instance-1", 5)
    second = Lease(redis, "tb", "api.b", "instance-2", 5)
    assert await first.acquire()
    stale = first.fence
    await redis.delete(first.key)  # its lease expired while it was stopped
    assert await second.acquire()
    assert second.token == first.token + 1
    await redis.xgroup_create(STREAM, "deliver", id="0", mkstream=True)
    entry = await redis.xadd(STREAM, {b"d": b"x"})
    await redis.xreadgroup("deliver", "c", {STREAM: ">"})
    idmap = IdMap(redis, "tb", 3600)
    d = copy(message("api.a", "x", "s1"), "api.b", "api")
    with pytest.raises(Fenced):
        await idmap.commit(stale, STREAM, "deliver", [entry], [(d, "n1")])
    assert await idmap.delivered([d]) == [False]
    assert (await redis.xpending(STREAM, "deliver"))["pending"] == 1
    await idmap.commit(second.fence, STREAM, "deliver", [entry], [(d, "n1")])
    assert await idmap.delivered([d]) == [True]
    assert (await redis.xpending(STREAM, "deliver"))["pending"] == 0


async def test_a_lease_reacquired_by_its_owner_keeps_its_token(redis: Redis) -> None:
    lease = Lease(redis, "tb", "api.a", "me", 5)
    assert await lease.acquire()
    token = lease.token
    assert await lease.acquire() and lease.token == token  # a renewal, not a new tenure
    await lease.release()
    assert await lease.acquire() and lease.token == token + 1


async def test_a_marker_is_found_two_batches_of_copies_later(redis: Redis) -> None:
    """Markers are looked for only in the generations a redelivery can reach:
    a room takes at most two batches of copies between recording a copy and
    meeting it again (the api script records a batch before its ack; a
    re-routed inbound batch repeats at most a batch)."""
    idmap = IdMap(redis, "tb", 3600, per_room=400, batch_size=50)  # generations of 100 copies
    assert idmap.marker_gens < 5
    for start in (0, 37, 99):  # the copy early, in the middle, at the end of a generation
        await redis.flushall()
        events = [message("api.a", "x", f"s{i}") for i in range(start + 1 + 100)]
        for event in events[:start]:
            await idmap.commit(None, STREAM, "deliver", [], [(copy(event, "api.b", "y"), "n")])
        target = copy(events[start], "api.b", "y")
        await idmap.commit(None, STREAM, "deliver", [], [(target, "n-target")])
        later = [(copy(event, "api.b", "y"), "n") for event in events[start + 1 :]]
        await idmap.commit(None, STREAM, "deliver", [], later)  # 2 x batch_size more copies
        assert await idmap.delivered([target]) == [True], start


async def test_a_remembered_copy_is_learned_from_its_key(redis: Redis) -> None:
    """A Talk bot's post: remembered by its text before posting, learned when
    a webhook shows the text with Talk's id."""
    idmap = IdMap(redis, "tb", 3600)
    src = message("api.a", "api", "s1")
    d = copy(src, "talk", "room")
    canonical = canonical_of(d)
    assert canonical is not None
    await idmap.remember("talk", "room", "[api/a] <bob> hi", canonical)
    await idmap.commit(None, STREAM, "deliver", [], [(d, None)])
    assert not await idmap.learn_remembered("talk", "other-room", "[api/a] <bob> hi", "42")
    assert not await idmap.learn_remembered("talk", "room", "another text", "42")
    assert await idmap.resolve("api.a", "api", "s1", "talk", "room") is None
    assert await idmap.learn_remembered("talk", "room", "[api/a] <bob> hi", "42")
    assert await idmap.resolve("api.a", "api", "s1", "talk", "room") == "42"
    assert await idmap.resolve("talk", "room", "42", "api.a", "api") == "s1"


async def test_the_first_record_item_is_the_delivered_marker(redis: Redis) -> None:
    """The api buffer script checks the marker from the first item it records."""
    idmap = IdMap(redis, "tb", 3600)
    for d, native_id in (
        (copy(message("api.a", "x", "s1"), "api.b", "y"), "n1"),
        (copy(message("api.a", "x", "s2"), "api.b", "y"), None),
        (copy(message("api.a", "x", None, EventKind.EDIT), "api.b", "y"), None),
    ):
        marker = idmap.marker(d)
        assert idmap.record_items(d, native_id)[0][:2] == (marker.bucket, marker.name)


async def test_on_redis_cluster_remembered_and_learned_copies_are_written(cluster: RedisCluster) -> None:
    """Writes without a fence or a stream (a Talk bot's post remembered and
    learned later) name stand-in keys in the account's slot: Cluster refuses
    a script whose keys are in different slots."""
    idmap = IdMap(cluster, "tb", 3600)  # type: ignore[arg-type]
    d = copy(message("api.a", "api", "s1"), "talk", "room")
    canonical = canonical_of(d)
    assert canonical is not None
    await idmap.remember("talk", "room", "[api/a] <bob> hi", canonical)
    assert await idmap.learn_remembered("talk", "room", "[api/a] <bob> hi", "42")
    assert await idmap.resolve("api.a", "api", "s1", "talk", "room") == "42"
