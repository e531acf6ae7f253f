"""An end-to-end encrypted room through real ``talkbridge run`` processes
(a Matrix account and an ``api`` account in one gateway) against the real
Synapse, alice on her own E2E client (tests/matrix_e2ee_rig.py): the
daemon SIGKILLed and restarted, then a second daemon in another directory
taking the account over, and each still decrypts alice's next message and
she decrypts theirs — one device id throughout, the crypto state in Redis."""

from __future__ import annotations

from pathlib import Path

import httpx
import redis as sync_redis

from tests.helpers import Daemon, RedisServer, free_port
from tests.matrix_e2ee_rig import Human, encrypted_room, is_message
from tests.matrix_rig import Room
from tests.synapse_rig import SynapseServer
from tests.talkbot_rig import until
from tests.test_matrix_e2e import GATEWAY, write


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


async def _round_trip(room: Room, human: Human, api: int, seen: list[str], n: int) -> None:
    """alice -> api and api -> alice, both through the encrypted room."""
    await human.text(room.room_id, f"from alice {n}")
    await until(lambda: f"from alice {n}" in _api_texts(api, seen), within=60, what=f"the api sees message {n}")
    _post(api, f"to alice {n}")
    await until(lambda: _decrypted_from_bot(human, room, f"to alice {n}"), within=60, what=f"alice decrypts {n}")


async def test_sigkill_restart_and_takeover_keep_one_device_that_decrypts(
    tmp_path: Path, redis_server: RedisServer, synapse: SynapseServer
) -> None:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    room, human = await encrypted_room(synapse, tmp_path / "alice")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    http, api = free_port(), free_port()
    daemon = Daemon(write(first, redis_server.url, room, http, api), http, first / "daemon.log").start()
    other: Daemon | None = None
    seen: list[str] = []
    try:
        await until(lambda: room.bot_id in _members(room), within=30, what="the bot joined")
        device = await until(lambda: human.device_of(room.bot_id), within=30, what="the bot's device keys")
        await _round_trip(room, human, api, seen, 1)
        daemon.kill()  # SIGKILL: no goodbye
        daemon.start()
        await _round_trip(room, human, api, seen, 2)
        daemon.kill()
        http2, api2 = free_port(), free_port()
        other = Daemon(write(second, redis_server.url, room, http2, api2), http2, second / "daemon.log").start()
        await _round_trip(room, human, api2, [], 3)
        assert [d["device_id"] for d in synapse.devices(room.bot_id)] == [device]
        logs = daemon.log() + other.log()
        assert "could not be decrypted" not in logs and "a new Olm account" in daemon.log()
        assert "a new Olm account" not in other.log()
    finally:
        daemon.stop()
        if other is not None:
            other.stop()
        await human.close()
        client.close()
