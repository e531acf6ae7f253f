"""``talkbridge run`` as a real process with a Matrix account and an ``api``
account in one gateway, against a real Synapse: everything crosses both
ways, a SIGKILL loses and repeats nothing, a homeserver restart loses
nothing, Synapse's default rate limits are waited out, and
``matrix-register`` creates the bot through a registration token."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis

from bridge.keys import account_key, dead_letters_key, degraded_key
from tests.helpers import (
    ROOT,
    SENTINEL,
    ConfigToml,
    Daemon,
    RedisServer,
    free_port,
    has_sentinel,
    through_sentinel,
    wait_for,
)
from tests.matrix_rig import Room, matrix_section, new_room
from tests.synapse_rig import SynapseServer, unique
from tests.test_matrix import PNG

ACCOUNT = "matrix.hs"
GATEWAY = "g"


@dataclass
class Bridge:
    synapse: SynapseServer
    room: Room
    daemon: Daemon
    redis: sync_redis.Redis
    api_port: int

    @property
    def r(self) -> str:
        return self.room.room_id

    def bridged(self, etype: str = "m.room.message") -> list[dict[str, Any]]:
        return self.room.alice.from_user(self.r, self.room.bot_id, etype)

    def post(self, **body: Any) -> None:
        resp = httpx.post(f"http://127.0.0.1:{self.api_port}/api/message", headers={"Authorization": "Bearer t"},
                          json={"gateway": GATEWAY, "username": "zoe", **body})  # fmt: skip
        assert resp.status_code == 200, resp.text

    def api_messages(self) -> list[dict[str, Any]]:
        resp = httpx.get(f"http://127.0.0.1:{self.api_port}/api/messages", headers={"Authorization": "Bearer t"})
        return resp.json()


def write(tmp_path: Path, redis_url: str, room: Room, http: int, api: int, **extra: Any) -> Path:
    config = ConfigToml().general("[{PROTOCOL}] <{NICK}> ")
    config.raw(matrix_section("hs", room.synapse.url, login=room.bot_login, **extra)).api("a", api, "t")
    config.gateway(GATEWAY, (ACCOUNT, room.room_id), ("api.a", "api"))
    return config.daemon(redis_url, http, LeaseSeconds=2, RetryBaseSeconds=0.05).write(tmp_path / "talkbridge.toml")


def bridge(tmp_path: Path, redis_server: RedisServer, synapse: SynapseServer, **extra: Any) -> Iterator[Bridge]:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    room = new_room(synapse)
    http, api = free_port(), free_port()
    daemon = Daemon(write(tmp_path, redis_server.url, room, http, api, **extra), http, tmp_path / "daemon.log")
    daemon.start()
    b = Bridge(synapse, room, daemon, client, api)
    try:
        wait_for(lambda: room.bot_id in _members(b), timeout=30, what="the bot joined")
        yield b
    finally:
        daemon.stop()
        client.close()


def _bodies(b: Bridge, n: int) -> list[str] | None:
    bodies = [e["content"]["body"] for e in b.bridged()]
    return bodies if len(bodies) >= n else None


def _members(b: Bridge) -> list[str]:
    return list(b.room.alice.call("GET", f"/_matrix/client/v3/rooms/{b.r}/joined_members")["joined"])


@pytest.fixture
def hs(tmp_path: Path, redis_server: RedisServer, synapse: SynapseServer) -> Iterator[Bridge]:
    yield from bridge(tmp_path, redis_server, synapse)


def test_everything_crosses_both_ways(hs: Bridge) -> None:
    b, alice = hs, hs.room.alice
    # Matrix -> api: formatted text as Markdown, nick formatted
    original = alice.send(b.r, {"msgtype": "m.text", "body": "hola", "format": "org.matrix.custom.html",
                                "formatted_body": "<b>hola</b> mundo"})  # fmt: skip
    [got] = wait_for(b.api_messages, what="api sees the Matrix message")
    assert (got["text"], got["username"]) == ("**hola** mundo", "[matrix] <Alice> ")
    # api -> Matrix: Markdown as HTML, with the nick
    b.post(text="a *reply*", parent_id=got["id"])
    [copy] = wait_for(b.bridged, what="the api message in Matrix")
    assert copy["content"]["m.relates_to"] == {"m.in_reply_to": {"event_id": original}}
    assert copy["content"]["body"] == "[api] <zoe> a *reply*"
    assert copy["content"]["formatted_body"] == "[api] &lt;zoe&gt; a <em>reply</em>"
    # an edit in Matrix reaches the api as an edit of the same message
    alice.send(b.r, {"msgtype": "m.text", "body": "* adiós", "m.new_content": {"msgtype": "m.text", "body": "adiós"},
                     "m.relates_to": {"rel_type": "m.replace", "event_id": original}})  # fmt: skip
    [edit] = wait_for(b.api_messages, what="the edit")
    assert (edit["text"], edit["id"]) == ("adiós", got["id"])
    # a reply in Matrix to the bridged copy, a reaction, an image
    alice.text(b.r, "respuesta", **{"m.relates_to": {"m.in_reply_to": {"event_id": copy["event_id"]}}})
    [reply] = wait_for(b.api_messages, what="the reply")
    assert reply["text"] == "respuesta" and reply["parent_id"]
    alice.send(
        b.r, {"m.relates_to": {"rel_type": "m.annotation", "event_id": original, "key": "🎉"}}, etype="m.reaction"
    )
    [reaction] = wait_for(b.api_messages, what="the reaction")
    assert (reaction["event"], reaction["text"], reaction["parent_id"]) == ("reaction_add", "🎉", got["id"])
    b.post(event="reaction_add", text="👍", parent_id=got["id"])
    wait_for(lambda: b.bridged("m.reaction"), what="the api reaction in Matrix")
    assert b.bridged("m.reaction")[0]["content"]["m.relates_to"] == {
        "rel_type": "m.annotation",
        "event_id": original,
        "key": "👍",
    }
    mxc = alice.upload(PNG, "image/png", "dot.png")
    alice.send(b.r, {"msgtype": "m.image", "body": "dot.png", "url": mxc, "info": {"mimetype": "image/png"}})
    [image] = wait_for(b.api_messages, what="the image")
    [file] = image["Extra"]["file"]
    assert (file["Name"], base64.b64decode(file["Data"])) == ("dot.png", PNG)
    # api -> Matrix: an image, uploaded with its info
    b.post(text="", Extra={"file": [{"Name": "pic.png", "Data": base64.b64encode(PNG).decode()}]})
    img = wait_for(lambda: [e for e in b.bridged() if e["content"].get("msgtype") == "m.image"], what="image")
    assert alice.download(img[0]["content"]["url"]) == PNG and img[0]["content"]["info"]["w"] == 3
    # a redaction in Matrix deletes on the api side
    alice.redact(b.r, original)
    [deleted] = wait_for(b.api_messages, what="the deletion")
    assert deleted["event"] == "msg_delete"
    # no echo: the bridge's own posts never come back (an echo would arrive
    # before a sentinel said on each side after them)
    at_api: list[dict[str, Any]] = []

    def seen() -> list[str]:
        at_api.extend(b.api_messages())
        return [m["text"] for m in at_api] + [e["content"].get("body", "") for e in b.bridged()]

    through_sentinel(lambda: (alice.text(b.r, SENTINEL), b.post(text=SENTINEL)), seen, has_sentinel, count=2,
                     what="a sentinel from each side")  # fmt: skip
    assert len([e for e in b.bridged() if not has_sentinel(e["content"].get("body"))]) == 2
    assert [m for m in at_api if not has_sentinel(m["text"])] == []


def test_fifty_messages_sent_while_the_daemon_is_dead_arrive_once_in_order(hs: Bridge) -> None:
    b = hs
    b.room.alice.text(b.r, "before")
    wait_for(b.api_messages, what="before")
    b.daemon.kill()
    for i in range(50):  # more than a sync's limited timeline holds
        b.room.alice.text(b.r, f"while down {i}")
    b.daemon.start()
    got: list[str] = []

    def fifty() -> bool:
        got.extend(m["text"] for m in b.api_messages())
        return len(got) >= 50

    wait_for(fifty, timeout=60, what="the fifty")
    # a late duplicate arrives before a sentinel said after them
    got = through_sentinel(lambda: b.room.alice.text(b.r, SENTINEL),
                           lambda: (got.extend(m["text"] for m in b.api_messages()), got)[1], has_sentinel)  # fmt: skip
    assert got == [f"while down {i}" for i in range(50)]


def test_a_homeserver_restart_mid_stream_loses_nothing(hs: Bridge) -> None:
    b = hs
    got: list[str] = []
    for i in range(5):
        b.post(text=f"to matrix {i}")
    b.synapse.stop()
    for i in range(5, 10):  # queued while the homeserver is away
        b.post(text=f"to matrix {i}")
    try:
        wait_for(lambda: "degraded" in str(httpx.get(f"http://127.0.0.1:{b.daemon.http_port}/readyz").json())
                 or b.redis.get(degraded_key("tb", ACCOUNT)), timeout=30, what="degraded")  # fmt: skip
    finally:
        b.synapse.start()
    b.room.alice.text(b.r, "after the restart")
    wait_for(lambda: got.extend(m["text"] for m in b.api_messages()) or "after the restart" in got, timeout=90,
             what="receiving again")  # fmt: skip
    texts = wait_for(lambda: [e["content"]["body"] for e in b.bridged()] if len(b.bridged()) >= 10 else None,
                     timeout=90, what="the ten")  # fmt: skip
    assert texts == [f"[api] <zoe> to matrix {i}" for i in range(10)]
    assert len(through_sentinel(lambda: b.post(text=SENTINEL), lambda: [e["content"]["body"] for e in b.bridged()],
                                has_sentinel)) == 10  # fmt: skip
    assert (
        b.redis.xlen(dead_letters_key("tb")) == 0
    )  # the outage delayed the deliveries; it did not spend their attempts


def test_synapse_default_rate_limits_are_waited_out(
    tmp_path: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    strict = SynapseServer(tmp_path_factory.mktemp("synapse-strict"), default_limits=True).start()
    try:
        for b in bridge(tmp_path, redis_server, strict):
            for i in range(25):  # Synapse's default rc_message lets ~10 through, then M_LIMIT_EXCEEDED
                b.post(text=f"burst {i}")
            texts = wait_for(lambda b=b: _bodies(b, 25), timeout=120, what="the burst")
            assert texts == [f"[api] <zoe> burst {i}" for i in range(25)]
            assert "M_LIMIT_EXCEEDED" in b.daemon.log() or "rate limited" in b.daemon.log()
            assert b.redis.xlen(dead_letters_key("tb")) == 0
    finally:
        strict.stop()


def test_matrix_register_creates_the_bot_with_a_registration_token(
    tmp_path: Path, redis_server: RedisServer, synapse: SynapseServer
) -> None:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    login = unique("regbot")
    config = tmp_path / "talkbridge.toml"
    config.write_text(matrix_section("hs", synapse.url, login=login) + '[api.a]\nBindAddress = "127.0.0.1:1"\n'
                      f'Token = "t"\n[[gateway]]\nname = "g"\n[[gateway.inout]]\naccount = "{ACCOUNT}"\n'
                      'channel = "!x:test.local"\n[[gateway.inout]]\naccount = "api.a"\nchannel = "api"\n'
                      f'[redis]\nURL = "{redis_server.url}"\n')  # fmt: skip
    env = {**os.environ, "REG_TOKEN": synapse.registration_token()}
    cmd = [sys.executable, "-m", "bridge.cli", "matrix-register", "--config", str(config), "hs",
           "--registration-token", "env:REG_TOKEN"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"@{login}:test.local" in out.stdout
    session = client.hgetall(account_key("tb", ACCOUNT, "matrix-session"))
    assert session[b"user_id"] == f"@{login}:test.local".encode() and session[b"access_token"]
    # the token is used once: a second registration is refused, clearly
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert again.returncode == 1 and "refused" in again.stderr
    client.close()
