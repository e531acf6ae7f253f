"""Fleet-wide control through Redis against real daemon processes: whichever
instance owns an account obeys a pause, keeps obeying it across a takeover,
releases everything in order on resume, and reconnects on a restart; what
instances announce (info, rates, an account's failure) reaches the fleet view."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import redis as sync_redis
from redis.asyncio import Redis

from bridge import control
from bridge.admin import fleet
from bridge.bus import Bus, BusSettings
from bridge.keys import fence_key
from tests.helpers import (
    SENTINEL,
    ConfigToml,
    Daemon,
    RedisServer,
    api_pair_config,
    free_port,
    has_sentinel,
    through_sentinel,
    wait_for,
    wait_quiet,
)
from tests.talkbot_rig import SECRET, bot_section
from tests.talkserver import ThreadedTalkServer

T = TypeVar("T")
PROTOCOLS = {"api.a": "api", "api.b": "api"}


def run(redis_url: str, action: Callable[[Redis, Bus], Awaitable[T]]) -> T:
    """One operator action or look, as the page does it, on a client of its own."""

    async def go() -> T:
        redis = Redis.from_url(redis_url)
        try:
            return await action(redis, Bus(redis, BusSettings()))
        finally:
            await redis.aclose()

    return asyncio.run(go())


class Api:
    def __init__(self, port: int, token: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.got: list[str] = []

    def post(self, text: str) -> bool:
        try:
            resp = httpx.post(f"{self.base}/api/message", json={"text": text, "username": "u", "gateway": "g"},
                              headers=self.headers, timeout=5)  # fmt: skip
        except httpx.HTTPError:
            return False  # the account between two owners: its port reopens
        return resp.status_code == 200

    def texts(self) -> list[str]:
        try:
            resp = httpx.get(f"{self.base}/api/messages", headers=self.headers, timeout=5)
        except httpx.HTTPError:
            return self.got
        if resp.status_code == 200:
            self.got.extend(m["text"] for m in resp.json())
        return self.got


def ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def status(url: str, account: str) -> fleet.AccountStatus:
    rows = run(url, lambda redis, bus: fleet.account_status(redis, bus, PROTOCOLS))
    return next(row for row in rows if row.name == account)


@pytest.fixture
def two_instances(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[list[Daemon], Api, Api]]:
    store = sync_redis.Redis.from_url(redis_server.url)
    store.flushall()
    store.close()
    pa, pb = free_port(), free_port()
    daemons = []
    for i in range(2):  # one bridge, two instances: each its own /readyz port
        (tmp_path / f"i{i}").mkdir()
        path, (_, _, http) = api_pair_config(tmp_path / f"i{i}", redis_server.url, ports=(pa, pb, free_port()))
        daemons.append(Daemon(path, http, tmp_path / f"daemon{i}.log").start(ready=False))
    try:
        for d in daemons:
            wait_for(lambda d=d: ready(d.http_port), timeout=30, what="both instances ready")
        yield daemons, Api(pa, "token-a"), Api(pb, "token-b")
    finally:
        for d in daemons:
            d.stop()


def test_the_owner_obeys_a_pause_across_a_takeover_and_resume_releases_in_order(
    two_instances: tuple[list[Daemon], Api, Api], redis_server: RedisServer
) -> None:
    daemons, a, b = two_instances
    url = redis_server.url
    wait_for(lambda: status(url, "api.a").state == "connected" and status(url, "api.b").state == "connected",
             timeout=30, what="both accounts connected")  # fmt: skip
    assert run(url, lambda redis, bus: control.pause(redis, bus.prefix, "api.b", "tester"))
    wait_for(lambda: status(url, "api.b").pause_applied, what="the owner holding api.b")
    first_owner = status(url, "api.b").owner
    sent = [f"m{i}" for i in range(3)]
    for text in sent:
        wait_for(lambda text=text: a.post(text), what=f"posting {text}")
    wait_for(lambda: status(url, "api.b").backlog == 3, what="three deliveries waiting for api.b")
    assert wait_quiet(b.texts) == []  # a held account delivers nothing, a sentinel neither: a window it is

    # the owner dies; the survivor takes api.b over and holds it too
    victim = next(d for d in daemons if first_owner and f"-{d.proc.pid}-" in first_owner)
    victim.kill()
    wait_for(lambda: (s := status(url, "api.b")).owner not in (None, first_owner) and s.pause_applied, timeout=30,
             what="the new owner holding api.b")  # fmt: skip
    more = ["m3", "m4"]
    for text in more:
        wait_for(lambda text=text: a.post(text), timeout=30, what=f"posting {text}")
    wait_for(lambda: status(url, "api.b").backlog == 5, what="five deliveries waiting for api.b")
    assert wait_quiet(b.texts) == []  # held: no sentinel could pass either

    assert run(url, lambda redis, bus: control.resume(redis, bus.prefix, "api.b"))
    wait_for(lambda: len(b.texts()) >= 5, timeout=30, what="every held message at api.b")
    # all of them, once, in order: a second copy would arrive before a sentinel posted last
    assert through_sentinel(lambda: wait_for(lambda: a.post(SENTINEL), what="posting the sentinel"), b.texts,
                            has_sentinel) == sent + more  # fmt: skip
    assert not status(url, "api.b").pause_applied


def test_a_restart_reconnects_the_account_under_a_new_tenure(
    two_instances: tuple[list[Daemon], Api, Api], redis_server: RedisServer
) -> None:
    _, a, b = two_instances
    url = redis_server.url
    store = sync_redis.Redis.from_url(url)
    try:
        wait_for(lambda: status(url, "api.a").state == "connected", timeout=30, what="api.a connected")
        tenure = int(store.get(fence_key("tb", "api.a")))
        run(url, lambda redis, bus: control.restart(redis, bus.prefix, "api.a"))
        wait_for(lambda: int(store.get(fence_key("tb", "api.a"))) > tenure, what="api.a under a new lease tenure")
        wait_for(lambda: status(url, "api.a").state == "connected", timeout=30, what="api.a connected again")
        wait_for(lambda: a.post("after the restart"), timeout=30, what="posting after the restart")
        wait_for(lambda: "after the restart" in b.texts(), what="the message crossing after the restart")
        # what the instances announce: both alive, with version and uptime; the rates count the traffic
        instances = run(url, lambda redis, bus: fleet.instance_status(redis, bus.prefix, {}))
        assert len(instances) == 2 and all(i.info["version"] and i.uptime is not None for i in instances)
        wait_for(lambda: run(url, lambda redis, bus: fleet.rates(redis, bus.prefix)).get("api.a", (0, 0))[0] >= 1,
                 timeout=30, what="api.a's events in the per-minute rate")  # fmt: skip
    finally:
        store.close()


def test_refused_credentials_show_as_failed_with_the_error(tmp_path: Path, redis_server: RedisServer) -> None:
    store = sync_redis.Redis.from_url(redis_server.url)
    store.flushall()
    talk = ThreadedTalkServer().start()
    http, api = free_port(), free_port()
    config = ConfigToml().api("a", api, "token-a").raw(bot_section("talk", talk.url, "w" * 40))
    config.gateway("g", ("api.a", "api"), ("nctalkbot.talk", "room1234"))
    path = config.daemon(redis_server.url, http, LeaseSeconds=3).write(tmp_path / "talkbridge.toml")
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    try:
        alice = talk.call("add_user", "alice", "Alice")
        talk.call("create_room", "Bridged", "room1234", (alice,))
        bot = talk.call("install_bot", "Bridge", SECRET, f"http://127.0.0.1:{http}/webhook/nextcloud/talk")
        talk.call("enable_bot", bot, "room1234")
        assert Api(api, "token-a").post("hello Talk")
        protocols = {"api.a": "api", "nctalkbot.talk": "nctalkbot"}

        def talk_status() -> fleet.AccountStatus:
            rows = run(redis_server.url, lambda redis, bus: fleet.account_status(redis, bus, protocols))
            return rows[1]

        row = wait_for(lambda: (s := talk_status()).state == "failed" and s, what="the Talk bot failed")
        assert row.error.startswith("credentials refused") and "401" in row.error
    finally:
        daemon.stop()
        talk.stop()
        store.close()
