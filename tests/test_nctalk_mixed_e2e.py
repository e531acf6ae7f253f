"""``talkbridge run`` as a real process with the three ways into Talk-land in
one gateway: a Talk **user** account (``[nctalk.user]``, room ``userroom``)
and a Talk **bot** (``[nctalkbot.bot]``, room ``botroom``) on one Talk
test-server instance, and an ``api`` account.

Each message reaches the two others once, with ``RemoteNickFormat``, and
nothing echoes. Replies cross every way; a reaction crosses between the two
Talk rooms. Edits cross where the bot API allows: an edit made in the user's
room or on the api side edits the copies the user account and the api hold;
the bot's copies stay as posted (the bot API can neither edit nor delete),
and an edit made in the bot's room does not leave it (Talk sends bots no
webhook for it). See docs/talk-user.md, "With a Talk bot in the same gateway".
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis

from bridge.keys import account_key
from tests.helpers import SENTINEL, ConfigToml, Daemon, RedisServer, free_port, has_sentinel, through_sentinel, wait_for
from tests.nctalk_rig import PASSWORD, user_section
from tests.talkbot_rig import SECRET, bot_section
from tests.talkserver import ThreadedTalkServer
from tests.talkserver.state import Actor, Bot, Message

USER_ROOM, BOT_ROOM = "userroom", "botroom"
USER, BOT = "nctalk.user", "nctalkbot.bot"


@dataclass
class Api:
    port: int
    seen: list[dict[str, Any]] = field(default_factory=list)  # without the sentinels
    sentinels: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, **message: Any) -> dict[str, Any]:
        resp = httpx.post(f"{self.base}/api/message", json={"gateway": "g", **message},
                          headers={"Authorization": "Bearer api-token"}, timeout=5)  # fmt: skip
        assert resp.status_code == 200, resp.text
        return resp.json()

    def messages(self) -> list[dict[str, Any]]:
        """Everything the api account was given so far (the buffer empties on each read)."""
        resp = httpx.get(f"{self.base}/api/messages", headers={"Authorization": "Bearer api-token"}, timeout=5)
        resp.raise_for_status()
        for message in resp.json():
            if has_sentinel(message["text"]):
                self.sentinels += 1
            else:
                self.seen.append(message)
        return list(self.seen)

    def wait(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        return wait_for(lambda: next((m for m in self.messages() if predicate(m)), None), what=what)


@dataclass
class Mixed:
    talk: ThreadedTalkServer
    daemon: Daemon
    api: Api
    bot: Bot
    alice: Actor  # in the user's room
    carol: Actor  # in the bot's room

    def by_user(self, sentinels: bool = False) -> list[Message]:
        """What the bridge's user account posted in its room (and the sentinels, if asked)."""
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
            self.talk.call("post", USER_ROOM, self.alice, SENTINEL)
            self.talk.call("post", BOT_ROOM, self.carol, SENTINEL)
            self.api.post(text=SENTINEL, username="zoe")

        def seen() -> list[str]:
            self.api.messages()  # counts the api's sentinels
            in_talk = self.by_user(sentinels=True) + self.by_bot(sentinels=True)
            return [m.message for m in in_talk] + [SENTINEL] * self.api.sentinels

        through_sentinel(say, seen, has_sentinel, count=6, what="a sentinel from each side on the two others")


def config(tmp_path: Path, redis_url: str, talk_url: str, http: int, api: int) -> Path:
    config = ConfigToml().general()
    config.api("a", api, "api-token").raw(user_section("user", talk_url, PollTimeout=5))
    config.raw(bot_section("bot", talk_url, WebhookURL=f"http://127.0.0.1:{http}/webhook/nextcloud/bot", Timeout=5))
    config.gateway("g", ("api.a", "api"), (USER, USER_ROOM), (BOT, BOT_ROOM))
    return config.daemon(redis_url, http, LeaseSeconds=2, RetryBaseSeconds=0.05).write(tmp_path / "talkbridge.toml")


@pytest.fixture
def mixed(tmp_path: Path, redis_server: RedisServer) -> Iterator[Mixed]:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    talk = ThreadedTalkServer(version=21, bruteforce_delay_scale=0).start()  # Talk 21: inReplyTo, reaction hooks
    http, api = free_port(), free_port()
    alice = talk.call("add_user", "alice", "Alice")
    carol = talk.call("add_user", "carol", "Carol")
    bridge = talk.call("add_user", "bridge", "Bridge", password=PASSWORD)
    talk.call("create_room", "Users", USER_ROOM, (alice, bridge))
    talk.call("create_room", "Bots", BOT_ROOM, (carol,))
    daemon = Daemon(config(tmp_path, redis_server.url, talk.url, http, api), http, tmp_path / "daemon.log").start()
    try:
        bot = talk.call("install_bot", "Bridge", SECRET, f"http://127.0.0.1:{http}/webhook/nextcloud/bot")
        talk.call("enable_bot", bot, BOT_ROOM)
        wait_for(lambda: client.hlen(account_key("tb", USER, "talk-cursors")), what="the user room polled")
        yield Mixed(talk, daemon, Api(api), bot, alice, carol)
    finally:
        daemon.stop()
        talk.stop()
        client.close()


def test_each_reaches_the_two_others_once_with_its_nick_and_nothing_echoes(mixed: Mixed) -> None:
    m = mixed
    m.talk.call("post", USER_ROOM, m.alice, "from the user's room")
    m.talk.call("post", BOT_ROOM, m.carol, "from the bot's room")
    m.api.post(text="from the api", username="zoe")
    wait_for(lambda: len(m.by_user()) >= 2 and len(m.by_bot()) >= 2, what="two copies in each Talk room")
    m.api.wait(lambda x: x["account"] == BOT, "the bot room's message at the api")
    m.settle()  # an echo or a second copy would arrive before the sentinels

    assert sorted(x.message for x in m.by_user()) == [
        "[api/a] <zoe> from the api", "[nctalkbot/bot] <Carol> from the bot's room"]  # fmt: skip
    assert sorted(x.message for x in m.by_bot()) == [
        "[api/a] <zoe> from the api", "[nctalk/user] <Alice> from the user's room"]  # fmt: skip
    got = sorted((x["account"], x["username"], x["text"]) for x in m.api.seen)
    assert got == [
        (USER, "[nctalk/user] <Alice> ", "from the user's room"),
        (BOT, "[nctalkbot/bot] <Carol> ", "from the bot's room"),
    ]
    # the user account's copies carry a referenceId and were posted as the user
    assert all(x.reference_id and len(x.reference_id) == 64 for x in m.by_user())
    # the bot was called only for what it posts: no request of it was refused
    assert {c.status for c in m.talk.state.webhook_calls} == {200}


def test_replies_cross_every_way(mixed: Mixed) -> None:
    m = mixed
    # carol (bot's room) asks; alice answers the user account's copy in her room
    question = m.talk.call("post", BOT_ROOM, m.carol, "question from the bot's room")
    [copy] = wait_for(m.by_user, what="the question in the user's room")
    at_api = m.api.wait(lambda x: x["text"] == "question from the bot's room", "the question at the api")
    m.talk.call("post", USER_ROOM, m.alice, "answer from the user's room", copy.id)
    answer = wait_for(lambda: [x for x in m.by_bot() if x.message.endswith("answer from the user's room")],
                      what="the answer in the bot's room")  # fmt: skip
    assert answer[0].parent_id == question.id  # threaded on carol's own message
    got = m.api.wait(lambda x: x["text"] == "answer from the user's room", "the answer at the api")
    assert got["parent_id"] == at_api["id"]

    # alice says something; carol answers the bot's copy in her room: Talk
    # shows the copy's id in the reply's inReplyTo, and the bridge learns it
    ping = m.talk.call("post", USER_ROOM, m.alice, "ping from the user's room")
    bot_copy = wait_for(lambda: [x for x in m.by_bot() if x.message.endswith("ping from the user's room")],
                        what="ping in the bot's room")  # fmt: skip
    m.talk.call("post", BOT_ROOM, m.carol, "pong from the bot's room", bot_copy[0].id)
    pong = wait_for(lambda: [x for x in m.by_user() if x.message.endswith("pong from the bot's room")],
                    what="pong in the user's room")  # fmt: skip
    assert pong[0].parent_id == ping.id
    ping_at_api = m.api.wait(lambda x: x["text"] == "ping from the user's room", "ping at the api")
    pong_at_api = m.api.wait(lambda x: x["text"] == "pong from the bot's room", "pong at the api")
    assert pong_at_api["parent_id"] == ping_at_api["id"]

    # the api answers carol's question: threaded in both Talk rooms
    m.api.post(text="answer from the api", username="zoe", parent_id=at_api["id"])
    in_user = wait_for(lambda: [x for x in m.by_user() if x.message.endswith("answer from the api")], what="user")
    in_bot = wait_for(lambda: [x for x in m.by_bot() if x.message.endswith("answer from the api")], what="bot")
    assert in_user[0].parent_id == copy.id and in_bot[0].parent_id == question.id
    m.settle()
    assert len(m.by_user()) == 3 and len(m.by_bot()) == 3  # question, pong, api / answer, ping, api


def test_a_reaction_crosses_between_the_two_talk_rooms(mixed: Mixed) -> None:
    m = mixed
    question = m.talk.call("post", BOT_ROOM, m.carol, "react to me")
    [copy] = wait_for(m.by_user, what="the copy in the user's room")
    m.talk.call("react", USER_ROOM, m.alice, copy.id, "👍")
    wait_for(lambda: m.message(question.id).reactions, what="the bot's reaction on carol's message")
    assert m.message(question.id).reactions == {"👍": [f"bots/bot-{m.bot.url_hash}"]}
    got = m.api.wait(lambda x: x["event"] == "reaction_add", "the reaction at the api")
    assert got["text"] == "👍"
    # and back: carol reacts to the bot's copy of alice's message (Talk's Like
    # hook names the copy; the bridge learns its id from it)
    mine = m.talk.call("post", USER_ROOM, m.alice, "and react to me")
    [bot_copy] = wait_for(m.by_bot, what="the bot's copy")
    m.talk.call("react", BOT_ROOM, m.carol, bot_copy.id, "🎉")
    wait_for(lambda: m.message(mine.id).reactions, what="the user account's reaction on alice's message")
    assert m.message(mine.id).reactions == {"🎉": ["users/bridge"]}
    m.settle()  # a reaction relayed twice would arrive before the sentinels
    # each reaction once at the api; the bot's and the user account's own reactions not relayed back
    assert sorted(x["text"] for x in m.api.seen if x["event"] == "reaction_add") == ["🎉", "👍"]
    assert m.message(question.id).reactions == {"👍": [f"bots/bot-{m.bot.url_hash}"]}
    assert m.message(copy.id).reactions == {"👍": ["users/alice"]}
    assert m.message(bot_copy.id).reactions == {"🎉": ["users/carol"]}


def test_edits_cross_where_the_bot_api_allows(mixed: Mixed) -> None:
    m = mixed
    # an edit in the user's room: the api's copy is edited; the bot cannot edit its copy
    original = m.talk.call("post", USER_ROOM, m.alice, "first version")
    at_api = m.api.wait(lambda x: x["text"] == "first version", "the message at the api")
    wait_for(m.by_bot, what="the bot's copy")
    m.talk.call("edit", USER_ROOM, m.alice, original.id, "second version")
    edit = m.api.wait(lambda x: x["text"] == "second version", "the edit at the api")
    assert edit["id"] == at_api["id"] and edit["event"] == ""  # Matterbridge's api: an edit repeats the id

    # an edit on the api side: the user account edits its copy in place (PUT)
    sent = m.api.post(text="api, first", username="zoe")
    [copy] = wait_for(lambda: [x for x in m.by_user() if x.message.endswith("api, first")], what="the api's copy")
    wait_for(lambda: len(m.by_bot()) >= 2, what="the bot's copy of the api's message")
    m.api.post(text="api, second", username="zoe", id=sent["id"])
    wait_for(lambda: m.message(copy.id).message.endswith("api, second"), what="the copy edited in the user's room")
    assert m.message(copy.id).message == "[api/a] <zoe> api, second"

    # an edit in the bot's room: Talk tells bots nothing of it, so it stays there
    theirs = m.talk.call("post", BOT_ROOM, m.carol, "carol, first")
    [carols] = wait_for(lambda: [x for x in m.by_user() if x.message.endswith("carol, first")], what="carol's copy")
    m.talk.call("edit", BOT_ROOM, m.carol, theirs.id, "carol, second")

    m.settle()
    assert [x.message for x in m.by_bot()] == [
        "[nctalk/user] <Alice> first version",
        "[api/a] <zoe> api, first",
    ]  # the bot's copies as posted
    assert m.message(carols.id).message == "[nctalkbot/bot] <Carol> carol, first"
    assert not [x for x in m.api.seen if x["text"] == "carol, second"]
    # nothing posted a visible "(edited)" note for what the bot cannot edit
    assert not [x for x in m.by_user() + m.by_bot() if "(edited)" in x.message]


def test_a_file_reaches_the_bot_room_as_its_name_and_link(mixed: Mixed) -> None:
    """The bot API posts text only: a file from the user's room or the api
    reaches the bot's room as a line with its name (and Talk's link); the
    api gets the bytes, and a file from the api is a real file in the user's room."""
    m = mixed
    data = bytes(range(256)) * 8
    shared = m.talk.call("post_file", USER_ROOM, m.alice, "plan.pdf", data, "the plan")
    [note] = wait_for(m.by_bot, what="the file's line in the bot's room")
    assert note.message.startswith(f"[nctalk/user] <Alice> the plan\nplan.pdf: {m.talk.url}/index.php/f/")
    assert shared.share is not None
    got = m.api.wait(lambda x: x["text"] == "the plan", "the file at the api")
    [att] = got["Extra"]["file"]
    assert att["Name"] == "plan.pdf" and base64.b64decode(att["Data"]) == data

    m.api.post(
        text="", username="zoe", Extra={"file": [{"Name": "nota.txt", "Data": base64.b64encode(b"hi").decode()}]}
    )
    [filed] = wait_for(
        lambda: [x for x in m.by_user() if x.share is not None], what="the api's file in the user's room"
    )
    assert m.talk.call("file_of", filed, "alice") == b"hi"
    wait_for(lambda: len(m.by_bot()) >= 2, what="the api's file in the bot's room")
    assert m.by_bot()[1].message == "[api/a] <zoe> \n[file nota.txt]"  # no link to give: its name
