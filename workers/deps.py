"""What a job gets: ``ctx["deps"]``, one ``WorkerDeps`` per worker process."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
from redis.asyncio import Redis

from bridge.bus import Bus
from bridge.config import Config

DEPS = "deps"  # the key of the WorkerDeps in arq's job context


@dataclass(slots=True)
class WorkerDeps:
    config: Config
    redis: Redis  # decode_responses=False
    bus: Bus
    http: httpx.AsyncClient  # one shared client, no base URL
    log: logging.Logger
    # An admin-room alert, deduplicated by key: (key, text, severity "error" | "critical")
    alert: Callable[[str, str, str], Awaitable[None]]
    clear_alert: Callable[[str, str], Awaitable[None]]  # (key, text): the condition is over
    # arq's queue, when it has a Redis of its own ([workers] RedisURL); None: it is on ``redis``
    queue: Redis | None = None

    @property
    def queue_redis(self) -> Redis:
        """Where arq's keys are: a job that enqueues another enqueues here."""
        return self.queue if self.queue is not None else self.redis

    async def server_time(self) -> float:
        """Redis's clock in seconds: the one clock every worker on every machine shares."""
        seconds, micros = await self.redis.time()
        return seconds + micros / 1e6

    @property
    def prefix(self) -> str:
        return self.bus.prefix
