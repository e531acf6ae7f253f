"""``talkbridge run`` as a real process: a Talk bot account and an api account
in one gateway, with the Talk test server (in a thread) on the other side."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis as sync_redis

from adapters.talk.common import reference_id
from bridge.events import event_from_wire
from bridge.keys import inbound_key, outbound_key, rooms_key
from tests.helpers import (
    SENTINEL,
    ConfigToml,
    Daemon,
    RedisServer,
    free_port,
    has_sentinel,
    through_sentinel,
    wait_for,
    wait_quiet,
)
from tests.talkbot_rig import SECRET
from tests.talkserver import ThreadedTalkServer
from tests.talkserver.state import Actor, Bot, Message

TOKEN = "room1234"
ACCOUNT = "nctalkbot.talk"


class Api:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": "Bearer api-token"}
        self.seen: list[dict] = []

    def post(self, **message) -> httpx.Response:
        return httpx.post(f"{self.base}/api/message", json={"gateway": "g", **message}, headers=self.headers, timeout=5)

    def wait(self, predicate, what: str) -> dict:
        def found():
            resp = httpx.get(f"{self.base}/api/messages", headers=self.headers, timeout=5)
            resp.raise_for_status()
            self.seen.extend(resp.json())
            return next((m for m in self.seen if predicate(m)), None)

        return wait_for(found, what=what)


@dataclass
class Bridge:
    talk: ThreadedTalkServer
    daemon: Daemon
    api: Api
    redis: sync_redis.Redis
    bot: Bot
    alice: Actor
    http_port: int

    def bot_messages(self) -> list[Message]:
        return self.talk.call("bot_messages", TOKEN, self.bot)

    def metric(self, line: str) -> bool:
        text = httpx.get(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5).text
        return line in text


def config(tmp_path: Path, redis_url: str, talk_url: str, http: int, api: int, secret: str = SECRET) -> Path:
    config = ConfigToml().general()
    config.api("a", api, "api-token")
    webhook = f"http://127.0.0.1:{http}/webhook/nextcloud/talk"
    config.section(ACCOUNT, Server=talk_url, BotSecret=secret, WebhookURL=webhook, Timeout=5)
    config.gateway("g", ("api.a", "api"), (ACCOUNT, TOKEN))
    config.daemon(redis_url, http, LeaseSeconds=2, RetryBaseSeconds=0.05)
    return config.write(tmp_path / "talkbridge.toml")


def make_bridge(tmp_path: Path, redis_server: RedisServer, daemon_secret: str = SECRET) -> Iterator[Bridge]:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    talk = ThreadedTalkServer().start()
    http, api_port = free_port(), free_port()
    path = config(tmp_path, redis_server.url, talk.url, http, api_port, daemon_secret)
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    try:
        alice = talk.call("add_user", "alice", "Alice")
        talk.call("create_room", "Bridged", TOKEN, (alice,))
        bot = talk.call("install_bot", "Bridge", SECRET, f"http://127.0.0.1:{http}/webhook/nextcloud/talk")
        talk.call("enable_bot", bot, TOKEN)
        yield Bridge(talk, daemon, Api(api_port), client, bot, alice, http)
    finally:
        daemon.stop()
        talk.stop()
        client.close()


@pytest.fixture
def bridge(tmp_path: Path, redis_server: RedisServer) -> Iterator[Bridge]:
    yield from make_bridge(tmp_path, redis_server)


def test_messages_replies_and_reactions_cross_both_ways(bridge: Bridge) -> None:
    b = bridge
    assert b.redis.smembers(rooms_key("tb", ACCOUNT)) == {TOKEN.encode()}  # from the Join
    msg = b.talk.call("post", TOKEN, b.alice, "hello from Talk, see https://example.com/x")
    got = b.api.wait(lambda m: m["text"].startswith("hello from Talk"), "the Talk message at the api")
    assert got["text"] == "hello from Talk, see https://example.com/x"
    assert got["username"] == "[nctalkbot/talk] <Alice> " and got["userid"] == "users/alice"
    assert got["channel"] == TOKEN and got["account"] == ACCOUNT and got["id"]

    # a reply from the api side lands in Talk as the bot, threaded on the original
    assert b.api.post(text="hi Alice", username="bob", parent_id=got["id"]).status_code == 200
    [reply] = wait_for(b.bot_messages, what="the bot's reply in Talk")
    assert reply.message == "[api/a] <bob> hi Alice"
    assert reply.parent_id == msg.id
    assert reply.actor.type == "bots" and reply.actor.id == f"bot-{b.bot.url_hash}"
    assert reply.reference_id is not None and len(reply.reference_id) == 64

    # a reaction from the api side becomes the bot's reaction in Talk
    assert b.api.post(event="reaction_add", text="👍", username="bob", parent_id=got["id"]).status_code == 200
    wait_for(lambda: b.talk.call("messages", TOKEN)[0].reactions.get("👍"), what="the reaction in Talk")
    assert b.talk.call("messages", TOKEN)[0].reactions == {"👍": [f"bots/bot-{b.bot.url_hash}"]}

    # a reaction in Talk reaches the api side, on the api's id of the message
    bob = b.talk.call("add_user", "bob", "Bob")
    b.talk.call("react", TOKEN, bob, msg.id, "🎉")
    got_reaction = b.api.wait(lambda m: m["event"] == "reaction_add", "the Talk reaction at the api")
    assert got_reaction["text"] == "🎉" and got_reaction["parent_id"] == got["id"]
    # Talk echoed the bot's own 👍 to the bot first (in stream order): it was not bridged back
    assert [m["text"] for m in b.api.seen if m["event"] == "reaction_add"] == ["🎉"]
    # and every webhook Talk sent was answered 200
    assert {c.status for c in b.talk.state.webhook_calls} == {200}


def test_a_talk_reply_to_a_bridged_message_reaches_the_api_threaded(bridge: Bridge) -> None:
    b = bridge
    posted = b.api.post(text="question from the api side", username="bob")
    assert posted.status_code == 200
    [copy] = wait_for(b.bot_messages, what="the bridged message in Talk")
    # Alice answers the bot's copy in Talk: the api side sees it threaded on its own id.
    b.talk.call("post", TOKEN, b.alice, "answer from Talk", copy.id)
    got = b.api.wait(lambda m: m["text"] == "answer from Talk", "the Talk reply at the api")
    assert got["parent_id"] == posted.json()["id"]


def test_a_kill_after_delivery_posts_no_duplicate(bridge: Bridge, tmp_path: Path) -> None:
    b = bridge
    assert b.api.post(text="first", username="bob").status_code == 200
    wait_for(b.bot_messages, what="first in Talk")
    # Talk's 201 is followed by the record of the delivery and its ack, in one
    # script: wait until the delivery is acknowledged, then kill
    stream = outbound_key("tb", ACCOUNT)

    def acknowledged() -> bool:
        entries = b.redis.xrange(stream)
        groups = {g["name"]: g for g in b.redis.xinfo_groups(stream)} if entries else {}
        group = groups.get(b"deliver")
        return group is not None and group["last-delivered-id"] == entries[-1][0] and group["pending"] == 0

    wait_for(acknowledged, what="the delivery recorded and acknowledged")
    b.daemon.kill()
    b.daemon.start()
    assert b.api.post(text="second", username="bob").status_code == 200
    wait_for(lambda: len(b.bot_messages()) >= 2, what="second in Talk")
    # a late duplicate of "first" arrives before a sentinel posted last
    assert settled(b) == ["[api/a] <bob> first", "[api/a] <bob> second"]


def settled(b: Bridge) -> list[str]:
    """The bot's messages in Talk, once a sentinel posted to the api after them is among them."""
    return through_sentinel(
        lambda: b.api.post(text=SENTINEL, username="bob"),
        lambda: [m.message for m in b.bot_messages()],
        has_sentinel,
        what="the sentinel in Talk",
    )


def test_a_kill_between_talks_201_and_the_marker_repeats_the_reference_id(bridge: Bridge) -> None:
    """The one window left open: Talk stored the message but the daemon died
    before recording it. Talk cannot be asked (a bot cannot read the chat) and
    does not dedupe on referenceId, so the copy is posted again — with the same
    referenceId, so clients and pollers can tell it is the same message."""
    b = bridge
    b.talk.call("stall_next")
    assert b.api.post(text="in the window", username="bob").status_code == 200
    b.talk.call("wait_stalled")  # stored in Talk, 201 not sent yet
    b.daemon.kill()
    b.daemon.start()

    def copies() -> list[Message]:
        return [m for m in b.bot_messages() if m.message == "[api/a] <bob> in the window"]

    wait_for(lambda: len(copies()) >= 2, what="the redelivered copy")
    settled(b)  # posted again once, not more: a third copy would arrive before the sentinel
    first, second = copies()
    assert first.reference_id == second.reference_id
    # ... the deterministic one of that delivery (event id, account, room)
    [(_entry, fields), _sentinel] = b.redis.xrange(inbound_key("tb", "api.a"))
    source = event_from_wire(fields[b"d"])
    assert first.reference_id == reference_id(f"{source.id}:{ACCOUNT}:{TOKEN}")


def test_a_401_from_talk_is_not_retried(tmp_path: Path, redis_server: RedisServer) -> None:
    gen = make_bridge(tmp_path, redis_server, daemon_secret="not-the-secret-talk-knows-" + "q" * 30)
    b = next(gen)
    try:
        assert b.api.post(text="one", username="bob").status_code == 200
        wait_for(lambda: b.metric('talkbridge_account_failed{account="nctalkbot.talk"} 1.0'), what="account_failed")
        assert b.api.post(text="two", username="bob").status_code == 200
        wait_for(lambda: b.redis.xlen(outbound_key("tb", ACCOUNT)) >= 2, what="the second delivery queued")
        # no retry comes; a paused account delivers nothing more, so no sentinel can follow: a window, then
        wait_quiet(lambda: len(b.talk.call("requests", "/message")), what="Talk's requests")
        assert len(b.talk.call("requests", "/message")) == 1  # one attempt, then the account is paused
        assert b.talk.call("requests", "/message")[0].status == 401
        assert b.bot_messages() == []
    finally:
        gen.close()
