"""The Talk test server itself: where it must behave like Talk for the
product's tests to mean anything (a body-signed reply is refused, the
brute-force throttle answers 429 after ten failures)."""

from __future__ import annotations

import hashlib
import hmac
import json

import httpx
import pytest

from tests.talkbot_rig import SECRET
from tests.talkserver import TalkServer
from tests.talkserver.webhooks import signature


@pytest.fixture
async def room(talk: TalkServer):
    alice = talk.add_user("alice", "Alice A.")
    room = talk.create_room("General", token="gen12345", members=(alice,))
    bot = talk.install_bot("Bridge", SECRET, "http://127.0.0.1:9/webhook/nextcloud/talk")  # no webhooks needed
    await talk.enable_bot(bot, room.token)
    return room, bot, alice


async def test_the_test_server_refuses_a_body_signed_reply(talk: TalkServer, room) -> None:
    r, _bot, _alice = room
    body = json.dumps({"message": "hi"}).encode()
    random = "r" * 64
    headers = {
        "OCS-APIRequest": "true",
        "Accept": "application/json",
        "Content-Type": "application/json",
        "X-Nextcloud-Talk-Bot-Random": random,
        "X-Nextcloud-Talk-Bot-Signature": hmac.new(SECRET.encode(), random.encode() + body, hashlib.sha256).hexdigest(),
    }
    url = f"{talk.url}/ocs/v2.php/apps/spreed/api/v1/bot/{r.token}/message"
    async with httpx.AsyncClient() as client:
        resp = await client.post(url, content=body, headers=headers)
        assert resp.status_code == 401
        assert resp.json() == {"ocs": {"meta": {"status": "failure", "statuscode": 401, "message": ""}, "data": None}}
        headers["X-Nextcloud-Talk-Bot-Signature"] = signature(SECRET, random, b"hi")
        ok = await client.post(url, content=body, headers=headers)
        assert ok.status_code == 201
        assert ok.json() == {"ocs": {"meta": {"status": "ok", "statuscode": 201, "message": "OK"}, "data": None}}
        del headers["OCS-APIRequest"]
        assert (await client.post(url, content=body, headers=headers)).status_code == 412


async def test_brute_force_protection_answers_429_after_ten_failures(talk: TalkServer, room) -> None:
    r, _bot, _alice = room
    url = f"{talk.url}/ocs/v2.php/apps/spreed/api/v1/bot/{r.token}/message"
    headers = {"OCS-APIRequest": "true", "Content-Type": "application/json", "Accept": "application/json",
               "X-Nextcloud-Talk-Bot-Random": "r" * 64, "X-Nextcloud-Talk-Bot-Signature": "0" * 64}  # fmt: skip
    async with httpx.AsyncClient() as client:
        codes = [(await client.post(url, json={"message": "x"}, headers=headers)).status_code for _ in range(12)]
    assert codes == [401] * 10 + [429, 429]


# what Talk refuses on the user routes (tests/talkserver/chat_api.py) -------------------
API = "/ocs/v2.php/apps/spreed/api"
USER_HEADERS = {"OCS-APIRequest": "true", "Accept": "application/json"}


@pytest.fixture
async def users(talk: TalkServer):
    """alice owns gen12345 (a moderator); bob is a plain participant."""
    alice = talk.add_user("alice", "Alice A.", password="pw-alice")
    bob = talk.add_user("bob", "Bob", password="pw-bob")
    talk.create_room("General", token="gen12345", members=(alice, bob))
    return alice, bob


def _client(talk: TalkServer, user: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=talk.url, auth=(user, f"pw-{user}"), headers=USER_HEADERS)


async def _statuses(client: httpx.AsyncClient, posted: int) -> dict[str, int]:
    """What each of a user's chat routes answers in gen12345 (``posted``: a message of the caller's there)."""
    chat = f"{API}/v1/chat/gen12345"
    poll = {"lookIntoFuture": 1, "timeout": 0, "lastKnownMessageId": posted}
    return {
        "history": (await client.get(chat, params={"lookIntoFuture": 0})).status_code,
        "poll": (await client.get(chat, params=poll)).status_code,
        "post": (await client.post(chat, json={"message": "hi"})).status_code,
        "edit": (await client.put(f"{chat}/{posted}", json={"message": "edited"})).status_code,
        "react": (await client.post(f"{API}/v1/reaction/gen12345/{posted}", json={"reaction": "👍"})).status_code,
        "reactions": (await client.get(f"{API}/v1/reaction/gen12345/{posted}")).status_code,
    }


async def test_user_routes_are_served_on_talks_api_version_and_token_pattern_only(talk: TalkServer, users) -> None:
    """routesChatController.php / routesReactionController.php: v1; routesRoomController.php: v4;
    token ``[a-z0-9]{4,30}``. A route Talk does not have is the router's 404, before authentication."""
    async with _client(talk, "alice") as client:
        assert (await client.get(f"{API}/v1/chat/gen12345", params={"lookIntoFuture": 0})).status_code == 304
        assert (await client.get(f"{API}/v4/chat/gen12345", params={"lookIntoFuture": 0})).status_code == 404
        assert (await client.post(f"{API}/v4/chat/gen12345", json={"message": "x"})).status_code == 404
        assert (await client.post(f"{API}/v4/reaction/gen12345/1", json={"reaction": "👍"})).status_code == 404
        assert (await client.get(f"{API}/v4/room")).status_code == 200
        assert (await client.get(f"{API}/v1/room")).status_code == 404
        assert (await client.post(f"{API}/v1/room/gen12345/participants/active")).status_code == 404
        for token in ("GEN12345", "gen", "a" * 31, "gen-1234"):
            resp = await client.get(f"{API}/v1/chat/{token}", params={"lookIntoFuture": 0})
            assert resp.status_code == 404 and resp.text == "route not found", token
    assert all(m.message != "x" for m in talk.messages("gen12345"))


async def test_a_poll_without_look_into_future_is_a_type_error(talk: TalkServer, users) -> None:
    """``receiveMessages(int $lookIntoFuture, …)`` has no default: the Dispatcher passes null, PHP throws."""
    async with _client(talk, "alice") as client:
        resp = await client.get(f"{API}/v1/chat/gen12345", params={"limit": 10})
    assert resp.status_code == 500 and "lookIntoFuture" in resp.text


async def test_a_read_only_room_refuses_writes_and_serves_reads(talk: TalkServer, users) -> None:
    _alice, bob = users
    mine = await talk.post("gen12345", bob, "before the lock")
    talk.set_read_only("gen12345", True)
    async with _client(talk, "bob") as bob_client, _client(talk, "alice") as owner:
        assert await _statuses(bob_client, mine.id) == {
            "history": 200, "poll": 304, "post": 403, "edit": 403, "react": 403, "reactions": 200}  # fmt: skip
        assert (await owner.post(f"{API}/v1/chat/gen12345", json={"message": "hi"})).status_code == 403  # everyone
        rooms = (await owner.get(f"{API}/v4/room")).json()["ocs"]["data"]
        assert [r["readOnly"] for r in rooms] == [1]
        talk.set_read_only("gen12345", False)
        assert (await bob_client.post(f"{API}/v1/chat/gen12345", json={"message": "unlocked"})).status_code == 201
    assert [m.message for m in talk.messages("gen12345")] == ["before the lock", "unlocked"]


async def test_the_lobby_keeps_non_moderators_out_of_the_chat_with_412(talk: TalkServer, users) -> None:
    _alice, bob = users
    mine = await talk.post("gen12345", bob, "before the lobby")
    talk.set_lobby("gen12345", True)
    async with _client(talk, "bob") as bob_client, _client(talk, "alice") as owner:
        assert await _statuses(bob_client, mine.id) == {
            "history": 412, "poll": 412, "post": 412, "edit": 412, "react": 412, "reactions": 412}  # fmt: skip
        assert (await owner.post(f"{API}/v1/chat/gen12345", json={"message": "moderators talk"})).status_code == 201
        talk.set_lobby("gen12345", False)
        assert (await bob_client.get(f"{API}/v1/chat/gen12345", params={"lookIntoFuture": 0})).status_code == 200


async def test_a_banned_actor_gets_403_everywhere_and_one_without_chat_permission_only_on_writes(
    talk: TalkServer, users
) -> None:
    _alice, bob = users
    mine = await talk.post("gen12345", bob, "before")
    talk.ban("gen12345", bob)
    async with _client(talk, "bob") as bob_client:
        assert set((await _statuses(bob_client, mine.id)).values()) == {403}
        talk.ban("gen12345", bob, banned=False)
        talk.allow_chat("gen12345", bob, False)
        assert await _statuses(bob_client, mine.id) == {
            "history": 200, "poll": 304, "post": 403, "edit": 403, "react": 403, "reactions": 200}  # fmt: skip
        talk.allow_chat("gen12345", bob, True)
        assert (await bob_client.post(f"{API}/v1/chat/gen12345", json={"message": "allowed"})).status_code == 201
    assert [m.message for m in talk.messages("gen12345")] == ["before", "allowed"]
