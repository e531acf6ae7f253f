"""Redis Streams: the durable bus between adapters, router and workers.

Streams (``P`` is the key prefix, ``tb`` by default):

- ``P:in:{ACCOUNT}``  — events an adapter received; consumer group ``router``.
- ``P:out:{ACCOUNT}`` — deliveries for an account; consumer group ``deliver``.
- ``P:dlq``         — dead letters: the entry, where it came from, the error.

Only the instance holding an account's lease consumes its streams, so every
stream has one active consumer and per-room order is the stream's order. When
a lease changes hands the new owner claims everything still pending
(XAUTOCLAIM from ``0-0`` with no idle time: the lease guarantees the old owner
is gone) and processes it before anything new.

Retention: entries are trimmed once consumed (XTRIM MINID up to the group's
oldest unacknowledged entry); ``StreamMaxLen`` optionally caps a stream even
if that drops unconsumed entries, which is counted.

An adapter that keeps a receive cursor (Talk's per-room last message, a
Matrix sync token) commits a batch of events and its cursor together
(``Bus.commit_inbound``): one script that appends the events (capped by
``StreamMaxLen``) and writes the cursor, all or nothing, and only while the
writer holds the account's current lease token, checked in the same script.
The stream, the cursor keys (``AdapterContext.key``) and the fence key carry
the account's hash tag (bridge/keys.py), so on Redis Cluster they share one
slot and the script may touch them all. Commits are group-committed like
``publish``: a hundred rooms polled at once share round trips.

Replicas (``[redis] MinReplicas``, docs/operations.md): ``publish`` and
``commit_inbound`` return only once their writes are on that many replicas
(a WAIT in their group commit, bridge/groupcommit.py), else raise
``NotReplicated`` (a RedisError: the ingress answers 503). ``replicated``
is the same wait for writes made elsewhere, before something leaves the
process on their strength (a send to Talk, rows handed to an api client).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bridge.events import Event, event_to_wire
from bridge.groupcommit import GroupCommit, Op
from bridge.idmap import FENCED, LUA_LIB, Fence, Fenced
from bridge.keys import (
    current_stream_name,
    dead_letters_key,
    fence_key,
    hash_tag,
    inbound_key,
    outbound_key,
    replicated_key,
)

if TYPE_CHECKING:
    from bridge.config import Config
    from bridge.config_keys import BusSection, RedisSection

ROUTER_GROUP = "router"
DELIVER_GROUP = "deliver"
FIELD = b"d"

Entry = tuple[bytes, bytes | None]  # (stream id, payload or None if deleted)


@dataclass(frozen=True, slots=True)
class BusSettings:
    prefix: str = "tb"
    stream_max_len: int = 0
    dead_letter_max_len: int = 100_000
    batch_size: int = 200
    min_replicas: int = 0  # [redis] MinReplicas
    replica_wait_seconds: float = 2.0  # [redis] ReplicaWaitSeconds

    @classmethod
    def from_section(cls, prefix: str, bus: BusSection, redis: RedisSection | None = None) -> BusSettings:
        return cls(
            prefix=prefix,
            stream_max_len=bus.stream_max_len,
            dead_letter_max_len=bus.dead_letter_max_len,
            batch_size=bus.batch_size,
            min_replicas=redis.min_replicas if redis is not None else 0,
            replica_wait_seconds=redis.replica_wait_seconds if redis is not None else 2.0,
        )


WRITE_OPS = frozenset({"SET", "SETNX", "HSET", "HSETNX", "SADD", "ZADD", "ZREMRANGEBYRANK"})


@dataclass(frozen=True, slots=True)
class Write:
    """One write to an adapter's own receive state (its cursor), committed
    with its events by ``Bus.commit_inbound``: the Redis command ``op`` on
    ``key`` with ``args``. The key must carry the account's hash tag (an
    ``AdapterContext.key``): the inbound stream's Cluster slot."""

    op: str
    key: str
    args: tuple[str | bytes | int, ...]

    def __post_init__(self) -> None:
        if self.op not in WRITE_OPS or not self.args:
            raise ValueError(f"not a cursor write: {self.op} {self.key} with {len(self.args)} arguments")

    @classmethod
    def set(cls, key: str, value: str | bytes | int) -> Write:
        return cls("SET", key, (value,))

    @classmethod
    def setnx(cls, key: str, value: str | bytes | int) -> Write:
        return cls("SETNX", key, (value,))

    @classmethod
    def hset(cls, key: str, field: str | bytes, value: str | bytes | int) -> Write:
        return cls("HSET", key, (field, value))

    @classmethod
    def sadd(cls, key: str, *members: str | bytes) -> Write:
        return cls("SADD", key, members)


# Append inbound events and write the adapter's cursor, fenced (module docstring).
# KEYS: the account's fence key, the stream, then one key per write.
# ARGV: token ("" unfenced), maxlen (0: none), n events, their payloads, then
# per write: op, n args, args.
_COMMIT_INBOUND = (
    LUA_LIB
    + r"""
if tb_fenced(KEYS[1], ARGV[1]) then return redis.error_reply('FENCED lease token is stale') end
local maxlen, n = tonumber(ARGV[2]), tonumber(ARGV[3])
local ids = {}
for i = 4, 3 + n do
  if maxlen > 0 then
    ids[#ids + 1] = redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'd', ARGV[i])  -- 'd': FIELD
  else
    ids[#ids + 1] = redis.call('XADD', KEYS[2], '*', 'd', ARGV[i])
  end
end
local at = 4 + n
for k = 3, #KEYS do
  local count = tonumber(ARGV[at + 1])
  redis.call(ARGV[at], KEYS[k], unpack(ARGV, at + 2, at + 1 + count))
  at = at + 2 + count
end
return ids
"""
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    stream: str
    entry_id: str
    error: str
    attempts: int
    failed_at: float
    payload: bytes


# Redis 6.2's XINFO GROUPS has no ``lag``: count the entries after the group's
# last-delivered id inside Redis, a chunk at a time, up to a cap. Reading them
# back instead (XRANGE to the client) moved a whole backlog across the
# connection at every /metrics scrape, and its transient garbage fragmented the
# daemon's heap: RSS grew with the backlog (docs/benchmarks.md, "Soak").
# KEYS: stream. ARGV: last-delivered id, cap.
_COUNT_AFTER = """
local after, cap, n = ARGV[1], tonumber(ARGV[2]), 0
while n < cap do
  local rows = redis.call('XRANGE', KEYS[1], '(' .. after, '+', 'COUNT', math.min(1000, cap - n))
  n = n + #rows
  if #rows < 1000 then break end
  after = rows[#rows][1]
end
return n
"""
LAG_COUNT_CAP = 100_000  # Redis 6.2 only: a lag beyond this reads as this


class Bus:
    def __init__(self, redis: Redis, settings: BusSettings) -> None:
        self.redis = redis
        self.settings = settings
        self.prefix = settings.prefix
        self._commits = GroupCommit(
            redis, settings.min_replicas, settings.replica_wait_seconds, replicated_key(settings.prefix)
        )
        self._count_after = redis.register_script(_COUNT_AFTER)
        self._commit_inbound = redis.register_script(_COMMIT_INBOUND)

    # key names -----------------------------------------------------------------
    def inbound(self, account: str) -> str:
        return inbound_key(self.prefix, account)

    def outbound(self, account: str) -> str:
        return outbound_key(self.prefix, account)

    @property
    def dlq(self) -> str:
        return dead_letters_key(self.prefix)

    # producing -----------------------------------------------------------------
    def _xadd_args(self) -> dict[str, Any]:
        if self.settings.stream_max_len > 0:
            return {"maxlen": self.settings.stream_max_len, "approximate": True}
        return {}

    async def publish(self, event: Event) -> str:
        """Durably append an inbound event; returns its stream id.

        Group-committed: concurrent publishes share one pipeline, and each
        returns only once its own entry is in Redis.
        """
        [entry_id] = await self._commits.run(
            [("xadd", (self.inbound(event.account), {FIELD: event_to_wire(event)}), self._xadd_args())]
        )
        return entry_id.decode()

    async def commit_inbound(
        self, account: str, events: Sequence[Event], writes: Sequence[Write] = (), fence: Fence | None = None
    ) -> list[str]:
        """Append ``events`` to the account's inbound stream and apply
        ``writes`` (its cursor), all or nothing; returns the stream ids.

        Fenced: raises ``Fenced`` (and writes nothing) unless ``fence`` is
        still the account's lease token, checked in the same script as the
        writes, so no stale owner slips in between a check and its write.
        ``None``: unfenced (no lease, as in the tests' rigs). Group-committed
        like ``publish``."""
        stream = self.inbound(account)
        keys = [fence_key(self.prefix, account), stream]
        args: list[Any] = [fence.token if fence else "", max(0, self.settings.stream_max_len), len(events)]
        args.extend(event_to_wire(event) for event in events)
        for write in writes:
            if hash_tag(write.key) != account:  # another slot: Cluster would refuse the script
                raise ValueError(f"{write.key} is not in the slot of {stream} (name it with AdapterContext.key)")
            keys.append(write.key)
            args += [write.op, len(write.args), *write.args]
        if not events and not writes:
            return []
        try:
            [ids] = await self._commits.run_script(self._commit_inbound, keys, args)
        except ResponseError as exc:
            if str(exc).startswith(FENCED):
                raise Fenced(f"{account}: lease token {fence.token if fence else ''} is stale") from None
            raise
        return [entry_id.decode() for entry_id in ids]

    def add_to(self, pipe: Any, stream: str, payload: bytes) -> None:
        pipe.xadd(stream, {FIELD: payload}, **self._xadd_args())

    async def replicated(self, reads: Sequence[Op] = ()) -> list[Any]:
        """Once everything this process wrote so far is on ``[redis]
        MinReplicas`` replicas (at once when that is 0); ``NotReplicated``
        when they do not confirm it within ReplicaWaitSeconds. Grouped with
        concurrent publishes: one WAIT for all of them. ``reads`` (commands
        that write nothing) ride along; their answers are returned."""
        return await self._commits.barrier(reads)

    # consuming -----------------------------------------------------------------
    async def ensure_group(self, stream: str, group: str) -> None:
        try:
            await self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def claim_all(self, stream: str, group: str, consumer: str) -> int:
        """Take over every pending entry of the group (lease takeover).

        XAUTOCLAIM answers ``[next, entries]`` on Redis 6.2 and
        ``[next, entries, deleted]`` on 7.0+; only the first two are used.
        """
        start = "0-0"
        claimed = 0
        while True:
            reply = await self.redis.xautoclaim(
                stream, group, consumer, min_idle_time=0, start_id=start, count=1000, justid=True
            )
            ids = reply  # redis-py returns just the claimed ids for JUSTID
            claimed += len(ids)
            if len(ids) < 1000:
                return claimed
            start = _next_id(ids[-1])

    async def read_pending(self, stream: str, group: str, consumer: str, after: bytes, count: int) -> list[Entry]:
        """Our own unacknowledged entries after ``after`` (in id order)."""
        reply = await self.redis.xreadgroup(group, consumer, {stream: after}, count=count)
        return _entries(reply)

    async def read_new(self, stream: str, group: str, consumer: str, count: int, block_ms: int) -> list[Entry]:
        reply = await self.redis.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block_ms)
        return _entries(reply)

    async def trim_consumed(self, stream: str, group: str) -> None:
        """Drop entries every consumer of ``group`` has acknowledged."""
        summary = await self.redis.xpending(stream, group)
        if summary and summary.get("pending"):
            minid = summary["min"]
        else:
            info = await self.redis.xinfo_groups(stream)
            last = next((g["last-delivered-id"] for g in info if _s(g["name"]) == group), None)
            if last is None:
                return
            minid = _next_id(last)
        await self.redis.xtrim(stream, minid=minid, approximate=True)

    # dead letters --------------------------------------------------------------
    async def dead_letter(self, stream: str, entry_id: bytes | str, payload: bytes, error: str, attempts: int) -> None:
        fields = {
            b"stream": stream,
            b"entry": _s(entry_id),
            b"error": error[:2000],
            b"attempts": str(attempts),
            b"at": f"{time.time():.3f}",
            FIELD: payload,
        }
        await self.redis.xadd(self.dlq, fields, maxlen=self.settings.dead_letter_max_len, approximate=True)

    async def dead_letters(self, count: int = 100, start: str = "-") -> list[DeadLetter]:
        rows = await self.redis.xrange(self.dlq, min=start, max="+", count=count)
        return [_dead_letter(entry_id, fields) for entry_id, fields in rows]

    async def replay(self, ids: Sequence[str] | None = None) -> int:
        """Put dead letters back on their stream (all of them when ``ids`` is None)."""
        if ids is None:
            letters = []
            start = "-"
            while True:
                page = await self.dead_letters(1000, start)
                letters.extend(page)
                if len(page) < 1000:
                    break
                start = "(" + page[-1].id
        else:
            letters = []
            for one in ids:
                rows = await self.redis.xrange(self.dlq, min=one, max=one)
                letters.extend(_dead_letter(i, f) for i, f in rows)
        for letter in letters:
            pipe = self.redis.pipeline(transaction=False)
            self.add_to(pipe, current_stream_name(self.prefix, letter.stream), letter.payload)
            pipe.xdel(self.dlq, letter.id)
            await pipe.execute()
        return len(letters)

    # status --------------------------------------------------------------------
    async def stream_status(self, stream: str, group: str) -> dict[str, Any]:
        length = await self.redis.xlen(stream)
        out: dict[str, Any] = {"stream": stream, "length": length, "lag": 0, "pending": 0, "oldest_pending_s": 0.0}
        if not length and not await self.redis.exists(stream):
            return out
        try:
            groups = await self.redis.xinfo_groups(stream)
        except ResponseError:
            return out
        info = next((g for g in groups if _s(g["name"]) == group), None)
        if info is None:
            out["lag"] = length
            return out
        out["pending"] = info["pending"]
        lag = info.get("lag")
        if lag is None:  # Redis 6.2
            lag = await self.entries_after(stream, _s(info["last-delivered-id"]))
        out["lag"] = lag
        if info["pending"]:
            summary = await self.redis.xpending(stream, group)
            if summary and summary.get("min"):  # an XACK may have emptied it since XINFO
                oldest_ms = int(_s(summary["min"]).split("-")[0])
                out["oldest_pending_s"] = max(0.0, time.time() - oldest_ms / 1000)
        return out

    async def entries_after(self, stream: str, entry_id: str, cap: int = LAG_COUNT_CAP) -> int:
        """How many entries follow ``entry_id`` (at most ``cap``), counted inside Redis."""
        return int(await self._count_after(keys=[stream], args=[entry_id, cap]))


def bus_for(config: Config, redis: Redis) -> Bus:
    """The bus a loaded config describes ([redis] KeyPrefix, [bus]): the daemon's,
    the workers', the management page's and the CLI's are this one."""
    return Bus(redis, BusSettings.from_section(config.redis.key_prefix, config.bus, config.redis))


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _next_id(entry_id: bytes | str) -> str:
    ms, seq = _s(entry_id).split("-")
    return f"{ms}-{int(seq) + 1}"


def _entries(reply: Any) -> list[Entry]:
    out: list[Entry] = []
    if not reply:
        return out
    for _stream, rows in reply:
        for entry_id, fields in rows:
            out.append((entry_id, fields.get(FIELD) if fields else None))
    return out


def _dead_letter(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    return DeadLetter(
        id=_s(entry_id),
        stream=_s(fields.get(b"stream", b"")),
        entry_id=_s(fields.get(b"entry", b"")),
        error=_s(fields.get(b"error", b"")),
        attempts=int(fields.get(b"attempts", b"0")),
        failed_at=float(fields.get(b"at", b"0")),
        payload=fields.get(FIELD, b""),
    )
