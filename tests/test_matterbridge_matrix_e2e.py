"""``talkbridge run`` joining a Matrix room (the session's Synapse) and a
Matterbridge gateway (the suite's Matterbridge 1.26, a real process, with an
IRC account in it): text, ``/me`` and images cross both ways; an edit made
in Matrix reaches IRC as a new message in ``EditFormat``, a reaction and a
redaction reach it not at all (Matterbridge's api cannot carry them:
docs/matterbridge-client.md, "Sending")."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from tests.helpers import SENTINEL, ConfigToml, Daemon, RedisServer, free_port, has_sentinel, through_sentinel, wait_for
from tests.matrix_rig import Room, matrix_section, new_room
from tests.mbserver.rig import MatterbridgeProcess
from tests.synapse_rig import SynapseServer
from tests.test_matrix import PNG

MATRIX, IRC = "matrix.hs", "irc.libera"


@dataclass
class MM:
    room: Room
    mb: MatterbridgeProcess
    daemon: Daemon
    sentinels: int = 0

    @property
    def r(self) -> str:
        return self.room.room_id

    def in_matrix(self, sentinels: bool = False) -> list[dict[str, Any]]:
        sent = self.room.alice.from_user(self.r, self.room.bot_id)
        return [e for e in sent if sentinels or not has_sentinel(e["content"].get("body"))]

    def on_irc(self, sentinels: bool = False) -> list[dict[str, Any]]:
        return [m for m in self.mb.heard(IRC) if sentinels or not has_sentinel(m["text"])]

    def settle(self) -> None:
        def say() -> None:
            self.mb.say(IRC, "#team", SENTINEL, "ircbob")
            self.room.alice.text(self.r, SENTINEL)

        def seen() -> list[str]:
            return [e["content"].get("body", "") for e in self.in_matrix(True)] + [m["text"] for m in self.on_irc(True)]

        self.sentinels += 2
        through_sentinel(say, seen, has_sentinel, count=self.sentinels, what="a sentinel each way")


@pytest.fixture
def mm(tmp_path: Path, redis_server: RedisServer, synapse: SynapseServer) -> Iterator[MM]:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    room = new_room(synapse)
    http, mb_port, control = free_port(), free_port(), free_port()
    mb = MatterbridgeProcess(
        {
            "accounts": {
                "api.tb": {"BindAddress": f"127.0.0.1:{mb_port}", "Token": "mb", "Buffer": 100},
                IRC: {"RemoteNickFormat": "[{PROTOCOL}] <{NICK}> "},
            },
            "gateways": [{"name": "team", "inout": [{"account": "api.tb"}, {"account": IRC, "channel": "#team"}]}],
            "control": f"127.0.0.1:{control}",
        },
        tmp_path,
    ).start()
    config = ConfigToml().general("[{PROTOCOL}] <{NICK}> ")
    config.raw(matrix_section("hs", room.synapse.url, login=room.bot_login))
    config.section("matterbridge.mb", URL=f"http://127.0.0.1:{mb_port}", Token="mb", RemoteNickFormat="{NICK}",
                   ReconnectMaxSeconds=1)  # fmt: skip
    config.gateway("g", (MATRIX, room.room_id), ("matterbridge.mb", "team"))
    path = config.daemon(redis_server.url, http, LeaseSeconds=2, RetryBaseSeconds=0.05).write(tmp_path / "tb.toml")
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    try:
        members = f"/_matrix/client/v3/rooms/{room.room_id}/joined_members"
        wait_for(lambda: room.bot_id in room.alice.call("GET", members)["joined"], timeout=30, what="the bot joined")
        mm = MM(room, mb, daemon)
        mm.settle()
        yield mm
    finally:
        daemon.stop()
        mb.stop()
        client.close()


def test_text_actions_and_images_cross_and_what_matterbridge_cannot_carry_does_not(mm: MM) -> None:
    m, alice = mm, mm.room.alice
    # IRC -> Matrix: text, /me as m.emote, an image as m.image
    m.mb.say(IRC, "#team", "hello from irc", "ircbob")
    m.mb.say(IRC, "#team", "waves", "ircbob", event="user_action")
    m.mb.say(IRC, "#team", "", "ircbob", extra={"file": [{"Name": "dot.png", "Data": base64.b64encode(PNG).decode()}]})
    # Matrix -> IRC: text, an m.emote, an image
    said = alice.text(m.r, "hello from matrix")
    alice.send(m.r, {"msgtype": "m.emote", "body": "nods"})
    mxc = alice.upload(PNG, "image/png", "pic.png")
    alice.send(m.r, {"msgtype": "m.image", "body": "pic.png", "url": mxc, "info": {"mimetype": "image/png"}})
    m.settle()

    got = [(e["content"]["msgtype"], e["content"]["body"]) for e in m.in_matrix()]
    assert got[:2] == [("m.text", "[irc] <ircbob> hello from irc"), ("m.emote", "[irc] <ircbob> waves")]
    [img] = [e for e in m.in_matrix() if e["content"]["msgtype"] == "m.image"]
    assert alice.download(img["content"]["url"]) == PNG and len(got) == 3

    irc = m.on_irc()
    assert [(x["username"], x["text"], x["event"]) for x in irc[:2]] == [
        ("[api] <Alice> ", "hello from matrix", ""),
        ("[api] <Alice> ", "nods", "user_action"),
    ]
    [pic] = irc[2]["Extra"]["file"]
    assert pic["Name"] == "pic.png" and base64.b64decode(pic["Data"]) == PNG and len(irc) == 3

    # an edit arrives as a new message in EditFormat; a reaction and a redaction do not arrive
    alice.send(m.r, {"msgtype": "m.text", "body": "* hello again", "m.new_content": {"msgtype": "m.text",
                     "body": "hello again"}, "m.relates_to": {"rel_type": "m.replace", "event_id": said}})  # fmt: skip
    alice.send(m.r, {"m.relates_to": {"rel_type": "m.annotation", "event_id": said, "key": "👍"}}, "m.reaction")
    alice.redact(m.r, said)
    m.settle()
    assert [x["text"] for x in m.on_irc()[3:]] == ["hello again (edited)"]
