"""Which inbound events start jobs: asked by the daemon's route loop.

Every feature module (registry.py) offers ``trigger(config, redis, prefix)``:
a ``Trigger`` that looks at each inbound event and enqueues the jobs it
wants, or None when the feature is not configured. A trigger runs in the
route loop for every event, so it must be cheap for events that do not
concern it; its job ids are deterministic from the event, because the loop
may handle an event again after a crash and arq refuses a second job with
an id it still knows (queued, running, or its result kept).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.config import Config
from bridge.events import Event
from bridge.keys import queue_name  # the fleet's key: the management page reads the queue too
from workers.results import is_worker_result

# await enqueue("function_name", *args, _job_id="...", _defer_by=None): arq's ArqRedis.enqueue_job
Enqueue = Callable[..., Awaitable[Any]]


class Trigger(Protocol):
    async def consider(self, event: Event, enqueue: Enqueue) -> None: ...


class Triggers:
    """The configured features' triggers, asked in order about each event."""

    def __init__(self, triggers: Sequence[Trigger], enqueue: Enqueue, log: logging.Logger) -> None:
        self.triggers = list(triggers)
        self.enqueue = enqueue
        self.log = log

    async def consider(self, event: Event) -> None:
        """Redis errors propagate (the route loop handles the batch again);
        any other failure of a trigger is this event's and this feature's
        only: logged, and routing goes on."""
        if is_worker_result(event):
            return
        for trigger in self.triggers:
            try:
                await trigger.consider(event, self.enqueue)
            except (RedisError, OSError):
                raise
            except Exception as exc:
                self.log.error("%s: trigger %s failed on %s", event.account, type(trigger).__name__, event.id,
                               exc_info=exc)  # fmt: skip


def build_triggers(
    config: Config,
    redis: Redis,
    prefix: str,
    log: logging.Logger,
    features: Sequence[ModuleType],
    queue: Redis | None = None,
) -> Triggers | None:
    """The daemon's triggers (bridge/relay.py ``EventTriggers``), or None when
    no feature is configured. ``features``: the feature modules, the
    registry's ``FEATURES`` (passed in: the features import this module).
    ``redis``: the bus's, where the triggers keep their own keys (dedupe, a
    persona's room); ``queue``: arq's own Redis ([workers] RedisURL), where
    jobs are enqueued; None: ``redis``."""
    from arq.connections import ArqRedis

    found = [t for t in (feature.trigger(config, redis, prefix) for feature in features) if t is not None]
    if not found:
        return None
    pool = getattr(queue if queue is not None else redis, "connection_pool", None)
    if pool is None:  # Redis Cluster: arq keeps its queue in one key space
        log.error(
            "workers: arq does not run on Redis Cluster; Instagram and persona jobs are off until "
            "[workers] RedisURL names a standalone or Sentinel Redis for the job queue"
        )
        return None
    arq = ArqRedis(connection_pool=pool)
    name = queue_name(prefix)

    async def enqueue(function: str, *args: Any, **kwargs: Any) -> Any:
        return await arq.enqueue_job(function, *args, _queue_name=name, **kwargs)

    return Triggers(found, enqueue, log)
