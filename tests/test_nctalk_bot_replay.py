"""Replayed Talk webhooks (issue 17): a signed webhook captured and sent again
is refused for every type, inside ``ReplayWindow`` by its random and after it
by Talk's message ids (``Create``, ``Activity``) or a long memory of randoms
(``Join``, ``Leave``, ``Like``, ``Undo``), and a refusal changes nothing.
Genuine webhooks are never refused. Real Redis, real HTTP, the Talk test
server's own webhooks as the captures."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from adapters.nctalk_bot import REPLAY_KEPT_DAYS
from tests.helpers import metric
from tests.talkbot_rig import SECRET, Rig, bot_section, start_rig, until, write_config
from tests.talkserver import TalkServer, php_json_encode
from tests.talkserver.webhooks import WebhookCall, signature, talk_random

ACCOUNT = "nctalkbot.talk"
ROOM = "gen12345"


async def make_rig(tmp_path: Path, redis: Redis, talk: TalkServer, **opts: Any) -> Rig:
    config = write_config(tmp_path / "talkbridge.toml", bot_section("talk", talk.url, **opts))
    return await start_rig(config, ACCOUNT, redis)


@pytest.fixture
async def short(tmp_path: Path, redis: Redis, talk: TalkServer) -> AsyncIterator[Rig]:
    """A rig whose window is a second: "after the window" is reached by waiting for Redis to expire the random."""
    rig = await make_rig(tmp_path, redis, talk, ReplayWindow=1)
    try:
        yield rig
    finally:
        await rig.close()


async def post(url: str, body: bytes, random: str | None = None) -> httpx.Response:
    random = random or talk_random()
    headers = {
        "Content-Type": "application/json",
        "X-Nextcloud-Talk-Random": random,
        "X-Nextcloud-Talk-Signature": signature(SECRET, random, body),
    }
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.post(url, content=body, headers=headers)


async def resend(url: str, call: WebhookCall) -> httpx.Response:
    """A captured webhook sent again, byte for byte, headers and all."""
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.post(url, content=call.body, headers=call.headers)


def random_of(call: WebhookCall) -> str:
    return call.headers["X-Nextcloud-Talk-Random"]


async def forgotten(rig: Rig, *randoms: str) -> None:
    """Wait until Redis has expired these randoms' window markers: the window is over for them."""
    keys = [rig.ctx.key("seen", random) for random in randoms]
    await until(lambda: _none_exist(rig.redis, keys), within=15, what="the replay window to pass")


async def _none_exist(redis: Redis, keys: list[str]) -> bool:
    return await redis.exists(*keys) == 0


async def room_state(rig: Rig) -> tuple[set[bytes], set[bytes]]:
    return await rig.redis.smembers(rig.adapter.rooms_key), await rig.redis.smembers(rig.adapter.left_key)


def message(kind: str, msg_id: int, token: str = ROOM, text: str = "hello", **extra: Any) -> bytes:
    note = {"type": "Note", "id": str(msg_id), "name": "message" if kind == "Create" else "reaction",
            "content": php_json_encode({"message": text, "parameters": []}), "mediaType": "text/markdown"}  # fmt: skip
    payload = {
        "type": kind,
        "actor": {"type": "Person", "id": "users/alice", "name": "Alice"},
        "object": note,
        "target": {"type": "Collection", "id": token, "name": "General"},
        **extra,
    }
    return php_json_encode(payload).encode()


def reaction(kind: str, msg_id: int, emoji: str = "👍", token: str = ROOM) -> bytes:
    target = {"type": "Collection", "id": token, "name": "General"}
    actor = {"type": "Person", "id": "users/bob", "name": "Bob"}
    content = php_json_encode({"message": "react to me", "parameters": []})
    note = {"type": "Note", "id": str(msg_id), "name": "message", "content": content, "mediaType": "text/markdown"}
    if kind == "Like":
        payload = {"type": "Like", "actor": actor, "object": note, "target": target, "content": emoji}
    else:
        like = {"type": "Like", "actor": actor, "object": note, "target": target, "content": emoji}
        payload = {"type": "Undo", "actor": actor, "object": like, "target": target}
    return php_json_encode(payload).encode()


def membership(kind: str, token: str = ROOM) -> bytes:
    return php_json_encode({"type": kind, "actor": {"type": "Application", "id": "bots/bot-x", "name": "Bridge"},
                            "object": {"type": "Collection", "id": token, "name": "General"}}).encode()  # fmt: skip


# After the window -------------------------------------------------------------------------------
async def test_every_captured_webhook_replayed_after_the_window_is_refused_and_changes_nothing(
    talk: TalkServer, short: Rig
) -> None:
    rig = short
    alice, bob = talk.add_user("alice"), talk.add_user("bob")
    room = talk.create_room("General", token=ROOM, members=(alice, bob))
    bot = talk.install_bot("Bridge", SECRET, rig.url)
    assert await talk.enable_bot(bot, room.token)  # Join
    msg = await talk.post(room.token, alice, "hello")  # Create
    await talk.react(room.token, bob, msg.id, "👍")  # an Activity (Talk's "reaction" system message), a Like
    await talk.unreact(room.token, bob, msg.id, "👍")  # an Activity, an Undo
    await talk.disable_bot(bot, room.token)  # Leave
    await talk.enable_bot(bot, room.token)  # Join: the bot is back in the room
    captured = list(talk.state.webhook_calls)
    kinds = [json.loads(call.body)["type"] for call in captured]
    assert kinds == ["Join", "Create", "Activity", "Like", "Activity", "Undo", "Leave", "Join"]
    assert all(call.status == 200 for call in captured)
    events = await rig.redis.xlen(rig.stream)
    assert events == 3  # the message, the reaction and its removal
    state = await room_state(rig)
    assert state == ({ROOM.encode()}, set())

    await forgotten(rig, *map(random_of, captured))
    for call, kind in zip(captured, kinds, strict=True):
        replayed = await resend(rig.url, call)
        assert replayed.status_code == 409, (kind, replayed.text)
        if kind in ("Create", "Activity"):
            assert "older than the replay window" in replayed.json()["error"]
        else:
            assert "already received" in replayed.json()["error"]
    # The Leave above would have sent the room's deliveries to the dead letters: nothing changed.
    assert await room_state(rig) == state
    assert await rig.redis.xlen(rig.stream) == events
    rejected = metric(rig.metrics, "talkbridge_ingress_rejected_total", account=ACCOUNT, reason="replay")
    assert rejected == len(captured)
    # Talk's next genuine webhooks still cross.
    await talk.post(room.token, alice, "still here")
    await talk.react(room.token, bob, msg.id, "👍")  # the same reaction again: a new random
    assert [call.status for call in talk.state.webhook_calls[len(captured) :]] == [200, 200, 200]
    assert [e["text"] for e in await rig.events() if e["kind"] == "message"] == ["hello", "still here"]
    assert await rig.redis.xlen(rig.stream) == events + 2


async def test_a_replayed_leave_is_refused_long_after_the_window(short: Rig) -> None:
    rig = short
    leave = talk_random()
    assert (await post(rig.url, membership("Join"))).status_code == 200
    assert (await post(rig.url, membership("Leave"), leave)).status_code == 200
    assert await room_state(rig) == (set(), {ROOM.encode()})
    assert (await post(rig.url, membership("Join"))).status_code == 200
    await forgotten(rig, leave)
    replayed = await post(rig.url, membership("Leave"), leave)
    assert replayed.status_code == 409 and "already received" in replayed.text
    assert await room_state(rig) == ({ROOM.encode()}, set())
    ttl = await rig.redis.pttl(rig.adapter.replay_randoms_key)  # remembered for REPLAY_KEPT_DAYS
    assert 0.99 * REPLAY_KEPT_DAYS * 86_400_000 < ttl <= REPLAY_KEPT_DAYS * 86_400_000


async def test_a_replay_inside_the_window_moves_no_room(tmp_path: Path, redis: Redis, talk: TalkServer) -> None:
    """The refusal comes before any room change: a replayed Join after a
    Leave, or a replayed message from a room since left, re-enables nothing."""
    rig = await make_rig(tmp_path, redis, talk)
    try:
        join, create = talk_random(), talk_random()
        assert (await post(rig.url, membership("Join"), join)).status_code == 200
        assert (await post(rig.url, message("Create", 5), create)).status_code == 200
        assert (await post(rig.url, membership("Leave"))).status_code == 200
        left = await room_state(rig)
        assert left == (set(), {ROOM.encode()})
        assert (await post(rig.url, membership("Join"), join)).status_code == 409
        assert (await post(rig.url, message("Create", 5), create)).status_code == 409
        assert await room_state(rig) == left
        assert await rig.redis.xlen(rig.stream) == 1
    finally:
        await rig.close()


async def test_a_replayed_message_is_refused_by_its_id_even_out_of_order(short: Rig) -> None:
    rig = short
    first, second = talk_random(), talk_random()
    assert (await post(rig.url, message("Create", 10), first)).status_code == 200
    assert (await post(rig.url, message("Activity", 12, text="call_started"), second)).status_code == 200
    await forgotten(rig, first, second)
    # 11: never seen, but below an id Talk announced a window ago, so made before it
    for body, random in ((message("Create", 10), first), (message("Activity", 12), second),
                         (message("Create", 11), talk_random())):  # fmt: skip
        refused = await post(rig.url, body, random)
        assert refused.status_code == 409 and "older than the replay window" in refused.text
    assert await rig.redis.xlen(rig.stream) == 1
    assert (await post(rig.url, message("Create", 13))).status_code == 200  # newer: genuine
    assert await rig.redis.xlen(rig.stream) == 2


# Genuine webhooks --------------------------------------------------------------------------------
async def test_genuine_webhooks_are_admitted_out_of_order_and_repeated(
    tmp_path: Path, redis: Redis, talk: TalkServer
) -> None:
    rig = await make_rig(tmp_path, redis, talk)  # the default window: an hour
    try:
        bodies = [
            membership("Join"),
            message("Create", 20), message("Create", 22), message("Create", 21),  # a slower request's id
            message("Activity", 23), message("Create", 20, text="the same id, a new random"),
            reaction("Like", 20), reaction("Undo", 20), reaction("Like", 20),  # the same reaction twice
            membership("Leave"), membership("Join"), membership("Leave"), membership("Join"),
        ]  # fmt: skip
        statuses = [(await post(rig.url, body)).status_code for body in bodies]
        assert statuses == [200] * len(bodies)
        assert await rig.redis.xlen(rig.stream) == 7
        assert await room_state(rig) == ({ROOM.encode()}, set())
    finally:
        await rig.close()


async def test_concurrent_webhooks_are_each_admitted_once(tmp_path: Path, redis: Redis, talk: TalkServer) -> None:
    """Many at once share pipelines (bridge/groupcommit.py): each gets its own verdict."""
    rig = await make_rig(tmp_path, redis, talk)
    try:
        randoms = [talk_random() for _ in range(40)]
        bodies = [message("Create", 100 + i) if i % 2 else reaction("Like", 1, emoji=str(i)) for i in range(40)]
        first = await asyncio.gather(*(post(rig.url, b, r) for b, r in zip(bodies, randoms, strict=True)))
        again = await asyncio.gather(*(post(rig.url, b, r) for b, r in zip(bodies, randoms, strict=True)))
        assert [r.status_code for r in first] == [200] * 40
        assert [r.status_code for r in again] == [409] * 40
        assert await rig.redis.xlen(rig.stream) == 40
    finally:
        await rig.close()


async def test_a_redis_without_the_script_gets_it_again(tmp_path: Path, redis: Redis, talk: TalkServer) -> None:
    """A restarted Redis (the embedded one comes back from its AOF) has no scripts loaded."""
    rig = await make_rig(tmp_path, redis, talk)
    try:
        assert (await post(rig.url, message("Create", 1))).status_code == 200
        await redis.script_flush()
        random = talk_random()
        assert (await post(rig.url, message("Create", 2), random)).status_code == 200
        assert (await post(rig.url, message("Create", 2), random)).status_code == 409
        assert await rig.redis.xlen(rig.stream) == 2
    finally:
        await rig.close()


async def test_the_memory_of_reaction_randoms_keeps_the_newest(short: Rig) -> None:
    rig = short
    rig.adapter.replay_kept = 3
    randoms = [talk_random() for _ in range(5)]
    for i, random in enumerate(randoms):
        assert (await post(rig.url, reaction("Like", 1, emoji=str(i)), random)).status_code == 200
    kept = await rig.redis.zrange(rig.adapter.replay_randoms_key, 0, -1)
    assert kept == [r.encode() for r in randoms[2:]]
    await forgotten(rig, *randoms)
    assert (await post(rig.url, reaction("Like", 1, emoji="4"), randoms[4])).status_code == 409


# By generation ------------------------------------------------------------------------------------
KINDS = st.sampled_from(["Create", "Activity", "Like", "Undo", "Join", "Leave"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kinds=st.lists(KINDS, min_size=1, max_size=12),
    swaps=st.lists(st.integers(min_value=0, max_value=11), max_size=4),
    replays=st.lists(st.integers(min_value=0, max_value=11), max_size=4),
)
async def test_genuine_sequences_are_admitted_and_their_replays_refused(
    tmp_path: Path, redis: Redis, talk: TalkServer, kinds: list[str], swaps: list[int], replays: list[int]
) -> None:
    """Any mix of types, ids increasing but for neighbours swapped (requests
    racing), each with a new random: all admitted; then any of them again:
    refused, and the rooms set is where the genuine ones left it."""
    await redis.flushall()
    rig = await make_rig(tmp_path, redis, talk)
    try:
        ids = list(range(1000, 1000 + len(kinds)))
        for at in swaps:
            if at + 1 < len(ids):
                ids[at], ids[at + 1] = ids[at + 1], ids[at]
        sent: list[tuple[bytes, str]] = []
        for kind, msg_id in zip(kinds, ids, strict=True):
            if kind in ("Create", "Activity"):
                body = message(kind, msg_id)
            elif kind in ("Like", "Undo"):
                body = reaction(kind, 1)
            else:
                body = membership(kind)
            random = talk_random()
            assert (await post(rig.url, body, random)).status_code == 200, kind
            sent.append((body, random))
        state = await room_state(rig)
        in_room = kinds[-1] != "Leave" if kinds[-1] in ("Join", "Leave") else None
        if "Leave" not in kinds:
            assert state == ({ROOM.encode()}, set())
        elif in_room is not None:
            assert state == (({ROOM.encode()}, set()) if in_room else (set(), {ROOM.encode()}))
        events = await rig.redis.xlen(rig.stream)
        for at in replays:
            body, random = sent[at % len(sent)]
            assert (await post(rig.url, body, random)).status_code == 409
        assert await room_state(rig) == state
        assert await rig.redis.xlen(rig.stream) == events
    finally:
        await rig.close()
