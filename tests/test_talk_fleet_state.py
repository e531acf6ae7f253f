"""The Talk bot's knowledge is the fleet's, not one process's.

Webhooks land on any instance and deliveries run on whichever instance holds
the account's lease: what one instance learned (Talk proved it shares our
secret; a room was refused, or proved again) must count on every other. Two
adapters on one Redis and one Talk test server stand for two daemons.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from bridge.adapter import AccountFailed, PermanentError, TransientError
from bridge.events import Event
from tests.talkbot_rig import SECRET, Rig, bot_section, start_rig, write_config
from tests.talkserver import TalkServer, php_json_encode
from tests.talkserver.webhooks import join_payload
from tests.test_nctalk_bot import ACCOUNT, apost, create_body, delivery

DEAD_URL = "http://127.0.0.1:9/webhook/nextcloud/talk"  # nothing listens: Talk's webhooks go nowhere


async def instance(tmp_path: Path, redis: Redis, talk: TalkServer, name: str, secret: str = SECRET) -> Rig:
    """One daemon's adapter for the account (each its own config file, as on its own host)."""
    config = write_config(tmp_path / f"{name}.toml", bot_section("talk", talk.url, secret=secret))
    return await start_rig(config, ACCOUNT, redis)


@pytest.fixture
async def fleet(tmp_path: Path, redis: Redis, talk: TalkServer) -> AsyncIterator[tuple[Rig, Rig]]:
    one = await instance(tmp_path, redis, talk, "one")
    two = await instance(tmp_path, redis, talk, "two")
    try:
        yield one, two
    finally:
        await one.close()
        await two.close()


# secret proven -------------------------------------------------------------------------------
async def test_a_webhook_verified_on_one_instance_proves_the_secret_on_another(
    talk: TalkServer, fleet: tuple[Rig, Rig]
) -> None:
    one, two = fleet
    alice = talk.add_user("alice", "Alice A.")
    room = talk.create_room("General", token="gen12345", members=(alice,))
    other = talk.create_room("Elsewhere", token="oth12345", members=(alice,))  # the bot is not enabled here
    bot = talk.install_bot("Bridge", SECRET, one.url)  # Talk's webhooks reach instance one only
    assert await talk.enable_bot(bot, room.token)  # the Join lands on instance one: verified there
    assert [c.status for c in talk.state.webhook_calls] == [200]
    # Instance two has seen nothing itself; the 401 still means "not in this room".
    with pytest.raises(PermanentError, match="not enabled in room oth12345"):
        await two.adapter.send(delivery(channel=other.token))
    assert await two.redis.sismember(two.adapter.left_key, other.token)  # refused, fleet-wide
    with pytest.raises(PermanentError, match="removed"):  # on instance one too, without asking Talk
        await one.adapter.send(delivery(channel=other.token))
    assert len(talk.requests("/oth12345/message")) == 1
    assert await two.adapter.send(delivery(channel=room.token)) is None  # the account carries on


async def test_a_request_accepted_on_one_instance_proves_the_secret_on_another(
    talk: TalkServer, fleet: tuple[Rig, Rig]
) -> None:
    one, two = fleet
    alice = talk.add_user("alice", "Alice A.")
    room = talk.create_room("General", token="gen12345", members=(alice,))
    other = talk.create_room("Elsewhere", token="oth12345", members=(alice,))
    bot = talk.install_bot("Bridge", SECRET, DEAD_URL)  # no webhook reaches any instance
    assert await talk.enable_bot(bot, room.token)
    assert await one.adapter.send(delivery(channel=room.token)) is None  # Talk's 201: the secret is right
    with pytest.raises(PermanentError, match="not enabled in room oth12345"):
        await two.adapter.send(delivery(channel=other.token))


async def test_without_proof_anywhere_a_401_stops_the_account(talk: TalkServer, fleet: tuple[Rig, Rig]) -> None:
    one, two = fleet
    alice = talk.add_user("alice", "Alice A.")
    room = talk.create_room("General", token="gen12345", members=(alice,))
    other = talk.create_room("Elsewhere", token="oth12345", members=(alice,))
    bot = talk.install_bot("Bridge", SECRET, DEAD_URL)
    assert await talk.enable_bot(bot, room.token)
    for rig in (two, one):
        with pytest.raises(AccountFailed):
            await rig.adapter.send(delivery(channel=other.token))
    assert not await two.redis.sismember(two.adapter.left_key, other.token)  # no room refused on a guess
    assert len(talk.requests("/oth12345/message")) == 2


async def test_a_proof_made_with_another_secret_does_not_count(tmp_path: Path, redis: Redis, talk: TalkServer) -> None:
    """BotSecret changed (and wrong) on restart: the old secret's proof must not
    turn "credentials refused" into refusing rooms one 401 at a time."""
    alice = talk.add_user("alice", "Alice A.")
    room = talk.create_room("General", token="gen12345", members=(alice,))
    bot = talk.install_bot("Bridge", SECRET, DEAD_URL)
    assert await talk.enable_bot(bot, room.token)
    before = await instance(tmp_path, redis, talk, "before")
    try:
        assert await before.adapter.send(delivery(channel=room.token)) is None  # proven, with SECRET
    finally:
        await before.close()
    after = await instance(tmp_path, redis, talk, "after", secret="changed-" + "q" * 40)
    try:
        with pytest.raises(AccountFailed):
            await after.adapter.send(delivery(channel=room.token))
        assert not await redis.sismember(after.adapter.left_key, room.token)
    finally:
        await after.close()


# rooms -------------------------------------------------------------------------------------
async def test_a_verified_webhook_lifts_a_room_refused_by_another_instance(
    talk: TalkServer, fleet: tuple[Rig, Rig]
) -> None:
    one, two = fleet
    alice = talk.add_user("alice", "Alice A.")
    room = talk.create_room("General", token="gen12345", members=(alice,))
    bot = talk.install_bot("Bridge", SECRET, one.url)
    assert await talk.enable_bot(bot, room.token)  # instance one writes the room (and remembers it did)
    talk.fail_next(401)  # e.g. a proxy in front of Talk, or Talk briefly not finding the bot
    with pytest.raises(PermanentError, match="not enabled in room gen12345"):
        await two.adapter.send(delivery(channel=room.token))
    assert await two.redis.smembers(two.adapter.rooms_key) == set()
    # A message in the room, verified on instance one: the bot is in the room after all.
    await talk.post(room.token, alice, "still here")
    assert [c.status for c in talk.state.webhook_calls] == [200, 200]
    assert await one.redis.smembers(one.adapter.rooms_key) == {room.token.encode()}  # what a "*" channel uses
    assert not await one.redis.sismember(one.adapter.left_key, room.token)
    assert await two.adapter.send(delivery(channel=room.token)) is None
    assert len(talk.bot_messages(room.token, bot)) == 1


async def test_a_leave_on_one_instance_holds_until_a_join_on_another(talk: TalkServer, fleet: tuple[Rig, Rig]) -> None:
    one, two = fleet
    alice = talk.add_user("alice", "Alice A.")
    room = talk.create_room("General", token="gen12345", members=(alice,))
    bot = talk.install_bot("Bridge", SECRET, one.url)
    assert await talk.enable_bot(bot, room.token)
    await talk.post(room.token, alice, "hello")  # instance one has the room confirmed
    # Talk removes the bot; its Leave reaches instance two (a load balancer's choice).
    room.bots.discard(bot.id)
    leave = php_json_encode(join_payload(room, bot, "Leave")).encode()
    assert (await apost(two.url, leave)).status_code == 200
    for rig in (one, two):
        assert await rig.redis.smembers(rig.adapter.rooms_key) == set()
        with pytest.raises(PermanentError, match="removed"):
            await rig.adapter.send(delivery(channel=room.token))
    assert talk.requests("/gen12345/message") == []
    assert await talk.enable_bot(bot, room.token)  # the Join lands on instance one
    assert await two.redis.smembers(two.adapter.rooms_key) == {room.token.encode()}
    assert await two.adapter.send(delivery(channel=room.token)) is None


# nothing swallowed without a trace ------------------------------------------------------------
async def test_a_failed_replay_marker_cleanup_is_logged_with_the_account(
    fleet: tuple[Rig, Rig], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    one, _two = fleet

    async def publish_fails(event: Event) -> str:
        raise RedisConnectionError("Connection reset by peer")

    async def delete_fails(*keys: str) -> int:
        raise RedisConnectionError("Connection refused")

    one.ctx.publish = publish_fails
    monkeypatch.setattr(one.redis, "delete", delete_fails)
    with caplog.at_level(logging.WARNING):
        resp = await apost(one.url, create_body())
    assert resp.status_code == 503
    [line] = [r.getMessage() for r in caplog.records if "replay marker" in r.getMessage()]
    assert line.startswith(f"{ACCOUNT}: ") and "Connection refused" in line
    assert json.loads(resp.text)["error"].startswith("message queue unavailable")


async def test_redis_failing_around_a_talk_request_is_logged_and_never_misread(
    talk: TalkServer, fleet: tuple[Rig, Rig], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    one, two = fleet
    alice = talk.add_user("alice", "Alice A.")
    room = talk.create_room("General", token="gen12345", members=(alice,))
    bot = talk.install_bot("Bridge", SECRET, DEAD_URL)
    assert await talk.enable_bot(bot, room.token)

    async def redis_down(*args: object, **kwargs: object) -> object:
        raise RedisConnectionError("Connection refused")

    monkeypatch.setattr(one.adapter._commands, "run", redis_down)
    monkeypatch.setattr(two.redis, "exists", redis_down)
    with caplog.at_level(logging.WARNING):
        # Posted: recording the proof for the fleet fails, the delivery does not.
        assert await one.adapter.send(delivery(channel=room.token)) is None
        # Proven here: a 401 is still this room's, though refusing the room cannot be recorded.
        talk.fail_next(401)
        with pytest.raises(PermanentError, match="not enabled in room gen12345"):
            await one.adapter.send(delivery(channel=room.token))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines == [
        f"{ACCOUNT}: could not record that Talk accepted the secret: Connection refused",
        f"{ACCOUNT}: could not record room gen12345 as refused: Connection refused",
    ]
    # Not proven here and the fleet's answer unreadable: neither a room refused nor the account stopped on a guess.
    talk.fail_next(401)
    with pytest.raises(TransientError, match="whether the secret was proven is unknown"):
        await two.adapter.send(delivery(channel=room.token))
