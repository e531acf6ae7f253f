"""The Talk bot adapter in-process, against real Redis and the Talk test server."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from adapters.nctalk_bot import TalkBot, install_command
from adapters.talk.common import reference_id, render, split_message
from bridge.adapter import AccountFailed, PermanentError, RateLimited, ServerUnavailable, TransientError
from bridge.events import Delivery, Event, EventKind
from bridge.idmap import IdMap
from tests.helpers import metric
from tests.talkbot_rig import SECRET, Rig, bot_section, start_rig, write_config
from tests.talkserver import TalkServer, php_json_encode
from tests.talkserver.webhooks import signature, talk_random

ACCOUNT = "nctalkbot.talk"


async def make_rig(tmp_path: Path, redis: Redis, talk: TalkServer, max_body: int = 1 << 20, **opts) -> Rig:
    body = bot_section("talk", talk.url, **opts) + f"[http]\nMaxBodyBytes = {max_body}\n"
    config = write_config(tmp_path / "talkbridge.toml", body)
    return await start_rig(config, ACCOUNT, redis)


@pytest.fixture
async def rig(tmp_path: Path, redis: Redis, talk: TalkServer) -> AsyncIterator[Rig]:
    r = await make_rig(tmp_path, redis, talk)
    try:
        yield r
    finally:
        await r.close()


@pytest.fixture
async def room(talk: TalkServer, rig: Rig):
    alice = talk.add_user("alice", "Alice A.")
    room = talk.create_room("General", token="gen12345", members=(alice,))
    bot = talk.install_bot("Bridge", SECRET, rig.url)
    assert await talk.enable_bot(bot, room.token)
    return room, bot, alice


def signed_post(url: str, body: bytes, secret: str = SECRET, random: str | None = None, **headers) -> httpx.Response:
    random = random or talk_random()
    hdrs = {
        "Content-Type": "application/json",
        "X-Nextcloud-Talk-Random": random,
        "X-Nextcloud-Talk-Signature": signature(secret, random, body),
        "X-Nextcloud-Talk-Backend": "http://localhost/",
    }
    hdrs.update(headers)
    return httpx.post(url, content=body, headers=hdrs, timeout=5)


async def apost(url: str, body: bytes, secret: str = SECRET, random: str | None = None, **headers) -> httpx.Response:
    random = random or talk_random()
    hdrs = {
        "Content-Type": "application/json",
        "X-Nextcloud-Talk-Random": random,
        "X-Nextcloud-Talk-Signature": signature(secret, random, body),
    }
    hdrs.update({k.replace("_", "-"): v for k, v in headers.items()})
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.post(url, content=body, headers=hdrs)


def create_body(token: str = "gen12345", text: str = "hello", msg_id: str = "7") -> bytes:
    payload = {
        "type": "Create",
        "actor": {"type": "Person", "id": "users/alice", "name": "Alice"},
        "object": {
            "type": "Note",
            "id": msg_id,
            "name": "message",
            "content": php_json_encode({"message": text, "parameters": []}),
            "mediaType": "text/markdown",
        },
        "target": {"type": "Collection", "id": token, "name": "General"},
    }
    return php_json_encode(payload).encode()


# inbound -------------------------------------------------------------------------------
async def test_a_message_from_talk_is_in_redis_before_the_200(talk: TalkServer, rig: Rig, room) -> None:
    r, _bot, alice = room
    msg = await talk.post(r.token, alice, "héllo wörld 👋 see https://example.com/a/b")
    [call] = [c for c in talk.state.webhook_calls if b'"Create"' in c.body]
    assert call.status == 200
    # Talk's body is PHP-escaped and verified over those exact bytes.
    assert b"https:\\\\\\/\\\\\\/example.com" in call.body and b"\\\\u00e9" in call.body
    [event] = await r_events(rig)  # in the stream by the time Talk got its 200
    assert event["kind"] == "message" and event["account"] == ACCOUNT and event["channel"] == r.token
    assert event["text"] == "héllo wörld 👋 see https://example.com/a/b"
    assert event["native_id"] == str(msg.id)
    assert event["sender_id"] == "users/alice" and event["sender_name"] == "Alice A."
    assert event["origin"] == [f"{ACCOUNT}/{r.token}"]
    assert await rig.redis.smembers(rig.ctx.key("rooms")) == {r.token.encode()}
    assert metric(rig.metrics, "talkbridge_events_in_total", account=ACCOUNT) == 1


async def r_events(rig: Rig) -> list[dict]:
    return await rig.events()


async def test_mentions_files_and_replies_are_rendered(talk: TalkServer, rig: Rig, room) -> None:
    r, _bot, alice = room
    bob = talk.add_user("bob", "Bob B.")
    first = await talk.post(r.token, bob, "question?")
    await talk.post(r.token, alice, "hi @bob, {not a param}", reply_to=first.id)
    events = await rig.events()
    assert events[1]["text"] == "hi @Bob B., {not a param}"
    assert events[1]["reply_to"] == str(first.id)
    text, files = render(
        "{file}", {"file": {"type": "file", "id": "12", "name": "cat.jpg", "size": "2048", "mimetype": "image/jpeg",
                            "link": "https://cloud/f/12"}},
    )  # fmt: skip
    assert text == "cat.jpg"
    assert files[0].name == "cat.jpg" and files[0].size == 2048 and files[0].url == "https://cloud/f/12"
    assert render("plain {x}", [])[0] == "plain {x}"  # parameters [] (PHP's empty array)


async def test_talk19_payloads_are_understood(tmp_path: Path, redis: Redis) -> None:
    talk = await TalkServer(version=19, bruteforce_delay_scale=0).start()
    rig = await make_rig(tmp_path, redis, talk)
    try:
        alice = talk.add_user("alice")
        room = talk.create_room("Old", token="old12345", members=(alice,))
        bot = talk.install_bot("Bridge", SECRET, rig.url, ("webhook", "response"))
        await talk.enable_bot(bot, room.token)
        m1 = await talk.post(room.token, alice, "one")
        await talk.post(room.token, alice, "two", reply_to=m1.id)
        assert b"talkParticipantType" not in talk.state.webhook_calls[-1].body
        events = await rig.events()
        assert [e["text"] for e in events] == ["one", "two"]
        assert "reply_to" not in events[1]  # Talk 19 does not say which message was answered
    finally:
        await rig.close()
        await talk.stop()


async def test_reactions_from_talk(talk: TalkServer, rig: Rig, room) -> None:
    r, _bot, alice = room
    bob = talk.add_user("bob")
    msg = await talk.post(r.token, alice, "react to me")
    await talk.react(r.token, bob, msg.id, "👍")
    await talk.unreact(r.token, bob, msg.id, "👍")
    events = await rig.events()
    assert [e["kind"] for e in events] == ["message", "reaction", "unreaction"]
    for e in events[1:]:
        assert e["target_id"] == str(msg.id) and e["reaction"] == "👍" and e["sender_id"] == "users/bob"
    # the 'reaction' system messages reached the bot as Activity too, and were ignored
    assert sum(b'"Activity"' in c.body and c.status == 200 for c in talk.state.webhook_calls) == 2


async def test_join_and_leave_track_rooms_and_route_nothing(talk: TalkServer, rig: Rig, room) -> None:
    r, bot, _alice = room
    other = talk.create_room("Other", token="oth12345")
    await talk.enable_bot(bot, other.token)
    assert await rig.redis.smembers(rig.ctx.key("rooms")) == {r.token.encode(), b"oth12345"}
    await talk.disable_bot(bot, r.token)
    assert await rig.redis.smembers(rig.ctx.key("rooms")) == {b"oth12345"}
    assert await rig.redis.get(rig.ctx.key("self")) == f"bots/bot-{bot.url_hash}".encode()
    assert all(c.status == 200 for c in talk.state.webhook_calls)
    assert await rig.redis.xlen(rig.stream) == 0
    with pytest.raises(PermanentError, match="removed"):  # no 401 (and brute-force attempt) at Talk
        await rig.adapter.send(delivery(channel=r.token))
    assert talk.state.bot_requests == []
    await talk.enable_bot(bot, r.token)
    await rig.adapter.send(delivery(channel=r.token))
    assert len(talk.bot_messages(r.token, bot)) == 1


async def test_system_messages_are_ignored(rig: Rig) -> None:
    payload = json.loads(create_body())
    payload["type"] = "Activity"
    payload["object"]["name"] = "call_started"
    resp = await apost(rig.url, php_json_encode(payload).encode())
    assert resp.status_code == 200
    assert await rig.redis.xlen(rig.stream) == 0


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("wrong_secret", 401),
        ("missing_random", 401),
        ("missing_signature", 401),
        ("short_random", 401),
        ("body_changed", 401),
        ("reserialized", 401),
        ("bad_json", 400),
        ("not_an_object", 400),
        ("unknown_type", 400),
        ("content_not_json", 400),
        ("content_without_message", 400),
        ("no_target", 400),
        ("like_without_emoji", 400),
    ],
)
async def test_bad_webhooks_are_refused_and_publish_nothing(rig: Rig, case: str, status: int) -> None:
    body = create_body(text="a/b")
    random = talk_random()
    headers = {
        "Content-Type": "application/json",
        "X-Nextcloud-Talk-Random": random,
        "X-Nextcloud-Talk-Signature": signature(SECRET, random, body),
    }
    if case == "wrong_secret":
        headers["X-Nextcloud-Talk-Signature"] = signature("another-secret-" + "y" * 40, random, body)
    elif case == "missing_random":
        del headers["X-Nextcloud-Talk-Random"]
    elif case == "missing_signature":
        del headers["X-Nextcloud-Talk-Signature"]
    elif case == "short_random":
        headers["X-Nextcloud-Talk-Random"] = "abc"
        headers["X-Nextcloud-Talk-Signature"] = signature(SECRET, "abc", body)
    elif case == "body_changed":
        body = body.replace(b"General", b"GENERAL")
    elif case == "reserialized":  # same JSON, re-encoded without PHP's \/ escapes
        body = json.dumps(json.loads(body)).encode()
    else:
        payload = json.loads(body)
        if case == "bad_json":
            body = body[:-5]
        elif case == "not_an_object":
            body = b"[1, 2]"
        elif case == "unknown_type":
            payload["type"] = "Delete"
        elif case == "content_not_json":
            payload["object"]["content"] = "hello"
        elif case == "content_without_message":
            payload["object"]["content"] = php_json_encode({"parameters": []})
        elif case == "no_target":
            del payload["target"]
        elif case == "like_without_emoji":
            payload["type"] = "Like"
        if case not in ("bad_json", "not_an_object"):
            body = php_json_encode(payload).encode()
        headers["X-Nextcloud-Talk-Signature"] = signature(SECRET, random, body)
    async with httpx.AsyncClient(timeout=5) as client:
        resp = await client.post(rig.url, content=body, headers=headers)
    assert resp.status_code == status, resp.text
    assert await rig.redis.xlen(rig.stream) == 0
    assert await rig.redis.exists(rig.ctx.key("rooms")) == 0
    assert sum(s.value for m in rig.metrics.rejected.collect() for s in m.samples if s.name.endswith("_total")) == 1


async def test_a_replayed_random_is_refused(rig: Rig) -> None:
    body = create_body()
    random = talk_random()
    first = await apost(rig.url, body, random=random)
    again = await apost(rig.url, body, random=random)
    other_body_same_random = await apost(rig.url, create_body(msg_id="8"), random=random)
    assert (first.status_code, again.status_code, other_body_same_random.status_code) == (200, 409, 409)
    assert await rig.redis.xlen(rig.stream) == 1
    ttl = await rig.redis.ttl(rig.ctx.key("seen", random))
    assert 0 < ttl <= 3600


async def test_on_redis_cluster_a_webhook_is_admitted_in_one_script(
    tmp_path: Path, talk: TalkServer, cluster: RedisCluster
) -> None:
    """The admission script writes the random, the replay ids and the rooms
    sets together: on Redis Cluster it runs only because all of them are in
    the account's slot (bridge/keys.py); in other slots Cluster refuses it
    (CROSSSLOT) and every webhook gets a 503."""
    rig = await make_rig(tmp_path, cluster, talk)  # type: ignore[arg-type]
    try:
        alice = talk.add_user("alice", "Alice A.")
        room = talk.create_room("General", token="gen12345", members=(alice,))
        bot = talk.install_bot("Bridge", SECRET, rig.url)
        assert await talk.enable_bot(bot, room.token)  # Talk's Join webhook
        await talk.post(room.token, alice, "on a cluster")
        assert [c.status for c in talk.state.webhook_calls] == [200, 200]
        assert [e["text"] for e in await r_events(rig)] == ["on a cluster"]
        assert await rig.redis.smembers(rig.ctx.key("rooms")) == {room.token.encode()}
        random = talk_random()
        first = await apost(rig.url, create_body(msg_id="99999"), random=random)
        again = await apost(rig.url, create_body(msg_id="99999"), random=random)
        assert (first.status_code, again.status_code) == (200, 409)
    finally:
        await rig.close()


async def test_oversized_bodies_get_413(tmp_path: Path, redis: Redis, talk: TalkServer) -> None:
    rig = await make_rig(tmp_path, redis, talk, max_body=2048)
    try:
        body = create_body(text="x" * 4000)
        resp = await apost(rig.url, body)  # Content-Length says too much: refused before reading
        assert resp.status_code == 413

        async def chunks():
            yield body[:1000]
            yield body[1000:]

        random = talk_random()
        async with httpx.AsyncClient(timeout=5) as client:  # no Content-Length: the bounded read stops it
            resp = await client.post(
                rig.url,
                content=chunks(),
                headers={
                    "X-Nextcloud-Talk-Random": random,
                    "X-Nextcloud-Talk-Signature": signature(SECRET, random, body),
                },
            )
        assert resp.status_code == 413
        assert await redis.xlen(rig.stream) == 0
        assert (await apost(rig.url, create_body(text="small"))).status_code == 200
    finally:
        await rig.close()


async def test_redis_unreachable_answers_503(tmp_path: Path, talk: TalkServer) -> None:
    from tests.helpers import free_port

    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    rig = await make_rig(tmp_path, dead, talk)
    try:
        resp = await apost(rig.url, create_body())
        assert resp.status_code == 503
    finally:
        await rig.close()
        await dead.aclose()


# outbound ----------------------------------------------------------------------------------
def delivery(kind: EventKind = EventKind.MESSAGE, channel: str = "gen12345", **kw) -> Delivery:
    event = Event(
        kind=kind,
        account="api.a",
        channel="api",
        sender_name="carol",
        text=kw.pop("text", "hi there"),
        native_id=kw.pop("native_id", "n1"),
        reaction=kw.pop("reaction", None),
        target_id=kw.pop("source_target", None),
    )
    return Delivery(event, ACCOUNT, channel, "g", "[api/a] <carol> ", event.text, **kw)


async def test_send_posts_as_the_bot_signed_over_the_text(talk: TalkServer, rig: Rig, room) -> None:
    r, bot, alice = room
    parent = await talk.post(r.token, alice, "question")
    d = delivery(reply_to=str(parent.id), text="answer / réponse")
    assert await rig.adapter.send(d) is None  # Talk answers 201 with data null: no id
    [posted] = talk.bot_messages(r.token, bot)
    assert posted.message == "[api/a] <carol> answer / réponse"
    assert posted.parent_id == parent.id
    assert posted.reference_id == reference_id(d.key) and len(posted.reference_id) == 64
    assert posted.actor.display_name == "Bridge (Bot)"
    [req] = talk.requests("/message")
    assert req.status == 201 and req.headers["OCS-APIRequest"] == "true"
    assert len(req.headers["X-Nextcloud-Talk-Bot-Random"]) >= 32
    body = json.loads(req.body)
    assert body == {
        "message": posted.message,
        "referenceId": posted.reference_id,
        "silent": False,
        "replyTo": parent.id,
    }
    # the bot's own message never came back as a webhook
    assert sum(b'"Create"' in c.body for c in talk.state.webhook_calls) == 1


async def test_a_send_that_meets_a_dead_redis_posts_nothing_so_its_retry_posts_once(
    talk: TalkServer, rig: Rig, room, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Redis write a send makes (the text it remembers to learn the bot's
    message id later) comes before the post: a Redis failover at that moment
    fails the send with nothing posted, and its retry posts the message once.
    After the post, the error failed a send Talk had taken, and the retry
    posted it twice."""
    r, bot, _alice = room
    idmap = rig.adapter.ctx.idmap
    assert idmap is not None
    remember = idmap.remember
    failures = [redis.exceptions.ConnectionError("Connection closed by server.")]

    async def remember_once_redis_is_back(*args: object) -> None:
        if failures:
            raise failures.pop()  # the master died: this write never happened
        await remember(*args)

    monkeypatch.setattr(idmap, "remember", remember_once_redis_is_back)
    d = delivery(text="only once")
    with pytest.raises(redis.exceptions.ConnectionError):
        await rig.adapter.send(d)
    assert talk.bot_messages(r.token, bot) == []
    assert await rig.adapter.send(d) is None  # the delivery loop's retry, Redis back
    assert [m.message for m in talk.bot_messages(r.token, bot)] == ["[api/a] <carol> only once"]


async def test_the_brute_force_block_stops_the_account_until_reset(talk: TalkServer, rig: Rig, room) -> None:
    r, _bot, _alice = room
    url = f"{talk.url}/ocs/v2.php/apps/spreed/api/v1/bot/{r.token}/message"
    headers = {"OCS-APIRequest": "true", "Content-Type": "application/json", "Accept": "application/json",
               "X-Nextcloud-Talk-Bot-Random": "r" * 64, "X-Nextcloud-Talk-Bot-Signature": "0" * 64}  # fmt: skip
    async with (
        httpx.AsyncClient() as client
    ):  # someone else's bad signatures block our address (tests/test_talkserver.py)
        for _ in range(11):
            await client.post(url, json={"message": "x"}, headers=headers)
    with pytest.raises(AccountFailed, match="brute-force"):  # even a correct request, until the reset: stop
        await rig.adapter.send(delivery())
    talk.reset_bruteforce("127.0.0.1")  # occ security:bruteforce:reset 127.0.0.1
    assert await rig.adapter.send(delivery()) is None


async def test_a_401_is_account_failed_after_one_request(tmp_path: Path, redis: Redis, talk: TalkServer, room) -> None:
    r, _bot, _alice = room
    wrong = await make_rig(tmp_path, redis, talk, secret="wrong-" + "z" * 40)
    try:
        with pytest.raises(AccountFailed):
            await wrong.adapter.send(delivery())
        assert len(talk.requests("/message")) == 1
        assert talk.messages(r.token) == []
    finally:
        await wrong.close()


async def test_a_401_in_one_room_after_the_secret_worked_fails_only_that_room(talk: TalkServer, rig: Rig, room) -> None:
    _r, _bot, alice = room
    other = talk.create_room("Elsewhere", token="oth12345", members=(alice,))  # the bot is not enabled here
    assert await rig.adapter.send(delivery()) is None  # 201 in the bot's room: the secret is right
    with pytest.raises(PermanentError, match="not enabled in room oth12345"):
        await rig.adapter.send(delivery(channel=other.token))
    assert len(talk.requests("/oth12345/message")) == 1
    # From now on refused here, without another 401 (brute-force attempt) at Talk.
    with pytest.raises(PermanentError, match="removed"):
        await rig.adapter.send(delivery(channel=other.token))
    assert len(talk.requests("/oth12345/message")) == 1
    assert not await rig.redis.sismember(rig.adapter.rooms_key, other.token)
    assert await rig.adapter.send(delivery(text="still fine")) is None  # the account is not stopped


async def test_error_statuses_map_to_delivery_errors(talk: TalkServer, rig: Rig, room) -> None:
    r, _bot, _alice = room
    talk.fail_next(502)  # a proxy before a Talk that is down: the core waits for it, spending no attempt
    with pytest.raises(ServerUnavailable):
        await rig.adapter.send(delivery())
    talk.set_maintenance(True)  # occ maintenance:mode --on answers every OCS call 503
    with pytest.raises(ServerUnavailable, match="503"):
        await rig.adapter.send(delivery())
    talk.set_maintenance(False)
    talk.fail_next(500)  # Talk failed on this request: retried within the delivery's budget
    with pytest.raises(TransientError) as failed:
        await rig.adapter.send(delivery())
    assert not isinstance(failed.value, ServerUnavailable)
    talk.fail_next(429, headers={"Retry-After": "7"})  # a proxy's rate limit, saying when
    with pytest.raises(RateLimited) as limited:
        await rig.adapter.send(delivery())
    assert limited.value.retry_after == 7
    with pytest.raises(PermanentError):  # replyTo a message that does not exist: 400
        await rig.adapter.send(delivery(reply_to="999999"))
    # A room the bot is not enabled in: Talk says 401, like a wrong secret; the
    # Join webhook of the fixture proved the secret, so only the room fails.
    with pytest.raises(PermanentError, match="not enabled in room nobot123"):
        await rig.adapter.send(delivery(channel="nobot123"))
    with pytest.raises(PermanentError):  # route requirement on the token: 404
        await rig.adapter.send(delivery(channel="NOT-A-TOKEN"))
    assert talk.bot_messages(r.token, _bot) == []


async def test_too_long_for_talk_is_permanent(tmp_path: Path, redis: Redis, talk: TalkServer, room) -> None:
    rig = await make_rig(tmp_path, redis, talk, MessageLength=40000)  # more than this Talk allows
    try:
        with pytest.raises(PermanentError, match="413"):
            await rig.adapter.send(delivery(text="y" * 33000))
    finally:
        await rig.close()


async def test_connection_refused_is_server_unavailable(tmp_path: Path, redis: Redis, talk: TalkServer) -> None:
    from tests.helpers import free_port

    config = write_config(tmp_path / "c.toml", bot_section("talk", f"http://127.0.0.1:{free_port()}"))
    rig = await start_rig(config, ACCOUNT, redis)
    try:
        with pytest.raises(ServerUnavailable, match="unreachable"):  # refused: Talk never saw it
            await rig.adapter.send(delivery())
    finally:
        await rig.close()


async def test_long_messages_are_split(tmp_path: Path, redis: Redis, talk: TalkServer, room) -> None:
    r, bot, alice = room
    parent = await talk.post(r.token, alice, "q")
    rig = await make_rig(tmp_path, redis, talk, MessageLength=60)
    try:
        text = " ".join(f"word{i:02d}" for i in range(30))
        d = delivery(text=text, reply_to=str(parent.id))
        await rig.adapter.send(d)
        posted = talk.bot_messages(r.token, bot)
        assert len(posted) > 1 and all(len(m.message) <= 60 for m in posted)
        assert " ".join(m.message for m in posted) == d.username.strip() + " " + text
        assert [m.parent_id for m in posted] == [parent.id] + [None] * (len(posted) - 1)
        assert len({m.reference_id for m in posted}) == len(posted)
    finally:
        await rig.close()
    assert split_message("a" * 10, 4) == ["aaaa", "aaaa", "aa"]
    assert split_message("ab\ncd ef", 5) == ["ab", "cd ef"]


async def test_redelivery_reuses_the_reference_id(talk: TalkServer, rig: Rig, room) -> None:
    r, bot, _alice = room
    d = delivery()
    await rig.adapter.send(d)
    await rig.adapter.send(d)  # what a crash between Talk's 201 and the core's marker causes
    first, second = talk.bot_messages(r.token, bot)
    assert first.reference_id == second.reference_id == reference_id(d.key)  # Talk does not dedupe on it


async def test_reactions_to_talk_and_their_echo(talk: TalkServer, rig: Rig, room) -> None:
    r, bot, alice = room
    msg = await talk.post(r.token, alice, "nice")
    add = delivery(EventKind.REACTION, reaction="🎉", target_id=str(msg.id), source_target="x")
    await rig.adapter.send(add)
    assert msg.reactions == {"🎉": [bot.actor.ref]}
    # Talk sent the bot's own reaction back to it as a Like; it was answered 200 and dropped
    likes = [c for c in talk.state.webhook_calls if b'"Like"' in c.body]
    assert len(likes) == 1 and likes[0].status == 200
    await rig.adapter.send(add)  # again (redelivery): Talk answers 200 "already there"
    assert talk.requests("/reaction/")[-1].status == 200
    remove = delivery(EventKind.UNREACTION, reaction="🎉", target_id=str(msg.id), source_target="x")
    await rig.adapter.send(remove)
    assert msg.reactions == {}
    await rig.adapter.send(remove)  # redelivered removal: 404 means it is gone already
    assert talk.requests("/reaction/")[-1].status == 404
    events = await rig.events()
    assert [e["kind"] for e in events] == ["message"]  # no echo of our own reactions
    [req] = talk.requests("/reaction/", "POST")[:1]
    random = req.headers["X-Nextcloud-Talk-Bot-Random"]
    assert req.headers["X-Nextcloud-Talk-Bot-Signature"] == signature(SECRET, random, "🎉".encode())


async def test_a_failed_reaction_keeps_its_error_when_its_marker_cannot_be_removed(
    talk: TalkServer, rig: Rig, room, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, _bot, alice = room
    msg = await talk.post(r.token, alice, "nice")
    talk.fail_next(502)  # the reaction fails: the echo marker set before it must go again

    async def redis_gone(*_keys: str) -> int:  # and Redis goes away just then
        raise ConnectionError("Redis went away")

    monkeypatch.setattr(rig.adapter.ctx.redis, "delete", redis_gone)
    with pytest.raises(TransientError, match="502"):  # the delivery's error, not the cleanup's
        await rig.adapter.send(delivery(EventKind.REACTION, reaction="🎉", target_id=str(msg.id), source_target="x"))
    [record] = [rec for rec in caplog.records if "echo marker" in rec.getMessage()]
    assert ACCOUNT in record.getMessage() and "Redis went away" in record.getMessage()


async def test_reaction_echo_with_the_old_actor_bug(talk: TalkServer, rig: Rig, room) -> None:
    """Before spreed#16889 the Like named the message author: the marker still catches it."""
    r, _bot, alice = room
    talk.state.reaction_actor = "author"
    msg = await talk.post(r.token, alice, "hello")
    await rig.adapter.send(delivery(EventKind.REACTION, reaction="👍", target_id=str(msg.id), source_target="x"))
    bob = talk.add_user("bob")
    await talk.react(r.token, bob, msg.id, "👍")  # a real user's reaction still crosses
    events = await rig.events()
    assert [e["kind"] for e in events] == ["message", "reaction"]


async def test_replies_and_reactions_to_bridged_messages_learn_their_id(talk: TalkServer, rig: Rig, room) -> None:
    r, bot, alice = room
    idmap = IdMap(rig.redis, "tb", 3600)
    await rig.adapter.send(delivery(text="bridged hello"))  # a copy of api.a's message "n1"
    [copy] = talk.bot_messages(r.token, bot)
    assert await idmap.resolve(ACCOUNT, r.token, str(copy.id), "api.a", "api") is None  # Talk gave no id
    await talk.post(r.token, alice, "a reply to the bridged message", reply_to=copy.id)
    reply = (await r_events(rig))[-1]
    assert reply["reply_to"] == str(copy.id)
    # Talk showed the copy's id in inReplyTo: the reply now reaches api.a threaded on "n1".
    assert await idmap.resolve(ACCOUNT, r.token, str(copy.id), "api.a", "api") == "n1"

    await rig.adapter.send(delivery(text="another one", native_id="n2"))
    second = talk.bot_messages(r.token, bot)[-1]
    await talk.react(r.token, alice, second.id, "🎉")
    assert (await r_events(rig))[-1]["kind"] == "reaction"
    assert await idmap.resolve(ACCOUNT, r.token, str(second.id), "api.a", "api") == "n2"


async def test_edits_and_deletes_are_skipped(talk: TalkServer, rig: Rig) -> None:
    for kind in (EventKind.EDIT, EventKind.DELETE):
        assert await rig.adapter.send(delivery(kind, target_id="5", source_target="x")) is None
    assert talk.state.bot_requests == []


async def test_webhook_own_actor_is_known_from_the_webhook_url(tmp_path: Path, redis: Redis, talk: TalkServer) -> None:
    url = "https://bridge.example.com/webhook/nextcloud/talk"
    rig = await make_rig(tmp_path, redis, talk, WebhookURL=url)
    try:
        assert rig.adapter.self_actor == "bots/bot-" + hashlib.sha1(url.encode()).hexdigest()
    finally:
        await rig.close()


# config and CLI helper ---------------------------------------------------------------------
def test_install_command_and_account_checks(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "a.toml",
        bot_section(
            "talk", "https://cloud.example.com", WebhookURL="https://bridge.example.com/webhook/nextcloud/talk"
        ),
    )
    line = install_command(config.accounts[ACCOUNT])
    assert line == (
        "occ talk:bot:install --feature webhook --feature response --feature reaction "
        f"'talk' '{SECRET}' 'https://bridge.example.com/webhook/nextcloud/talk'"
    )
    bare = write_config(tmp_path / "b.toml", bot_section("x", "https://cloud.example.com", BotName="It's me"))
    assert install_command(bare.accounts["nctalkbot.x"]).endswith(
        "'It'\"'\"'s me' " + f"'{SECRET}' 'https://PUBLIC-HOST/webhook/nextcloud/x'"
    )
    from bridge.config import ConfigError

    with pytest.raises(ConfigError) as err:
        write_config(tmp_path / "c.toml", bot_section("y", "cloud.example.com", secret="short"))
    assert sorted(err.value.problems) == [
        "nctalkbot.y.BotSecret: must be 40 to 128 characters (Talk refuses others)",
        'nctalkbot.y.Server: "cloud.example.com" is not an http(s) URL',
    ]
    assert TalkBot.options["BotSecret"].secret
