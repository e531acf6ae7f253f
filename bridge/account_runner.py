"""One account's runner: who owns the account, and serving it while owned.

An ``AccountRunner`` competes for the account's lease (bridge/lease.py),
balancing accounts over the live instances (``Daemon.fair_share``); the
instance that holds it connects the adapter, routes the account's inbound
stream, delivers its outbound stream and runs its receive loop, each
restarted on its own after a failure (capped backoffs), until the lease is
lost or handed over. The daemon (bridge/daemon.py) starts one per account
and keeps what they share: the Redis client, the bus, the metrics.

A runner that does not hold the lease tries again every third of a lease
period, or at once when the daemon's heartbeat wakes it: a peer stopped
(its leases were handed back) or died (the heartbeat deleted the leases
that named it, bridge/lease.py ``Liveness``), so a dead instance's
accounts move within a takeover window, not a lease length.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from bridge.adapter import AccountFailed, Adapter
from bridge.alerts_watch import progress
from bridge.control import AccountControl, RestartRequested
from bridge.delivery import AccountStopped, DeliveryLoop
from bridge.health import clear_degraded, mark_degraded
from bridge.idmap import Fenced
from bridge.lease import Lease
from bridge.migrate_keys import migrate_account
from bridge.receiver import MAX_DOUBLINGS
from bridge.relay import RouteLoop

if TYPE_CHECKING:
    from bridge.daemon import Daemon

ACCOUNT_FAILED_PAUSE = 900.0  # after a refused credential, try once more only this much later
CRASH_BACKOFF_MIN = 1.0  # seconds before an account restarts after an unexpected error…
CRASH_BACKOFF_MAX = 60.0  # …doubling while it keeps failing, up to this
CRASH_RESET = 300.0  # an account that ran this long without one starts the backoff over
CONNECT_BACKOFF_MAX = 60.0
REDIS_BACKOFF_MAX = 10.0
RECEIVE_BACKOFF_MIN = 1.0  # seconds before a receive loop that died runs again…
RECEIVE_BACKOFF_MAX = 60.0  # …doubling while it keeps dying, up to this (then jittered)
RECEIVE_STEADY = 60.0  # a receive loop that ran this long before dying starts the backoff over


def receive_restart_delay(failures: int, rng: random.Random) -> float:
    """The pause before the ``failures``-th consecutive restart of a receive
    loop: capped exponential, half of it random, so the accounts of a fleet
    that lost one server together do not all hit it again at the same instant."""
    step = min(RECEIVE_BACKOFF_MIN * 2 ** min(failures - 1, MAX_DOUBLINGS), RECEIVE_BACKOFF_MAX)
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
        # set by the daemon's heartbeat when a peer died or left: try for the lease now, not at the next poll
        self._woken = asyncio.Event()
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
                await self._idle(poll)
                continue
            self._free_since = None
            self.owned = True
            self.tenure = (time.monotonic(), progress(self.d.metrics, self.name))
            self.log.info("%s: this instance owns the account", self.name)
            cooldown = 0.0
            wakeable = False  # may the heartbeat cut the cooldown short (a peer died or left)?
            started = time.monotonic()
            try:
                await self._owned()
            except* (LeaseLost, Fenced):
                # Fenced: a write carried a stale lease token (we stalled past
                # the lease and another instance took over): stop at once.
                self.log.warning("%s: lease lost, stopping the account here", self.name)
            except* LeaseShed:
                self.log.info("%s: handing the account to a less loaded instance", self.name)
                cooldown = 2 * self.d.lease_seconds  # let another instance take it…
                wakeable = True  # …unless that instance dies or leaves meanwhile
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
                self.adapter.ctx.health.disowned()  # the next owner reports the account's health
                await self._disconnect()
                try:
                    await asyncio.shield(self.lease.release())
                except (RedisError, OSError) as exc:  # it expires by itself
                    self.log.warning("%s: could not hand the lease back: %s", self.name, exc)
                with contextlib.suppress(RedisError, OSError):  # it expires by itself
                    await asyncio.shield(self.control.clear_state())
            if wakeable:
                await self._idle(cooldown)
            else:
                await asyncio.sleep(cooldown)

    def wake(self) -> None:
        """Try for the lease at once (a peer died or left: bridge/daemon.py's heartbeat)."""
        self._woken.set()

    async def _idle(self, seconds: float) -> None:
        """Wait ``seconds`` before trying for the lease again, or until woken."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._woken.wait()
        self._woken.clear()

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
                with contextlib.suppress(TimeoutError):  # or as soon as Redis answers again
                    async with asyncio.timeout(delay):
                        await self.d.redis_watch.back()
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
            record_patience=self.d.lease_seconds,  # past it another instance may own the account
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
