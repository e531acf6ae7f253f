"""Worker jobs benchmark (issue 11): how many Instagram preview jobs the
workers run, how long a job waits between its enqueue and its start, and how
fast a cached preview is answered.

    .venv/bin/python -m bench.jobs [--jobs 2000] [--rate 50] [--seconds 10] [--samples 300] [--poll-delay 0.05]

Starts its own redis-server and 1, then 4, worker processes. Each is this
script in ``--worker`` mode: arq's ``Worker`` set up as ``talkbridge worker``
sets it up (``workers.settings.worker_options`` and ``build_deps`` from the
same config), running the real ``instagram_preview`` job, whose fetcher is a
no-op (``instagram.FETCHER`` in the job context): the cache lookup, the
breaker, the limiter (limits raised out of the way), the reply written to the
room's outbound stream, everything but Instagram. Each worker notes when each
job starts (arq's ``on_job_start``) and hands the times over when it stops.

1. *burst*: ``--jobs`` jobs enqueued as fast as one client can; jobs/s from
   the first enqueue to the last reply in the stream; enqueue-to-start
   percentiles (mostly queueing: the burst waits for the workers).
2. *paced*: ``--rate`` jobs/s for ``--seconds`` (open loop: job i is enqueued
   at start + i/rate); enqueue-to-start percentiles: what the queue adds to
   a job when the workers keep up (arq's ``poll_delay`` shows here).
3. *cache hit*: a preview already cached; a message with its link goes
   through the real trigger (``InstagramTrigger.consider`` and the arq
   enqueue); the time until the reply is in the room's outbound stream, one
   message at a time after a random pause (up to two poll delays), with one worker.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
from arq.connections import ArqRedis
from arq.worker import Worker
from redis.asyncio import Redis

from adapters import AdapterRegistry
from bridge.bus import bus_for
from bridge.config import Config, load_config
from bridge.events import Event, EventKind
from bridge.options import protocol_specs
from tests.helpers import free_port, start_redis_server
from workers import instagram
from workers.deps import DEPS
from workers.feature_settings import FEATURE_SPECS, WorkersSection
from workers.instagram_cache import PreviewCache
from workers.instagram_fetch import Preview
from workers.instagram_urls import Target
from workers.settings import build_deps, functions, worker_options
from workers.triggers import build_triggers, queue_name

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "api.bench"
STARTS = "bench:jobs:starts"  # each worker's start times, pushed when it stops
READY = "bench:jobs:ready"

CONFIG = """
[api.bench]
BindAddress = "127.0.0.1:{port}"
[api.other]
BindAddress = "127.0.0.1:{port2}"

[[gateway]]
name = "bench"
enable = true
Instagram = true
[[gateway.inout]]
account = "api.bench"
channel = "api"
[[gateway.inout]]
account = "api.other"
channel = "api"

[instagram]
RequestsPerMinute = 1000000000
RoomRequestsPerMinute = 1000000000
DedupeSeconds = 0

[workers]
PollDelay = {poll}

[redis]
URL = "{redis}"
"""


def load(path: Path) -> Config:
    return load_config(path, protocol_specs(AdapterRegistry()), features=FEATURE_SPECS)


class NoopFetcher:
    """Instagram, answering at once with a preview of nothing to download."""

    async def media_preview(self, target: Target) -> Preview:
        return Preview(kind=target.kind, ident=target.ident, link=target.url, author="bench", caption="no-op")

    profile_preview = media_preview


# --worker mode ------------------------------------------------------------------------
async def worker_main(config_path: Path) -> None:
    config = load(config_path)
    redis = Redis.from_url(config.redis.url)
    starts: list[tuple[str, int, int]] = []

    async def on_job_start(ctx: dict) -> None:
        starts.append((ctx["job_id"], int(ctx["enqueue_time"].timestamp() * 1000), time.time_ns() // 1_000_000))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with httpx.AsyncClient() as http:
        deps = build_deps(config, redis, http, logging.getLogger("bench.worker"))
        worker = Worker(
            functions([instagram]),
            redis_pool=ArqRedis(connection_pool=redis.connection_pool),
            handle_signals=False,
            ctx={DEPS: deps, instagram.FETCHER: NoopFetcher()},
            on_job_start=on_job_start,
            **worker_options(config),
        )
        main = asyncio.create_task(worker.async_run())
        await redis.incr(READY)
        await stop.wait()
        main.cancel()
        await asyncio.gather(main, return_exceptions=True)
    if starts:
        await redis.rpush(STARTS, *(orjson.dumps(s) for s in starts))
    await redis.incr(f"{READY}:done")
    await redis.aclose()


# the benchmark ---------------------------------------------------------------------------
def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Bench:
    def __init__(self, config_path: Path, work: Path) -> None:
        self.config_path = config_path
        self.config = load(config_path)
        self.work = work
        self.redis = Redis.from_url(self.config.redis.url)
        self.bus = bus_for(self.config, self.redis)
        prefix = self.bus.prefix
        self.arq = ArqRedis(connection_pool=self.redis.connection_pool)
        self.queue = queue_name(prefix)
        self.outbound = self.bus.outbound(ACCOUNT)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.poll_delay = float(self.config.settings(WorkersSection).poll_delay)

    def source(self, i: int) -> dict:
        event = Event(kind=EventKind.MESSAGE, account=ACCOUNT, channel="api", native_id=str(i), id=f"bench{i:08d}")
        return event.to_dict()

    async def start_workers(self, count: int) -> None:
        await self.redis.delete(READY, f"{READY}:done", STARTS)
        for n in range(count):
            self.procs.append(spawn_worker(self.config_path, self.work / f"worker{count}-{n}.log"))
        deadline = time.monotonic() + 60
        while int(await self.redis.get(READY) or 0) < count:
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise SystemExit("a worker did not start; see the worker logs in " + str(self.work))
            await asyncio.sleep(0.05)

    async def stop_workers(self) -> list[tuple[str, int, int]]:
        count = len(self.procs)
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            proc.wait(60)
        self.procs.clear()
        if int(await self.redis.get(f"{READY}:done") or 0) != count:
            raise SystemExit("a worker did not hand over its start times")
        return [tuple(orjson.loads(raw)) for raw in await self.redis.lrange(STARTS, 0, -1)]  # type: ignore[misc]

    async def wait_replies(self, count: int, within: float = 600) -> float:
        deadline = time.monotonic() + within
        while await self.redis.xlen(self.outbound) < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {await self.redis.xlen(self.outbound)} of {count} replies")
            await asyncio.sleep(0.002)
        return time.monotonic()

    async def enqueue(self, i: int, tag: str) -> None:
        await self.arq.enqueue_job(instagram.JOB, self.source(i), "post", f"Bench{i:07d}", _job_id=f"{tag}:{i}",
                                   _queue_name=self.queue)  # fmt: skip

    async def burst(self, jobs: int) -> float:
        await self.redis.delete(self.outbound)
        t0 = time.monotonic()
        for i in range(jobs):
            await self.enqueue(i, "burst")
        t1 = await self.wait_replies(jobs)
        return jobs / (t1 - t0)

    async def paced(self, rate: float, seconds: float, first: int) -> None:
        await self.redis.delete(self.outbound)
        total = int(rate * seconds)
        t0 = time.monotonic()
        for k in range(total):
            due = t0 + k / rate
            if (delay := due - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            await self.enqueue(first + k, "paced")
        await self.wait_replies(total)

    async def cache_hits(self, samples: int) -> list[float]:
        """Enqueue through the real trigger; the time until the reply is in the room's stream."""
        target = Target("post", "CachedPost1")
        prefix = self.bus.prefix
        cache = PreviewCache(self.redis, prefix, 3600)
        await cache.put(target, Preview(kind="post", ident=target.ident, link=target.url, author="x", caption="y"), [])
        triggers = build_triggers(self.config, self.redis, prefix, logging.getLogger("bench"), features=[instagram])
        assert triggers is not None
        await self.redis.delete(self.outbound)
        last = "0-0"
        latencies = []
        for i in range(samples):
            # a random pause first, over two poll delays: a message arriving right after
            # the worker's last job would always wait its whole poll_delay (arq sleeps
            # after each job), which a lock-step loop would measure every time
            await asyncio.sleep(random.uniform(0, 2 * self.poll_delay + 0.1))
            event = Event(kind=EventKind.MESSAGE, account=ACCOUNT, channel="api", text=f"see {target.url}",
                          native_id=str(i), id=f"hit{i:08d}")  # fmt: skip
            t0 = time.monotonic()
            await triggers.consider(event)
            reply = await self.redis.xread({self.outbound: last}, count=1, block=10_000)
            latencies.append((time.monotonic() - t0) * 1000)
            if not reply:
                raise SystemExit("no reply to a cached link within 10 s")
            last = reply[0][1][0][0]
        return latencies


def spawn_worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "bench.jobs", "--worker", str(config)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip


def latency_ms(starts: list[tuple[str, int, int]], tag: str) -> list[float]:
    return [float(start - enqueued) for job, enqueued, start in starts if job.startswith(tag + ":")]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs in the burst")
    parser.add_argument("--rate", type=float, default=50.0, help="jobs/s in the paced run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the paced run")
    parser.add_argument("--samples", type=int, default=300, help="cached links asked one after another")
    parser.add_argument("--poll-delay", type=float, default=0.05, help="[workers] PollDelay")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        work = Path(tmp)
        server = start_redis_server(work)
        try:
            path = work / "talkbridge.toml"
            path.write_text(CONFIG.format(port=free_port(), port2=free_port(), poll=args.poll_delay, redis=server.url))
            bench = Bench(path, work)
            print(f"cores: {os.cpu_count()}, load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            print(f"PollDelay {args.poll_delay} s; burst of {args.jobs}; paced {args.rate:g}/s for {args.seconds:g} s")
            print("| workers | burst jobs/s | burst enqueue→start p50 / p99 | paced enqueue→start p50 / p99 |")
            print("|---|---|---|---|")
            for count in args.workers:
                await bench.redis.flushall()
                await bench.start_workers(count)
                rate = await bench.burst(args.jobs)
                await bench.paced(args.rate, args.seconds, args.jobs)
                starts = await bench.stop_workers()
                burst, paced = latency_ms(starts, "burst"), latency_ms(starts, "paced")
                print(f"| {count} | {rate:.0f} | {pct(burst, 50):.0f} / {pct(burst, 99):.0f} ms "
                      f"| {pct(paced, 50):.1f} / {pct(paced, 99):.1f} ms |", flush=True)  # fmt: skip
            await bench.redis.flushall()
            await bench.start_workers(1)
            hits = await bench.cache_hits(args.samples)
            await bench.stop_workers()
            print(
                f"cache hit, message -> reply in the room's stream (1 worker, {len(hits)} one after another): "
                f"p50 {pct(hits, 50):.1f} ms, p99 {pct(hits, 99):.1f} ms, mean {statistics.mean(hits):.1f} ms"
            )
            await bench.redis.aclose()
        finally:
            server.stop()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        logging.basicConfig(level=logging.WARNING)
        asyncio.run(worker_main(Path(sys.argv[2])))
    else:
        asyncio.run(main())
