"""What a Talk user account does when Talk says no — through ``talkbridge
run`` as a real process against the Talk test server (in a thread): a room
that answers 404 and then recovers is picked up again while the other room
keeps flowing; a 429's ``Retry-After`` is honoured by the poll and by a send;
a revoked app password makes a bounded number of requests (a burst, then one
probe per ``RefusedRetrySeconds``) and the account resumes when the password
is fixed on the server, or in the config and the daemon restarted.

The in-process tests (tests/test_nctalk.py) look at the backoff's delays
one by one; these look at what a running daemon does with them.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis

from bridge.keys import account_key, dead_letters_key, degraded_key
from tests.helpers import SENTINEL, ConfigToml, Daemon, RedisServer, free_port, has_sentinel, through_sentinel, wait_for
from tests.nctalk_rig import PASSWORD
from tests.talkserver import ThreadedTalkServer
from tests.talkserver.state import Actor, BotRequest

ACCOUNT = "nctalk.cloud"
ROOM, OTHER = "room1234", "room5678"
PROBE = 1.0  # RefusedRetrySeconds
# Request times are the server's wall clock, sleeps the daemon's event-loop
# timers (libuv's are milliseconds): a gap may read a hair short of the delay.
CLOCKS = 0.02
CURSORS = account_key("tb", ACCOUNT, "talk-cursors")


@dataclass
class Api:
    port: int
    seen: list[dict[str, Any]] = field(default_factory=list)

    def post(self, gateway: str, **message: Any) -> None:
        resp = httpx.post(f"http://127.0.0.1:{self.port}/api/message", json={"gateway": gateway, **message},
                          headers={"Authorization": "Bearer t"}, timeout=5)  # fmt: skip
        assert resp.status_code == 200, resp.text

    def texts(self) -> list[str]:
        resp = httpx.get(f"http://127.0.0.1:{self.port}/api/messages", headers={"Authorization": "Bearer t"}, timeout=5)
        resp.raise_for_status()
        self.seen.extend(resp.json())
        return [m["text"] for m in self.seen]


@dataclass
class Setup:
    tmp_path: Path
    talk: ThreadedTalkServer
    daemon: Daemon
    redis: sync_redis.Redis
    api: Api
    alice: Actor
    http: int

    def requests(self, path_part: str = "", method: str | None = None) -> list[BotRequest]:
        return self.talk.call("chat_requests", path_part, method)

    def refused(self) -> list[BotRequest]:
        return [r for r in self.requests() if r.status == 401]

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.http}/metrics", timeout=5).text

    def by_bridge(self, token: str) -> list[str]:
        return [m.message for m in self.talk.call("messages", token) if m.actor.id == "bridge"]

    def post(self, token: str, text: str) -> None:
        self.talk.call("post", token, self.alice, text)

    def api_settled(self) -> list[str]:
        """What reached the api from both rooms, once a sentinel said in each has arrived."""
        return through_sentinel(
            lambda: (self.post(ROOM, SENTINEL), self.post(OTHER, SENTINEL)),
            self.api.texts,
            has_sentinel,
            count=2,
            what="the rooms' sentinels at the api",
        )

    def talk_settled(self, gateway: str, token: str) -> list[str]:
        """The bridge's posts in a room, once a sentinel sent to it through the api is among them."""
        return through_sentinel(
            lambda: self.api.post(gateway, text=SENTINEL, username="zoe"),
            lambda: self.by_bridge(token),
            has_sentinel,
            what=f"the sentinel in {token}",
        )


def write_config(path: Path, redis_url: str, talk_url: str, http: int, api: int, password: str = PASSWORD) -> Path:
    # one gateway per room, the api in both: a room's messages reach the api only
    config = ConfigToml().general("[{PROTOCOL}] <{NICK}> ").api("a", api, "t")
    config.section(ACCOUNT, Server=talk_url, Login="bridge", Password=password, PollTimeout=5, RoomRetryMinSeconds=0.2,
                   RoomRetryMaxSeconds=1, RefusedRetrySeconds=PROBE)  # fmt: skip
    config.gateway("one", (ACCOUNT, ROOM), ("api.a", "api")).gateway("two", (ACCOUNT, OTHER), ("api.a", "api"))
    return config.daemon(redis_url, http, LeaseSeconds=2, RetryBaseSeconds=0.05).write(path)


def make_setup(tmp_path: Path, redis_server: RedisServer, password: str = PASSWORD) -> Iterator[Setup]:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    talk = ThreadedTalkServer(version=19, bruteforce_delay_scale=0).start()
    alice = talk.call("add_user", "alice", "Alice")
    bridge = talk.call("add_user", "bridge", "Bridge", password=PASSWORD)
    talk.call("create_room", "One", ROOM, (alice, bridge))
    talk.call("create_room", "Two", OTHER, (alice, bridge))
    http, api = free_port(), free_port()
    path = write_config(tmp_path / "talkbridge.toml", redis_server.url, talk.url, http, api, password)
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    try:
        if password == PASSWORD:
            wait_for(lambda: client.hlen(CURSORS) == 2, what="both rooms polled")
        yield Setup(tmp_path, talk, daemon, client, Api(api), alice, http)
    finally:
        daemon.stop()
        talk.stop()
        client.close()


@pytest.fixture
def setup(tmp_path: Path, redis_server: RedisServer) -> Iterator[Setup]:
    yield from make_setup(tmp_path, redis_server)


def test_a_room_answering_404_is_picked_up_again_while_the_other_flows(setup: Setup) -> None:
    s = setup
    s.talk.call("fail_room", ROOM, 404)
    failed = f'talkbridge_room_failed{{account="{ACCOUNT}",room="{ROOM}"}} 1.0'
    wait_for(lambda: failed in s.metrics(), what="the room shown as failed")
    assert f"room {ROOM}" in (s.redis.get(degraded_key("tb", ACCOUNT)) or b"").decode()  # talkbridge status
    s.post(ROOM, "posted while the room fails")
    s.post(OTHER, "the other room flows")
    wait_for(lambda: "the other room flows" in s.api.texts(), what="the other room's message")
    # a few retries, spaced by the backoff: the room is not given up
    wait_for(lambda: len([r for r in s.requests(f"/chat/{ROOM}") if r.status == 404]) >= 3, what="retries")
    s.talk.call("heal_room", ROOM)
    s.post(ROOM, "after the recovery")
    wait_for(lambda: "after the recovery" in s.api.texts(), what="the healed room's message")
    assert s.api_settled() == ["the other room flows", "posted while the room fails", "after the recovery"]
    assert f'talkbridge_room_failed{{account="{ACCOUNT}",room="{ROOM}"}} 0.0' in s.metrics()
    log = s.daemon.log()
    assert f"ALERT: room {ROOM} failing" in log and f"room {ROOM} recovered" in log
    assert s.redis.get(degraded_key("tb", ACCOUNT)) is None


def test_talk_in_maintenance_longer_than_the_retry_budget_delays_messages_and_loses_none(setup: Setup) -> None:
    """``occ maintenance:mode --on`` (an upgrade) answers every request 503
    with X-Nextcloud-Maintenance-Mode. Deliveries wait for Talk without
    spending their attempts (bridge.adapter.ServerUnavailable): far more
    tries than MaxDeliveries (5) later nothing is dead-lettered, and once
    maintenance ends everything arrives in order, once; the polls resume."""
    s = setup
    s.talk.call("set_maintenance", True)
    sent = [f"during the upgrade {i}" for i in range(3)]
    for text in sent:
        s.api.post("one", text=text, username="bob")
    tries = re.compile(rf'talkbridge_delivery_errors_total{{account="{ACCOUNT}",kind="unavailable"}} (\d+)')

    def tried() -> int:
        found = tries.search(s.metrics())
        return int(found.group(1)) if found else 0

    wait_for(lambda: tried() >= 7, timeout=60, what="more tries than MaxDeliveries")
    assert s.redis.xlen(dead_letters_key("tb")) == 0 and s.by_bridge(ROOM) == []
    s.talk.call("set_maintenance", False)
    expected = [f"[api] <bob> {text}" for text in sent]
    wait_for(lambda: s.by_bridge(ROOM) == expected, timeout=60, what="the held messages in Talk")
    assert s.talk_settled("one", ROOM) == expected
    assert s.redis.xlen(dead_letters_key("tb")) == 0
    s.post(ROOM, "after the upgrade")
    wait_for(lambda: "after the upgrade" in s.api.texts(), timeout=30, what="the poll resumed")
    assert "the server is away for room1234" in s.daemon.log()


def test_a_429_retry_after_is_honoured_by_the_poll_and_by_a_send(setup: Setup) -> None:
    s = setup
    s.talk.call("fail_room", ROOM, 429, {"Retry-After": "2"})
    wait_for(lambda: len([r for r in s.requests(f"/chat/{ROOM}") if r.status == 429]) >= 3, what="three 429s")
    s.talk.call("heal_room", ROOM)
    throttled = [r for r in s.requests(f"/chat/{ROOM}") if r.status == 429]
    # each next request came no sooner than Talk asked (a sleep is never shorter)
    assert all(b.at - a.at >= 2.0 - CLOCKS for a, b in itertools.pairwise(throttled))
    assert "retrying in 2.0s" in s.daemon.log()

    # a send answered 429 is retried after its Retry-After, and posted once
    s.talk.call("fail_chat_next", 429, 1, {"Retry-After": "2"}, "POST")
    s.api.post("two", text="to the other room", username="zoe")
    wait_for(lambda: s.by_bridge(OTHER), what="the api's message in Talk")
    posts = s.requests(f"/chat/{OTHER}", "POST")
    assert [r.status for r in posts] == [429, 201] and posts[1].at - posts[0].at >= 2.0 - CLOCKS
    assert s.talk_settled("two", OTHER) == ["[api] <zoe> to the other room"]


def test_a_revoked_password_makes_a_bounded_number_of_requests_and_resumes_when_fixed(setup: Setup) -> None:
    s = setup
    s.talk.call("revoke_password", "bridge", PASSWORD)
    s.post(ROOM, "wakes one")  # both polls come back and ask again: refused
    s.post(OTHER, "wakes two")
    wait_for(lambda: f'talkbridge_account_failed{{account="{ACCOUNT}"}} 1.0' in s.metrics(), what="account failed")
    burst = len(s.refused())
    assert 1 <= burst <= 2  # at most one per room's poll in flight
    s.api.post("one", text="sent while refused", username="zoe")  # waits: no request of its own
    wait_for(lambda: len(s.refused()) >= burst + 2, what="two probes")
    probes = s.refused()[burst:]
    assert all(r.method == "GET" and "/cloud/capabilities" in r.path for r in probes)
    assert all(b.at - a.at >= PROBE - CLOCKS for a, b in itertools.pairwise(probes))  # one per RefusedRetrySeconds
    assert not s.requests("/chat/", "POST") and "credentials refused" in s.daemon.log()
    assert b"credentials refused" in (s.redis.get(degraded_key("tb", ACCOUNT)) or b"")

    s.talk.call("grant_password", "bridge", PASSWORD)  # fixed on the server
    wait_for(lambda: s.by_bridge(ROOM), what="the waiting send posted")
    wait_for(lambda: {"wakes one", "wakes two"} <= set(s.api.texts()), what="what was said while refused")
    assert s.talk_settled("one", ROOM) == ["[api] <zoe> sent while refused"]
    assert sorted(s.api_settled()) == ["wakes one", "wakes two"]
    assert f'talkbridge_account_failed{{account="{ACCOUNT}"}} 0.0' in s.metrics()
    assert "credentials accepted again" in s.daemon.log()
    assert all("/cloud/capabilities" in r.path for r in s.refused()[burst:])  # a probe or two more, no poll, no post


def test_a_password_fixed_in_the_config_is_used_after_a_restart(tmp_path: Path, redis_server: RedisServer) -> None:
    gen = make_setup(tmp_path, redis_server, password="not-the-app-password")
    s = next(gen)
    try:
        wait_for(lambda: f'talkbridge_account_failed{{account="{ACCOUNT}"}} 1.0' in s.metrics(), what="refused")
        assert all("/cloud/capabilities" in r.path for r in s.requests())  # never a room's poll
        s.daemon.stop()
        config = s.daemon.config.read_text().replace("not-the-app-password", PASSWORD)
        s.daemon.config.write_text(config)
        s.daemon.start()
        wait_for(lambda: s.redis.hlen(CURSORS) == 2, what="both rooms polled")
        s.post(OTHER, "after the fix")
        wait_for(lambda: "after the fix" in s.api.texts(), what="the message after the fix")
    finally:
        gen.close()


def test_a_post_to_a_read_only_room_is_dead_lettered_with_the_reason_and_the_other_room_flows(setup: Setup) -> None:
    """Talk answers a post into a read-only room 403 (RequireReadWriteConversation):
    the room's trouble, not Talk's, so the delivery spends its MaxDeliveries (5)
    and is dead-lettered naming the reason; nothing is posted there, the other
    room flows, and once the room is writable again a new message is posted."""
    s = setup
    s.talk.call("set_read_only", ROOM, True)
    s.api.post("one", text="into the locked room", username="bob")
    wait_for(lambda: s.redis.xlen(dead_letters_key("tb")) == 1, timeout=60, what="the dead letter")
    [(_id, letter)] = s.redis.xrange(dead_letters_key("tb"))
    assert letter[b"attempts"] == b"5"
    assert b"answered 403" in letter[b"error"] and b"read-only" in letter[b"error"]
    s.api.post("two", text="to the other room", username="bob")
    wait_for(lambda: s.by_bridge(OTHER), what="the other room's message")
    s.talk.call("set_read_only", ROOM, False)
    s.api.post("one", text="after the unlock", username="bob")
    wait_for(lambda: s.by_bridge(ROOM), what="the message after the unlock")
    assert s.talk_settled("one", ROOM) == ["[api] <bob> after the unlock"] and s.redis.xlen(dead_letters_key("tb")) == 1
