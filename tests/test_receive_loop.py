"""The receive loop the account runner supervises (issue 7, item 1): an
adapter's ``receive`` that raises or returns is started again after a
jittered backoff, counted, and the account shows as degraded until then; one
that hangs is cancelled when the lease is lost and at shutdown. The real
``Daemon`` and ``AccountRunner``, in-process, on a real Redis."""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import pytest
from redis.asyncio import Redis

from bridge.account_runner import RECEIVE_BACKOFF_MAX, receive_restart_delay
from bridge.adapter import AdapterContext, Option
from bridge.cli import main, protocol_specs
from bridge.config import load_config
from bridge.daemon import Daemon
from bridge.lease import lease_key
from bridge.receiver import Backoff
from tests.helpers import RedisServer, metric
from tests.poison_daemon import PoisonAdapter
from tests.talkbot_rig import until


class ReceivingAdapter(PoisonAdapter):
    """Its receive loop follows the account's ``Plan``, one step per start:
    ``raise``, ``return``, and after the last step it hangs until cancelled."""

    protocol = "receiving"
    options: ClassVar[dict[str, Option]] = {"Plan": Option(str, default="")}

    def __init__(self, ctx: AdapterContext) -> None:
        super().__init__(ctx)
        self.steps = ctx.account.get("Plan", "").split()
        self.starts = 0
        self.active = 0  # receive calls running now
        self.cancelled = 0

    async def receive(self) -> None:
        self.starts += 1
        step = self.steps.pop(0) if self.steps else "hang"
        if step == "raise":
            raise RuntimeError(f"the network went away (start {self.starts})")
        if step == "return":
            return
        self.active += 1
        try:
            await asyncio.Event().wait()  # a long poll that never answers
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1


class HeldPause:
    """Stands in for the runner's pause before a restart: records it and waits
    for the test, so the degraded state can be looked at for as long as needed."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._release = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self._release.clear()
        await self._release.wait()

    def release(self) -> None:
        self._release.set()


ADAPTERS = {"receiving": ReceivingAdapter, "poison": PoisonAdapter}


def write_config(tmp_path: Path, redis_url: str, plan: str) -> Path:
    path = tmp_path / "talkbridge.toml"
    path.write_text(f"""
[receiving.a]
Plan = "{plan}"
[poison.hooks]

[[gateway]]
name = "g"
enable = true
[[gateway.inout]]
account = "receiving.a"
channel = "room"
[[gateway.inout]]
account = "poison.hooks"
channel = "room"

[redis]
URL = "{redis_url}"
[http]
BindAddress = ""
[bus]
LeaseSeconds = 2
""")
    return path


class Running:
    def __init__(self, daemon: Daemon, path: Path) -> None:
        self.daemon = daemon
        self.path = path
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def adapter(self) -> ReceivingAdapter:
        adapter = self.daemon.runners["receiving.a"].adapter
        assert isinstance(adapter, ReceivingAdapter)
        return adapter

    def start(self) -> None:
        self.task = asyncio.create_task(self.daemon.run(self.stop))

    async def shut_down(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 20)

    async def state(self, account: str = "receiving.a") -> str:
        ready, detail = await self.daemon.readiness()
        assert ready  # degraded is still ready
        return detail["accounts"][account]

    async def status(self) -> str:
        out = io.StringIO()
        # the CLI runs its own event loop: keep it off the test's
        assert await asyncio.to_thread(main, ["status", "--config", str(self.path)], out, ADAPTERS) == 0
        return out.getvalue()

    def restarts(self) -> float:
        return metric(self.daemon.metrics, "talkbridge_receive_restarts_total", account="receiving.a")


@pytest.fixture
def running(tmp_path: Path, redis: Redis, redis_server: RedisServer):
    async def build(plan: str) -> Running:
        path = write_config(tmp_path, redis_server.url, plan)
        return Running(Daemon(load_config(path, protocol_specs(ADAPTERS)), redis, ADAPTERS), path)

    return build


@pytest.fixture
async def cleanup() -> AsyncIterator[list[Running]]:
    daemons: list[Running] = []
    yield daemons
    for d in daemons:
        await d.shut_down()


def receive_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("receive:")]


async def test_a_receive_loop_that_raises_or_returns_is_restarted_counted_and_degrades_the_account(
    running, cleanup: list[Running]
) -> None:
    r: Running = await running("raise return")
    held = HeldPause()
    r.daemon.runners["receiving.a"].restart_pause = held
    cleanup.append(r)
    r.start()

    await until(lambda: len(held.pauses) == 1, what="the first failure")
    state = await r.state()
    assert state.startswith("degraded: receive loop raised RuntimeError: the network went away (start 1)")
    assert "degraded: receive loop raised RuntimeError" in await r.status()
    assert r.restarts() == 0
    assert await r.state("poison.hooks") == "connected"  # a webhook-only adapter has no loop to degrade it

    held.release()
    await until(lambda: len(held.pauses) == 2, what="the second failure")
    assert (await r.state()).startswith("degraded: receive loop returned; restart 2")
    assert r.restarts() == 1

    held.release()
    await until(lambda: r.adapter.active == 1, what="the third start, which keeps running")
    assert r.adapter.starts == 3 and r.restarts() == 2
    assert await r.state() == "connected"
    status = await r.status()
    assert "degraded" not in status
    assert f"owned by {r.daemon.instance_id}" in next(x for x in status.splitlines() if x.startswith("receiving.a "))
    # the backoff grew between the two failures (each is jittered within its step)
    first, second = held.pauses
    assert 0.5 <= first <= 1.0 and 1.0 <= second <= 2.0


def test_the_restart_backoff_doubles_up_to_a_cap_with_jitter() -> None:
    rng = random.Random(7)
    for failures in range(1, 12):
        step = min(2.0 ** (failures - 1), RECEIVE_BACKOFF_MAX)
        for _ in range(20):
            assert step / 2 <= receive_restart_delay(failures, rng) <= step
    assert len({receive_restart_delay(3, rng) for _ in range(20)}) > 1  # jittered, not one fixed pause


def test_a_server_away_for_days_is_still_waited_for_at_the_cap() -> None:
    """A float doubled 1,024 times overflows: a loop restarted every minute
    for a day got there and raised OverflowError out of its backoff."""
    rng = random.Random(7)
    for failures in (1025, 10**6):
        assert RECEIVE_BACKOFF_MAX / 2 <= receive_restart_delay(failures, rng) <= RECEIVE_BACKOFF_MAX
        assert 30 <= Backoff(1.0, 60.0, rng).delay(failures) <= 60


async def test_a_hanging_receive_loop_is_cancelled_when_the_lease_is_lost(
    running, cleanup: list[Running], redis: Redis
) -> None:
    r: Running = await running("")
    cleanup.append(r)
    r.start()
    await until(lambda: r.adapter.active == 1, what="the receive loop running")
    assert [t.get_name() for t in receive_tasks()] == ["receive:receiving.a"]  # none for the webhook-only one

    # another instance holds the lease now (ours expired while we stalled, say)
    await redis.set(lease_key(r.daemon.bus.prefix, "receiving.a"), "another-instance", px=60_000)
    await until(lambda: r.adapter.cancelled == 1, what="the receive loop cancelled")
    assert r.adapter.active == 0 and receive_tasks() == []
    assert await r.state() == "owned by another-instance"
    assert r.restarts() == 0  # a cancellation is not a failure


async def test_a_hanging_receive_loop_is_cancelled_at_shutdown(running) -> None:
    r: Running = await running("")
    r.start()
    try:
        await until(lambda: r.adapter.active == 1, what="the receive loop running")
    finally:
        await r.shut_down()
    assert r.adapter.cancelled == 1 and r.adapter.active == 0
    assert receive_tasks() == []


async def test_an_instance_that_loses_the_account_stops_exporting_its_failures(
    running, cleanup: list[Running], redis: Redis
) -> None:
    """The gauges a fleet alerts on are the owner's: once another instance
    holds the account, this one's account_failed and room_failed read 0 (a
    stale 1 would alert for ever, whatever the new owner reports)."""
    r: Running = await running("")
    cleanup.append(r)
    r.start()
    await until(lambda: r.adapter.active == 1, what="the receive loop running")
    health = r.adapter.ctx.health
    await health.credentials_refused("401 from the server", retry_in=60)
    await health.room_failed("room1", "403 from the server", retry_in=60)
    failed = lambda: metric(r.daemon.metrics, "talkbridge_account_failed", account="receiving.a")  # noqa: E731
    room = lambda: metric(r.daemon.metrics, "talkbridge_room_failed", account="receiving.a", room="room1")  # noqa: E731
    assert (failed(), room()) == (1, 1)

    await redis.set(lease_key(r.daemon.bus.prefix, "receiving.a"), "another-instance", px=60_000)
    await until(lambda: r.adapter.cancelled == 1, what="the account stopped here")
    assert (failed(), room()) == (0, 0)
    assert health.refused is None and health.failing_rooms() == {}  # nothing left for this instance's watch
