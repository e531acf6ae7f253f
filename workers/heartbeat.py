"""Which workers are alive, and what they have done: the management page's
Workers table (bridge/admin/fleet.py ``worker_status``).

- ``{prefix}:workers``: a sorted set, worker id -> expiry (ms since the epoch);
- ``{prefix}:worker:ID``: a hash of what the worker announces (host, pid,
  version, started, jobs done, failed, retried and running), expiring with it.

Kept apart from the daemons' ``{prefix}:instances``: the daemons share the
accounts among the members of that set, and a worker holds none. A worker
that stops cleanly leaves at once; one that dies drops out when its expiry
passes (``LIFETIMES`` beats). The keys and their reader (``live_workers``)
are the fleet's, in bridge/control.py beside the daemons' announcements;
this module writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.control import announce
from bridge.keys import worker_key, workers_key

EVERY = 10.0  # seconds between beats
LIFETIMES = 3  # a worker is shown alive this many beats after its last


async def beat(redis: Redis, prefix: str, ident: str, info: Mapping[str, str], every: float = EVERY) -> None:
    """One beat: the worker alive until ``LIFETIMES`` beats from now; the
    expired ones removed."""
    now_ms = int(time.time() * 1000)
    ttl_ms = int(every * LIFETIMES * 1000)
    pipe = redis.pipeline(transaction=False)
    pipe.zadd(workers_key(prefix), {ident: now_ms + ttl_ms})
    pipe.zremrangebyscore(workers_key(prefix), "-inf", now_ms)
    announce(pipe, worker_key(prefix, ident), info, ttl_ms)
    await pipe.execute()


async def heartbeat(
    redis: Redis,
    prefix: str,
    ident: str,
    info: Callable[[], Mapping[str, str]],
    log: logging.Logger,
    every: float = EVERY,
) -> None:
    """Beat every ``every`` seconds until cancelled; Redis away is waited out
    (the next beat tries again; the worker drops off the page meanwhile)."""
    while True:
        try:
            await beat(redis, prefix, ident, info(), every)
        except (RedisError, OSError) as exc:
            log.debug("worker heartbeat not written: %s", exc)
        await asyncio.sleep(every)


async def leave(redis: Redis, prefix: str, ident: str) -> None:
    """A clean stop: off the page at once."""
    with contextlib.suppress(RedisError, OSError):
        pipe = redis.pipeline(transaction=False)
        pipe.zrem(workers_key(prefix), ident)
        pipe.delete(worker_key(prefix, ident))
        await pipe.execute()
