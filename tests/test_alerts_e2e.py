"""Admin-room alerts through real daemons (issue 12, "What must be shown"):
``talkbridge run`` processes on one Redis, the Talk test server, and an
``api`` account as the admin room (``[general] AdminRoom``), read through
its ``/api/messages`` like any Matterbridge client would."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis as sync_redis

from bridge.keys import alerts_key, log_key
from tests.helpers import ConfigToml, Daemon, RedisServer, free_port, start_redis_server, wait_for, wait_quiet
from tests.talkbot_rig import SECRET, bot_section
from tests.talkserver import ThreadedTalkServer

TOKEN = "room1234"
BOT = "nctalkbot.talk"
WRONG_SECRET = "not-the-secret-talk-knows-" + "q" * 30
DEAD_URL = "http://127.0.0.1:9/webhook/nextcloud/talk"  # Talk's webhooks go nowhere: only our sends matter here


def states(port: int) -> dict[str, str]:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).json().get("accounts", {})
    except httpx.HTTPError:
        return {}


def owner_of(daemons: list[Daemon], account: str) -> Daemon | None:
    return next((d for d in daemons if states(d.http_port).get(account) == "connected"), None)


@dataclass
class AdminRoom:
    """The admin room: an api account, read through /api/messages (which drains it)."""

    port: int
    seen: list[dict] = field(default_factory=list)

    def read(self) -> list[dict]:
        try:
            resp = httpx.get(
                f"http://127.0.0.1:{self.port}/api/messages",
                headers={"Authorization": "Bearer admin-token"},
                timeout=5,
            )
        except httpx.TransportError:  # the account moving to another instance: its port reopens
            return self.seen
        if resp.status_code == 200:
            self.seen.extend(resp.json())
        return self.seen

    def texts(self) -> list[str]:
        return [m["text"] for m in self.read()]

    def wait(self, part: str) -> list[str]:
        wait_for(lambda: any(part in text for text in self.texts()), timeout=30, what=f"{part!r} in the admin room")
        return self.texts()

    def settled(self) -> list[str]:
        """Everything the room got, once nothing more arrives (a duplicate would show now).
        A window, not a sentinel: each instance's watcher raises alerts on its
        own clock, in no order with any message a test could send after them."""
        return wait_quiet(lambda: list(self.texts()), what="the admin room")  # type: ignore[return-value]


def config_text(redis_url: str, talk_url: str, http: int, api: int, admin: int, secret: str) -> str:
    config = ConfigToml().general(AdminRoom="api.admin:api")
    config.api("a", api, "api-token").api("admin", admin, "admin-token")
    config.raw(bot_section("talk", talk_url, secret, Timeout=5)).gateway("g", ("api.a", "api"), (BOT, TOKEN))
    config.daemon(redis_url, http, LeaseSeconds=2, RetryBaseSeconds=0.05)
    return config.section("alerts", CheckSeconds=0.2).text()


@dataclass
class Fleet:
    """Two daemon instances with their own config files (as on two hosts)."""

    tmp: Path
    redis_url: str
    talk_url: str
    api: int
    admin: int
    daemons: list[Daemon] = field(default_factory=list)

    def write(self, secret: str) -> None:
        for i, daemon in enumerate(self.daemons):
            text = config_text(self.redis_url, self.talk_url, daemon.http_port, self.api, self.admin, secret)
            (self.tmp / f"instance{i}.toml").write_text(text)

    def add(self, count: int) -> None:
        for _ in range(count):
            i = len(self.daemons)
            self.daemons.append(Daemon(self.tmp / f"instance{i}.toml", free_port(), self.tmp / f"instance{i}.log"))

    def start_all(self, accounts: tuple[str, ...] = ("api.a", "api.admin", BOT)) -> None:
        for daemon in self.daemons:
            daemon.start(ready=False)
        self.wait_served(accounts)

    def running(self) -> list[Daemon]:
        return [d for d in self.daemons if d.proc is not None and d.proc.poll() is None]

    def wait_served(self, accounts: tuple[str, ...]) -> None:
        def served() -> bool:
            connected = {a for d in self.running() for a, s in states(d.http_port).items() if s == "connected"}
            return connected >= set(accounts)

        wait_for(served, timeout=30, interval=0.1, what="every account connected on some instance")

    def stop_all(self) -> None:
        for daemon in self.daemons:
            daemon.stop()

    def logs(self) -> str:
        return "\n".join(d.log() for d in self.daemons if d.log_path.exists())


@pytest.fixture
def talk() -> Iterator[ThreadedTalkServer]:
    server = ThreadedTalkServer(bruteforce_delay_scale=0).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fleet(tmp_path: Path, redis_server: RedisServer, talk: ThreadedTalkServer) -> Iterator[Fleet]:
    sync_redis.Redis.from_url(redis_server.url).flushall()
    fleet = Fleet(tmp_path, redis_server.url, talk.url, free_port(), free_port())
    try:
        yield fleet
    finally:
        fleet.stop_all()


def test_a_wrong_bot_secret_alerts_once_across_two_instances_and_resolves_once(
    fleet: Fleet, talk: ThreadedTalkServer, redis_server: RedisServer
) -> None:
    client = sync_redis.Redis.from_url(redis_server.url, decode_responses=True)
    alice = talk.call("add_user", "alice", "Alice")
    talk.call("create_room", "Bridged", TOKEN, (alice,))
    bot = talk.call("install_bot", "Bridge", SECRET, DEAD_URL)
    talk.call("enable_bot", bot, TOKEN)
    room = AdminRoom(fleet.admin)
    fleet.add(2)
    fleet.write(WRONG_SECRET)
    fleet.start_all()

    # A message for Talk: Talk refuses the bot's signature (401), the account stops and alerts.
    posted = httpx.post(
        f"http://127.0.0.1:{fleet.api}/api/message",
        json={"text": "hello Talk", "username": "alice", "gateway": "g"},
        headers={"Authorization": "Bearer api-token"},
        timeout=5,
    )
    assert posted.status_code == 200
    room.wait("credentials refused")

    # The owner goes away; the other instance takes the account over, retries the
    # pending delivery, is refused too, and fires the same alert: nothing new is posted.
    first = owner_of(fleet.daemons, BOT)
    assert first is not None
    first.stop()
    [second] = fleet.running()
    wait_for(lambda: states(second.http_port).get(BOT) == "connected", timeout=30, what="the takeover")
    wait_for(lambda: len(talk.call("requests", "/message")) >= 2, timeout=30, what="the second instance's refusal")
    assert {r.status for r in talk.call("requests", "/message")} == {401}
    wait_for(lambda: f"{BOT}: credentials refused" in second.log(), what="the second instance's refusal logged")
    alerts = [t for t in room.settled() if "credentials refused" in t]
    assert len(alerts) == 1, room.seen
    [alert] = alerts
    assert alert.startswith("[talkbridge CRITICAL] nctalkbot.talk: credentials refused: ")
    assert "account:nctalkbot.talk:credentials" in alert
    [only] = room.seen
    assert only["userid"] == "talkbridge" and only["account"] == "talkbridge.alerts"
    # the dashboard's record of it (docs/operations-alerts.md)
    record = client.hget(alerts_key("tb"), "account:nctalkbot.talk:credentials")
    assert record is not None and '"notified":"posted"' in record.replace(" ", "")

    # The fix: the right secret, both instances restarted. The delivery that
    # waited goes through, and one "resolved" follows.
    second.stop()
    fleet.write(SECRET)
    fleet.start_all()
    wait_for(lambda: talk.call("bot_messages", TOKEN, bot), timeout=30, what="the waiting message in Talk")
    room.wait("[talkbridge RESOLVED]")
    texts = room.settled()
    assert len(texts) == 2, texts
    assert texts[0] == alert
    assert texts[1].startswith("[talkbridge RESOLVED] nctalkbot.talk: credentials accepted again (after ")
    assert client.hlen(alerts_key("tb")) == 0
    assert [m.message for m in talk.call("bot_messages", TOKEN, bot)] == ["[api/a] <alice> hello Talk"]

    # Every instance streamed its warnings and errors into the fleet's log (bridge/logstream.py).
    entries = [fields for _id, fields in client.xrange(log_key("tb"))]
    critical = [e for e in entries if e["level"] == "CRITICAL" and e["account"] == BOT]
    assert {e["logger"] for e in critical} >= {"talkbridge.alerts", f"talkbridge.{BOT}"}
    assert all(set(e) == {"ts", "level", "logger", "account", "instance", "message"} for e in entries)
    assert len({e["instance"] for e in critical}) == 2  # refused on both instances
    client.close()


def test_an_instance_that_dies_is_alerted_once_and_resolved_when_replaced(fleet: Fleet) -> None:
    room = AdminRoom(fleet.admin)
    fleet.add(2)
    fleet.write(SECRET)
    fleet.start_all()
    victim, survivor = fleet.daemons
    victim_id = instance_id(victim)
    # a member of the fleet for a while (the accounts are shared out between the two)
    wait_for(lambda: "connected" in states(victim.http_port).values(), timeout=30, what="the victim's share")
    victim.kill()  # SIGKILL: it never leaves the heartbeat set; its entry lapses
    room.wait(f"instance {victim_id} stopped without leaving")
    # a newcomer brings the fleet back to two
    fleet.add(1)
    fleet.write(SECRET)
    fleet.daemons[2].start(ready=False)
    room.wait("[talkbridge RESOLVED]")
    texts = room.settled()
    assert len(texts) == 2, texts
    assert texts[0].startswith(f"[talkbridge ERROR] instance {victim_id} stopped without leaving")
    assert texts[1].startswith(f"[talkbridge RESOLVED] {victim_id} replaced: 2 instances alive")
    assert survivor.proc is not None and survivor.proc.poll() is None


def test_redis_lost_and_regained_is_posted_once_it_is_back(tmp_path: Path, talk: ThreadedTalkServer) -> None:
    server = start_redis_server(tmp_path)
    fleet = Fleet(tmp_path, server.url, talk.url, free_port(), free_port())
    room = AdminRoom(fleet.admin)
    fleet.add(1)
    fleet.write(SECRET)
    try:
        fleet.start_all()
        [daemon] = fleet.daemons
        me = instance_id(daemon)
        server.stop()
        wait_for(lambda: "alerts: Redis unreachable" in daemon.log(), what="the outage noticed")
        server = start_redis_server(tmp_path, server.port)  # back (empty: a new server)
        room.wait("[talkbridge RESOLVED] Redis reachable again")
        texts = room.settled()
        assert len(texts) == 2, texts
        assert texts[0].startswith(f"[talkbridge ERROR] Redis unreachable from {me} since ")
        assert texts[1].startswith(f"[talkbridge RESOLVED] Redis reachable again from {me} after ")
    finally:
        fleet.stop_all()
        server.stop()


def instance_id(daemon: Daemon) -> str:
    """The id a daemon announced in its first lines."""
    line = wait_for(lambda: next((x for x in daemon.log().splitlines() if "accounts," in x), None), what="its id")
    return line.split("talkbridge ", 2)[-1].split(":", 1)[0]
