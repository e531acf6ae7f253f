"""The delivery loop: an account's outbound stream, handed to its adapter
room by room (``DeliveryLoop``). The route loop that fills the stream, and
the stream loop both build on, are bridge/relay.py's.

Per-room lanes (``DeliveryLoop``)
---------------------------------

An account's deliveries share one stream, but a room that fails must not hold
up the others. The reader hands every entry to the *lane* of its destination
channel; each lane delivers its entries one after another in stream order, and
lanes run concurrently: at most ``SEND_SLOTS`` sends of an account in flight,
and one at a time until a send of the run has gone through, so a refused
credential costs one request. An entry is acknowledged (XACK) when its lane
has finished with it —
delivered, skipped or dead-lettered — so acknowledgements are in stream order
within a room and in any order across rooms.

When a lane's head must wait (a transient error, a 429), the lane *parks*
until the retry time: only its head stays in memory; everything behind it,
and whatever the reader finds for that room meanwhile, stays only in Redis,
in the consumer group's pending list (PEL) where the reader put it. Other
lanes keep flowing. Once the head is done, the lane *refills* from the PEL
(our pending entries after its last one, that room's only, in stream order)
before it takes anything new. So a parked room costs one entry of memory
however long it fails, and it never fills the read-ahead window the healthy
rooms need.

Parked and queued work survives a crash or a lease takeover exactly as any
pending entry does: nothing is acknowledged before it is finished, so the
next owner's start — claim everything pending, then read the pending list in
stream order, then new entries — dispatches it into lanes again in stream
order: nothing lost, room order kept, and the delivered-markers keep a copy
that was sent just before the crash from being posted twice. The attempt
count of a parked delivery lives in memory: after a crash or takeover it
starts again at one (a delivery may then get up to ``MaxDeliveries`` more
attempts).

Memory is bounded: lanes hold at most ``READ_AHEAD`` times ``BatchSize`` entries
that are not parked heads; when they are full the reader stops reading until
lanes drain (the entries wait in the stream, where they are safe). A room
whose sends are merely slow keeps its entries in that shared window, so
several rooms hanging at once (until the adapter's timeout turns the hang
into an error and parks them) can hold up the others for that long; so can a
first send that hangs while sends still go one at a time. A parked room's
entries also keep the stream from being trimmed past its oldest one.

Pausing (``bridge/control.py``, bridge/relay.py): ``wait_unpaused`` is
awaited before every send; a paused account's entries wait in its stream.

Poison containment: an exception an adapter did not foresee (not a
``DeliveryError``, ``TimeoutError`` or ``OSError``) while resolving or sending
one delivery is that delivery's failure: it is retried with backoff and then
dead-lettered with the exception and a traceback summary; the account and
the daemon keep running. Redis errors and a refused lease token
(``Fenced``) are not a delivery's fault: they stop the loop and the entry
stays pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.adapter import AccountFailed, Adapter, PermanentError, RateLimited, ServerUnavailable, TransientError
from bridge.bus import DELIVER_GROUP, Bus, Entry
from bridge.control import never_paused
from bridge.delivery_state import DeliveryState
from bridge.events import Delivery, EventKind, WireError
from bridge.idmap import Fence, Fenced, IdMap
from bridge.metrics import Metrics
from bridge.relay import BLOCK_MS, StreamLoop, failure_summary

RETRY_AFTER_CAP = 600.0  # seconds; a longer Retry-After is treated as this
SEND_SLOTS = 16  # an account's sends in flight at once (one per lane at most)
READ_AHEAD = 4  # batches of entries lanes may hold in memory (parked heads aside)
READ_LAG = 0.005  # seconds the reader waits for busy lanes to take what it read last

# Not a delivery's fault: these stop the delivery loop (the runner restarts it,
# or stops the account) and leave the entry pending, never dead-letter it.
STOPS_DELIVERY: tuple[type[BaseException], ...] = (RedisError, Fenced)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    base_seconds: float = 0.5
    max_seconds: float = 30.0

    def delay(self, attempt: int, hint: float | None = None) -> float:
        if hint is not None:  # the server said how long: honour it, within reason
            return min(max(hint, 0.0), RETRY_AFTER_CAP)
        return min(self.base_seconds * (2 ** (attempt - 1)), self.max_seconds)


class AccountStopped(Exception):
    """The adapter said the account is unusable; the owner stops delivering."""


def _sid(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


class _Item:
    """One delivery held in memory by its lane."""

    __slots__ = ("attempts", "checked", "delivery", "entry_id", "payload", "waits")

    def __init__(self, entry_id: bytes, delivery: Delivery, payload: bytes) -> None:
        self.entry_id = entry_id
        self.delivery = delivery
        self.payload = payload
        self.attempts = 0  # failed sends so far (in this process: a crash starts again)
        self.waits = 0  # sends that found the server away (ServerUnavailable): not attempts
        self.checked = False  # looked up in the delivered-markers already

    @property
    def refers(self) -> bool:
        event = self.delivery.event
        return bool(event.reply_to or event.target_id)


class _Lane:
    """The deliveries to one channel, in stream order."""

    __slots__ = ("channel", "last", "parked", "queue", "spill_high", "spilled", "task")

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.queue: deque[_Item] = deque()  # in memory, in stream order
        self.last = b"0-0"  # newest entry of this lane taken into memory (the refill cursor)
        # True while entries of this lane newer than ``last`` wait in the PEL only
        self.spilled = False
        self.spill_high = b"0-0"  # newest entry of this lane left in the PEL
        self.parked = False
        self.task: asyncio.Task[None] | None = None


class DeliveryLoop(DeliveryState, StreamLoop):
    group = DELIVER_GROUP

    def __init__(
        self,
        bus: Bus,
        idmap: IdMap,
        adapter: Adapter,
        account: str,
        consumer: str,
        metrics: Metrics,
        log: logging.Logger,
        retry: RetryPolicy,
        fence: Callable[[], Fence | None] = lambda: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wait_unpaused: Callable[[], Awaitable[None]] = never_paused,
        record_patience: float = 15.0,
    ) -> None:
        super().__init__(bus, bus.outbound(account), consumer, log)
        # how long the record of a delivery the network took is retried while
        # Redis is away (a failover): the lease's length, past which another
        # instance may own the account and its fence refuses the record anyway
        self.record_patience = record_patience
        self.wait_unpaused = wait_unpaused
        self.account = account
        self.idmap = idmap
        self.adapter = adapter
        self.metrics = metrics
        self.retry = retry
        self.fence = fence  # the lease token of this tenure (bridge.lease)
        self.sleep = sleep
        self.redis: Redis = bus.redis
        self.read_ahead = READ_AHEAD * bus.settings.batch_size
        # Labelled children resolved once: these are touched for every message.
        self._out = metrics.events_out.labels(account)
        self._latency = metrics.latency.labels(account)
        self._reset()

    def _reset(self) -> None:
        """Forget every lane: a (re)started run dispatches the PEL again."""
        self._lanes: dict[str, _Lane] = {}
        self._in_memory = 0  # entries in lanes' memory (parked heads included)
        self._parked = 0  # parked lanes (each holds its head only)
        self._queued = 0  # entries waiting in lanes that are not parked, not yet taken up
        self._dispatched = (0, 0)  # newest entry the reader has handed out
        self._space = asyncio.Event()  # set when lanes finish entries
        self._taken = asyncio.Event()  # set when lanes have taken up everything queued
        self._slots = asyncio.Semaphore(SEND_SLOTS)
        self._probe = asyncio.Lock()
        self._proven = False  # a send of this run succeeded: the account's credentials work
        self._failure: asyncio.Future[BaseException] | None = None  # a lane's fatal exception
        self._recording: set[asyncio.Task[None]] = set()  # records of sent deliveries being written

    # introspection (tests, status) -----------------------------------------------
    @property
    def in_memory(self) -> int:
        """Entries in the lanes' memory, parked heads included (the rest wait in Redis)."""
        return self._in_memory

    def parked_rooms(self) -> list[str]:
        return [lane.channel for lane in self._lanes.values() if lane.parked]

    # the reader ------------------------------------------------------------------
    async def run(self) -> None:
        self._reset()
        self._failure = failure = asyncio.get_running_loop().create_future()
        reader = asyncio.create_task(self._read(), name=f"deliver:{self.account}")
        try:
            await asyncio.wait((reader, failure), return_when=asyncio.FIRST_COMPLETED)
            if failure.done():
                raise failure.result()  # a lane's: AccountStopped, Redis, Fenced, a bug
            reader.result()
        finally:
            tasks = [reader, *(lane.task for lane in self._lanes.values() if lane.task is not None)]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # sent: their records finish (or give up) before a new run re-reads the PEL
            await asyncio.gather(*list(self._recording), return_exceptions=True)
            self._lanes.clear()

    async def _read(self) -> None:
        bus, n = self.bus, self.bus.settings.batch_size
        await bus.ensure_group(self.stream, self.group)
        claimed = await bus.claim_all(self.stream, self.group, self.consumer)
        if claimed:
            self.log.info("%s: took over %d pending entries", self.stream, claimed)
        after = b"0"
        while True:
            await self._ready_to_read()
            batch = await bus.read_pending(self.stream, self.group, self.consumer, after, n)
            if not batch:
                break
            after = batch[-1][0]
            await self._dispatch(batch)
        while True:
            await self._ready_to_read()
            batch = await bus.read_new(self.stream, self.group, self.consumer, n, BLOCK_MS)
            if batch:
                await self._dispatch(batch)

    async def _ready_to_read(self) -> None:
        # Bounded memory: while lanes hold a full read-ahead window, leave the
        # rest in the stream (parked heads do not count: a failing room must
        # not fill the window the others need).
        while self._in_memory - self._parked >= self.read_ahead:
            self._space.clear()
            await self._space.wait()
        # Batching: read again once lanes have taken up what was read last, so
        # a busy lane finds a whole batch waiting (not one entry per read); a
        # lane stuck in a slow send holds the reader back READ_LAG at most.
        if self._queued > 0:
            self._taken.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(READ_LAG):
                    await self._taken.wait()

    async def _dispatch(self, batch: list[Entry]) -> None:
        gone: list[bytes] = []
        for entry_id, payload in batch:
            self._dispatched = _sid(entry_id)
            if payload is None:
                gone.append(entry_id)  # trimmed or deleted while pending: nothing to deliver
                continue
            try:
                delivery = Delivery.from_wire(payload)
            except WireError as exc:
                await self._dead(entry_id, payload, f"unreadable delivery: {exc}", 1)
                continue
            except Exception as exc:
                await self._dead(entry_id, payload, f"unreadable delivery: {failure_summary(exc)}", 1)
                continue
            self._place(entry_id, delivery, payload)
        if gone:
            await self._ack(gone)
        await self._count_for_trim(len(batch))

    def _place(self, entry_id: bytes, delivery: Delivery, payload: bytes) -> None:
        lane = self._lanes.get(delivery.channel)
        if lane is None:
            lane = self._lanes[delivery.channel] = _Lane(delivery.channel)
        if lane.spilled or lane.parked:
            # behind a waiting head: it stays in the PEL until the lane refills
            lane.spilled = True
            lane.spill_high = entry_id
            return
        lane.queue.append(_Item(entry_id, delivery, payload))
        lane.last = entry_id
        self._in_memory += 1
        self._queued += 1
        if lane.task is None:
            lane.task = asyncio.create_task(self._lane(lane), name=f"lane:{self.account}:{delivery.channel}")

    # lanes ------------------------------------------------------------------------
    async def _lane(self, lane: _Lane) -> None:
        try:
            while True:
                if not lane.queue:
                    if not lane.spilled:
                        break
                    await self._refill(lane)
                    continue
                rest, delay = await self._step(lane)
                if delay is not None:
                    await self._park(lane, rest, delay)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # stop the whole loop: run() raises it
            if self._failure is not None and not self._failure.done():
                self._failure.set_result(exc)
        finally:
            lane.task = None
            if not lane.queue and not lane.spilled and self._lanes.get(lane.channel) is lane:
                del self._lanes[lane.channel]  # idle: a room costs nothing between messages

    def _finished(self, count: int) -> None:
        self._in_memory -= count
        self._space.set()

    def _took(self, count: int) -> None:
        self._queued -= count
        if self._queued <= 0:
            self._taken.set()

    async def _step(self, lane: _Lane) -> tuple[list[_Item], float | None]:
        """Work through the head of the lane (up to a batch); returns what is
        left unfinished and the delay to park for, or ([], None)."""
        window = [lane.queue.popleft() for _ in range(min(self.bus.settings.batch_size, len(lane.queue)))]
        self._took(len(window))
        unchecked = [item for item in window if not item.checked]
        if unchecked:
            done = await self._already_delivered([item.delivery for item in unchecked])
            skip = set()
            for item, delivered in zip(unchecked, done, strict=True):
                item.checked = True
                if delivered:
                    skip.add(item.entry_id)
            if skip:
                # Acking a skipped entry ahead of earlier unsent ones is safe:
                # it has no effect left to order.
                self.metrics.skipped.labels(self.account, "already_delivered").inc(len(skip))
                await self._ack(list(skip))
                self._finished(len(skip))
                window = [item for item in window if item.entry_id not in skip]
        # Batch runs of independent messages (an adapter whose batch is one
        # round trip). A delivery that refers to another message (reply, edit,
        # deletion, reaction) goes alone, after the run before it is committed:
        # its target may be in that very run, and the id map knows the
        # target's copy only once the run is recorded.
        i, batch_from = 0, 0
        while i < len(window):
            item = window[i]
            if self.adapter.traits.batch_send and i >= batch_from and not item.refers:
                j = i + 1
                while j < len(window) and not window[j].refers:
                    j += 1
                if j - i > 1:
                    if await self._deliver_batch(window[i:j]):
                        i = j
                        continue
                    batch_from = j  # that run goes one by one
            delay = await self._deliver_one(item)
            if delay is not None:
                return window[i:], delay
            i += 1
        return [], None

    async def _park(self, lane: _Lane, rest: list[_Item], delay: float) -> None:
        """Wait for the head's retry time holding only the head: everything
        after it stays in (or goes back to) the PEL, the lane refills later."""
        head = rest[0]
        queued = len(lane.queue)  # arrived during the step: counted as queued
        self._took(queued)
        dropped = queued + len(rest) - 1
        if dropped:
            if _sid(lane.last) > _sid(lane.spill_high):
                lane.spill_high = lane.last
            lane.last = head.entry_id
            lane.spilled = True
            self._finished(dropped)  # not finished: back in the PEL only
        lane.queue.clear()
        lane.queue.append(head)
        lane.parked = True
        self._parked += 1
        self._space.set()
        try:
            await self.sleep(delay)
        finally:
            lane.parked = False
            self._parked -= 1
        self._queued += 1

    async def _refill(self, lane: _Lane) -> None:
        """Take the lane's next entries from our pending list, in stream order.

        Only entries the reader has already handed out are looked at: newer
        ones are the reader's to place (it leaves them in the PEL while the
        lane is spilled), so no entry is ever taken twice."""
        page = self.bus.settings.batch_size
        while self._in_memory - self._parked >= self.read_ahead:
            self._space.clear()
            await self._space.wait()
        while True:
            limit = self._dispatched
            after = lane.last
            scanning = True
            while scanning:
                rows = await self.bus.read_pending(self.stream, self.group, self.consumer, after, page)
                scanning = len(rows) == page
                for entry_id, payload in rows:
                    if _sid(entry_id) > limit:
                        scanning = False
                        break
                    after = entry_id
                    if payload is None:
                        continue
                    try:
                        delivery = Delivery.from_wire(payload)
                    except Exception:
                        continue  # the reader dead-letters it
                    if delivery.channel != lane.channel:
                        continue
                    lane.queue.append(_Item(entry_id, delivery, payload))
                    lane.last = entry_id
                    self._in_memory += 1
                    self._queued += 1
                    if len(lane.queue) >= page or self._in_memory - self._parked >= self.read_ahead:
                        return  # still spilled: the rest on the next refill
            # Everything of this lane the reader had handed out is in memory,
            # unless the reader left more in the PEL while we scanned.
            if _sid(lane.spill_high) <= limit:
                lane.spilled = False
                return
            if lane.queue:
                return  # deliver these first; the next refill goes on from lane.last

    # one delivery, or a run of them ----------------------------------------------
    def _gate(self) -> contextlib.AbstractAsyncContextManager[object]:
        """Until a send of this run went through, sends go one at a time: a
        refused credential (401) then costs one request, not one per room
        waiting — Nextcloud counts each towards its brute-force lockout. Once
        the loop is stopping (a lane raised), nothing more is sent."""
        if self._stopping():
            raise asyncio.CancelledError  # this lane is being torn down with the rest
        return contextlib.nullcontext() if self._proven else self._probed()

    @contextlib.asynccontextmanager
    async def _probed(self) -> AsyncIterator[None]:
        async with self._probe:
            if self._stopping():
                raise asyncio.CancelledError
            yield

    def _stopping(self) -> bool:
        return self._failure is not None and self._failure.done()

    async def _deliver_batch(self, run: list[_Item]) -> bool:
        """One round trip for a run of deliveries that refer to no other
        message (nothing to resolve); False to fall back to one by one."""
        try:
            await self.wait_unpaused()
            async with self._slots, self._gate():
                await self._check_fence()
                native_ids = await self._send_to_the_end(
                    self.adapter.send_batch([item.delivery for item in run]),
                    lambda ids: [(item.entry_id, item.delivery, nid) for item, nid in zip(run, ids, strict=True)],
                )
            self._proven = True
            done = [(item.entry_id, item.delivery, nid) for item, nid in zip(run, native_ids, strict=True)]
        except STOPS_DELIVERY:
            raise
        except Exception as exc:
            self.log.warning("%s: batch delivery failed (%s); delivering one by one", self.account, exc)
            return False
        await self._record_sent(done)
        self._finished(len(run))
        now = time.time()
        for item in run:
            self._out.inc()
            self._latency.observe(max(0.0, now - item.delivery.event.timestamp))
        return True

    async def _deliver_one(self, item: _Item) -> float | None:
        """Resolve and send one delivery. None when the lane is done with it
        (sent, skipped or dead-lettered), else the delay before its retry."""
        delivery = item.delivery
        try:
            if not await self._resolve(delivery):
                self.metrics.skipped.labels(self.account, "unmapped_target").inc()
                await self._ack([item.entry_id])
                self._finished(1)
                return None
            await self.wait_unpaused()
            async with self._slots, self._gate():
                await self._check_fence()
                native_id = await self._send_to_the_end(
                    self.adapter.send(delivery), lambda nid: [(item.entry_id, delivery, nid)]
                )
            self._proven = True
        except AccountFailed as exc:
            self.metrics.delivery_errors.labels(self.account, "account_failed").inc()
            self.metrics.account_failed.labels(self.account).set(1)
            raise AccountStopped(str(exc)) from exc
        except PermanentError as exc:
            self.metrics.delivery_errors.labels(self.account, "permanent").inc()
            await self._dead(item.entry_id, item.payload, f"{type(exc).__name__}: {exc}", item.attempts + 1)
            self._finished(1)
            return None
        except STOPS_DELIVERY:
            raise
        except ServerUnavailable as exc:
            return self._server_away(item, f"{type(exc).__name__}: {exc}")
        except (TimeoutError, TransientError, OSError) as exc:
            kind = "rate_limited" if isinstance(exc, RateLimited) else "transient"
            hint = exc.retry_after if isinstance(exc, RateLimited) else None
            return await self._failed(item, kind, f"{type(exc).__name__}: {exc}", hint)
        except Exception as exc:
            # An exception the adapter did not foresee: this delivery's failure,
            # never the account's (one poison message must not stop it).
            return await self._failed(item, "unexpected", failure_summary(exc))
        await self._record_sent([(item.entry_id, delivery, native_id)])
        self._finished(1)
        self._out.inc()
        self._latency.observe(max(0.0, time.time() - delivery.event.timestamp))
        return None

    async def _failed(self, item: _Item, kind: str, error: str, hint: float | None = None) -> float | None:
        self.metrics.delivery_errors.labels(self.account, kind).inc()
        item.attempts += 1
        if item.attempts >= self.retry.max_attempts:
            await self._dead(item.entry_id, item.payload, error, item.attempts)
            self._finished(1)
            return None
        delay = self.retry.delay(item.attempts, hint)
        self.log.warning(
            "%s: delivery to %s failed (%s), retry %d in %.1fs; the room waits, the others go on",
            self.account, item.delivery.channel, error.partition("\n")[0], item.attempts, delay,
        )  # fmt: skip
        return delay

    def _server_away(self, item: _Item, error: str) -> float:
        """The server takes no request now: the delivery waits for it, retried
        with capped backoff and never dead-lettered for it (a restart or a
        maintenance window delays messages; the room shows as failing)."""
        self.metrics.delivery_errors.labels(self.account, "unavailable").inc()
        item.waits += 1
        delay = self.retry.delay(min(item.waits, 32))
        if item.waits == 1 or item.waits % 20 == 0:  # a long outage logs now and then, not at every retry
            self.log.warning(
                "%s: the server is away for %s (%s); the room waits for it, retry %d in %.1fs",
                self.account, item.delivery.channel, error.partition("\n")[0], item.waits, delay,
            )  # fmt: skip
        return delay

    async def _resolve(self, delivery: Delivery) -> bool:
        """Fill in destination ids; False when there is nothing to act on there."""
        event = delivery.event
        if event.reply_to:
            delivery.reply_to = await self.idmap.resolve(
                event.account, event.channel, event.reply_to, delivery.account, delivery.channel
            )
        if event.kind in (EventKind.EDIT, EventKind.DELETE, EventKind.REACTION, EventKind.UNREACTION):
            if not event.target_id:
                return False
            delivery.target_id = await self.idmap.resolve(
                event.account, event.channel, event.target_id, delivery.account, delivery.channel
            )
            return delivery.target_id is not None
        return True
