"""The daemon: one shared HTTP server, and one runner per account.

An ``AccountRunner`` (bridge/account_runner.py) competes for the account's
lease; the instance that holds it connects the adapter, routes the account's
inbound stream and delivers its outbound stream. Every instance serves
webhook ingress. This module is the daemon's lifecycle (its tasks, the
heartbeat, the control channel) and what it reports (/readyz, /metrics, the
management page's listener).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.account_runner import CRASH_BACKOFF_MAX, AccountRunner
from bridge.adapter import Adapter, AdapterContext
from bridge.addresses import parse_hostport
from bridge.alerts import Alerts, outbound_publisher
from bridge.alerts_watch import DaemonWatch, watch_interval
from bridge.bus import DELIVER_GROUP, ROUTER_GROUP, Bus, bus_for
from bridge.config import Config
from bridge.control import (
    RateRecorder,
    announce,
    announcement,
    listen,
)
from bridge.delivery import RetryPolicy
from bridge.events import Event
from bridge.http import StatusAccess, build_app
from bridge.idmap import Fence, IdMap
from bridge.keys import instance_key, instances_key
from bridge.lease import Liveness
from bridge.listener import Listener, ListenerLimits
from bridge.metrics import Metrics
from bridge.redis_watch import RedisWatch
from bridge.rejections import RejectionLog
from bridge.relay import EventTriggers
from bridge.router import Router

TASK_RESTART_DELAY = 1.0  # Daemon.run: before a task that ended is started again (doubling)
GAUGES_MAX_AGE = 1.0  # seconds: /metrics scrapes within this share one read of the stream gauges


def adapter_context(
    config: Config,
    name: str,
    redis: Redis,
    publish: Callable[[Event], Awaitable[str]],
    metrics: Metrics,
    key_prefix: str,
    idmap: IdMap,
    fence: Callable[[], Fence | None] = lambda: None,
    rejections: RejectionLog | None = None,
    bus: Bus | None = None,
) -> AdapterContext:
    """The ``AdapterContext`` of account ``name``: what the daemon hands each
    adapter (the tests' in-process rigs build theirs here too). ``rejections``:
    where refused requests are summed up (one of its own when None)."""
    log = logging.getLogger(f"talkbridge.{name}")
    return AdapterContext(
        account=config.accounts[name],
        publish=publish,
        redis=redis,
        metrics=metrics,
        log=log,
        channels=config.channels_of(name),
        sends_into={
            gw.name: e.channel for gw in config.gateways for e in gw.entries if e.account == name and e.can_send
        },
        key_prefix=key_prefix,
        max_body=config.http.max_body_bytes,
        http_limits=ListenerLimits.from_section(config.http),
        idmap=idmap,
        fence=fence,
        rejections=rejections or RejectionLog(logging.getLogger("talkbridge.rejections")),
        bus=bus,
    )


class Daemon:
    def __init__(
        self,
        config: Config,
        redis: Redis,
        adapters: Mapping[str, type[Adapter]],
        metrics: Metrics | None = None,
        instance_id: str | None = None,
        triggers: EventTriggers | None = None,
        queue_redis: Redis | None = None,
    ) -> None:
        self.config = config
        self.redis = redis
        self.metrics = metrics or Metrics()
        self.instance_id = instance_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        bus_cfg = config.bus
        self.bus = bus_for(config, redis)
        self.metrics.redis_min_replicas.set(self.bus.settings.min_replicas)  # what acknowledgements wait for
        self.redis_watch = RedisWatch(redis, self.bus.prefix, self.metrics, self.instance_id)
        self.map_ttl = int(bus_cfg.message_map_days * 86400)
        self.idmap = IdMap(redis, self.bus.prefix, self.map_ttl, bus_cfg.message_map_per_room, bus_cfg.batch_size)
        self.router = Router(config)
        # the workers' features (Instagram previews, personas): which inbound events start jobs;
        # built by the CLI (workers/triggers.py), None: no feature configured
        self.triggers = triggers
        # the job queue's own Redis ([workers] RedisURL; None: this one): the page counts its jobs there
        self.queue_redis = queue_redis
        self.lease_seconds = float(bus_cfg.lease_seconds)
        # a dead instance's accounts are taken over after this (bridge/lease.py, Liveness)
        self.takeover_seconds = bus_cfg.takeover_window
        self.retry = RetryPolicy(bus_cfg.max_deliveries, bus_cfg.retry_base_seconds, bus_cfg.retry_max_seconds)
        self.max_body = config.http.max_body_bytes
        self.http_limits = ListenerLimits.from_section(config.http)
        self.status_access = StatusAccess.from_section(config.http)
        # refused requests of every listener and account here, summed up (bridge/rejections.py)
        self.rejections = RejectionLog(logging.getLogger("talkbridge.rejections"))
        self.runners: dict[str, AccountRunner] = {}
        self.instances_key = instances_key(self.bus.prefix)
        self.started = time.time()
        self.rates = RateRecorder(redis, self.bus.prefix, self.metrics.events_in, self.metrics.events_out)
        self.live_instances = 1
        self.liveness = Liveness(redis, self.bus.prefix, self.instance_id, self.takeover_seconds)
        self._announced_at = -math.inf
        self._members: set[str] = set()  # the instances set at the last heartbeat
        self._shed_until = 0.0
        self._gauges_lock = asyncio.Lock()
        self._gauges_at = -math.inf
        self.gauges_max_age = GAUGES_MAX_AGE
        for name, acct in config.accounts.items():
            ctx = adapter_context(
                config, name, redis, self.publish, self.metrics, self.bus.prefix, self.idmap,
                fence=functools.partial(self._fence, name), rejections=self.rejections, bus=self.bus,
            )  # fmt: skip
            self.runners[name] = AccountRunner(self, adapters[acct.protocol](ctx), name)
        # admin-room alerts (bridge/alerts.py): what this instance sees, fired and cleared fleet-wide
        self.alerts = Alerts(redis, self.bus.prefix, config, self.instance_id, outbound_publisher(self.bus))
        self.watch = DaemonWatch(
            self.alerts, self.runners, self.metrics, self.instances_key, self.bus.dlq, self.bus.entries_after,
            interval=watch_interval(self.alerts.settings, self.lease_seconds),
            health={name: runner.adapter.ctx.health for name, runner in self.runners.items()},
        )  # fmt: skip
        self._site: web.TCPSite | None = None

    # balancing accounts over instances --------------------------------------------
    def owned_count(self) -> int:
        return sum(1 for runner in self.runners.values() if runner.owned)

    def fair_share(self) -> int:
        return max(1, math.ceil(len(self.runners) / self.live_instances))

    def should_shed(self) -> bool:
        """One account at a time, when another instance has joined."""
        now = time.monotonic()
        if self.owned_count() > self.fair_share() and now >= self._shed_until:
            self._shed_until = now + 2 * self.lease_seconds
            return True
        return False

    async def _heartbeat_once(self) -> None:
        """Announce this instance; count the live ones; take over from dead ones.

        The instances sorted set (id -> expiry, a lease ahead on this host's
        clock) says who is in the fleet; the alive keys (bridge/lease.py,
        Liveness) say, within a takeover window on Redis's clock, who of
        them still beats. Until this instance's own beats have been steady
        for a window it judges nobody and counts every member as live."""
        may_judge = await self.liveness.beat()
        now_ms = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.instances_key, {self.instance_id: now_ms + int(self.lease_seconds * 1000)})
        pipe.zremrangebyscore(self.instances_key, "-inf", now_ms)
        pipe.zrange(self.instances_key, 0, -1)
        if time.monotonic() - self._announced_at >= self.lease_seconds / 3:
            # what the admin page shows of this instance (bridge/control.py), expiring with the heartbeat
            announce(pipe, instance_key(self.bus.prefix, self.instance_id), announcement(self.started),
                     int(self.lease_seconds * 2000))  # fmt: skip
            self._announced_at = time.monotonic()
        members = [m.decode() for m in (await pipe.execute())[2]]
        left = self._members - set(members)  # stopped cleanly (or expired): their leases are free or soon
        self._members = set(members)
        if not may_judge:
            self.live_instances = max(1, len(members))
            if left:
                self._wake_idle_runners()
            return
        dead, self.live_instances = await self.liveness.judge(members)
        self.live_instances = max(1, self.live_instances)
        if dead:
            await self._take_over(dead)
        if dead or left:
            self._wake_idle_runners()

    async def _take_over(self, dead: set[str]) -> None:
        """Delete the leases that still name a dead instance; the runners
        acquire them (raising the fence) once woken."""
        try:
            for name, runner in self.runners.items():
                if runner.owned:
                    continue
                holder = await runner.lease.holder()
                if holder in dead and await runner.lease.take_over(holder):
                    self.metrics.lease_takeovers.labels(name).inc()
                    runner.log.warning(
                        "%s: instance %s has not beaten for %gs: taking its lease over",
                        name, holder, self.takeover_seconds,
                    )  # fmt: skip
        except (RedisError, OSError) as exc:
            self.liveness.retry(dead)  # the next beat tries again
            logging.getLogger("talkbridge").warning("taking over from %s failed: %s", ", ".join(sorted(dead)), exc)

    def _wake_idle_runners(self) -> None:
        for runner in self.runners.values():
            if not runner.owned:
                runner.wake()

    async def _heartbeat(self) -> None:
        last_flush = time.monotonic()
        while True:
            await asyncio.sleep(self.takeover_seconds / 3)
            try:
                await self._heartbeat_once()
            except (RedisError, OSError):  # keep the last count meanwhile
                self.liveness.lapsed()
            if time.monotonic() - last_flush >= self.lease_seconds / 3:
                last_flush = time.monotonic()
                with contextlib.suppress(RedisError, OSError):  # added to the next flush
                    await self.rates.flush()

    def _poke(self, account: str) -> None:
        runner = self.runners.get(account)
        if runner is not None and runner.owned:
            runner.control.poke()

    async def _control(self) -> None:
        await listen(self.redis, self.bus.prefix, self._poke, logging.getLogger("talkbridge.control"))

    def _fence(self, account: str) -> Fence | None:
        """The lease token the account's writes carry (None before the runner exists)."""
        runner = self.runners.get(account)
        return runner.lease.fence if runner is not None else None

    async def publish(self, event: Event) -> str:
        return await self.bus.publish(event)

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        detail: dict[str, Any] = {"redis": "ok", "accounts": {}}
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            detail["redis"] = f"unreachable: {exc}"
            return False, detail
        ready = True
        for name, runner in self.runners.items():
            if runner.connected:
                # Degraded is still ready: webhooks, routing and delivery go on
                # here, and another instance would not receive any better.
                down = runner.receive_down
                detail["accounts"][name] = f"degraded: {down}" if down else "connected"
                continue
            holder = await runner.lease.holder()
            if holder and holder != self.instance_id:
                detail["accounts"][name] = f"owned by {holder}"
            else:
                detail["accounts"][name] = "not connected"
                ready = False
        return ready, detail

    def streams(self) -> list[tuple[str, str]]:
        out = []
        for name in self.runners:
            out.append((self.bus.inbound(name), ROUTER_GROUP))
            out.append((self.bus.outbound(name), DELIVER_GROUP))
        return out

    async def refresh_metrics(self) -> None:
        """Read the stream gauges from Redis, at most once per ``gauges_max_age``.

        Every /metrics request asks for them; concurrent and back-to-back scrapes
        share one refresh, so a client looping on /metrics cannot turn into a
        load on Redis (each refresh is a few commands per stream, and on Redis 6.2
        a count of each backlog)."""
        async with self._gauges_lock:
            if time.monotonic() - self._gauges_at < self.gauges_max_age:
                return
            await self._refresh_gauges()
            self._gauges_at = time.monotonic()

    async def _refresh_gauges(self) -> None:
        for stream, group in self.streams():
            st = await self.bus.stream_status(stream, group)
            self.metrics.stream_length.labels(stream).set(st["length"])
            self.metrics.stream_lag.labels(stream).set(st["lag"])
            self.metrics.stream_pending.labels(stream).set(st["pending"])
            self.metrics.stream_oldest_pending.labels(stream).set(st["oldest_pending_s"])
        self.metrics.dlq_length.set(await self.redis.xlen(self.bus.dlq))

    async def start_http(self) -> Listener | None:
        bind = self.config.http.bind_address
        if not bind:
            return None
        ingress = [route for runner in self.runners.values() for route in runner.adapter.ingress_routes()]
        log = logging.getLogger("talkbridge.http")
        app = build_app(
            self.metrics, self.readiness, self.refresh_metrics, ingress, self.max_body, log,
            access=self.status_access, rejections=self.rejections,
        )  # fmt: skip
        host, port = parse_hostport(bind)  # type: ignore[misc]
        listener = Listener(app, bind, self.http_limits, log)
        await listener.start(host, port)
        limits = self.http_limits
        access = self.status_access
        logging.getLogger("talkbridge").info(
            "http: listening on %s (request timeout %gs, idle timeout %gs, at most %d connections); "
            "/metrics and /readyz's detail to %s%s",
            bind, limits.request_timeout, limits.idle_timeout, limits.max_connections,
            ", ".join(map(str, access.networks)) or "no address", " and MetricsToken's bearer" if access.token else "",
        )  # fmt: skip
        return listener

    async def start_admin(self) -> Listener | None:
        """The management page (bridge/admin), when [admin] User and Password are set.

        A port already taken (another instance on this host serves it) is
        logged and the daemon runs on without the page."""
        admin = self.config.admin
        if not (admin.user and admin.password):
            return None
        from bridge.admin.web import build_admin_app  # Jinja2 only where the page is served

        log = logging.getLogger("talkbridge.admin")
        bind = admin.bind_address
        host, port = parse_hostport(bind)  # type: ignore[misc]
        app = build_admin_app(self.config, self.redis, log, self.rejections, self.metrics, self.queue_redis)
        listener = Listener(app, bind, self.http_limits, log)
        try:
            await listener.start(host, port)
        except OSError as exc:
            log.error("admin: cannot listen on %s (%s); this instance serves no management page", bind, exc)
            return None
        log.info("admin: the management page listens on http://%s", bind)
        return listener

    @staticmethod
    async def _after(pause: float, start: Callable[[], Awaitable[None]]) -> None:
        await asyncio.sleep(pause)
        await start()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set. One account's trouble never ends it: a
        task that ends anyway (it should not: each loops for ever) is logged
        and started again after a pause; the other accounts are untouched."""
        http = await self.start_http()
        admin = await self.start_admin()
        log = logging.getLogger("talkbridge")
        starts: dict[str, Callable[[], Awaitable[None]]] = {"heartbeat": self._heartbeat, "control": self._control}
        starts["alerts"] = self.watch.run
        starts["rejections"] = self.rejections.run  # the summaries of refused requests, as they fall due
        starts["redis"] = self.redis_watch.run  # the master, its replicas, failovers
        with contextlib.suppress(RedisError, OSError):
            await self._heartbeat_once()
        starts.update({f"account:{n}": r.run for n, r in self.runners.items()})
        pauses = dict.fromkeys(starts, TASK_RESTART_DELAY)
        running = {asyncio.create_task(start(), name=name): name for name, start in starts.items()}
        waiter = asyncio.create_task(stop.wait())
        try:
            while True:
                done, _ = await asyncio.wait([waiter, *running], return_when=asyncio.FIRST_COMPLETED)
                if waiter in done:
                    return
                for task in done:
                    name = running.pop(task)
                    exc = None if task.cancelled() else task.exception()
                    pause = pauses[name]
                    pauses[name] = min(pause * 2, CRASH_BACKOFF_MAX)
                    log.error("%s ended unexpectedly (%r); starting it again in %.0fs", name, exc, pause, exc_info=exc)
                    running[asyncio.create_task(self._after(pause, starts[name]), name=name)] = name
        finally:
            tasks = list(running)
            waiter.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(waiter, *tasks, return_exceptions=True)
            self.rejections.flush(force=True)  # what was counted and not yet said
            if http is not None:
                await http.cleanup()
            if admin is not None:
                await admin.cleanup()
            with contextlib.suppress(RedisError, OSError):
                await self.redis.zrem(self.instances_key, self.instance_id)
                await self.redis.delete(instance_key(self.bus.prefix, self.instance_id))
                await self.liveness.leave()
