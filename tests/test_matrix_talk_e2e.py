"""``talkbridge run`` as a real process with a Matrix account (a room on the
session's Synapse), a Talk **user** account and a Talk **bot** on one Talk
test-server instance, in one gateway.

Between Matrix and the Talk user account everything crosses both ways:
formatted text (Talk's Markdown → Matrix HTML, Matrix HTML → Markdown), a
reply threaded on the other side, an edit, a deletion/redaction, a reaction
and an image, with ``RemoteNickFormat`` and no echo. The bot's room gets and
gives plain text once each way (the bot API can neither edit, delete nor
post files; see tests/test_nctalk_mixed_e2e.py for what it can)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from bridge.keys import account_key
from tests.helpers import SENTINEL, ConfigToml, Daemon, RedisServer, free_port, has_sentinel, through_sentinel, wait_for
from tests.matrix_rig import Room, matrix_section, new_room
from tests.nctalk_rig import PASSWORD, user_section
from tests.synapse_rig import SynapseServer
from tests.talkbot_rig import SECRET, bot_section
from tests.talkserver import ThreadedTalkServer
from tests.talkserver.state import Actor, Bot, Message
from tests.test_matrix import PNG

MATRIX, USER, BOT = "matrix.hs", "nctalk.user", "nctalkbot.bot"
USER_ROOM, BOT_ROOM = "userroom", "botroom"


@dataclass
class MT:
    room: Room
    talk: ThreadedTalkServer
    daemon: Daemon
    bot: Bot
    bob: Actor  # in the user account's Talk room
    carol: Actor  # in the bot's Talk room

    @property
    def r(self) -> str:
        return self.room.room_id

    def in_matrix(self, etype: str = "m.room.message", sentinels: bool = False) -> list[dict[str, Any]]:
        """What the bridge's Matrix bot sent in the room (and the sentinels, if asked)."""
        sent = self.room.alice.from_user(self.r, self.room.bot_id, etype)
        return [e for e in sent if sentinels or not has_sentinel(e["content"].get("body"))]

    def matrix_texts(self) -> list[dict[str, Any]]:
        """The bridge's Matrix messages that are not edits (and not redacted)."""
        return [e for e in self.in_matrix() if "m.new_content" not in e["content"] and e["content"]]

    def by_user(self, sentinels: bool = False) -> list[Message]:
        posted = [m for m in self.talk.call("messages", USER_ROOM) if m.actor.id == "bridge"]
        return [m for m in posted if sentinels or not has_sentinel(m.message)]

    def by_bot(self, sentinels: bool = False) -> list[Message]:
        posted = self.talk.call("bot_messages", BOT_ROOM, self.bot)
        return [m for m in posted if sentinels or not has_sentinel(m.message)]

    def message(self, msg_id: int) -> Message:
        return self.talk.state.messages[msg_id]

    def settle(self) -> None:
        """A sentinel said on each of the three sides, waited for on the two
        others: an echo or a second copy of anything said before reaches a
        side before the sentinels do (each room's deliveries go in order)."""

        def say() -> None:
            self.room.alice.text(self.r, SENTINEL)
            self.talk.call("post", USER_ROOM, self.bob, SENTINEL)
            self.talk.call("post", BOT_ROOM, self.carol, SENTINEL)

        def seen() -> list[str]:
            in_talk = [m.message for m in self.by_user(sentinels=True) + self.by_bot(sentinels=True)]
            return in_talk + [e["content"].get("body", "") for e in self.in_matrix(sentinels=True)]

        through_sentinel(say, seen, has_sentinel, count=6, what="a sentinel from each side on the two others")


def config(tmp_path: Path, redis_url: str, room: Room, talk_url: str, http: int) -> Path:
    config = ConfigToml().general("[{PROTOCOL}] <{NICK}> ")
    config.raw(matrix_section("hs", room.synapse.url, login=room.bot_login))
    config.raw(user_section("user", talk_url, PollTimeout=5))
    config.raw(bot_section("bot", talk_url, WebhookURL=f"http://127.0.0.1:{http}/webhook/nextcloud/bot", Timeout=5))
    config.gateway("g", (MATRIX, room.room_id), (USER, USER_ROOM), (BOT, BOT_ROOM))
    return config.daemon(redis_url, http, LeaseSeconds=2, RetryBaseSeconds=0.05).write(tmp_path / "talkbridge.toml")


@pytest.fixture
def mt(tmp_path: Path, redis_server: RedisServer, synapse: SynapseServer) -> Iterator[MT]:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    room = new_room(synapse)
    talk = ThreadedTalkServer(version=21, bruteforce_delay_scale=0).start()  # Talk 21: inReplyTo, reaction hooks
    http = free_port()
    bob = talk.call("add_user", "bob", "Bob")
    carol = talk.call("add_user", "carol", "Carol")
    bridge = talk.call("add_user", "bridge", "Bridge", password=PASSWORD)
    talk.call("create_room", "Users", USER_ROOM, (bob, bridge))
    talk.call("create_room", "Bots", BOT_ROOM, (carol,))
    daemon = Daemon(config(tmp_path, redis_server.url, room, talk.url, http), http, tmp_path / "daemon.log").start()
    try:
        bot = talk.call("install_bot", "Bridge", SECRET, f"http://127.0.0.1:{http}/webhook/nextcloud/bot")
        talk.call("enable_bot", bot, BOT_ROOM)
        members = f"/_matrix/client/v3/rooms/{room.room_id}/joined_members"
        wait_for(lambda: room.bot_id in room.alice.call("GET", members)["joined"], timeout=30, what="the bot joined")
        wait_for(lambda: client.hlen(account_key("tb", USER, "talk-cursors")), what="the user room polled")
        yield MT(room, talk, daemon, bot, bob, carol)
    finally:
        daemon.stop()
        talk.stop()
        client.close()


def test_everything_crosses_between_matrix_and_the_talk_user(mt: MT) -> None:
    m, alice = mt, mt.room.alice
    # Talk -> Matrix: Talk's Markdown as HTML, nick formatted
    hello = m.talk.call("post", USER_ROOM, m.bob, "hello **world**")
    [copy] = wait_for(m.matrix_texts, what="bob's message in Matrix")
    assert copy["content"]["body"] == "[nctalk] <Bob> hello **world**"
    assert copy["content"]["formatted_body"] == "[nctalk] &lt;Bob&gt; hello <strong>world</strong>"

    # Matrix -> Talk: HTML as Markdown, a reply threaded on bob's own message
    original = alice.send(m.r, {"msgtype": "m.text", "body": "hola mundo", "format": "org.matrix.custom.html",
                                "formatted_body": "<b>hola</b> mundo",
                                "m.relates_to": {"m.in_reply_to": {"event_id": copy["event_id"]}}})  # fmt: skip
    [hola] = wait_for(lambda: [x for x in m.by_user() if "hola" in x.message], what="alice's reply in Talk")
    assert hola.message == "[matrix] <Alice> **hola** mundo"
    assert hola.parent_id == hello.id

    # Talk -> Matrix: a reply to the bridged copy is threaded on alice's event
    m.talk.call("post", USER_ROOM, m.bob, "respuesta", hola.id)
    reply = wait_for(lambda: [e for e in m.matrix_texts() if e["content"]["body"].endswith("respuesta")],
                     what="bob's reply in Matrix")  # fmt: skip
    assert reply[0]["content"]["m.relates_to"] == {"m.in_reply_to": {"event_id": original}}

    # edits: Matrix -> Talk edits the copy in place; Talk -> Matrix is an m.replace
    alice.send(m.r, {"msgtype": "m.text", "body": "* adiós", "m.new_content": {"msgtype": "m.text", "body": "adiós"},
                     "m.relates_to": {"rel_type": "m.replace", "event_id": original}})  # fmt: skip
    wait_for(lambda: m.message(hola.id).message.endswith("adiós"), what="the edit in Talk")
    assert m.message(hola.id).message == "[matrix] <Alice> adiós"
    m.talk.call("edit", USER_ROOM, m.bob, hello.id, "hello *again*")
    [edit] = wait_for(lambda: [e for e in m.in_matrix() if "m.new_content" in e["content"]], what="edit in Matrix")
    assert edit["content"]["m.relates_to"] == {"rel_type": "m.replace", "event_id": copy["event_id"]}
    assert edit["content"]["m.new_content"]["body"] == "[nctalk] <Bob> hello *again*"

    # reactions: Matrix -> Talk by the user account; Talk -> Matrix as an annotation
    alice.send(m.r, {"m.relates_to": {"rel_type": "m.annotation", "event_id": copy["event_id"], "key": "🎉"}},
               etype="m.reaction")  # fmt: skip
    wait_for(lambda: m.message(hello.id).reactions, what="the reaction in Talk")
    assert m.message(hello.id).reactions == {"🎉": ["users/bridge"]}
    m.talk.call("react", USER_ROOM, m.bob, hola.id, "👍")
    [reaction] = wait_for(lambda: m.in_matrix("m.reaction"), what="the reaction in Matrix")
    assert reaction["content"]["m.relates_to"] == {"rel_type": "m.annotation", "event_id": original, "key": "👍"}

    # images: Matrix -> Talk as a shared file; Talk -> Matrix as an m.image
    mxc = alice.upload(PNG, "image/png", "dot.png")
    alice.send(m.r, {"msgtype": "m.image", "body": "dot.png", "url": mxc, "info": {"mimetype": "image/png"}})
    [shared] = wait_for(lambda: [x for x in m.by_user() if x.share is not None], what="the image in Talk")
    assert m.talk.call("file_of", shared, "bob") == PNG
    m.talk.call("post_file", USER_ROOM, m.bob, "pic.png", PNG)
    img = wait_for(lambda: [e for e in m.in_matrix() if e["content"].get("msgtype") == "m.image"], what="m.image")
    assert alice.download(img[0]["content"]["url"]) == PNG and img[0]["content"]["info"]["w"] == 3

    # deletions: a Matrix redaction deletes the Talk copy; a Talk deletion redacts the Matrix copy
    alice.redact(m.r, original)
    wait_for(lambda: m.message(hola.id).message_type == "comment_deleted", what="the deletion in Talk")
    m.talk.call("delete", USER_ROOM, m.bob, hello.id)
    wait_for(lambda: not [e for e in m.in_matrix() if e["event_id"] == copy["event_id"] and e["content"]],
             what="the redaction in Matrix")  # fmt: skip

    # no echo: nothing the bridge posted came back to where it started (it
    # would have arrived before the sentinels)
    m.settle()
    assert len(m.in_matrix("m.reaction")) == 1
    assert sorted(e["content"].get("msgtype", "") for e in m.matrix_texts()) == ["m.image", "m.text"]
    assert len(m.by_user()) == 2  # alice's reply (deleted) and her image
    assert m.message(hola.id).reactions == {"👍": ["users/bob"]}


def test_the_bot_room_gets_and_gives_text_once(mt: MT) -> None:
    m, alice = mt, mt.room.alice
    m.talk.call("post", BOT_ROOM, m.carol, "from the bot's room")
    alice.text(m.r, "from matrix")
    in_matrix = wait_for(lambda: [e for e in m.matrix_texts() if "bot's room" in e["content"]["body"]],
                         what="the bot room's message in Matrix")  # fmt: skip
    assert in_matrix[0]["content"]["body"] == "[nctalkbot] <Carol> from the bot's room"
    wait_for(lambda: [x for x in m.by_bot() if x.message.endswith("from matrix")], what="Matrix in the bot's room")
    m.settle()
    assert [x.message for x in m.by_bot()] == ["[matrix] <Alice> from matrix"]
    assert sorted(x.message for x in m.by_user()) == ["[matrix] <Alice> from matrix",
                                                      "[nctalkbot] <Carol> from the bot's room"]  # fmt: skip
    assert [e["content"]["body"] for e in m.matrix_texts()] == ["[nctalkbot] <Carol> from the bot's room"]
