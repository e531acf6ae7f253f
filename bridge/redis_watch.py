"""Which Redis master this instance uses, and when it changed (a failover).

Every daemon runs a ``RedisWatch``: each ``EVERY`` seconds it asks where the
master is — through Sentinel the sentinels' answer (``discover_master``, the
address the connection pool connects to), otherwise the configured address —
and the master's ``INFO replication``, and sets ``redis_up`` and
``redis_replicas``. It keeps the fleet's record in one hash
(bridge/keys.py ``redis_master_key``) by one script: the master's address and
since when, the replicas it reports, and the last failover (when, from which
address to which, seen first by which instance). The record lives on the
Redis it describes, so after a failover the promoted replica still holds the
old address (it was replicated): the first instance that finds the new master
there writes the failover, the others find it written. ``redis_failovers``
counts the changes this instance saw itself.

Limits: only a Sentinel master changes address; a standalone server is shown
by the address this instance dials (another instance may name it otherwise),
a Cluster has no one master and is not watched. A failover is seen within
``EVERY`` seconds of the sentinels' switch, by an instance alive then; the
record keeps the last one only (the log and the counter keep the rest).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import RedisError

from bridge.keys import redis_master_key
from bridge.metrics import Metrics

EVERY = 1.0  # seconds between looks: a failover shows within this

# KEYS[1] the record; ARGV: address, replicas, now (unix seconds), instance, sentinel ("1"/"0").
# Returns the address recorded before, "" for none. Writes only what changed.
RECORD = """
local before = redis.call('HGET', KEYS[1], 'address') or ''
if before ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'address', ARGV[1], 'since', ARGV[3])
  if before ~= '' and ARGV[5] == '1' then
    redis.call('HSET', KEYS[1], 'failover_at', ARGV[3], 'failover_from', before,
               'failover_to', ARGV[1], 'failover_seen_by', ARGV[4])
  end
end
if redis.call('HGET', KEYS[1], 'replicas') ~= ARGV[2] then
  redis.call('HSET', KEYS[1], 'replicas', ARGV[2])
end
return before
"""


@dataclass(frozen=True)
class MasterRecord:
    """The fleet's record (``read_record``): the master now, the last failover."""

    address: str
    since: float
    replicas: int
    failover_at: float | None = None
    failover_from: str = ""
    failover_to: str = ""
    failover_seen_by: str = ""


def is_sentinel(redis: Redis) -> bool:
    return isinstance(getattr(redis, "connection_pool", None), SentinelConnectionPool)


async def master_address(redis: Redis) -> str | None:
    """``host:port`` of the master this client writes to (``unix:PATH`` for a
    socket); None for a Cluster. Through Sentinel, asks the sentinels (a
    MasterNotFoundError, a ConnectionError, while none is agreed on)."""
    if isinstance(redis, RedisCluster):
        return None
    pool = redis.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        host, port = await pool.sentinel_manager.discover_master(pool.service_name)
        return f"{host}:{port}"
    kwargs = pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


async def read_record(redis: Redis, prefix: str) -> MasterRecord | None:
    """The fleet's record, None before any instance wrote one."""
    raw = await redis.hgetall(redis_master_key(prefix))
    if not raw:
        return None
    got = {_s(k): _s(v) for k, v in raw.items()}
    return MasterRecord(
        address=got.get("address", ""),
        since=_float(got.get("since")) or 0.0,
        replicas=int(_float(got.get("replicas")) or 0),
        failover_at=_float(got.get("failover_at")),
        failover_from=got.get("failover_from", ""),
        failover_to=got.get("failover_to", ""),
        failover_seen_by=got.get("failover_seen_by", ""),
    )


class RedisWatch:
    def __init__(
        self, redis: Redis, prefix: str, metrics: Metrics, instance_id: str, log: logging.Logger | None = None
    ) -> None:
        self.redis = redis
        self.key = redis_master_key(prefix)
        self.metrics = metrics
        self.instance_id = instance_id
        self.log = log or logging.getLogger("talkbridge.redis")
        self.sentinel = is_sentinel(redis)
        self.seen: str | None = None  # the master this instance saw last
        self._record = redis.register_script(RECORD)
        self._down = False
        self._back = asyncio.Event()  # set, and replaced, each time Redis answers again after failing

    async def back(self) -> None:
        """Until the next time Redis answers again after a failed look: loops
        that lost Redis start again then, not at their next backoff step
        (a failover's master is found within ``EVERY`` seconds)."""
        await self._back.wait()

    def _answered(self, answered: bool) -> None:
        self.metrics.redis_up.set(1 if answered else 0)
        if not answered:
            self._down = True
        elif self._down:
            self._down = False
            self._back.set()
            self._back = asyncio.Event()

    async def look(self) -> None:
        """One look: the metrics, the record, a failover logged and counted."""
        try:
            address = await master_address(self.redis)
            info = await self.redis.info("replication")
        except (RedisError, OSError):
            self._answered(False)
            return
        self._answered(True)
        if address is None or info.get("role") != "master":  # Cluster; a master being demoted
            return
        replicas = int(info.get("connected_slaves", 0))
        self.metrics.redis_replicas.set(replicas)
        if self.seen is not None and address != self.seen:
            self.metrics.redis_failovers.inc()
            self.log.warning("redis: the master is now %s (was %s): a failover", address, self.seen)
        self.seen = address
        try:
            await self._record(
                keys=[self.key], args=[address, replicas, f"{time.time():.3f}", self.instance_id, int(self.sentinel)]
            )
        except (RedisError, OSError):
            self._answered(False)

    async def run(self) -> None:
        while True:
            await self.look()
            await asyncio.sleep(EVERY)


def describe(record: MasterRecord | None, address: str | None) -> list[str]:
    """What ``talkbridge status`` prints about Redis: this client's master and
    the fleet's record (the same words as the management page)."""
    lines = [f"redis master: {address or 'Redis Cluster (no one master)'}"]
    if record is not None:
        lines.append(f"redis master recorded: {record.address} since {_utc(record.since)}, {record.replicas} replicas")
        if record.failover_at is not None:
            lines.append(
                f"last failover: {_utc(record.failover_at)} from {record.failover_from} to {record.failover_to}"
                f" (seen first by {record.failover_seen_by})"
            )
    return lines


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def _s(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
