"""What the Talk user adapter does with answers Talk never sends (a broken
proxy, a hostile server): a clear error naming the problem, nothing
published, the cursor where it was, the room retried — and guest mode's
public-room flow (seed 003)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

from bridge.events import EventKind
from tests.nctalk_rig import PASSWORD, UserRig, delivery, gateway, load, past_sentinel, start_user_rig, user_section
from tests.talkbot_rig import until
from tests.talkserver import TalkServer
from tests.test_nctalk import ACCOUNT, ROOM, Pauses, _at_least, _has_cursor, api_event

TALK_VERSION = 19  # the conftest's talk speaks it

GOOD_MESSAGE = {"id": 1, "actorType": "users", "actorId": "alice", "actorDisplayName": "A", "timestamp": 1,
                "message": "x", "messageParameters": [], "systemMessage": "", "messageType": "comment"}  # fmt: skip


def ocs(data: object) -> bytes:
    return orjson.dumps({"ocs": {"meta": {"status": "ok", "statuscode": 200, "message": "OK"}, "data": data}})


HOSTILE = {
    "not JSON": (b"<html>proxy error</html>", {}),
    "not OCS": (b'{"data": []}', {}),
    "data not a list": (ocs({"a": 1}), {"X-Chat-Last-Given": "999999"}),
    "message id a string": (ocs([{**GOOD_MESSAGE, "id": "1"}]), {"X-Chat-Last-Given": "999999"}),
    "parameters a non-empty list": (ocs([{**GOOD_MESSAGE, "messageParameters": [1]}]), {}),
    "a parameter not an object": (ocs([{**GOOD_MESSAGE, "messageParameters": {"a": "b"}}]), {}),
    "too many messages": (ocs([GOOD_MESSAGE] * 201), {}),
    "last given not a number": (ocs([GOOD_MESSAGE]), {"X-Chat-Last-Given": "12abc"}),
    "cursor not moving": (ocs([]), {"X-Chat-Last-Given": "0"}),
    "oversized": (b" " * (1 << 17), {}),
}


@pytest.fixture
async def rig(tmp_path: Path, talk: TalkServer, redis: Redis) -> AsyncIterator[UserRig]:
    bridge = talk.add_user("bridge", "Bridge", password=PASSWORD)
    alice = talk.add_user("alice", "Alice")
    talk.create_room("Bridged", ROOM, (alice, bridge))
    text = user_section("cloud", talk.url, PollTimeout=1, MaxAnswerBytes=1 << 16) + gateway("g", (ACCOUNT, ROOM))
    r = await start_user_rig(load(tmp_path, text), ACCOUNT, redis)
    try:
        await until(lambda: _has_cursor(r, ROOM), what="cursor")
        yield r
    finally:
        await r.close()


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_a_hostile_poll_answer_changes_nothing_and_is_retried(rig, talk, case, caplog) -> None:
    body, headers = HOSTILE[case]
    alice = talk.state.rooms[ROOM].participants["users/alice"]
    pauses = rig.adapter.pause = Pauses()
    cursor = await rig.cursor(ROOM)
    caplog.set_level(logging.WARNING, "talkbridge")
    talk.fail_chat_next(200, headers={"Content-Type": "application/json", **headers}, method="GET", body=body)
    await until(lambda: pauses.delays, what="the refused answer")
    assert await rig.cursor(ROOM) == cursor and await rig.events() == []
    assert any("ALERT: room room1234 failing" in r.getMessage() for r in caplog.records)
    # the next answer is Talk's again: the room goes on from where it was
    msg = await talk.post(ROOM, alice, "after")
    await until(rig.events, what="the message after")
    assert await rig.texts() == ["after"] and await rig.cursor(ROOM) == msg.id


async def test_a_hostile_answer_to_a_post_is_a_retry_not_a_crash(rig, talk) -> None:
    from bridge.adapter import TransientError

    talk.fail_chat_next(201, method="POST", body=b"{not json", headers={"Content-Type": "application/json"})
    with pytest.raises(TransientError, match="not understood"):
        await rig.adapter.send(delivery(api_event(), ACCOUNT, ROOM))


# guests (seed 003) -----------------------------------------------------------------------
@pytest.fixture
async def guest_rig(tmp_path: Path, talk: TalkServer, redis: Redis) -> AsyncIterator[UserRig]:
    alice = talk.add_user("alice", "Alice")
    talk.create_room("Public", ROOM, (alice,))
    talk.make_public(ROOM)
    text = user_section("cloud", talk.url, login="", PollTimeout=1) + gateway("g", (ACCOUNT, ROOM))
    r = await start_user_rig(load(tmp_path, text), ACCOUNT, redis)
    try:
        await until(lambda: _has_cursor(r, ROOM), what="cursor")
        yield r
    finally:
        await r.close()


async def test_a_guest_joins_a_public_room_polls_and_posts_with_its_name(guest_rig, talk) -> None:
    r = guest_rig
    alice = talk.state.rooms[ROOM].participants["users/alice"]
    [page] = talk.chat_requests(f"/call/{ROOM}", "GET")
    assert page.status == 200
    [join] = talk.chat_requests(f"/room/{ROOM}/participants/active", "POST")
    assert join.status == 200 and talk.COOKIE in join.headers.get("Cookie", "")
    token = talk.sessions[next(iter(talk.sessions))].request_token
    assert join.headers.get("requesttoken") == token  # sent as seed 003 says
    await talk.post(ROOM, alice, "hello guest")
    await until(r.events, what="alice's message")
    assert await r.texts() == ["hello guest"]
    native = await r.adapter.send(delivery(api_event("hi from the bridge"), ACCOUNT, ROOM, username="[api/a] <bob> "))
    posted = talk.state.messages[int(native)]
    assert posted.actor.type == "guests" and posted.message == "[api/a] <bob> hi from the bridge"
    sent = orjson.loads(talk.chat_requests(f"/chat/{ROOM}", "POST")[-1].body)
    assert sent["actorDisplayName"] == "[api/a] <bob>"
    # the guest's own message is not relayed back (it would be before a sentinel alice says after it)
    assert [e.kind for e in await past_sentinel(r, talk, alice, ROOM)] == [EventKind.MESSAGE]


async def test_a_guest_whose_session_expired_joins_again(guest_rig, talk) -> None:
    r = guest_rig
    alice = talk.state.rooms[ROOM].participants["users/alice"]
    talk.expire_guest_sessions()
    await talk.post(ROOM, alice, "after expiry")
    await until(lambda: _at_least(r, 1), what="the message after a rejoin")
    assert len(talk.chat_requests(f"/room/{ROOM}/participants/active", "POST")) >= 2
    native = await r.adapter.send(delivery(api_event("still here"), ACCOUNT, ROOM))
    assert talk.state.messages[int(native)].actor.type == "guests"
    # both guest identities are the bridge's own: neither is relayed back
    assert [e.text for e in await past_sentinel(r, talk, alice, ROOM)] == ["after expiry"]
