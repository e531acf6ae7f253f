"""The workers' core (issue 11): config, triggers in the route loop, arq jobs,
answers posted once into their room.

Feature-specific behaviour (Instagram, personas) is tested in their own files;
here a small test feature stands in for them, so these tests show what every
feature inherits: a job enqueued once per event even when the route loop
handles the event again after a crash, run by a real arq worker on a real
Redis, and its answer delivered once by a real daemon even when posted twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis as sync_redis
from arq.worker import func
from redis.asyncio import Redis

from adapters import AdapterRegistry
from bridge.bus import ROUTER_GROUP, bus_for
from bridge.config import ConfigError, load_config
from bridge.control import live_workers
from bridge.events import Event, EventKind
from bridge.keys import alerts_key, log_key
from bridge.logstream import install as install_log_stream
from bridge.metrics import Metrics
from bridge.options import protocol_specs
from bridge.relay import RouteLoop
from bridge.router import Router
from tests.helpers import Daemon, RedisServer, api_pair_config, wait_for, wait_quiet
from workers import instagram
from workers.deps import DEPS
from workers.feature_settings import FEATURE_SPECS, personas
from workers.llm_trigger import room_persona
from workers.results import answer, is_worker_result, post_reply, result_id
from workers.settings import run_worker
from workers.triggers import build_triggers, queue_name

SPECS = protocol_specs(AdapterRegistry())

BASE = """
[api.a]
BindAddress = "127.0.0.1:0"
Token = "t"
[nctalkbot.bot]
Server = "https://cloud.example"
BotSecret = "0123456789abcdef0123456789abcdef0123456789"
Persona = "ada"
[api.c]
BindAddress = "127.0.0.1:0"
Token = "t"
"""


def load(tmp_path: Path, text: str):
    path = tmp_path / "talkbridge.toml"
    path.write_text(text)
    return load_config(path, SPECS, environ={"KEY": "sk-secret"}, features=FEATURE_SPECS)


def test_personas_instagram_and_room_options_load(tmp_path: Path) -> None:
    (tmp_path / "prompt.txt").write_text("You are Ada.\n")
    config = load(
        tmp_path,
        BASE
        + """
[persona.ada]
Endpoint = "http://127.0.0.1:8080/v1"
Model = "smollm2"
APIKey = "env:KEY"
SystemPromptFile = "prompt.txt"
[persona.bob]
Name = "Bobby"
Endpoint = "https://llm.example/v1"
Model = "m"
[instagram]
RequestsPerMinute = 10
RateWindowSeconds = 30
[[gateway]]
name = "g"
enable = true
Instagram = true
Persona = "bob"
[[gateway.inout]]
account = "nctalkbot.bot"
channel = "*"
[[gateway.inout]]
account = "api.a"
channel = "api"
options = { Instagram = false }
[[gateway]]
name = "h"
enable = true
[[gateway.inout]]
account = "api.c"
channel = "api"
options = { Persona = "ada" }
[[gateway.inout]]
account = "nctalkbot.bot"
channel = "room2"
""",
    )
    ada = personas(config)["ada"]
    assert (ada["Name"], ada["APIKey"], ada["SystemPrompt"], ada["MaxTokens"]) == (
        "ada",
        "sk-secret",
        "You are Ada.\n",
        256,
    )
    assert "SystemPromptFile" not in ada
    assert personas(config)["bob"]["Name"] == "Bobby"
    assert config.section("instagram")["RequestsPerMinute"] == 10
    assert config.section("instagram")["RoomRequestsPerMinute"] == 6  # the default
    limits = instagram.Settings.from_config(config)
    assert (limits.requests_per_minute, limits.room_requests_per_minute, limits.period) == (10, 6, 30.0)
    assert config.section("workers")["PollDelay"] == 0.05
    # the gateway enables Instagram; the api channel's own option turns it off there
    assert instagram.instagram_enabled(config, "nctalkbot.bot", "anyroom")
    assert not instagram.instagram_enabled(config, "api.a", "api")
    assert not instagram.instagram_enabled(config, "api.c", "api")  # never enabled: previews need a yes somewhere
    # the bot is the persona (every message); elsewhere only @Name, by channel option first, then gateway
    assert room_persona(config, "nctalkbot.bot", "anyroom") == ("ada", True)
    assert room_persona(config, "api.c", "api") == ("ada", False)
    assert room_persona(config, "api.a", "api") == ("bob", False)
    assert room_persona(config, "api.b", "api") is None  # no such account


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("", "nctalkbot.bot.Persona: no [persona.ada] is defined"),
        ('[persona.ada]\nModel = "m"\n', "persona.ada.Endpoint: is required"),
        ('[persona.ada]\nEndpoint = "ftp://x"\nModel = "m"\n', "persona.ada.Endpoint: must be an http://"),
        ('[persona.ada]\nEndpoint = "http://x"\nModel = "m"\nTemperature = 9\n', "persona.ada.Temperature: must be"),
        ('[persona.ada]\nEndpoint = "http://x"\nModel = "m"\nColour = 1\n', "persona.ada.Colour: unknown key"),
        ('[persona.ada]\nEndpoint = "http://x"\nModel = "m"\nName = "a b"\n', "persona.ada.Name: must be 1 to 64"),
        (
            '[persona.ada]\nEndpoint = "http://x"\nModel = "m"\nSystemPromptFile = "missing.txt"\n',
            "persona.ada.SystemPromptFile: cannot read",
        ),
        ("persona = 3\n[persona2]\n", "persona: must hold personas as [persona.NAME] tables"),
        (
            '[persona.ada]\nEndpoint = "http://x"\nModel = "m"\n[instagram]\nMaxMediaBytes = 0\n',
            "instagram.MaxMediaBytes",
        ),
        (
            '[persona.ada]\nEndpoint = "http://x"\nModel = "m"\n[instagram]\nRateWindowSeconds = 0\n',
            "instagram.RateWindowSeconds",
        ),
        (
            '[persona.ada]\nEndpoint = "http://x"\nModel = "m"\n'
            '[[gateway]]\nname = "g"\nenable = true\nPersona = "zed"\n'
            '[[gateway.inout]]\naccount = "api.a"\nchannel = "api"\noptions = { Instagram = "yes" }\n',
            "options.Instagram: must be true or false",
        ),
    ],
)
def test_bad_persona_and_worker_config_is_refused_with_the_key(tmp_path: Path, extra: str, problem: str) -> None:
    text = BASE + extra
    if extra.startswith("persona = 3"):
        text = extra.split("\n", 1)[0] + "\n" + BASE
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert any(problem in p for p in err.value.problems), err.value.problems


# --- a test feature: "!echo TEXT" answers TEXT ---------------------------------------
class EchoTrigger:
    async def consider(self, event: Event, enqueue: Any) -> None:
        if event.kind is EventKind.MESSAGE and event.text.startswith("!echo "):
            await enqueue("echo", event.to_dict(), _job_id=f"echo:{event.id}")


async def echo(ctx: dict[str, Any], source: dict[str, Any]) -> None:
    event = Event.from_dict(source)
    await post_reply(ctx[DEPS], event, f"echo:{event.id}", event.text.removeprefix("!echo "), feature="echo")


ECHO = SimpleNamespace(trigger=lambda config, redis, prefix: EchoTrigger(), FUNCTIONS=[echo])


def pair_config(tmp_path: Path, redis_url: str) -> tuple[Path, tuple[int, int, int]]:
    return api_pair_config(tmp_path, redis_url)


async def test_a_routed_event_enqueues_one_job_even_when_routed_again(tmp_path: Path, redis: Redis) -> None:
    path, _ = pair_config(tmp_path, "redis://unused")
    config = load_config(path, SPECS, features=FEATURE_SPECS)
    bus = bus_for(config, redis)
    triggers = build_triggers(config, redis, "tb", logging.getLogger("test"), features=[ECHO])
    assert triggers is not None
    loop = RouteLoop(bus, Router(config), "api.a", "c1", Metrics(), logging.getLogger("test"), triggers)
    await bus.ensure_group(bus.inbound("api.a"), ROUTER_GROUP)
    event = Event(EventKind.MESSAGE, "api.a", "api", sender_name="zoe", text="!echo hi", native_id="n1")
    plain = Event(EventKind.MESSAGE, "api.a", "api", sender_name="zoe", text="hello")
    await bus.publish(event)
    await bus.publish(plain)
    batch = await bus.read_new(bus.inbound("api.a"), ROUTER_GROUP, "c1", 10, 0)
    await loop.handle(batch)
    await loop.handle(batch)  # a crash before the XACK: the same entries once more
    jobs = await redis.zrange(queue_name("tb"), 0, -1)
    assert jobs == [f"echo:{event.id}".encode()]
    # a worker's own answer never starts a job (no loops between features)
    result = answer(config, event, "k", "!echo again", feature="echo").event
    assert is_worker_result(result)
    await triggers.consider(result)
    assert await redis.zcard(queue_name("tb")) == 1


def test_a_job_answers_once_in_its_room_through_the_daemon(tmp_path: Path, redis_server: RedisServer) -> None:
    """A real daemon delivers what a real arq worker (in this process) posts:
    the answer arrives once, as a reply, even though the job posts it twice
    (as a job run again after its worker died does)."""
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    path, (port_a, _, http) = pair_config(tmp_path, redis_server.url)
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    config = load_config(path, SPECS, features=FEATURE_SPECS)

    async def twice(ctx: dict[str, Any], source: dict[str, Any]) -> None:
        await echo(ctx, source)
        await echo(ctx, source)

    feature = SimpleNamespace(trigger=ECHO.trigger, FUNCTIONS=[func(twice, name="echo")])

    async def scenario() -> None:
        redis = Redis.from_url(redis_server.url)
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(config, redis, stop, features=[feature]))
        try:
            triggers = build_triggers(config, redis, "tb", logging.getLogger("test"), features=[feature])
            assert triggers is not None
            source = Event(EventKind.MESSAGE, "api.a", "api", sender_name="zoe", text="!echo pong", native_id="m1")
            await triggers.consider(source)

            def delivered() -> list[dict[str, Any]]:
                resp = httpx.get(f"http://127.0.0.1:{port_a}/api/messages", headers={"Authorization": "Bearer token-a"})
                got.extend(resp.json())
                return got

            got: list[dict[str, Any]] = []
            await asyncio.to_thread(wait_for, lambda: delivered(), 30, 0.05, "the answer")
            await asyncio.to_thread(wait_quiet, lambda: len(delivered()))  # a job's answer: in no order, a window
            assert [m["text"] for m in got] == ["pong"]
            assert got[0]["parent_id"] == "m1"  # threaded to the message it answers
        finally:
            stop.set()
            await worker
            await redis.aclose()

    try:
        asyncio.run(scenario())
    finally:
        daemon.stop()
        client.close()


async def test_result_ids_are_stable_and_distinct() -> None:
    assert result_id("a") == result_id("a") != result_id("b")
    assert len(result_id("a")) == 32


def test_check_config_lists_personas_without_their_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from bridge.cli import main

    monkeypatch.setenv("KEY", "sk-very-secret")
    path = tmp_path / "talkbridge.toml"
    path.write_text(
        BASE + '[persona.ada]\nEndpoint = "http://127.0.0.1:8080/v1"\nModel = "smollm2"\nAPIKey = "env:KEY"\n'
    )
    out = io.StringIO()
    assert main(["check-config", str(path)], out=out) == 0
    assert "ada  (@ada, smollm2 at http://127.0.0.1:8080/v1)" in out.getvalue()
    assert "sk-very-secret" not in out.getvalue()


def test_a_jobs_alert_reaches_the_admin_room_and_its_warnings_the_log_stream(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A job's alert is the fleet's (bridge/alerts.py), not a line in the
    worker's own log: recorded once however many jobs raise it, posted to
    ``[general] AdminRoom`` through a real daemon, and "resolved" when a job
    clears it; the worker's WARN+ records land in the fleet's log stream,
    where the management page reads them."""
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    path, (_, port_b, http) = pair_config(tmp_path, redis_server.url)
    path.write_text(path.read_text().replace("[general]\n", '[general]\nAdminRoom = "api.b:api"\n', 1))
    daemon = Daemon(path, http, tmp_path / "daemon.log").start()
    config = load_config(path, SPECS, features=FEATURE_SPECS)

    async def alarm(ctx: dict[str, Any], source: dict[str, Any]) -> None:
        deps = ctx[DEPS]
        text = Event.from_dict(source).text
        if text == "!echo down":
            deps.log.warning("the test service refused us")
            await deps.alert("test:service", "the test service refuses requests", "error")
        else:
            await deps.clear_alert("test:service", "the test service answers again")

    feature = SimpleNamespace(trigger=ECHO.trigger, FUNCTIONS=[func(alarm, name="echo")])
    logstream = install_log_stream("tb", config.accounts, logging.getLogger("talkbridge.worker"))

    def admin_room() -> list[str]:
        resp = httpx.get(f"http://127.0.0.1:{port_b}/api/messages", headers={"Authorization": "Bearer token-b"})
        seen.extend(m["text"] for m in resp.json())
        return seen

    seen: list[str] = []

    async def scenario() -> None:
        redis = Redis.from_url(redis_server.url)
        logstream.start(redis, "worker-test")
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(config, redis, stop, features=[feature], instance_id="worker-test"))
        try:
            triggers = build_triggers(config, redis, "tb", logging.getLogger("test"), features=[feature])
            assert triggers is not None
            for n in range(3):  # three jobs meet the same condition: one alert
                await triggers.consider(Event(EventKind.MESSAGE, "api.a", "api", text="!echo down", native_id=f"d{n}"))
            await asyncio.to_thread(wait_for, admin_room, 30, 0.05, "the alert in the admin room")
            # the worker is on the management page's Workers table while it runs (its
            # first beat is written as it starts, before it takes a job)
            [(ident, _, info)] = await live_workers(redis, "tb")
            assert ident == "worker-test" and info["pid"] == str(os.getpid()) and info["max_jobs"] == "10"
            active = await redis.hgetall(alerts_key("tb"))
            assert list(active) == [b"test:service"]
            assert b'"instance":"worker-test"' in active[b"test:service"]
            await triggers.consider(Event(EventKind.MESSAGE, "api.a", "api", text="!echo up", native_id="u1"))
            await asyncio.to_thread(wait_for, lambda: len(admin_room()) >= 2, 30, 0.05, "the resolution")
            await asyncio.to_thread(wait_quiet, lambda: len(admin_room()))  # alerts keep no order: a window
            assert await redis.hlen(alerts_key("tb")) == 0
            records = await redis.xrange(log_key("tb"))
            messages = [fields[b"message"].decode() for _, fields in records]
            assert "the test service refused us" in messages
            assert any("ALERT test:service" in m for m in messages)
            sources = [(fields[b"instance"], fields[b"message"]) for _, fields in records]
            assert all(instance == b"worker-test" for instance, _ in sources), sources
        finally:
            stop.set()
            await worker
            await logstream.aclose()
        try:
            assert await live_workers(redis, "tb") == []  # a clean stop leaves at once
        finally:
            await redis.aclose()

    try:
        asyncio.run(scenario())
    finally:
        logging.getLogger("talkbridge.worker").removeHandler(logstream)
        daemon.stop()
        client.close()
    assert len(seen) == 2, seen
    assert seen[0].startswith("[talkbridge ERROR] the test service refuses requests")
    assert seen[1].startswith("[talkbridge RESOLVED] the test service answers again")
