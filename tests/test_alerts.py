"""``bridge.alerts.Alerts`` against a real Redis: one message when a condition
starts and one when it clears, however many instances see it; a budget and a
repeat window so that nothing storms; what is held is posted later; alerts
about the admin room's own account stay out of it. Also ``[general]
AdminRoom`` and ``[alerts]`` in the config."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from adapters import AdapterRegistry
from bridge.alerts import ALERT_SOURCE, Alerts, outbound_publisher, subject_of
from bridge.bus import Bus, BusSettings
from bridge.config import Config, ConfigError, load_config
from bridge.events import Delivery
from bridge.keys import alerts_key
from bridge.options import protocol_specs
from tests.helpers import RedisServer, free_port
from tests.talkbot_rig import SECRET

ADMIN = "api.admin"


def config_text(admin_room: str | None = f"{ADMIN}:api", alerts: str = "", general: str = "") -> str:
    room = f'AdminRoom = "{admin_room}"' if admin_room is not None else ""
    return f"""
[general]
{room}
{general}

[api.admin]
BindAddress = "127.0.0.1:{free_port()}"

[api.a]
BindAddress = "127.0.0.1:{free_port()}"

[nctalkbot.ops]
Server = "https://cloud.example"
BotSecret = "{SECRET}"

[[gateway]]
name = "g"
enable = true
[[gateway.inout]]
account = "api.a"
channel = "api"
[[gateway.inout]]
account = "nctalkbot.ops"
channel = "room1"

[alerts]
{alerts}
"""


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    path = tmp_path / "talkbridge.toml"
    path.write_text(text)
    return load_config(path, protocol_specs(AdapterRegistry()), environ=environ or {})


class Clock:
    """Wall time the test moves (the budget and the repeat window are in it)."""

    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def room(redis: Redis, account: str = ADMIN, prefix: str = "tb") -> list[str]:
    """Texts queued for the admin room (its outbound stream), in order."""
    rows = await redis.xrange(f"{prefix}:out:{{{account}}}")
    deliveries = [Delivery.from_wire(fields[b"d"]) for _id, fields in rows]
    assert all(d.event.account == ALERT_SOURCE and d.account == account for d in deliveries)
    return [d.text for d in deliveries]


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load(tmp_path, config_text(alerts="MaxPerMinute = 3\nRepeatMinutes = 10"))


@pytest.fixture
async def second(redis_server: RedisServer, redis: Redis) -> AsyncIterator[Redis]:
    """Another instance's connection to the same Redis."""
    client = Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


def alerts_for(redis: Redis, config: Config, instance: str, clock: Clock, prefix: str = "tb") -> Alerts:
    publish = outbound_publisher(Bus(redis, BusSettings(prefix=prefix)))
    return Alerts(redis, prefix, config, instance, publish, clock=clock)


# once across instances -------------------------------------------------------------
async def test_many_instances_firing_at_once_post_one_message_and_one_resolved(
    redis: Redis, second: Redis, config: Config
) -> None:
    clock = Clock()
    one, two = alerts_for(redis, config, "one", clock), alerts_for(second, config, "two", clock)
    key = "account:nctalkbot.ops:credentials"
    fired = await asyncio.gather(
        *[a.fire(key, "nctalkbot.ops: credentials refused", "critical") for a in [one, two] * 20]
    )
    assert fired.count(True) == 1
    texts = await room(redis)
    assert len(texts) == 1
    assert texts[0].startswith("[talkbridge CRITICAL] nctalkbot.ops: credentials refused (since 2025-06-15 ")
    record = orjson.loads(await redis.hget(alerts_key("tb"), key))
    assert record["key"] == key and record["severity"] == "critical" and record["account"] == "nctalkbot.ops"
    assert record["notified"] == "posted" and record["since"] == clock.now and record["instance"] in ("one", "two")
    clock.now += 95
    cleared = await asyncio.gather(
        *[a.clear(key, "nctalkbot.ops: credentials accepted again") for a in [two, one] * 20]
    )
    assert cleared.count(True) == 1
    texts = await room(redis)
    assert len(texts) == 2
    assert texts[1] == f"[talkbridge RESOLVED] nctalkbot.ops: credentials accepted again (after 1m 35s; {key})"
    assert await redis.hlen(alerts_key("tb")) == 0
    # fired again later (past the repeat window): a new episode, posted again
    clock.now += 601
    assert await two.fire(key, "refused again", "critical")
    assert len(await room(redis)) == 3


async def test_how_long_it_lasted_is_to_the_nearest_second_from_any_start(redis: Redis, config: Config) -> None:
    """The start ("since") is kept to the millisecond: one at x.0006 s is recorded as
    x.001, and a clear 301 s later is 300.9996 s after that: "5m 01s", not
    "5m 00s" (seen in CI: truncating made the test of the watch flaky)."""
    clock = Clock(1_750_000_000.0006)
    alerts = alerts_for(redis, config, "one", clock)
    await alerts.fire("worker:x", "x broke")
    clock.now += 301
    await alerts.clear("worker:x", "x fixed")
    assert (await room(redis))[1] == "[talkbridge RESOLVED] x fixed (after 5m 01s; worker:x)"


async def test_an_alert_about_the_admin_rooms_own_account_goes_to_log_and_dashboard_only(
    redis: Redis, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    alerts = alerts_for(redis, config, "one", Clock())
    with caplog.at_level(logging.WARNING, logger="talkbridge.alerts"):
        assert await alerts.fire(f"account:{ADMIN}:credentials", "api.admin: refused", "critical")
        assert await alerts.fire("worker:breaker", "the admin account's own worker", account=ADMIN)
        assert await alerts.clear(f"account:{ADMIN}:credentials", "fine again")
    assert await room(redis) == []
    record = orjson.loads(await redis.hget(alerts_key("tb"), "worker:breaker"))
    assert record["notified"] == "silent" and record["account"] == ADMIN
    logged = [(r.levelname, r.getMessage(), r.account) for r in caplog.records]  # type: ignore[attr-defined]
    assert logged[0] == ("CRITICAL", f"ALERT account:{ADMIN}:credentials: api.admin: refused (not posted)", ADMIN)
    assert logged[2] == ("WARNING", f"RESOLVED account:{ADMIN}:credentials: fine again", ADMIN)


async def test_warnings_and_a_config_without_admin_room_stay_on_the_dashboard(redis: Redis, tmp_path: Path) -> None:
    with_room = load(tmp_path, config_text())
    alerts = alerts_for(redis, with_room, "one", Clock())
    assert await alerts.fire("worker:queue", "queue long", "warning")
    no_room = alerts_for(redis, load(tmp_path, config_text(admin_room=None)), "one", Clock())
    assert await no_room.fire("dead-letters", "growing", "error")
    assert await room(redis) == []
    assert set(await alerts.active()) == {"worker:queue", "dead-letters"}
    with pytest.raises(ValueError, match="severity must be one of"):
        await alerts.fire("x", "y", "info")


# never a storm -------------------------------------------------------------------------
async def test_over_the_budget_starts_are_held_and_posted_later_oldest_first(redis: Redis, config: Config) -> None:
    clock = Clock()
    alerts = alerts_for(redis, config, "one", clock)
    for i in range(6):  # MaxPerMinute = 3
        clock.now += 1
        assert await alerts.fire(f"room:api.a:r{i}", f"room r{i} failing")
    assert [t.split("]")[1].split("(")[0].strip() for t in await room(redis)] == [
        f"room r{i} failing" for i in range(3)
    ]
    assert await alerts.flush() == 0  # the same minute: still over
    # r4 clears while held: the room never hears of it, neither start nor end
    assert await alerts.clear("room:api.a:r4", "recovered")
    clock.now += 60
    assert await alerts.flush() == 2
    texts = await room(redis)
    assert len(texts) == 5
    assert "room r3 failing" in texts[3] and "room r5 failing" in texts[4]
    records = await alerts.active()
    assert sorted(records) == ["room:api.a:r0", "room:api.a:r1", "room:api.a:r2", "room:api.a:r3", "room:api.a:r5"]
    assert {r["notified"] for r in records.values()} == {"posted"}


async def test_a_resolved_over_the_budget_waits_and_a_restart_meanwhile_posts_nothing(
    redis: Redis, config: Config
) -> None:
    clock = Clock()
    alerts = alerts_for(redis, config, "one", clock)
    for key in ("a", "b", "c"):
        await alerts.fire(f"worker:{key}", f"{key} broken")
    assert await alerts.clear("worker:a", "a fixed")  # budget spent: held
    assert await alerts.clear("worker:b", "b fixed")
    assert len(await room(redis)) == 3
    assert await alerts.fire("worker:b", "b broken again")  # the room still thinks b is broken: nothing to say
    assert orjson.loads(await redis.hget(alerts_key("tb"), "worker:b"))["notified"] == "posted"
    clock.now += 61
    assert await alerts.flush() == 1
    texts = await room(redis)
    assert texts[3] == "[talkbridge RESOLVED] a fixed (after 0s; worker:a)"
    assert await alerts.clear("worker:b", "b fixed for good")
    assert (await room(redis))[4].startswith("[talkbridge RESOLVED] b fixed for good")


async def test_a_flapping_condition_costs_two_messages_per_repeat_window(redis: Redis, config: Config) -> None:
    clock = Clock()
    alerts = alerts_for(redis, config, "one", clock)
    key = "room:nctalkbot.ops:room1"
    for _ in range(20):
        clock.now += 5
        await alerts.fire(key, "room1 failing")
        clock.now += 5
        await alerts.clear(key, "room1 recovered")
        await alerts.flush()
    texts = await room(redis)
    assert [t.split(" ", 2)[1] for t in texts] == ["ERROR]", "RESOLVED]"]
    # it comes back and stays: once the repeat window has passed, the start is posted
    await alerts.fire(key, "room1 failing")
    assert await alerts.flush() == 0
    clock.now += 600
    assert await alerts.flush() == 1
    assert len(await room(redis)) == 3


# Redis away -------------------------------------------------------------------------------
async def test_without_redis_fire_and_clear_return_false_and_do_not_raise(config: Config) -> None:
    gone = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    try:
        alerts = alerts_for(gone, config, "one", Clock())
        assert await alerts.fire("redis", "x") is False
        assert await alerts.clear("redis", "y") is False
        assert await alerts.flush() == 0
    finally:
        await gone.aclose()


# the model: any interleaving, any instances ----------------------------------------------
OPS = st.lists(
    st.tuples(
        st.sampled_from(["fire", "clear", "flush"]),
        st.integers(0, 2),  # which instance
        st.sampled_from(["room:api.a:x", "room:api.a:y", "dead-letters", "instance:z", f"account:{ADMIN}:down"]),
        st.sampled_from([0, 1, 7, 30, 61, 400, 700]),  # seconds before it
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_any_sequence_posts_balanced_messages_within_the_budget(
    redis_server: RedisServer, tmp_path: Path, ops: list[tuple[str, int, str, int]]
) -> None:
    """Whatever instances fire and clear, in any order and timing: per key,
    the room sees started and resolved alternating (never two starts in a
    row), nothing about the admin account, at most MaxPerMinute messages in
    any minute; once everything cleared and time passed, every start it saw
    was resolved."""
    config = load(tmp_path, config_text(alerts="MaxPerMinute = 2\nRepeatMinutes = 5"))

    async def run() -> None:
        clients = [Redis.from_url(redis_server.url) for _ in range(3)]
        prefix = f"model{id(ops)}"
        clock = Clock()
        instances = [alerts_for(c, config, f"i{n}", clock, prefix) for n, c in enumerate(clients)]
        posted_at: list[float] = []
        seen: list[str] = []

        async def observe() -> None:
            texts = await room(clients[0], prefix=prefix)
            posted_at.extend([clock.now] * (len(texts) - len(seen)))
            seen[:] = texts

        try:
            await clients[0].delete(*[k async for k in clients[0].scan_iter(f"*{prefix}*")] or ["-"])
            for op, who, key, gap in ops:
                clock.now += gap
                alerts = instances[who]
                if op == "fire":
                    await alerts.fire(key, f"{key} bad")
                elif op == "clear":
                    await alerts.clear(key, f"{key} good")
                else:
                    await alerts.flush()
                await observe()
            for key in {k for _, _, k, _ in ops}:
                await instances[0].clear(key, f"{key} good")
                await observe()
            for _ in range(20):  # drain whatever the budget held
                clock.now += 61
                await instances[1].flush()
                await observe()
            leftovers = [await clients[0].hlen(f"{prefix}:alerts"), await clients[0].hlen(f"{{{prefix}:alerts}}:held")]
        finally:
            await clients[0].delete(*[k async for k in clients[0].scan_iter(f"*{prefix}*")] or ["-"])
            for c in clients:
                await c.aclose()
        by_key: dict[str, list[str]] = {}
        for text in seen:
            kind = "resolved" if text.startswith("[talkbridge RESOLVED]") else "started"
            by_key.setdefault(text.rsplit("; ", 1)[-1].rstrip(")"), []).append(kind)  # the key ends either
        assert f"account:{ADMIN}:down" not in by_key
        for key, kinds in by_key.items():  # alternating, and all resolved in the end
            assert kinds == ["started", "resolved"] * (len(kinds) // 2) and len(kinds) % 2 == 0, (key, kinds)
        assert leftovers == [0, 0]  # nothing active, nothing held back
        for i, at in enumerate(posted_at):
            assert sum(1 for other in posted_at[i:] if other // 60 == at // 60) <= 2

    asyncio.run(run())


# config -----------------------------------------------------------------------------------
def test_admin_room_forms(tmp_path: Path) -> None:
    assert load(tmp_path, config_text(admin_room="api.admin")).admin_room == (ADMIN, "api")
    assert load(tmp_path, config_text(admin_room="api.admin:whatever")).admin_room == (ADMIN, "api")
    talk = load(tmp_path, config_text(admin_room="nctalkbot.ops:adminroom"))
    assert talk.admin_room == ("nctalkbot.ops", "adminroom")
    assert talk.channels_of("nctalkbot.ops") == ["room1", "adminroom"]  # joined like a gateway's room
    assert load(tmp_path, config_text(admin_room=None)).admin_room is None
    defaults = load(tmp_path, config_text()).section("alerts")
    assert defaults == {
        "FailedMinutes": 5,
        "DeadLetterThreshold": 1,
        "DeadLetterWindowMinutes": 10,
        "MaxPerMinute": 10,
        "RepeatMinutes": 10,
        "CheckSeconds": 10,
    }
    env = load(
        tmp_path, config_text(admin_room="env:ROOM"), environ={"ROOM": "nctalkbot.ops:!id:matrix.example"}
    ).admin_room
    assert env == ("nctalkbot.ops", "!id:matrix.example")  # split at the first colon only


@pytest.mark.parametrize(
    "value, problem",
    [
        ("nope.none:room", 'general.AdminRoom: no account "nope.none" (accounts: api.a, api.admin, nctalkbot.ops)'),
        ("nctalkbot.ops", 'general.AdminRoom: must name one room of nctalkbot.ops: "nctalkbot.ops:CHANNEL"'),
        ("nctalkbot.ops:*", 'general.AdminRoom: must name one room of nctalkbot.ops: "nctalkbot.ops:CHANNEL"'),
        (":room", 'general.AdminRoom: must be "ACCOUNT:CHANNEL"'),
    ],
)
def test_a_bad_admin_room_is_one_line_naming_the_key(tmp_path: Path, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, config_text(admin_room=value))
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(problem)


def test_a_bad_alerts_section_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, config_text(general="", alerts='MaxPerMinute = 0\nFailedMinutes = "soon"\nAdminRoom = "x"'))
    assert err.value.problems[0] == "alerts.MaxPerMinute: must be at least 1"
    assert err.value.problems[1].startswith("alerts.FailedMinutes: must be an integer or a number")
    assert err.value.problems[2].startswith("alerts.AdminRoom: unknown key (known: FailedMinutes,")
    with pytest.raises(ConfigError) as err:
        load(tmp_path, config_text(admin_room=None, general="AdminRoom = 5"))
    assert err.value.problems == ['general.AdminRoom: must be a string "ACCOUNT:CHANNEL", not the integer 5']


def toml_string(value: str) -> str:
    """A TOML basic string: every control character, quote and backslash escaped."""
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08X}" for c in value) + '"'


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.text(max_size=40))
def test_any_admin_room_value_loads_or_is_one_clear_problem(tmp_path: Path, value: str) -> None:
    path = tmp_path / "talkbridge.toml"
    path.write_text(config_text(admin_room=None, general=f"AdminRoom = {toml_string(value)}"))
    try:
        config = load_config(path, protocol_specs(AdapterRegistry()), environ={})
    except ConfigError as exc:
        assert len(exc.problems) == 1 and exc.problems[0].startswith("general.AdminRoom: "), exc.problems
        return
    assert config.admin_room is not None
    account, channel = config.admin_room
    assert account in config.accounts and channel and channel != "*"
    assert channel in config.channels_of(account)


def test_file_paths_take_environment_variables(tmp_path: Path) -> None:
    """systemd's LoadCredential: ``file:${CREDENTIALS_DIRECTORY}/NAME`` (contrib/talkbridge.service)."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "bot-secret").write_text(SECRET + "\n")
    text = config_text().replace(f'BotSecret = "{SECRET}"', 'BotSecret = "file:${CREDENTIALS_DIRECTORY}/bot-secret"')
    config = load(tmp_path, text, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert config.accounts["nctalkbot.ops"].get("BotSecret") == SECRET
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text, environ={})
    assert err.value.problems == [
        "nctalkbot.ops.BotSecret: environment variable CREDENTIALS_DIRECTORY is not set "
        "(named in ${CREDENTIALS_DIRECTORY}/bot-secret)"
    ]


def test_alert_keys_name_their_account() -> None:
    assert subject_of("account:api.a:credentials") == "api.a"
    assert subject_of("room:matrix.m:!abc:example.org") == "matrix.m"
    assert subject_of("dead-letters") is None and subject_of("instance:h-1-a") is None
