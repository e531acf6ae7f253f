"""The api adapter's buffer: a Redis stream of messages for its clients,
written exactly once per delivery under the lease's fence, read by claiming
pages of rows (held in this process while a reader writes them) that are
deleted once written or let go for the next reader. A mixin of
MatterbridgeAPI (adapters/api/adapter.py), which holds the state it uses.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from redis.exceptions import ResponseError

from bridge.adapter import AdapterContext
from bridge.events import Delivery, EventKind
from bridge.groupcommit import NotReplicated
from bridge.idmap import FENCED, Fenced, recording_script

# Deliver into the buffer exactly once, under the lease's fence: each
# delivery's record in the id map (which is also its delivered-marker,
# bridge/idmap.py RECORDING_LIB) and its buffer entry are written together, so
# a redelivery after a crash finds the marker and adds nothing, and a stale
# owner adds nothing at all.
# KEYS: fence, buffer. ARGV: token, maxlen, the map's arguments
# (IdMap.recording_args), then per delivery: payload, native id, the map's
# arguments for it (IdMap.delivery_args). Returns {native ids..., entries
# pushed out of a full buffer}.
_DELIVER_MANY = recording_script(
    r"""
if tb_fenced(KEYS[1], ARGV[1]) then return redis.error_reply('FENCED lease token is stale') end
local maxlen = tonumber(ARGV[2])
local at = tb_rec_begin(3)
local out = {}
local before = redis.call('XLEN', KEYS[2])
local added = 0
while at <= #ARGV do
  local payload, native_id = ARGV[at], ARGV[at + 1]
  local done
  done, at = tb_rec_delivery(at + 2)
  if done then
    out[#out + 1] = done
  else
    redis.call('XADD', KEYS[2], 'MAXLEN', maxlen, '*', 'd', payload)
    out[#out + 1] = native_id
    added = added + 1
  end
end
tb_rec_end()
local dropped = before + added - maxlen
if dropped < 0 then dropped = 0 end
out[#out + 1] = dropped
return out
"""
)


def unavailable(exc: BaseException) -> str:
    """The reason a 503 gives: Redis away, or not enough replicas in time."""
    return (
        f"message queue unavailable: {exc}"
        if isinstance(exc, NotReplicated)
        else "message queue unavailable, retry later"
    )


class ApiBuffer:
    name: str
    ctx: AdapterContext
    buffer_key: str
    buffer_size: int
    _changed: asyncio.Event
    _claim_lock: asyncio.Lock
    _claimed: set[bytes]

    message_for: Callable[[Delivery, str], dict[str, Any]]  # adapters/api/messages.py

    def _unavailable(self, exc: BaseException, what: str) -> str:
        """Why a POST gets 503 (Redis away, or its write not on [redis]
        MinReplicas replicas in time: counted as ``replication_short{what}``)."""
        if isinstance(exc, NotReplicated):
            self.ctx.metrics.replication_short.labels(what).inc()
        return unavailable(exc)

    async def send(self, delivery: Delivery) -> str | None:
        [native_id] = await self.send_batch([delivery])
        return native_id

    async def send_batch(self, deliveries: Sequence[Delivery]) -> list[str | None]:
        idmap = self.ctx.idmap
        assert idmap is not None, "the api adapter records its deliveries in the id map"
        fence = self.ctx.fence()
        keys = [fence.key if fence else self.ctx.key("unfenced"), self.buffer_key]  # unfenced: never read
        # an api account has one channel: every delivery here is to one room
        assert all(d.channel == deliveries[0].channel for d in deliveries)
        args: list[Any] = [fence.token if fence else "", self.buffer_size]
        args += idmap.recording_args(self.name, deliveries[0].channel)
        for delivery in deliveries:
            # 8 random bytes: unique per room, and a compact map entry
            native_id = os.urandom(8).hex() if delivery.event.kind == EventKind.MESSAGE else ""
            args += [orjson.dumps(self.message_for(delivery, native_id)), native_id]
            args += idmap.delivery_args(delivery, native_id or None)
        try:
            *stored, dropped = await self._deliver_many(keys=keys, args=args)
        except ResponseError as exc:
            if str(exc).startswith(FENCED):
                raise Fenced(str(exc)) from None
            raise
        if int(dropped):
            self.ctx.metrics.api_buffer_dropped.labels(self.name).inc(int(dropped))
        self._wake_readers()
        return [(s.decode() if isinstance(s, bytes) else s) or None for s in stored]

    # reading the buffer --------------------------------------------------------------
    def _wake_readers(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _claim(self, count: int | None) -> list[Any]:
        """The oldest rows no other reader holds, at most ``count`` (None: all
        of them), now held by the caller until ``_taken`` or ``_let_go``."""
        async with self._claim_lock:  # held for this read only, never across a client's write
            held = self._claimed
            if count is None:
                rows = await self.ctx.redis.xrange(self.buffer_key, min="-", max="+")
            else:  # held rows are the oldest, mostly: skip past them
                rows = await self.ctx.redis.xrange(self.buffer_key, min="-", max="+", count=count + len(held))
            page = [row for row in rows if row[0] not in held][:count]
            held.update(row[0] for row in page)
        if page and self.ctx.bus is not None:
            # [redis] MinReplicas: no client sees a row a failover could undo
            # (its delivery would be buffered, and handed out, again)
            try:
                await self.ctx.bus.replicated()
            except BaseException as exc:
                self._let_go([row[0] for row in page])
                if isinstance(exc, NotReplicated):
                    self.ctx.metrics.replication_short.labels("api_read").inc()
                raise
        return page

    def _let_go(self, ids: Sequence[bytes]) -> None:
        """Claimed rows not written: the next reader takes them (they never left the buffer)."""
        self._claimed.difference_update(ids)
        self._wake_readers()

    async def _taken(self, ids: Sequence[bytes]) -> None:
        """Written rows: deleted, and only then released (released at once, a
        reader could take them again before the delete). The delete runs to its
        end even if this handler is cancelled (the daemon stopping)."""
        if not ids:  # an empty answer (a poll of an empty buffer): nothing to delete, and XDEL needs an id
            return
        deletion = asyncio.ensure_future(self.ctx.redis.xdel(self.buffer_key, *ids))
        deletion.add_done_callback(lambda _done: self._claimed.difference_update(ids))
        await asyncio.shield(deletion)
        if self.ctx.bus is None:
            return
        try:  # the client has them: a delete not on replicas in time is counted, not undone
            await self.ctx.bus.replicated()
        except NotReplicated as exc:
            self.ctx.metrics.replication_short.labels("api_read").inc()
            self.ctx.log.warning(
                "%s: %d messages handed out, their removal not on replicas yet (a failover now would hand them "
                "out again): %s", self.name, len(ids), exc,
            )  # fmt: skip
