"""The loops an account owner runs over the bus, and what they share.

``RouteLoop`` (here) reads the account's inbound stream and writes one
delivery per destination into the destinations' outbound streams.
``DeliveryLoop`` (bridge/delivery.py) reads the account's outbound stream and
hands each delivery to the adapter, in per-room lanes.

Both start by taking over whatever is pending (a previous owner may have died
mid-batch) and process it before anything new, so order is the stream's order
(``StreamLoop``). An entry is acknowledged only after its effect is durable:
routed entries after their deliveries are in Redis, deliveries after the
adapter confirmed the send and the delivered-marker is written.

Pausing (``bridge/control.py``): ``wait_unpaused`` is awaited before a
route batch is handled and before every send; while the account is paused
from the admin page it does not return, so entries wait in the stream (read
ones in the pending list) and go on in stream order once it does.

Poison containment: an event the router cannot route is dead-lettered and
the route loop goes on; a delivery's own failures are bridge/delivery.py's.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable
from typing import Protocol

from bridge.bus import ROUTER_GROUP, Bus, Entry
from bridge.control import never_paused
from bridge.events import Event, WireError, event_from_wire
from bridge.metrics import Metrics
from bridge.rooms import Rooms
from bridge.router import Router

BLOCK_MS = 5_000
TRIM_EVERY = 1_000  # acknowledged entries between two XTRIMs


def failure_summary(exc: BaseException, frames: int = 6) -> str:
    """``Type: message`` and the innermost frames, for a dead letter's error."""
    tb = "".join(traceback.format_tb(exc.__traceback__, limit=-frames)) if exc.__traceback__ else ""
    return f"{type(exc).__name__}: {exc}" + (f"\n{tb.rstrip()}" if tb else "")


class StreamLoop:
    group: str
    # Awaited before work that moves traffic on; waits while the account is
    # paused (the owner sets it to its AccountControl's pause_gate.wait: bridge/control.py).
    wait_unpaused: Callable[[], Awaitable[None]] = staticmethod(never_paused)

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
        await self.wait_unpaused()
        await self.handle(batch)
        await self._count_for_trim(len(batch))

    async def _count_for_trim(self, entries: int) -> None:
        self._since_trim += entries
        if self._since_trim >= TRIM_EVERY:
            self._since_trim = 0
            await self.bus.trim_consumed(self.stream, self.group)


class EventTriggers(Protocol):
    """Which inbound events start jobs (the workers' features, workers/triggers.py),
    asked by the route loop about every event it routes. The CLI builds them and
    hands them to the daemon, as it does the adapters: the core imports no worker.

    ``consider`` must be cheap for an event that does not concern it, and the jobs
    it starts must have ids deterministic from the event (the loop may handle an
    event again after a crash). A Redis error propagates (the batch is handled
    again); anything else is the trigger's to log."""

    async def consider(self, event: Event) -> None: ...


class RouteLoop(StreamLoop):
    group = ROUTER_GROUP

    def __init__(
        self,
        bus: Bus,
        router: Router,
        account: str,
        consumer: str,
        metrics: Metrics,
        log: logging.Logger,
        triggers: EventTriggers | None = None,
    ):
        super().__init__(bus, bus.inbound(account), consumer, log)
        self.account = account
        self.router = router
        self.metrics = metrics
        self.triggers = triggers  # the workers' features: which events start jobs

    async def rooms(self) -> dict[str, set[str]]:
        """Current rooms of the accounts a gateway names with channel ``*``."""
        # the sets their adapters keep through AdapterContext.rooms
        return {
            account: await Rooms(self.bus.redis, self.bus.prefix, account).members()
            for account in self.router.wildcard_accounts
        }

    async def handle(self, batch: list[Entry]) -> None:
        rooms = await self.rooms() if self.router.wildcard_accounts else None
        pipe = self.bus.redis.pipeline(transaction=False)
        for entry_id, payload in batch:
            if payload is None:
                continue  # trimmed or deleted while pending
            try:
                event = event_from_wire(payload)
                deliveries = self.router.route(event, rooms)
            except WireError as exc:
                await self._dead(entry_id, payload, f"unreadable event: {exc}")
                continue
            except Exception as exc:  # a router bug must not stop the account: this event only
                self.log.error("%s: cannot route %s", self.account, entry_id.decode(), exc_info=exc)
                await self._dead(entry_id, payload, f"routing failed: {failure_summary(exc)}")
                continue
            for delivery in deliveries:
                self.bus.add_to(pipe, self.bus.outbound(delivery.account), delivery.to_wire())
            if self.triggers is not None:
                # before the XACK: a crash here routes the event again, and the
                # jobs' deterministic ids keep it from running twice
                await self.triggers.consider(event)
        # Not MULTI: on Redis Cluster the streams live in different slots. A
        # crash between the XADDs and the XACK re-routes the entry; the copies
        # it adds are dropped by the delivered-markers.
        pipe.xack(self.stream, self.group, *[entry_id for entry_id, _ in batch])
        await pipe.execute()

    async def _dead(self, entry_id: bytes, payload: bytes, error: str) -> None:
        # acknowledged with the rest of the batch
        await self.bus.dead_letter(self.stream, entry_id, payload, error, 1)
        self.metrics.dead_letters.labels(self.stream).inc()
