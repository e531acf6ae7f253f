"""The daemon: one shared HTTP server, and one runner per account.

An ``AccountRunner`` competes for the account's lease; the instance that
holds it connects the adapter, routes the account's inbound stream and
delivers its outbound stream. Every instance serves webhook ingress.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.adapter import AccountFailed, Adapter, AdapterContext
from bridge.addresses import parse_hostport
from bridge.alerts import Alerts, outbound_publisher
from bridge.alerts_watch import DaemonWatch, progress, watch_interval
from bridge.bus import DELIVER_GROUP, ROUTER_GROUP, Bus, bus_for
from bridge.config import Config
from bridge.control import (
    AccountControl,
    RateRecorder,
    RestartRequested,
    announce,
    announcement,
    listen,
)
from bridge.delivery import AccountStopped, DeliveryLoop, RetryPolicy
from bridge.events import Event
from bridge.health import clear_degraded, mark_degraded
from bridge.http import StatusAccess, build_app
from bridge.idmap import Fence, Fenced, IdMap
from bridge.keys import instance_key, instances_key
from bridge.lease import Lease
from bridge.listener import Listener, ListenerLimits
from bridge.metrics import Metrics
from bridge.migrate_keys import migrate_account
from bridge.rejections import RejectionLog
from bridge.relay import EventTriggers, RouteLoop
from bridge.router import Router

ACCOUNT_FAILED_PAUSE = 900.0  # after a refused credential, try once more only this much later
CRASH_BACKOFF_MIN = 1.0  # seconds before an account restarts after an unexpected error…
CRASH_BACKOFF_MAX = 60.0  # …doubling while it keeps failing, up to this
CRASH_RESET = 300.0  # an account that ran this long without one starts the backoff over
TASK_RESTART_DELAY = 1.0  # Daemon.run: before a task that ended is started again (doubling)
CONNECT_BACKOFF_MAX = 60.0
REDIS_BACKOFF_MAX = 10.0
GAUGES_MAX_AGE = 1.0  # seconds: /metrics scrapes within this share one read of the stream gauges
RECEIVE_BACKOFF_MIN = 1.0  # seconds before a receive loop that died runs again…
RECEIVE_BACKOFF_MAX = 60.0  # …doubling while it keeps dying, up to this (then jittered)
RECEIVE_STEADY = 60.0  # a receive loop that ran this long before dying starts the backoff over


def receive_restart_delay(failures: int, rng: random.Random) -> float:
    """The pause before the ``failures``-th consecutive restart of a receive
    loop: capped exponential, half of it random, so the accounts of a fleet
    that lost one server together do not all hit it again at the same instant."""
    step = min(RECEIVE_BACKOFF_MIN * 2 ** (failures - 1), RECEIVE_BACKOFF_MAX)
    return step / 2 + rng.uniform(0, step / 2)


class LeaseLost(Exception):
    pass


class LeaseShed(Exception):
    """This instance holds more than its share; hand one account over."""


class AccountRunner:
    def __init__(self, daemon: Daemon, adapter: Adapter, name: str) -> None:
        self.d = daemon
        self.adapter = adapter
        self.name = name
        self.log = logging.getLogger(f"talkbridge.{name}")
        self.lease = Lease(daemon.redis, daemon.bus.prefix, name, daemon.instance_id, daemon.lease_seconds)
        self.connected = False
        self.owned = False
        # Why the adapter's receive loop is not running while the account is
        # owned here (None: running, or the adapter has none): /readyz shows
        # the account as degraded meanwhile.
        self.receive_down: str | None = None
        # The pause before a receive loop is started again; a test holds it to
        # look at the degraded state.
        self.restart_pause: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._rng = random.Random()  # the restart jitter; per runner, not the module's shared one
        self._free_since: float | None = None
        # what the admin-room alerts look at (bridge/alerts_watch.py, DaemonWatch)
        self.refused: str | None = None  # why the credentials were refused, until the account works again
        self.refused_at: float | None = None
        self.receive_since: float | None = None  # the receive loop's last start while owned
        self.tenure: tuple[float, float] = (0.0, 0.0)  # (start, events in+out then) of this ownership
        self.delivery: DeliveryLoop | None = None
        # operators' requests (pause, restart) and the state the admin page shows: bridge/control.py
        self.control = AccountControl(daemon.redis, daemon.bus.prefix, name, daemon.instance_id, daemon.lease_seconds)

    async def _may_take(self) -> bool:
        """Balance accounts over the live instances: take a free lease only
        while under our share — or when nobody has taken it for two lease
        periods (the others may be full or gone)."""
        if self.d.owned_count() < self.d.fair_share():
            return True
        if await self.lease.holder() is not None:
            self._free_since = None
            return False
        now = time.monotonic()
        if self._free_since is None:
            self._free_since = now
        return now - self._free_since >= 2 * self.d.lease_seconds

    async def run(self) -> None:
        """Compete for the account and serve it while owned; never ends.

        Nothing that happens while serving it ends this loop: an exception
        nobody foresaw (a bug, a poison input that escaped containment) is
        logged with its traceback and counted, and the account starts over
        after a growing pause — the daemon and its other accounts go on."""
        poll = self.d.lease_seconds / 3
        crash_pause = CRASH_BACKOFF_MIN
        while True:
            try:
                held = await self._may_take() and await self.lease.acquire()
            except (RedisError, OSError) as exc:
                self.log.warning("%s: lease check failed: %s", self.name, exc)
                held = False
            except Exception:
                self.log.exception("%s: lease check failed unexpectedly", self.name)
                held = False
            if not held:
                await asyncio.sleep(poll)
                continue
            self._free_since = None
            self.owned = True
            self.tenure = (time.monotonic(), progress(self.d.metrics, self.name))
            self.log.info("%s: this instance owns the account", self.name)
            cooldown = 0.0
            started = time.monotonic()
            try:
                await self._owned()
            except* (LeaseLost, Fenced):
                # Fenced: a write carried a stale lease token (we stalled past
                # the lease and another instance took over): stop at once.
                self.log.warning("%s: lease lost, stopping the account here", self.name)
            except* LeaseShed:
                self.log.info("%s: handing the account to a less loaded instance", self.name)
                cooldown = 2 * self.d.lease_seconds  # let another instance take it
            except* RestartRequested:
                self.log.warning("%s: restarting the account's connection, as an operator asked", self.name)
            except* (RedisError, OSError) as group:
                self.log.error("%s: Redis trouble, restarting the account: %s", self.name, group.exceptions[0])
                cooldown = poll
            except* Exception as group:
                if time.monotonic() - started >= CRASH_RESET:
                    crash_pause = CRASH_BACKOFF_MIN  # a new fault, not the same one again
                for exc in group.exceptions:
                    self.log.error(
                        "%s: unexpected error, restarting the account in %.0fs", self.name, crash_pause, exc_info=exc
                    )
                self.d.metrics.account_restarts.labels(self.name).inc()
                cooldown = crash_pause
                crash_pause = min(crash_pause * 2, CRASH_BACKOFF_MAX)
            finally:
                self.owned = False
                self.connected = False
                self.d.metrics.account_connected.labels(self.name).set(0)
                await self._disconnect()
                try:
                    await asyncio.shield(self.lease.release())
                except (RedisError, OSError) as exc:  # it expires by itself
                    self.log.warning("%s: could not hand the lease back: %s", self.name, exc)
                with contextlib.suppress(RedisError, OSError):  # it expires by itself
                    await asyncio.shield(self.control.clear_state())
            await asyncio.sleep(cooldown)

    async def _owned(self) -> None:
        # keys an upgrade left in the old layout, moved before anything reads them (bridge/migrate_keys.py)
        await migrate_account(self.d.redis, self.d.bus.prefix, self.name, self.log)
        self.control.begin()
        with contextlib.suppress(RedisError, OSError):  # a pause set before we took over holds from the start
            await self.control.refresh()
        async with asyncio.TaskGroup() as tg:
            renew = tg.create_task(self._renew())
            tg.create_task(self.control.obey(self.log))
            await self._connect()
            tg.create_task(self._route())
            tg.create_task(self._deliver())
            if self.adapter.has_receive_loop():
                tg.create_task(self._receive(), name=f"receive:{self.name}")
            await renew  # ends only by raising LeaseLost; the group cancels the rest

    async def _renew(self) -> None:
        interval = self.d.lease_seconds / 3
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self.lease.renew():
                    raise LeaseLost(self.name)  # expired and maybe taken: stop now
                renewed = time.monotonic()
                if self.d.should_shed():
                    raise LeaseShed(self.name)
            except (RedisError, OSError) as exc:
                # Redis unreachable: nobody can take the lease meanwhile, so
                # keep serving (ingress answers 503) until it would have
                # expired; past that another instance may own the account.
                if time.monotonic() - renewed >= self.d.lease_seconds:
                    raise LeaseLost(self.name) from exc

    async def _connect(self) -> None:
        delay = 1.0
        while True:
            try:
                await self.adapter.connect()
                for channel in self.adapter.ctx.channels:
                    await self.adapter.join(channel)
                break
            except Exception as exc:
                self.log.error("%s: connect failed: %s; retry in %.0fs", self.name, exc, delay)
                self.control.set_state("failed", f"connect failed: {exc}")
                await self._disconnect()
                await asyncio.sleep(delay)
                delay = min(delay * 2, CONNECT_BACKOFF_MAX)
        self.connected = True
        self.d.metrics.account_connected.labels(self.name).set(1)
        self.control.set_state("connected")

    async def _disconnect(self) -> None:
        """Close the adapter; a failure is logged (a port left bound would
        otherwise fail the next connect with no clue), never raised."""
        try:
            await self.adapter.disconnect()
        except Exception as exc:
            self.log.warning("%s: disconnect failed: %s: %s", self.name, type(exc).__name__, exc)

    async def _receive(self) -> None:
        """Run the adapter's receive loop while the account is owned here.

        It should never end: one that raises or returns is logged and started
        again after a capped, jittered backoff, and the account is degraded
        until then. Only cancellation (lease lost, shutdown) ends this; a
        stale lease token (Fenced) stops the account like any other write."""
        failures = 0
        try:
            while True:
                await self._receive_up()
                started = time.monotonic()
                pause: float | None = None
                try:
                    await self.adapter.receive()
                    why = "returned"
                    self.log.error("%s: the receive loop returned; it should run for ever", self.name)
                except Fenced:
                    raise
                except AccountFailed as exc:
                    # Never retry a refused credential soon: Nextcloud's
                    # brute-force protection would lock the bridge's IP out.
                    why = f"credentials refused ({exc})"
                    self.log.critical("%s: receive loop: %s; paused for %.0fs", self.name, why, ACCOUNT_FAILED_PAUSE)
                    await self.adapter.ctx.credentials_refused(str(exc))  # the gauge and the watch's state
                    self.control.set_state("failed", why)
                    pause = ACCOUNT_FAILED_PAUSE
                    await self._refused(str(exc))
                except Exception as exc:
                    why = f"raised {type(exc).__name__}: {exc}"
                    self.log.error("%s: the receive loop raised", self.name, exc_info=exc)
                if time.monotonic() - started >= RECEIVE_STEADY:
                    failures = 0  # a new fault, not the same one again
                failures += 1
                if pause is None:
                    pause = receive_restart_delay(failures, self._rng)
                await self._receive_stopped(f"receive loop {why}; restart {failures} in {pause:.1f}s", pause)
                await self.restart_pause(pause)
                await self.adapter.ctx.credentials_accepted()  # tried again: not refused until told so
                self.control.set_state("connected")
                self.d.metrics.receive_restarts.labels(self.name).inc()
        finally:
            self.receive_down = None  # not owned any more: nothing to be degraded
            self.receive_since = None

    async def _receive_stopped(self, reason: str, pause: float) -> None:
        self.receive_down = reason
        self.log.warning("%s: degraded: %s", self.name, reason)
        try:
            await mark_degraded(self.d.redis, self.d.bus.prefix, self.name, reason, pause + self.d.lease_seconds)
        except (RedisError, OSError) as exc:  # /readyz still says it; the status command will not
            self.log.warning("%s: could not record the degraded state: %s", self.name, exc)

    async def _receive_up(self) -> None:
        self.receive_down = None
        self.receive_since = time.monotonic()
        try:
            # also clears a mark a previous owner of the account left behind
            await clear_degraded(self.d.redis, self.d.bus.prefix, self.name)
        except (RedisError, OSError) as exc:  # it expires by itself
            self.log.warning("%s: could not clear the degraded state: %s", self.name, exc)

    async def _route(self) -> None:
        loop = RouteLoop(
            self.d.bus, self.d.router, self.name, self.d.instance_id, self.d.metrics, self.log, self.d.triggers
        )
        loop.wait_unpaused = self.control.pause_gate.wait  # paused from the admin page: routing waits
        await self._survive_redis(loop.run)

    async def _survive_redis(self, run: Callable[[], Awaitable[None]]) -> None:
        """Run a stream loop; when Redis is away, wait and start it again.

        Restarting is safe: a loop begins by taking over what is pending."""
        delay = 0.5
        while True:
            started = time.monotonic()
            try:
                await run()
            except (RedisError, OSError) as exc:
                if time.monotonic() - started > 60:
                    delay = 0.5  # a new outage, not the same one
                self.log.error("%s: Redis unavailable (%s); retry in %.1fs", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, REDIS_BACKOFF_MAX)

    async def _deliver(self) -> None:
        loop = DeliveryLoop(
            self.d.bus,
            self.d.idmap,
            self.adapter,
            self.name,
            self.d.instance_id,
            self.d.metrics,
            self.log,
            self.d.retry,
            fence=self.adapter.ctx.fence,  # the same token the adapter's own scripts carry
            wait_unpaused=self.control.pause_gate.wait,  # paused from the admin page: sends wait
        )
        self.delivery = loop
        while True:
            try:
                await self._survive_redis(loop.run)
            except AccountStopped as exc:
                # Never retry a refused credential in a loop: Nextcloud's
                # brute-force protection would lock the bridge's IP out.
                self.log.critical(
                    "%s: credentials refused (%s); delivery paused for %.0fs — fix the account and restart",
                    self.name, exc, ACCOUNT_FAILED_PAUSE,
                )  # fmt: skip
                self.control.set_state("failed", f"credentials refused: {exc}")
                await self.adapter.ctx.credentials_refused(str(exc))
                await self._refused(str(exc))
                await asyncio.sleep(ACCOUNT_FAILED_PAUSE)
                await self.adapter.ctx.credentials_accepted()  # tried again: not refused until told so
                self.control.set_state("connected")

    # for the admin-room alerts (bridge/alerts.py) ----------------------------------------
    async def _refused(self, why: str) -> None:
        """The account's credentials were refused: alert at once (the watch
        clears it once the account has worked again)."""
        self.refused, self.refused_at = why, time.monotonic()
        await self.d.watch.account_refused(self.name, why)

    def has_receive_loop(self) -> bool:
        return self.adapter.has_receive_loop()

    def failing_rooms(self) -> dict[str, str]:
        """Rooms whose deliveries are waiting to be retried right now."""
        loop = self.delivery
        if loop is None or not self.owned:
            return {}
        return dict.fromkeys(
            loop.parked_rooms(),
            "delivering to it keeps failing (retried; dead-lettered after MaxDeliveries unless its server is away)",
        )


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
    ) -> None:
        self.config = config
        self.redis = redis
        self.metrics = metrics or Metrics()
        self.instance_id = instance_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        bus_cfg = config.bus
        self.bus = bus_for(config, redis)
        self.map_ttl = int(bus_cfg.message_map_days * 86400)
        self.idmap = IdMap(redis, self.bus.prefix, self.map_ttl, bus_cfg.message_map_per_room, bus_cfg.batch_size)
        self.router = Router(config)
        # the workers' features (Instagram previews, personas): which inbound events start jobs;
        # built by the CLI (workers/triggers.py), None: no feature configured
        self.triggers = triggers
        self.lease_seconds = float(bus_cfg.lease_seconds)
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
        """Announce this instance; count the live ones (a sorted set of expiries)."""
        now_ms = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.instances_key, {self.instance_id: now_ms + int(self.lease_seconds * 1000)})
        pipe.zremrangebyscore(self.instances_key, "-inf", now_ms)
        pipe.zcard(self.instances_key)
        # what the admin page shows of this instance (bridge/control.py), expiring with the heartbeat
        announce(pipe, instance_key(self.bus.prefix, self.instance_id), announcement(self.started),
                 int(self.lease_seconds * 2000))  # fmt: skip
        self.live_instances = max(1, (await pipe.execute())[2])

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            with contextlib.suppress(RedisError, OSError):  # keep the last count meanwhile
                await self._heartbeat_once()
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
        app = build_admin_app(self.config, self.redis, log, self.rejections, self.metrics)
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
