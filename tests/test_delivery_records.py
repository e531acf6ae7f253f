"""A delivery the network took is recorded, however long Redis is away.

The Redis server is SIGKILLed right after the adapter's send went through
(as a master dies in a failover) and brought back from its append-only file:
the record of the send is written once Redis answers again, and the message
is not sent a second time — before, the record's error stopped the loop, the
entry stayed pending and the next run sent it again.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.bus import DELIVER_GROUP, Bus, BusSettings
from bridge.delivery import DeliveryLoop, RetryPolicy
from bridge.events import Delivery
from bridge.idmap import IdMap
from bridge.metrics import Metrics
from tests.helpers import LogLines, start_redis_server
from tests.talkbot_rig import until
from tests.test_bus import RecordingAdapter, enqueue, make_delivery


async def test_a_send_whose_record_meets_a_dead_redis_is_recorded_once_it_is_back_and_not_sent_again(
    tmp_path: Path,
) -> None:
    server = start_redis_server(tmp_path, None, "--appendonly", "yes", "--appendfsync", "always")
    redis = Redis(port=server.port)
    log = logging.getLogger("test.delivery_records")
    lines = LogLines()
    log.addHandler(lines)
    killed = asyncio.Event()

    def kill_after_the_send(n: int, _: Delivery) -> None:
        if n == 1:  # the network took it; Redis dies before the record
            server.proc.kill()
            server.proc.wait()
            killed.set()

    adapter = RecordingAdapter(fail=kill_after_the_send)
    bus = Bus(redis, BusSettings(batch_size=50))
    loop = DeliveryLoop(
        bus, IdMap(redis, "tb", 3600), adapter, "api.b", "c1", Metrics(), log, RetryPolicy(3, 0.01, 0.05),
        record_patience=60,
    )  # fmt: skip
    try:
        await enqueue(redis, make_delivery("hello"))
        run = asyncio.create_task(loop.run())
        await until(lambda: killed.is_set(), what="the send")
        await until(lambda: run.done() or any("writing it again" in x for x in lines.lines), what="the record fails")
        server = start_redis_server(tmp_path, server.port, "--appendonly", "yes", "--appendfsync", "always")
        if run.done():  # the runner starts a loop that ended on a Redis error again (bridge/account_runner.py)
            assert isinstance(run.exception(), RedisError)
            run = asyncio.create_task(loop.run())

        async def settled() -> bool:
            try:
                pending = (await redis.xpending(bus.outbound("api.b"), DELIVER_GROUP))["pending"]
            except RedisError:
                return False
            return pending == 0

        await until(settled, what="the entry acknowledged")
        assert adapter.calls == 1 and [d.text for d in adapter.sent] == ["hello"]
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        # a new run (a new owner) sends what comes next, and nothing again
        again = asyncio.create_task(loop.run())
        await enqueue(redis, make_delivery("after"))
        await until(lambda: len(adapter.sent) >= 2 or again.done(), what="the next message")
        assert [d.text for d in adapter.sent] == ["hello", "after"]
        again.cancel()
        await asyncio.gather(again, return_exceptions=True)
    finally:
        log.removeHandler(lines)
        await redis.aclose()
        server.stop()


class SlowNetwork(RecordingAdapter):
    """A server that takes a message the moment the request arrives and
    answers only when ``answer`` is set: a send in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.taken: list[str] = []
        self.in_flight = asyncio.Event()
        self.answer = asyncio.Event()

    async def send(self, delivery: Delivery) -> str | None:
        self.taken.append(delivery.text)
        self.in_flight.set()
        await self.answer.wait()
        return await super().send(delivery)


async def test_a_send_in_flight_when_redis_dies_is_finished_and_recorded_not_sent_again(tmp_path: Path) -> None:
    """The reader loses Redis while a lane's send is in flight: the run is torn
    down, but the send is not abandoned (its server may have the message
    already): it finishes, is recorded once Redis is back, and nothing is
    sent twice. Before, the send was cancelled unrecorded and the next run
    sent the message again."""
    server = start_redis_server(tmp_path, None, "--appendonly", "yes", "--appendfsync", "always")
    redis = Redis(port=server.port)
    adapter = SlowNetwork()
    bus = Bus(redis, BusSettings(batch_size=50))
    loop = DeliveryLoop(
        bus, IdMap(redis, "tb", 3600), adapter, "api.b", "c1", Metrics(), logging.getLogger("test.in_flight"),
        RetryPolicy(3, 0.01, 0.05), record_patience=60,
    )  # fmt: skip
    try:
        await enqueue(redis, make_delivery("hello"))
        run = asyncio.create_task(loop.run())
        await until(adapter.in_flight.is_set, what="the send in flight")
        [lane] = [t for t in asyncio.all_tasks() if t.get_name() == "lane:api.b:y"]
        server.proc.kill()  # the master dies: the reader's blocked read fails and the run is torn down
        server.proc.wait()
        await until(lambda: lane.done() or lane.cancelling(), what="the lane torn down")
        adapter.answer.set()  # the server answers: it has had the message since the request
        server = start_redis_server(tmp_path, server.port, "--appendonly", "yes", "--appendfsync", "always")
        await until(run.done, what="the run ended on the lost connection")
        assert isinstance(run.exception(), RedisError)
        run = asyncio.create_task(loop.run())  # as the runner starts it again
        await enqueue(redis, make_delivery("after"))
        await until(lambda: len(adapter.taken) >= 2 and adapter.taken[-1] == "after", what="the next message")
        assert adapter.taken == ["hello", "after"]
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    finally:
        await redis.aclose()
        server.stop()
