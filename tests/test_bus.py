"""The bus and the delivery loop against a real Redis server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from bridge.adapter import AccountFailed, Adapter, AdapterTraits, PermanentError, RateLimited, TransientError
from bridge.bus import DELIVER_GROUP, ROUTER_GROUP, Bus, BusSettings
from bridge.delivery import AccountStopped, DeliveryLoop, RetryPolicy
from bridge.events import Delivery, Event, EventKind, event_from_wire, event_to_wire
from bridge.idmap import IdMap
from bridge.keys import outbound_key
from bridge.metrics import Metrics
from tests.helpers import metric

LOG = logging.getLogger("test")


class RecordingAdapter(Adapter):
    """A network that records what it was sent; ``fail`` decides per call."""

    protocol = "test"

    def __init__(self, fail: Callable[[int, Delivery], Exception | None] = lambda n, d: None) -> None:
        self.sent: list[Delivery] = []
        self.calls = 0
        self.fail = fail

    async def connect(self) -> None:
        pass

    async def disconnect(self) -> None:
        pass

    async def send(self, delivery: Delivery) -> str | None:
        self.calls += 1
        error = self.fail(self.calls, delivery)
        if error is not None:
            raise error
        self.sent.append(delivery)
        return f"native-{len(self.sent)}"


def make_delivery(text: str, account: str = "api.b", kind: EventKind = EventKind.MESSAGE, **kw) -> Delivery:
    event = Event(kind=kind, account="api.a", channel="x", sender_name="alice", text=text, **kw)
    return Delivery(event=event, account=account, channel="y", gateway="g", username="alice", text=text)


async def no_sleep(_: float) -> None:
    return None


def loop_for(redis: Redis, adapter: Adapter, metrics: Metrics | None = None, attempts: int = 3) -> DeliveryLoop:
    bus = Bus(redis, BusSettings(batch_size=50))
    return DeliveryLoop(
        bus, IdMap(redis, "tb", 3600), adapter, "api.b", "c1", metrics or Metrics(), LOG,
        RetryPolicy(attempts, 0.01, 0.05), sleep=no_sleep,
    )  # fmt: skip


async def drain(loop: DeliveryLoop) -> None:
    """Run the loop until its stream has nothing pending or unread."""
    task = asyncio.create_task(loop.run())
    try:
        for _ in range(500):
            status = await loop.bus.stream_status(loop.stream, DELIVER_GROUP)
            if status["lag"] == 0 and status["pending"] == 0 and await loop.redis.exists(loop.stream):
                groups = await loop.redis.xinfo_groups(loop.stream)
                if groups:
                    return
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        raise TimeoutError("delivery loop did not drain")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def enqueue(redis: Redis, *deliveries: Delivery) -> None:
    for d in deliveries:
        await redis.xadd(outbound_key("tb", "api.b"), {b"d": d.to_wire()})


async def test_published_event_round_trips(redis: Redis) -> None:
    bus = Bus(redis, BusSettings())
    event = Event(
        kind=EventKind.MESSAGE, account="api.a", channel="api", text="héllo", reply_to="7", origin=["api.a/api"]
    )
    entry = await bus.publish(event)
    await bus.ensure_group(bus.inbound("api.a"), ROUTER_GROUP)
    assert await bus.read_pending(bus.inbound("api.a"), ROUTER_GROUP, "c", b"0", 10) == []  # nothing read yet
    [(entry_id, payload)] = await bus.read_new(bus.inbound("api.a"), ROUTER_GROUP, "c", 10, 100)
    assert entry_id.decode() == entry
    assert event_from_wire(payload) == event


async def test_claim_all_takes_over_a_dead_consumers_entries_in_order(redis: Redis) -> None:
    bus = Bus(redis, BusSettings())
    stream = bus.inbound("api.a")
    await bus.ensure_group(stream, ROUTER_GROUP)
    for i in range(5):
        await redis.xadd(
            stream, {b"d": event_to_wire(Event(kind=EventKind.MESSAGE, account="api.a", channel="c", text=str(i)))}
        )
    dead = await bus.read_new(stream, ROUTER_GROUP, "dead-instance", 3, 100)  # read, never acked
    assert len(dead) == 3
    assert await bus.claim_all(stream, ROUTER_GROUP, "new-owner") == 3
    mine = await bus.read_pending(stream, ROUTER_GROUP, "new-owner", b"0", 10)
    assert [e for e, _ in mine] == [e for e, _ in dead]
    rest = await bus.read_new(stream, ROUTER_GROUP, "new-owner", 10, 100)
    assert len(rest) == 2


async def test_delivery_in_order_and_idempotent(redis: Redis) -> None:
    adapter = RecordingAdapter()
    first = [make_delivery(f"m{i}") for i in range(20)]
    await enqueue(redis, *first)
    await drain(loop_for(redis, adapter))
    assert [d.text for d in adapter.sent] == [f"m{i}" for i in range(20)]
    # The same deliveries again (a re-routed batch after a crash): nothing is posted twice.
    await enqueue(redis, *first)
    await drain(loop_for(redis, adapter))
    assert len(adapter.sent) == 20
    assert await IdMap(redis, "tb", 3600).delivered(first) == [True] * 20  # the markers, in the id map


async def test_transient_errors_retry_then_dead_letter(redis: Redis) -> None:
    metrics = Metrics()
    adapter = RecordingAdapter(lambda n, d: TransientError("503") if d.text == "bad" or n == 1 else None)
    await enqueue(redis, make_delivery("ok1"), make_delivery("bad"), make_delivery("ok2"))
    await drain(loop_for(redis, adapter, metrics, attempts=3))
    assert [d.text for d in adapter.sent] == ["ok1", "ok2"]  # ok1 succeeded on its 2nd try
    bus = Bus(redis, BusSettings())
    [letter] = await bus.dead_letters()
    assert (
        letter.stream == outbound_key("tb", "api.b") and letter.attempts == 3 and "TransientError: 503" in letter.error
    )
    assert metric(metrics, "talkbridge_dead_letters_total", stream=outbound_key("tb", "api.b")) == 1
    # Replay puts it back; a now-healthy network takes it.
    adapter.fail = lambda n, d: None
    assert await bus.replay([letter.id]) == 1
    assert await bus.dead_letters() == []
    await drain(loop_for(redis, adapter))
    assert [d.text for d in adapter.sent] == ["ok1", "ok2", "bad"]


async def test_rate_limit_honours_retry_after(redis: Redis) -> None:
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    adapter = RecordingAdapter(lambda n, d: RateLimited("429", retry_after=7) if n == 1 else None)
    await enqueue(redis, make_delivery("m"))
    loop = loop_for(redis, adapter)
    loop.sleep = record
    await drain(loop)
    assert waits == [7] and len(adapter.sent) == 1


async def test_permanent_error_dead_letters_at_once(redis: Redis) -> None:
    adapter = RecordingAdapter(lambda n, d: PermanentError("404 room gone") if d.text == "x" else None)
    await enqueue(redis, make_delivery("x"), make_delivery("y"))
    await drain(loop_for(redis, adapter))
    assert adapter.calls == 2 and [d.text for d in adapter.sent] == ["y"]
    [letter] = await Bus(redis, BusSettings()).dead_letters()
    assert letter.attempts == 1


async def test_account_failure_stops_without_retrying(redis: Redis) -> None:
    metrics = Metrics()
    adapter = RecordingAdapter(lambda n, d: AccountFailed("401"))
    await enqueue(redis, make_delivery("m1"), make_delivery("m2"))
    loop = loop_for(redis, adapter, metrics)
    with pytest.raises(AccountStopped):
        await asyncio.wait_for(loop.run(), 10)
    assert adapter.calls == 1  # one request, no loop
    assert metric(metrics, "talkbridge_account_failed", account="api.b") == 1
    status = await loop.bus.stream_status(loop.stream, DELIVER_GROUP)
    assert status["pending"] + status["lag"] == 2  # both still owed: nothing lost
    assert await loop.bus.dead_letters() == []  # and nothing dead-lettered


class BatchingAdapter(RecordingAdapter):
    """Takes whole batches (as the api buffer does): the batch path of the loop."""

    traits = AdapterTraits(batch_send=True)

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    async def send_batch(self, deliveries):
        self.batches.append(len(deliveries))
        return [await self.send(d) for d in deliveries]


@pytest.mark.parametrize("adapter_cls", [RecordingAdapter, BatchingAdapter])
async def test_replies_edits_and_reactions_follow_the_id_map(redis: Redis, adapter_cls) -> None:
    # All five are read in one batch: the reply, edit and reaction refer to a
    # message delivered moments before, inside the same batch.
    adapter = adapter_cls()
    original = make_delivery("first", native_id="src-1")
    reply = make_delivery("answer", native_id="src-2", reply_to="src-1")
    edit = make_delivery("first, edited", kind=EventKind.EDIT, target_id="src-1")
    react = make_delivery("", kind=EventKind.REACTION, target_id="src-1", reaction="👍")
    orphan = make_delivery("", kind=EventKind.DELETE, target_id="never-seen")
    await enqueue(redis, original, reply, edit, react, orphan)
    metrics = Metrics()
    await drain(loop_for(redis, adapter, metrics))
    sent = {d.event.text or d.event.reaction: d for d in adapter.sent}
    assert sent["answer"].reply_to == "native-1"
    assert sent["first, edited"].target_id == "native-1"
    assert sent["👍"].target_id == "native-1"
    assert len(adapter.sent) == 4  # the delete of an unknown message is skipped
    assert metric(metrics, "talkbridge_deliveries_skipped_total", account="api.b", reason="unmapped_target") == 1
    # And a reply written in the destination to the copy resolves back to the source.
    idmap = IdMap(redis, "tb", 3600)
    assert await idmap.resolve("api.b", "y", "native-1", "api.a", "x") == "src-1"


async def test_a_reply_in_the_same_batch_as_its_parent_is_threaded(redis: Redis) -> None:
    adapter = BatchingAdapter()
    first = make_delivery("first", native_id="s1")
    second = make_delivery("second", native_id="s2")
    reply = make_delivery("re: second", native_id="s3", reply_to="s2")
    edit = make_delivery("first, edited", kind=EventKind.EDIT, target_id="s1")
    await enqueue(redis, first, second, reply, edit)
    await drain(loop_for(redis, adapter))
    assert adapter.batches == [2]  # first and second together; the rest alone, after them
    sent = {d.event.text: d for d in adapter.sent}
    assert sent["re: second"].reply_to == "native-2"
    assert sent["first, edited"].target_id == "native-1"
    assert [d.event.text for d in adapter.sent] == ["first", "second", "re: second", "first, edited"]


async def test_unreadable_entries_are_dead_lettered_not_fatal(redis: Redis) -> None:
    adapter = RecordingAdapter()
    await redis.xadd(outbound_key("tb", "api.b"), {b"d": b"{not json"})
    await enqueue(redis, make_delivery("fine"))
    await drain(loop_for(redis, adapter))
    assert [d.text for d in adapter.sent] == ["fine"]
    [letter] = await Bus(redis, BusSettings()).dead_letters()
    assert "unreadable delivery" in letter.error


async def test_trim_keeps_unconsumed_entries(redis: Redis) -> None:
    bus = Bus(redis, BusSettings())
    stream = bus.outbound("api.b")
    await bus.ensure_group(stream, DELIVER_GROUP)
    for i in range(300):
        await redis.xadd(stream, {b"d": b"x%d" % i})
    rows = await bus.read_new(stream, DELIVER_GROUP, "c", 250, 100)
    await redis.xack(stream, DELIVER_GROUP, *[e for e, _ in rows[:200]])
    await bus.trim_consumed(stream, DELIVER_GROUP)
    remaining = await redis.xrange(stream)
    # approximate trimming may keep some acknowledged entries, never drops pending ones
    assert {e for e, _ in rows[200:]} <= {e for e, _ in remaining}
    assert len(remaining) >= 100
    # ... but it does drop what was consumed: whole stream nodes (100 entries each) of it
    assert rows[0][0] not in {e for e, _ in remaining}
    assert len(remaining) <= 200
    status = await bus.stream_status(stream, DELIVER_GROUP)
    assert status["pending"] == 50 and status["lag"] == 50


async def test_trim_with_nothing_pending_drops_what_was_read_and_acknowledged(redis: Redis) -> None:
    bus = Bus(redis, BusSettings())
    stream = bus.outbound("api.b")
    await bus.ensure_group(stream, DELIVER_GROUP)
    for i in range(300):
        await redis.xadd(stream, {b"d": b"x%d" % i})
    rows = await bus.read_new(stream, DELIVER_GROUP, "c", 250, 100)
    await redis.xack(stream, DELIVER_GROUP, *[e for e, _ in rows])
    await bus.trim_consumed(stream, DELIVER_GROUP)
    remaining = {e for e, _ in await redis.xrange(stream)}
    assert rows[0][0] not in remaining  # consumed: trimmed (whole nodes)
    assert len(remaining) >= 50  # never read: kept
    status = await bus.stream_status(stream, DELIVER_GROUP)
    assert status["pending"] == 0 and status["lag"] == 50


async def test_lag_is_counted_inside_redis_across_chunks_and_capped(redis: Redis) -> None:
    """Redis 6.2 has no ``lag`` in XINFO GROUPS; the bus counts the entries after
    last-delivered with a script (1,000 per XRANGE) instead of reading the backlog
    back at every /metrics scrape. On Redis 7 the figure must agree with XINFO's."""
    bus = Bus(redis, BusSettings())
    stream = bus.outbound("api.b")
    await bus.ensure_group(stream, DELIVER_GROUP)
    pipe = redis.pipeline(transaction=False)
    for i in range(2_500):
        pipe.xadd(stream, {b"d": b"x%d" % i})
    ids = await pipe.execute()
    await bus.read_new(stream, DELIVER_GROUP, "c", 700, 100)
    assert await bus.entries_after(stream, ids[699].decode()) == 1_800
    assert await bus.entries_after(stream, ids[699].decode(), cap=1_000) == 1_000
    assert await bus.entries_after(stream, ids[699].decode(), cap=1_500) == 1_500
    assert await bus.entries_after(stream, ids[-1].decode()) == 0
    assert await bus.entries_after(stream, "0-0") == 2_500
    status = await bus.stream_status(stream, DELIVER_GROUP)
    assert status["lag"] == 1_800 and status["pending"] == 700
    groups = await redis.xinfo_groups(stream)
    if groups[0].get("lag") is not None:  # Redis 7: the server's own count agrees
        assert groups[0]["lag"] == 1_800
