"""An end-to-end encrypted room through real ``talkbridge run`` processes
(a Matrix account, an ``api`` account and a Talk user account on the Talk
test server, in one gateway) against the real Synapse, alice on her own E2E
client (tests/matrix_e2ee_rig.py): her encrypted text and image reach the
api and Talk, theirs reach her encrypted and she decrypts them; the daemon
SIGKILLed and restarted, then a second daemon in another directory taking
the accounts over, and each still decrypts alice's next message and she
decrypts theirs — one device id throughout, the crypto state in Redis."""

from __future__ import annotations

from pathlib import Path

import httpx
import redis as sync_redis

from bridge.keys import account_key
from tests.helpers import ConfigToml, Daemon, RedisServer, free_port
from tests.matrix_e2ee_rig import Human, encrypted_room, is_message
from tests.matrix_rig import Room, matrix_section
from tests.nctalk_rig import PASSWORD, user_section
from tests.synapse_rig import SynapseServer
from tests.talkbot_rig import until
from tests.talkserver import ThreadedTalkServer
from tests.talkserver.state import Actor
from tests.test_matrix import PNG

GATEWAY, MATRIX, USER, USER_ROOM = "g", "matrix.hs", "nctalk.user", "userroom"


def write(directory: Path, redis_url: str, room: Room, talk_url: str, http: int, api: int) -> Path:
    config = ConfigToml().general("[{PROTOCOL}] <{NICK}> ")
    config.raw(matrix_section("hs", room.synapse.url, login=room.bot_login))
    config.raw(user_section("user", talk_url, PollTimeout=5)).api("a", api, "t")
    config.gateway(GATEWAY, (MATRIX, room.room_id), ("api.a", "api"), (USER, USER_ROOM))
    return config.daemon(redis_url, http, LeaseSeconds=2, RetryBaseSeconds=0.05).write(directory / "talkbridge.toml")


def _members(room: Room) -> list[str]:
    return list(room.alice.call("GET", f"/_matrix/client/v3/rooms/{room.room_id}/joined_members")["joined"])


def _post(api: int, text: str) -> None:
    resp = httpx.post(f"http://127.0.0.1:{api}/api/message", headers={"Authorization": "Bearer t"},
                      json={"gateway": GATEWAY, "username": "zoe", "text": text})  # fmt: skip
    assert resp.status_code == 200, resp.text


def _api_texts(api: int, seen: list[str]) -> list[str]:
    """The api account's messages so far (its buffer is read once: kept in ``seen``)."""
    resp = httpx.get(f"http://127.0.0.1:{api}/api/messages", headers={"Authorization": "Bearer t"})
    seen.extend(m["text"] for m in resp.json())
    return seen


async def _decrypted_from_bot(human: Human, room: Room, text: str) -> bool:
    return any(
        is_message(e) and text in e.source["content"].get("body", "") for e in await human.from_user(room.bot_id)
    )


def _in_talk(talk: ThreadedTalkServer, text: str) -> bool:
    """A message of the bridge in the Talk room ending with ``text`` (after a
    restart the sender may be shown by user id: lazy-loaded members are not
    sent to the same device again; docs/matrix.md, Limits)."""
    return any(m.message.endswith(text) for m in talk.call("messages", USER_ROOM) if m.actor.id == "bridge")


async def _round_trip(room: Room, human: Human, talk: ThreadedTalkServer, bob: Actor, api: int, seen: list[str],
                      n: int) -> None:  # fmt: skip
    """alice -> api and Talk, api and Talk -> alice, all through the encrypted room."""
    await human.text(room.room_id, f"from alice {n}")
    await until(lambda: f"from alice {n}" in _api_texts(api, seen), within=60, what=f"the api sees message {n}")
    await until(lambda: _in_talk(talk, f"> from alice {n}"), within=60, what=f"Talk sees {n}")
    _post(api, f"to alice {n}")
    await until(lambda: _decrypted_from_bot(human, room, f"to alice {n}"), within=60, what=f"alice decrypts {n}")
    talk.call("post", USER_ROOM, bob, f"bob {n}")
    await until(lambda: _decrypted_from_bot(human, room, f"[nctalk] <Bob> bob {n}"), within=60,
                what=f"alice decrypts bob's {n}")  # fmt: skip


async def test_sigkill_restart_and_takeover_keep_one_device_that_decrypts(
    tmp_path: Path, redis_server: RedisServer, synapse: SynapseServer
) -> None:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    room, human = await encrypted_room(synapse, tmp_path / "alice")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    talk = ThreadedTalkServer(version=21, bruteforce_delay_scale=0).start()
    bob = talk.call("add_user", "bob", "Bob")
    talk.call("create_room", "Users", USER_ROOM, (bob, talk.call("add_user", "bridge", "Bridge", password=PASSWORD)))
    http, api = free_port(), free_port()
    daemon = Daemon(write(first, redis_server.url, room, talk.url, http, api), http, first / "daemon.log").start()
    other: Daemon | None = None
    seen: list[str] = []
    try:
        await until(lambda: room.bot_id in _members(room), within=30, what="the bot joined")
        await until(lambda: client.hlen(account_key("tb", USER, "talk-cursors")), what="the Talk room polled")
        device = await until(lambda: human.device_of(room.bot_id), within=30, what="the bot's device keys")
        await _round_trip(room, human, talk, bob, api, seen, 1)
        await human.send_file(room.room_id, PNG, "dot.png", "image/png")  # an encrypted image, decrypted for Talk
        shared = await until(lambda: [m for m in talk.call("messages", USER_ROOM) if m.share is not None],
                             within=60, what="the image in Talk")  # fmt: skip
        assert talk.call("file_of", shared[0], "bob") == PNG
        daemon.kill()  # SIGKILL: no goodbye
        daemon.start()
        await _round_trip(room, human, talk, bob, api, seen, 2)
        daemon.kill()
        http2, api2 = free_port(), free_port()
        other = Daemon(write(second, redis_server.url, room, talk.url, http2, api2), http2, second / "daemon.log")
        other.start()
        await _round_trip(room, human, talk, bob, api2, [], 3)
        assert [d["device_id"] for d in synapse.devices(room.bot_id)] == [device]
        logs = daemon.log() + other.log()
        assert "could not be decrypted" not in logs and "a new Olm account" in daemon.log()
        assert "a new Olm account" not in other.log()
    finally:
        daemon.stop()
        if other is not None:
            other.stop()
        talk.stop()
        await human.close()
        client.close()
