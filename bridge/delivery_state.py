"""The delivery loop's state in Redis: every read and write of it goes
through ``DeliveryState``, a part of bridge/delivery.py's ``DeliveryLoop``.

All of it is in the id map (bridge/idmap.py), whose fields double as
delivered-markers; every write is fenced by the lease token, so an owner that
stalled past its lease cannot record or acknowledge beside its successor.

Two rules keep a failover of Redis from sending a message twice or out of
order (docs/operations.md, "Acknowledged writes and replicas"):

- before a send Redis cannot fence (an HTTP post), ``_check_fence`` reads the
  lease token and, with ``[redis] MinReplicas``, waits until what the send
  stands on (its entry, the room's previous marker) is on the replicas;
- once the network took a delivery, its record is written until it holds
  (``_record_sent``), across a failover, for up to ``record_patience``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from redis.exceptions import RedisError

from bridge.events import Delivery
from bridge.groupcommit import NotReplicated
from bridge.idmap import Fence, Fenced, IdMap

if TYPE_CHECKING:
    from collections.abc import Callable

    from bridge.adapter import Adapter
    from bridge.bus import Bus
    from bridge.metrics import Metrics

T = TypeVar("T")
Sent = tuple[bytes, Delivery, str | None]  # an entry, its delivery, the id the network gave it

SEND_DRAIN_SECONDS = 5.0  # a send in flight when its run is torn down may finish this long
RECORD_RETRY_MIN = 0.05  # seconds before a failed record of a sent delivery is written again…
RECORD_RETRY_MAX = 1.0  # …doubling up to this, for as long as ``record_patience`` allows


class DeliveryState:
    """What ``DeliveryLoop`` sets up and these methods use."""

    account: str
    adapter: Adapter
    bus: Bus
    idmap: IdMap
    metrics: Metrics
    log: logging.Logger
    stream: str
    group: str
    fence: Callable[[], Fence | None]
    record_patience: float
    _recording: set[asyncio.Task[None]]

    async def _already_delivered(self, deliveries: list[Delivery]) -> list[bool]:
        """Which of these copies a previous attempt (a crash, a takeover) sent."""
        if self.adapter.traits.records_delivery:
            return [False] * len(deliveries)  # its own script checks the marker, atomically
        return await self.idmap.delivered(deliveries)

    async def _check_fence(self) -> None:
        """Before a send Redis cannot fence (an HTTP post): are we still the
        owner? Narrows a stale owner's window to the send itself (docs/talk-bot.md).
        Then: is what the send stands on (its entry, the lane's last marker and
        XACK) on [redis] MinReplicas replicas? Else a failover resends it, or an
        earlier entry after it (``NotReplicated``: the loop retries)."""
        if self.adapter.traits.records_delivery:
            return  # its send is a Redis write: its readers wait (adapters/api/streams.py)
        fence = self.fence()
        try:  # the token's read rides with the WAIT: one round trip
            answers = await self.bus.replicated([("get", (fence.key,), {})] if fence is not None else [])
        except NotReplicated:
            self.metrics.replication_short.labels("delivery").inc()
            raise
        if fence is not None and (answers[0] is None or answers[0].decode() != fence.token):
            raise Fenced(f"{self.account}: lease token {fence.token} is stale")

    async def _send_to_the_end(self, send: Coroutine[Any, Any, T], records: Callable[[T], list[Sent]]) -> T:
        """Run a send to its end even when the run is torn down meanwhile.

        The reader losing Redis (the master died) tears the run down; a send
        cancelled in flight may already have been taken by the server, and
        its entry, unrecorded, would be sent again by the next run. So the
        send goes on (for up to ``SEND_DRAIN_SECONDS``) and, if it went
        through, is recorded (``_record_sent``) before the cancellation goes
        on; ``run`` waits for its lanes, so the next run starts after."""
        task = asyncio.ensure_future(send)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # a failed send or record, or one still hanging after SEND_DRAIN_SECONDS (then
            # cancelled, as before): the entry stays pending
            with contextlib.suppress(Exception):
                await self._record_sent(records(await asyncio.wait_for(task, SEND_DRAIN_SECONDS)))
            raise

    async def _record_sent(self, done: list[Sent]) -> None:
        """Record deliveries the network has taken, however long Redis is away.

        Once a send went through, giving its record up means sending it again
        (the entry stays pending): a Talk room would get the message twice.
        So a record that fails on a Redis error (the master died, Sentinel is
        promoting a replica), or that ``[redis] MinReplicas`` replicas did not
        confirm, is written again until it holds, for up to ``record_patience``. It runs as a task
        of its own: a lane torn down meanwhile (the reader lost Redis too)
        does not abandon it, and ``run`` waits for it before it returns, so a
        restarted run never re-reads an entry whose record is still on its
        way. A refused fence (another owner) is final."""
        task = asyncio.create_task(self._record_until_held(done), name=f"record:{self.account}")
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)
        await asyncio.shield(task)

    async def _record_until_held(self, done: list[Sent]) -> None:
        give_up = time.monotonic() + self.record_patience
        delay = RECORD_RETRY_MIN
        while True:
            try:
                await self._commit(done)
                # with MinReplicas, held means on the replicas: a record only the master had
                # dies with it, and the next owner sends the message again
                await self.bus.replicated()
                return
            except Fenced:
                raise
            except (RedisError, OSError) as exc:  # NotReplicated included: on the master only
                short = isinstance(exc, NotReplicated)
                if short:
                    self.metrics.replication_short.labels("record").inc()
                if time.monotonic() + delay >= give_up:
                    raise
                self.log.warning(
                    "%s: the record of %d delivered message(s) %s (%s); writing it again in %.2fs",
                    self.account, len(done), "is not on the replicas yet" if short else "failed", exc, delay,
                )  # fmt: skip
            await asyncio.sleep(delay)  # the real clock: this waits for Redis, not a retry schedule
            delay = min(delay * 2, RECORD_RETRY_MAX)

    async def _commit(self, done: list[Sent]) -> None:
        """Record sent deliveries (id map + marker) and acknowledge their entries."""
        # An adapter that records its own deliveries wrote them with the send.
        records = [] if self.adapter.traits.records_delivery else [(d, native_id) for _, d, native_id in done]
        await self.idmap.commit(self.fence(), self.stream, self.group, [e for e, _, _ in done], records)

    async def _ack(self, entry_ids: list[bytes]) -> None:
        """Acknowledge entries that need no record (skipped, dead-lettered)."""
        if entry_ids:
            await self.idmap.commit(self.fence(), self.stream, self.group, entry_ids)

    async def _dead(self, entry_id: bytes, payload: bytes, error: str, attempts: int) -> None:
        self.log.error(
            "%s: dead-lettered %s of %s after %d attempt(s): %s",
            self.account, entry_id.decode(), self.stream, attempts, error,
        )  # fmt: skip
        await self.bus.dead_letter(self.stream, entry_id, payload, error, attempts)
        await self._ack([entry_id])
        self.metrics.dead_letters.labels(self.stream).inc()
