"""``talkbridge worker``: arq's ``Worker``, configured from ``[workers]``.

Every worker on every machine reads the one queue the daemons enqueue to
(bridge/keys.py queue_name): on the daemons' Redis, or on the queue's own
(``[workers] RedisURL``: arq does not run on Redis Cluster, the bus does).
Only arq's keys live there (the queue, its jobs, results, in-progress marks
and the health key); everything a job reads and writes besides (caches,
rate limits, a persona's room, the answers posted to outbound streams,
alerts, the workers' heartbeat) is the bus's, on ``[redis] URL``. Tuned for latency: arq polls
its queue every ``poll_delay`` seconds when idle, and its default of 0.5 s
adds up to half a second to every job and caps a worker near 200 jobs/s
(docs/benchmarks.md); ``[workers] PollDelay`` defaults to 0.05 s.

arq runs a job at least once: a job stays in the queue until it is done, and
one whose worker died is taken by another worker once its in-progress mark
expires (``JobTimeout`` + 10 s). Jobs are written to be run twice: their
answers are posted once (results.py).

arq's poll loop ends at the first Redis error (a killed master, a Sentinel
failover under way, a job whose result could not be written): ``poll_arq``
starts it again after a pause, so a worker rides out a failover instead of
exiting; the jobs it was running go on meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import httpx
from arq.connections import ArqRedis
from arq.worker import Worker
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.alerts import Alerts, outbound_publisher
from bridge.bus import bus_for
from bridge.config import Config
from bridge.control import announcement
from bridge.keys import queue_name
from workers import heartbeat
from workers.deps import DEPS, WorkerDeps
from workers.feature_settings import WorkersSection
from workers.registry import FEATURES

HEALTH_EVERY = 10.0  # seconds between a worker's health notes
STOP_GRACE = 10.0  # seconds running jobs get to finish when the worker stops
HTTP_TIMEOUT = 60.0  # a job's own timeouts (FetchTimeout, a persona's Timeout) are shorter or explicit
REDIS_PAUSE_FIRST, REDIS_PAUSE_MAX = 0.1, 2.0  # seconds before arq polls again after a Redis error (doubling)


def functions(features: Sequence[ModuleType] = FEATURES) -> list[Any]:
    return [function for feature in features for function in feature.FUNCTIONS]


async def poll_arq(worker: Worker, stop: asyncio.Event, log: logging.Logger) -> None:
    """arq's poll loop (``Worker.main``, which may be entered again: its pool
    and running jobs stay), started again after a Redis error until ``stop``."""
    pause = REDIS_PAUSE_FIRST
    while not stop.is_set():
        try:
            await worker.main()
            return
        except (RedisError, OSError) as exc:
            log.warning("worker: Redis unavailable (%s); polling again in %.1fs", exc, pause)
        try:
            await asyncio.wait_for(stop.wait(), pause)
        except TimeoutError:
            pause = min(pause * 2, REDIS_PAUSE_MAX)


def health_key(prefix: str, host: str | None = None) -> str:
    """Where a worker notes that its loop turns (every HEALTH_EVERY seconds,
    expiring just after): one key per host, which is one worker per container
    (docker-compose.yml's healthcheck reads it)."""
    return f"{queue_name(prefix)}:health:{host or socket.gethostname()}"


def worker_options(config: Config) -> dict[str, Any]:
    """arq ``Worker`` keyword arguments from ``[workers]`` (not the connection)."""
    section = config.settings(WorkersSection)
    prefix = config.redis.key_prefix
    return {
        "queue_name": queue_name(prefix),
        "health_check_key": health_key(prefix),
        "health_check_interval": HEALTH_EVERY,
        "poll_delay": section.poll_delay,
        "max_jobs": section.max_jobs,
        "job_timeout": section.job_timeout,
        "keep_result": section.keep_result_seconds,
        "max_tries": 5,
        # the job ids are ours (deterministic); results are kept only to refuse duplicates
        "log_results": False,
    }


def worker_id() -> str:
    """This worker process's name in alerts and the fleet's log stream."""
    return f"worker-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def build_deps(
    config: Config,
    redis: Redis,
    http: httpx.AsyncClient,
    log: logging.Logger,
    instance_id: str | None = None,
    queue: Redis | None = None,
) -> WorkerDeps:
    """A job's alerts are the fleet's (bridge/alerts.py): recorded in Redis,
    deduplicated across workers and daemons, posted to ``[general] AdminRoom``
    through the admin account's outbound stream, shown on the management page."""
    bus = bus_for(config, redis)
    alerts = Alerts(redis, bus.prefix, config, instance_id or worker_id(), outbound_publisher(bus), log=log)

    async def alert(key: str, text: str, severity: str = "error") -> None:
        await alerts.fire(key, text, severity)

    async def clear_alert(key: str, text: str) -> None:
        await alerts.clear(key, text)

    return WorkerDeps(config, redis, bus, http, log, alert, clear_alert, queue)


async def run_worker(
    config: Config,
    redis: Redis,
    stop: asyncio.Event,
    features: Sequence[ModuleType] = FEATURES,
    instance_id: str | None = None,
    queue: Redis | None = None,
) -> None:
    """Run jobs until ``stop`` is set; jobs in progress then finish or are
    given back to the queue (arq: run again by another worker). ``redis``:
    the bus's; ``queue``: arq's own ([workers] RedisURL), None: ``redis``."""
    log = logging.getLogger("talkbridge.worker")
    pool = getattr(queue if queue is not None else redis, "connection_pool", None)
    if pool is None:  # a RedisCluster: no one connection pool, arq's keys would span slots
        raise RuntimeError(
            "workers: arq does not run on Redis Cluster: set [workers] RedisURL to a standalone or Sentinel Redis"
        )
    ident = instance_id or worker_id()
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, follow_redirects=False) as http:
        deps = build_deps(config, redis, http, log, ident, queue)
        worker = Worker(
            functions(features),
            redis_pool=ArqRedis(connection_pool=pool),
            handle_signals=False,
            ctx={DEPS: deps},
            **worker_options(config),
        )
        log.info("worker %s: %d job functions on queue %s", ident, len(worker.functions), worker.queue_name)
        started = time.time()

        def announce() -> dict[str, str]:
            running = sum(not task.done() for task in worker.tasks.values())
            return announcement(started) | {
                "done": str(worker.jobs_complete),
                "failed": str(worker.jobs_failed),
                "retried": str(worker.jobs_retried),
                "running": str(running),
                "max_jobs": str(worker.max_jobs),
            }

        # on the management page from the start (workers/heartbeat.py), then taking jobs
        beats = asyncio.create_task(heartbeat.heartbeat(redis, deps.prefix, ident, announce, log), name="heartbeat")
        main = asyncio.create_task(poll_arq(worker, stop, log))
        waiter = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([main, waiter], return_when=asyncio.FIRST_COMPLETED)
            if main.done():
                main.result()  # a worker that ended by itself ended with an error
        finally:
            # Stop taking jobs, give the running ones a moment, cancel the rest
            # (arq runs them again elsewhere once their in-progress mark expires).
            # Not Worker.close(): it closes the connection pool, which is ours.
            waiter.cancel()
            main.cancel()
            running = [t for t in worker.tasks.values() if not t.done()]
            if running:
                log.info("worker: stopping, %d job(s) running get %.0fs to finish", len(running), STOP_GRACE)
                _, late = await asyncio.wait(running, timeout=STOP_GRACE)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
            await asyncio.gather(main, waiter, return_exceptions=True)
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)
            await heartbeat.leave(redis, deps.prefix, ident)
