"""``talkbridge run`` as a real process with a Talk user account whose
channel is ``*`` and an api account in one gateway: every group room the user
is in reaches the api and the other rooms, the api reaches every one of them,
a room the user is added to joins in, and a one-to-one conversation stays
private."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis as sync_redis

from bridge.keys import account_key
from tests.helpers import SENTINEL, ConfigToml, Daemon, RedisServer, free_port, has_sentinel, through_sentinel, wait_for
from tests.nctalk_rig import PASSWORD, user_section
from tests.talkserver import ThreadedTalkServer
from tests.talkserver.state import Actor

ACCOUNT = "nctalk.cloud"
CURSORS = account_key("tb", ACCOUNT, "talk-cursors")


@dataclass
class Star:
    talk: ThreadedTalkServer
    redis: sync_redis.Redis
    api_port: int
    alice: Actor
    bridge: Actor
    seen: list[dict] = field(default_factory=list)

    def api_texts(self) -> list[str]:
        resp = httpx.get(f"http://127.0.0.1:{self.api_port}/api/messages", headers={"Authorization": "Bearer t"},
                         timeout=5)  # fmt: skip
        self.seen.extend(resp.json())
        return sorted(m["text"] for m in self.seen)

    def bridged(self, token: str) -> list[str]:
        return [m.message for m in self.talk.call("messages", token) if m.actor.id == "bridge"]


@pytest.fixture
def star(tmp_path: Path, redis_server: RedisServer) -> Iterator[Star]:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    talk = ThreadedTalkServer(version=21, bruteforce_delay_scale=0).start()
    alice = talk.call("add_user", "alice", "Alice")
    bridge = talk.call("add_user", "bridge", "Bridge", password=PASSWORD)
    for token in ("roomaaaa", "roombbbb"):
        talk.call("create_room", token, token, (alice, bridge))
    talk.call("create_room", "Alice", "dm000001", (alice, bridge), type=1)
    http, api = free_port(), free_port()
    config = ConfigToml().general("[{PROTOCOL}] <{NICK}> ").api("a", api, "t")
    config.raw(user_section("cloud", talk.url, PollTimeout=5, RoomsRefreshSeconds=0.5))
    config.gateway("g", (ACCOUNT, "*"), ("api.a", "api"))
    config.daemon(redis_server.url, http, LeaseSeconds=2, RetryBaseSeconds=0.05)
    path = config.write(tmp_path / "talkbridge.toml")
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    try:
        wait_for(lambda: client.hlen(CURSORS) == 2, what="both group rooms polled")
        yield Star(talk, client, api, alice, bridge)
    finally:
        daemon.stop()
        talk.stop()
        client.close()


def test_every_group_room_and_the_api_in_one_gateway(star: Star) -> None:
    s = star
    s.talk.call("post", "roomaaaa", s.alice, "from a")
    s.talk.call("post", "dm000001", s.alice, "a private word")
    resp = httpx.post(f"http://127.0.0.1:{s.api_port}/api/message", headers={"Authorization": "Bearer t"},
                      json={"text": "from the api", "username": "zoe", "gateway": "g"}, timeout=5)  # fmt: skip
    assert resp.status_code == 200
    # the api reaches every room of "*" (one-to-one aside); a room reaches the api and the other rooms
    wait_for(lambda: s.bridged("roomaaaa") and len(s.bridged("roombbbb")) == 2, what="both rooms")
    assert s.bridged("roomaaaa") == ["[api] <zoe> from the api"]
    assert sorted(s.bridged("roombbbb")) == ["[api] <zoe> from the api", "[nctalk] <Alice> from a"]
    wait_for(lambda: "from a" in s.api_texts(), what="room a at the api")

    # a room the user is added to joins the gateway
    s.talk.call("create_room", "roomcccc", "roomcccc", (s.alice, s.bridge))
    wait_for(lambda: s.redis.hlen(CURSORS) == 3, what="the new room polled")
    s.talk.call("post", "roomcccc", s.alice, "from c")
    wait_for(lambda: "from c" in s.api_texts(), what="room c at the api")
    # a duplicate arrives before a sentinel said after it in each room (and one from the api into room a)
    rooms = ("roomaaaa", "roombbbb", "roomcccc")
    at_api = through_sentinel(lambda: [s.talk.call("post", r, s.alice, SENTINEL) for r in rooms], s.api_texts,
                              has_sentinel, count=3, what="the rooms' sentinels at the api")  # fmt: skip
    assert at_api == ["from a", "from c"]
    assert not s.bridged("dm000001")
    in_a = through_sentinel(lambda: None, lambda: s.bridged("roomaaaa"), has_sentinel, count=2,
                            what="rooms b's and c's sentinels in room a")  # fmt: skip
    assert in_a == ["[api] <zoe> from the api", "[nctalk] <Alice> from c"]
