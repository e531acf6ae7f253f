"""The two loops an account owner runs over the bus.

``RouteLoop`` reads the account's inbound stream and writes one delivery per
destination into the destinations' outbound streams. ``DeliveryLoop`` reads
the account's outbound stream and hands each delivery to the adapter.

Both start by taking over whatever is pending (a previous owner may have died
mid-batch) and process it before anything new, so order is the stream's order.
An entry is acknowledged only after its effect is durable: routed entries
after their deliveries are in Redis, deliveries after the adapter confirmed
the send and the delivered-marker is written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from adapters.base import AccountFailed, Adapter, PermanentError, RateLimited, TransientError
from bridge.bus import DELIVER_GROUP, ROUTER_GROUP, Bus, Entry, account_key, delivered_key
from bridge.events import Delivery, EventKind, WireError, event_from_wire
from bridge.idmap import IdMap, canonical_of
from bridge.metrics import Metrics
from bridge.router import Router

BLOCK_MS = 5_000
TRIM_EVERY = 1_000  # acknowledged entries between two XTRIMs
RETRY_AFTER_CAP = 600.0  # seconds; a longer Retry-After is treated as this


class _StreamLoop:
    group: str

    def __init__(self, bus: Bus, stream: str, consumer: str, log: logging.Logger) -> None:
        self.bus = bus
        self.stream = stream
        self.consumer = consumer
        self.log = log
        self._since_trim = 0

    async def handle(self, batch: list[Entry]) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        bus, n = self.bus, self.bus.settings.batch_size
        await bus.ensure_group(self.stream, self.group)
        claimed = await bus.claim_all(self.stream, self.group, self.consumer)
        if claimed:
            self.log.info("%s: took over %d pending entries", self.stream, claimed)
        after = b"0"
        while batch := await bus.read_pending(self.stream, self.group, self.consumer, after, n):
            await self._handle(batch)
            after = batch[-1][0]
        while True:
            batch = await bus.read_new(self.stream, self.group, self.consumer, n, BLOCK_MS)
            if batch:
                await self._handle(batch)

    async def _handle(self, batch: list[Entry]) -> None:
        await self.handle(batch)
        self._since_trim += len(batch)
        if self._since_trim >= TRIM_EVERY:
            self._since_trim = 0
            await self.bus.trim_consumed(self.stream, self.group)


class RouteLoop(_StreamLoop):
    group = ROUTER_GROUP

    def __init__(self, bus: Bus, router: Router, account: str, consumer: str, metrics: Metrics, log: logging.Logger):
        super().__init__(bus, bus.inbound(account), consumer, log)
        self.router = router
        self.metrics = metrics

    async def rooms(self) -> dict[str, set[str]]:
        """Current rooms of the accounts a gateway names with channel ``*``."""
        out = {}
        for account in self.router.wildcard_accounts:
            # the set its adapter keeps as ctx.key("rooms")
            members = await self.bus.redis.smembers(account_key(self.bus.prefix, account, "rooms"))
            out[account] = {m.decode() for m in members}
        return out

    async def handle(self, batch: list[Entry]) -> None:
        rooms = await self.rooms() if self.router.wildcard_accounts else None
        pipe = self.bus.redis.pipeline(transaction=False)
        for entry_id, payload in batch:
            if payload is None:
                continue  # trimmed or deleted while pending
            try:
                event = event_from_wire(payload)
            except WireError as exc:
                await self.bus.dead_letter(self.stream, entry_id, payload, f"unreadable event: {exc}", 1)
                self.metrics.dead_letters.labels(self.stream).inc()
                continue
            for delivery in self.router.route(event, rooms):
                self.bus.add_to(pipe, self.bus.outbound(delivery.account), delivery.to_wire())
        # Not MULTI: on Redis Cluster the streams live in different slots. A
        # crash between the XADDs and the XACK re-routes the entry; the copies
        # it adds are dropped by the delivered-markers.
        pipe.xack(self.stream, self.group, *[entry_id for entry_id, _ in batch])
        await pipe.execute()


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


class DeliveryLoop(_StreamLoop):
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
        ttl_seconds: int,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(bus, bus.outbound(account), consumer, log)
        self.account = account
        self.idmap = idmap
        self.adapter = adapter
        self.metrics = metrics
        self.retry = retry
        self.ttl = ttl_seconds
        self.sleep = sleep
        self.redis: Redis = bus.redis
        # Labelled children resolved once: these are touched for every message.
        self._out = metrics.events_out.labels(account)
        self._latency = metrics.latency.labels(account)

    async def handle(self, batch: list[Entry]) -> None:
        parsed: list[tuple[bytes, Delivery | None, bytes | None]] = []
        for entry_id, payload in batch:
            if payload is None:
                parsed.append((entry_id, None, None))
                continue
            try:
                parsed.append((entry_id, Delivery.from_wire(payload), payload))
            except WireError as exc:
                await self._dead(entry_id, payload, f"unreadable delivery: {exc}", 1)
                parsed.append((entry_id, None, None))
        keys = [delivered_key(self.bus.prefix, d) for _, d, _ in parsed if d is not None]
        if self.adapter.records_delivery:
            done = iter([None] * len(keys))  # its own script checks the marker, atomically
        else:
            done = iter(await self.redis.mget(keys) if keys else [])
        todo: list[tuple[bytes, Delivery, bytes]] = []
        skip: list[bytes] = []
        for entry_id, delivery, payload in parsed:
            if delivery is None:
                skip.append(entry_id)
            elif next(done) is not None:
                self.metrics.skipped.labels(self.account, "already_delivered").inc()
                skip.append(entry_id)
            else:
                assert payload is not None
                todo.append((entry_id, delivery, payload))
        if skip:
            # Acking a skipped entry ahead of earlier unsent ones is safe: it
            # has no effect left to order.
            await self.redis.xack(self.stream, self.group, *skip)
        if not self.adapter.batch_send:
            for entry_id, delivery, payload in todo:
                await self.deliver(entry_id, delivery, payload)
            return
        # Batch runs of independent messages. A delivery that refers to another
        # message (reply, edit, deletion, reaction) goes alone, after the run
        # before it is committed: its target may be in that very run, and the
        # id map knows the target's copy only once the run is recorded.
        run: list[tuple[bytes, Delivery, bytes]] = []
        for item in todo:
            event = item[1].event
            if event.reply_to or event.target_id:
                await self._deliver_run(run)
                run = []
                await self.deliver(*item)
            else:
                run.append(item)
        await self._deliver_run(run)

    async def _deliver_run(self, run: list[tuple[bytes, Delivery, bytes]]) -> None:
        if len(run) > 1 and await self._deliver_batch(run):
            return
        for entry_id, delivery, payload in run:
            await self.deliver(entry_id, delivery, payload)

    async def _deliver_batch(self, run: list[tuple[bytes, Delivery, bytes]]) -> bool:
        """One round trip for a run of deliveries that refer to no other
        message (nothing to resolve); False to fall back to one by one."""
        ready = [(entry_id, delivery) for entry_id, delivery, _payload in run]
        try:
            native_ids = await self.adapter.send_batch([d for _, d in ready])
        except Exception as exc:
            self.log.warning("%s: batch delivery failed (%s); delivering one by one", self.account, exc)
            return False
        pipe = self.redis.pipeline(transaction=False)
        for (_entry_id, delivery), native_id in zip(ready, native_ids, strict=True):
            self._commit(pipe, delivery, native_id)
        pipe.xack(self.stream, self.group, *[e for e, _ in ready])
        await pipe.execute()
        now = time.time()
        for _, delivery in ready:
            self._out.inc()
            self._latency.observe(max(0.0, now - delivery.event.timestamp))
        return True

    def _commit(self, pipe: Any, delivery: Delivery, native_id: str | None) -> None:
        """Queue the delivered-marker and the id map entry for one sent delivery."""
        if not self.adapter.records_delivery:
            pipe.set(delivered_key(self.bus.prefix, delivery), native_id or "", ex=self.ttl)
        canonical = canonical_of(delivery)
        if native_id and canonical is not None:
            self.idmap.record(pipe, canonical, delivery.account, delivery.channel, native_id)

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

    async def deliver(self, entry_id: bytes, delivery: Delivery, payload: bytes) -> None:
        if not await self._resolve(delivery):
            self.metrics.skipped.labels(self.account, "unmapped_target").inc()
            await self.redis.xack(self.stream, self.group, entry_id)
            return
        attempt = 0
        while True:
            attempt += 1
            try:
                native_id = await self.adapter.send(delivery)
                break
            except AccountFailed as exc:
                self.metrics.delivery_errors.labels(self.account, "account_failed").inc()
                self.metrics.account_failed.labels(self.account).set(1)
                raise AccountStopped(str(exc)) from exc
            except PermanentError as exc:
                self.metrics.delivery_errors.labels(self.account, "permanent").inc()
                await self._dead(entry_id, payload, f"{type(exc).__name__}: {exc}", attempt)
                return
            except (TimeoutError, TransientError, OSError) as exc:
                kind = "rate_limited" if isinstance(exc, RateLimited) else "transient"
                self.metrics.delivery_errors.labels(self.account, kind).inc()
                if attempt >= self.retry.max_attempts:
                    await self._dead(entry_id, payload, f"{type(exc).__name__}: {exc}", attempt)
                    return
                hint = exc.retry_after if isinstance(exc, RateLimited) else None
                delay = self.retry.delay(attempt, hint)
                self.log.warning("%s: delivery failed (%s), retry %d in %.1fs", self.account, exc, attempt, delay)
                await self.sleep(delay)
        event = delivery.event
        pipe = self.redis.pipeline(transaction=False)
        self._commit(pipe, delivery, native_id)
        pipe.xack(self.stream, self.group, entry_id)
        await pipe.execute()
        self._out.inc()
        self._latency.observe(max(0.0, time.time() - event.timestamp))

    async def _dead(self, entry_id: bytes, payload: bytes, error: str, attempts: int) -> None:
        self.log.error("%s: dead-lettered %s after %d attempt(s): %s", self.stream, entry_id.decode(), attempts, error)
        await self.bus.dead_letter(self.stream, entry_id, payload, error, attempts)
        await self.redis.xack(self.stream, self.group, entry_id)
        self.metrics.dead_letters.labels(self.stream).inc()
