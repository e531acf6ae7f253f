"""Poison containment (issue 6, part 7): an exception an adapter or the router
did not foresee costs one entry (retried, then dead-lettered with the
exception recorded), never the account, the other accounts or the daemon."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis as sync_redis
from redis.asyncio import Redis

import bridge.account_runner as account_runner
import bridge.daemon as daemon_mod
from bridge.bus import ROUTER_GROUP, Bus, BusSettings
from bridge.cli import protocol_specs
from bridge.config import load_config
from bridge.daemon import Daemon
from bridge.delivery import DeliveryLoop
from bridge.events import Delivery, Event, EventKind, event_to_wire
from bridge.keys import dead_letters_key
from bridge.metrics import Metrics
from bridge.relay import RouteLoop
from bridge.router import Router
from tests.helpers import ROOT, ConfigToml, RedisServer, free_port, metric, wait_for
from tests.helpers import Daemon as DaemonProcess
from tests.poison_daemon import PoisonAdapter
from tests.talkbot_rig import until
from tests.test_bus import BatchingAdapter, RecordingAdapter, enqueue, loop_for, make_delivery
from tests.test_lanes import backlog, settled

LOG = logging.getLogger("test.poison")


async def drain(loop: DeliveryLoop) -> None:
    task = asyncio.create_task(loop.run())
    try:
        await until(lambda: settled(loop), what="the stream delivered")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def poisoned(n: int, d: Delivery) -> Exception | None:
    return KeyError("user_id") if d.text == "poison" else None


async def test_an_unforeseen_exception_is_retried_then_dead_lettered(redis: Redis) -> None:
    metrics = Metrics()
    adapter = RecordingAdapter(poisoned)
    await enqueue(redis, make_delivery("before"), make_delivery("poison"), make_delivery("after"))
    await drain(loop_for(redis, adapter, metrics, attempts=3))
    assert [d.text for d in adapter.sent] == ["before", "after"]
    assert adapter.calls == 5  # the poison was tried three times
    [letter] = await Bus(redis, BusSettings()).dead_letters()
    assert letter.attempts == 3
    first, *frames = letter.error.splitlines()
    assert first == "KeyError: 'user_id'"
    assert any("in send" in line for line in frames)  # where it was raised
    assert metric(metrics, "talkbridge_delivery_errors_total", account="api.b", kind="unexpected") == 3


async def test_a_poison_message_in_a_batch_costs_only_itself(redis: Redis) -> None:
    class PoisonBatches(BatchingAdapter):
        async def send_batch(self, deliveries):
            if any(d.text == "poison" for d in deliveries):
                raise KeyError("user_id")
            return await super().send_batch(deliveries)

    adapter = PoisonBatches()
    adapter.fail = poisoned
    await enqueue(redis, *[make_delivery(t) for t in ("a", "b", "poison", "c", "d")])
    await drain(loop_for(redis, adapter, attempts=2))
    assert [d.text for d in adapter.sent] == ["a", "b", "c", "d"]
    [letter] = await Bus(redis, BusSettings()).dead_letters()
    assert letter.error.startswith("KeyError: 'user_id'") and letter.attempts == 2


async def test_an_event_the_router_cannot_route_is_dead_lettered(redis: Redis, tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text("""
[poison.a]
[poison.b]
[[gateway]]
name = "g"
enable = true
[[gateway.inout]]
account = "poison.a"
channel = "room"
[[gateway.inout]]
account = "poison.b"
channel = "room"
""")
    router = Router(load_config(path, protocol_specs({"poison": PoisonAdapter})))
    real = router.route

    def route(event, rooms=None):
        if event.text == "poison":
            raise ValueError("a router bug")
        return real(event, rooms)

    router.route = route  # type: ignore[method-assign]
    bus = Bus(redis, BusSettings())
    for text in ("one", "poison", "two"):
        event = Event(kind=EventKind.MESSAGE, account="poison.a", channel="room", text=text, origin=["poison.a/room"])
        await redis.xadd(bus.inbound("poison.a"), {b"d": event_to_wire(event)})
    loop = RouteLoop(bus, router, "poison.a", "c1", Metrics(), LOG)
    task = asyncio.create_task(loop.run())
    try:
        await until(lambda: redis.xlen(bus.outbound("poison.b")), what="deliveries routed")

        async def routed() -> list[str]:
            rows = await redis.xrange(bus.outbound("poison.b"))
            return [Delivery.from_wire(f[b"d"]).text for _, f in rows]

        await until(lambda: _eq(routed(), ["one", "two"]), what="both good events routed")
        [letter] = await bus.dead_letters()
        assert letter.stream == bus.inbound("poison.a")
        assert letter.error.startswith("routing failed: ValueError: a router bug")
        assert await backlog(redis, bus.inbound("poison.a"), ROUTER_GROUP) == (0, 0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _eq(value, expected) -> bool:
    return await value == expected


# the daemon, in-process --------------------------------------------------------------
CONFIG = """
[poison.src]
[poison.one]
Poison = "poison"
[poison.two]

[[gateway]]
name = "g"
enable = true
[[gateway.inout]]
account = "poison.src"
channel = "room"
[[gateway.inout]]
account = "poison.one"
channel = "room"
[[gateway.inout]]
account = "poison.two"
channel = "room"

[http]
BindAddress = ""

[bus]
LeaseSeconds = 2
MaxDeliveries = 3
RetryBaseSeconds = 0.01
"""


@pytest.fixture
async def daemon(tmp_path: Path, redis: Redis) -> AsyncIterator[Daemon]:
    path = tmp_path / "talkbridge.toml"
    path.write_text(CONFIG)
    adapters = {"poison": PoisonAdapter}
    d = Daemon(load_config(path, protocol_specs(adapters)), redis, adapters)
    d.stop = asyncio.Event()  # type: ignore[attr-defined]
    d.task = asyncio.create_task(d.run(d.stop))  # type: ignore[attr-defined]
    try:
        yield d
    finally:
        d.stop.set()  # type: ignore[attr-defined]
        await asyncio.wait_for(d.task, 20)  # type: ignore[attr-defined]


async def publish(d: Daemon, *texts: str) -> None:
    for text in texts:
        event = Event(
            kind=EventKind.MESSAGE, account="poison.src", channel="room", text=text,
            native_id=text, origin=["poison.src/room"],
        )  # fmt: skip
        await d.publish(event)


def sent(redis: Redis, account: str):
    async def read() -> list[str]:
        return [t.decode() for t in await redis.lrange(f"poison:sent:{account}", 0, -1)]

    return read


async def test_a_poison_message_stops_neither_the_account_nor_the_daemon(daemon: Daemon, redis: Redis) -> None:
    await publish(daemon, "m1", "poison", "m2", "m3")
    await until(lambda: _eq(sent(redis, "poison.two")(), ["m1", "poison", "m2", "m3"]), what="the other account")
    await until(lambda: _eq(sent(redis, "poison.one")(), ["m1", "m2", "m3"]), what="the poisoned account goes on")
    [letter] = await daemon.bus.dead_letters()
    assert letter.stream == daemon.bus.outbound("poison.one") and letter.attempts == 3
    assert letter.error.startswith('KeyError: "the field this adapter\'s author was sure every message has"')
    assert not daemon.task.done()  # type: ignore[attr-defined]
    await publish(daemon, "m4")
    await until(lambda: _eq(sent(redis, "poison.one")(), ["m1", "m2", "m3", "m4"]), what="still delivering")


async def test_an_account_that_crashes_starts_over_and_the_daemon_goes_on(
    tmp_path: Path, redis: Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug that escapes every containment (here: the route loop's batch
    handling raises once) restarts that account after a pause; nothing is
    lost (the batch was not acknowledged) and the daemon keeps running."""
    monkeypatch.setattr(account_runner, "CRASH_BACKOFF_MIN", 0.05)
    real = RouteLoop.handle
    crashed: list[str] = []

    async def handle(self: RouteLoop, batch) -> None:
        if not crashed:
            crashed.append(self.account)
            raise RuntimeError("a bug in the route loop")
        await real(self, batch)

    monkeypatch.setattr(RouteLoop, "handle", handle)
    path = tmp_path / "talkbridge.toml"
    path.write_text(CONFIG)
    adapters = {"poison": PoisonAdapter}
    d = Daemon(load_config(path, protocol_specs(adapters)), redis, adapters)
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    try:
        await publish(d, "m1", "m2")
        await until(lambda: _eq(sent(redis, "poison.two")(), ["m1", "m2"]), what="delivered after the restart")
        assert crashed == ["poison.src"]
        assert not task.done()
        assert metric(d.metrics, "talkbridge_account_restarts_total", account="poison.src") == 1
        assert "poison.src: unexpected error, restarting the account" in caplog.text
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def test_the_daemon_starts_an_account_task_that_died_again(
    tmp_path: Path, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon_mod, "TASK_RESTART_DELAY", 0.01)
    path = tmp_path / "talkbridge.toml"
    path.write_text(CONFIG)
    adapters = {"poison": PoisonAdapter}
    d = Daemon(load_config(path, protocol_specs(adapters)), redis, adapters)
    runner = d.runners["poison.two"]
    real = runner.run
    starts: list[int] = []

    async def run() -> None:
        starts.append(1)
        if len(starts) == 1:
            raise RuntimeError("the runner itself died")
        await real()

    runner.run = run  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    try:
        await publish(d, "m1")
        await until(lambda: _eq(sent(redis, "poison.two")(), ["m1"]), what="the account served again")
        assert len(starts) == 2 and not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


# the daemon as a process ------------------------------------------------------------------
class PoisonDaemonProcess(DaemonProcess):
    def start(self, ready: bool = True) -> PoisonDaemonProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.poison_daemon", "run", "--config", str(self.config)],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if ready:
            self.wait_ready()
        return self


def test_a_poison_message_does_not_stop_the_daemon_process(tmp_path: Path, redis_server: RedisServer) -> None:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    a, b, http = free_port(), free_port(), free_port()
    config = ConfigToml().api("a", a, "token-a").api("b", b, "token-b").section("poison.one", Poison="poison")
    config.gateway("g", ("api.a", "api"), ("api.b", "api"), ("poison.one", "room"))
    config.daemon(redis_server.url, http, LeaseSeconds=2, MaxDeliveries=3, RetryBaseSeconds=0.05)
    path = config.write(tmp_path / "talkbridge.toml")
    daemon = PoisonDaemonProcess(path, http, tmp_path / "daemon.log").start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{a}", headers={"Authorization": "Bearer token-a"}) as api:
            for text in ("m1", "poison", "m2", "m3"):
                assert api.post("/api/message", json={"text": text, "username": "bob"}).status_code == 200

        def delivered() -> list[str]:
            return [t.decode() for t in client.lrange("poison:sent:poison.one", 0, -1)]

        wait_for(lambda: delivered() == ["m1", "m2", "m3"], what="the poisoned account's later messages")
        received: list[str] = []

        def at_b() -> bool:
            resp = httpx.get(f"http://127.0.0.1:{b}/api/messages", headers={"Authorization": "Bearer token-b"})
            received.extend(m["text"] for m in resp.json())
            return len(received) >= 4

        wait_for(at_b, what="the other account's messages")
        assert received == ["m1", "poison", "m2", "m3"]
        [(_id, letter)] = client.xrange(dead_letters_key("tb"))
        assert letter[b"error"].startswith(b"KeyError: ") and letter[b"attempts"] == b"3"
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert httpx.get(f"http://127.0.0.1:{http}/healthz", timeout=5).status_code == 200
    finally:
        assert daemon.stop() == 0
        client.close()
