"""The Talk test server itself: where it must behave like Talk for the
product's tests to mean anything (a body-signed reply is refused, the
brute-force throttle answers 429 after ten failures)."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.talkbot_rig import SECRET
from tests.talkserver import TalkServer
from tests.talkserver.webhooks import signature


@pytest.fixture
async def talk() -> AsyncIterator[TalkServer]:
    server = await TalkServer(bruteforce_delay_scale=0).start()
    try:
        yield server
    finally:
        await server.stop()


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
