"""What a daemon watches for the admin-room alerts (bridge/daemon.py runs
``DaemonWatch.run``; docs/operations-alerts.md describes each condition).

Every ``CheckSeconds`` the watch reads the daemon's state (its account
runners, what each adapter reported of its health through its context —
bridge/health.py ``AccountHealth`` —, its event counters, the instances'
heartbeats, the dead-letter stream) and
turns it into ``Alerts.fire``/``Alerts.clear`` calls (bridge/alerts.py, which
records each condition once across the fleet and keeps the room's budget).
Per-account conditions are judged only by the account's owner; fleet-wide
ones by every instance, the alerts' deduplication making them one message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.alerts import Alerts, AlertSettings, as_str, format_duration, format_time


class WatchedRunner(Protocol):
    """An AccountRunner, as far as the watch looks at it."""

    owned: bool
    connected: bool
    receive_down: str | None
    refused: str | None  # why the credentials were refused (AccountFailed / AccountStopped), until proven again
    refused_at: float | None  # monotonic
    receive_since: float | None  # monotonic: the receive loop's last (re)start while owned
    tenure: tuple[float, float]  # (monotonic start, events in+out then) of the current ownership

    def has_receive_loop(self) -> bool: ...

    def failing_rooms(self) -> Mapping[str, str]: ...


class WatchedHealth(Protocol):
    """An account's ``AccountHealth`` (bridge/health.py): what its adapter reported."""

    refused: str | None  # the adapter's own report of refused credentials, until accepted again

    def failing_rooms(self) -> Mapping[str, str]: ...


class WatchedMetrics(Protocol):
    events_in: Any
    events_out: Any


def samples(metric: Any) -> dict[tuple[str, ...], float]:
    """A labelled Prometheus metric's current values by label values (the
    ``_total``/``_created`` samples of counters aside)."""
    out: dict[tuple[str, ...], float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out[tuple(sample.labels.values())] = sample.value
    return out


def progress(metrics: WatchedMetrics, account: str) -> float:
    """Events the account received and delivered in this process."""
    return samples(metrics.events_in).get((account,), 0.0) + samples(metrics.events_out).get((account,), 0.0)


@dataclass(slots=True)
class _Sustained:
    """When a condition was first seen, and last seen, failing."""

    first: float
    last: float
    why: str
    fired: bool = False


@dataclass(slots=True)
class _Proof:
    """What an owned account must exceed to count as working again."""

    tenure: tuple[float, float]
    since: float
    progress: float
    refused_at: float | None = None


class DaemonWatch:
    """Turns a daemon's state into ``fire``/``clear`` calls, every
    ``interval`` seconds (docs/operations-alerts.md describes each condition).

    Per-account conditions are judged only by the account's owner;
    fleet-wide ones (dead letters, instances) by every instance, the alerts'
    deduplication making them one message."""

    def __init__(
        self,
        alerts: Alerts,
        runners: Mapping[str, WatchedRunner],
        metrics: WatchedMetrics,
        instances_key: str,
        dlq_key: str,
        count_after: Callable[[str, str, int], Awaitable[int]],
        *,
        interval: float = 10.0,
        proof_seconds: float = 60.0,
        room_grace: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        health: Mapping[str, WatchedHealth] | None = None,
    ) -> None:
        self.alerts = alerts
        self.redis = alerts.redis
        self.instance_id = alerts.instance_id
        self.runners = runners
        self.health = health if health is not None else {}  # account -> what its adapter reports
        self.metrics = metrics
        self.instances_key = instances_key
        self.dlq_key = dlq_key
        self.count_after = count_after  # Bus.entries_after: counted inside Redis
        self.interval = interval
        self.proof_seconds = proof_seconds  # a receive loop up this long, unrefused, proves the credentials
        self.room_grace = room_grace  # a failing room must look healthy this long to count as recovered
        self.clock = clock
        self.wall = wall
        self._proofs: dict[str, _Proof] = {}
        self._sustained: dict[str, _Sustained] = {}
        self._instances: dict[str, float] = {}  # instance id -> its heartbeat's expiry (ms), as last seen
        self._redis_lost: float | None = None  # wall time of the first check Redis did not answer

    @property
    def settings(self) -> AlertSettings:
        return self.alerts.settings

    async def run(self) -> None:
        log = self.alerts.log
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if self._redis_lost is None:
                    self._redis_lost = self.wall()
                    log.warning("alerts: Redis unreachable (%s); the checks wait for it", exc)
            except Exception:  # a bug here must not stop the daemon's other work
                log.exception("alerts: check failed")

    async def tick(self) -> None:
        active = await self.alerts.active()  # raises while Redis is away
        if self._redis_lost is not None:
            lost, self._redis_lost = self._redis_lost, None
            await self._redis_regained(lost)
        now = self.clock()
        for name, runner in self.runners.items():
            if not runner.owned:
                self._proofs.pop(name, None)
                continue
            health = self.health.get(name)
            await self._credentials(name, runner, active, health is not None and health.refused is not None, now)
            await self._down(name, runner, active, now)
        await self._rooms(active, now)
        await self._dead_letters(active)
        await self._fleet(active)
        await self.alerts.flush()

    # accounts ---------------------------------------------------------------------------
    async def account_refused(self, name: str, why: str) -> None:
        """The runner's AccountFailed / AccountStopped paths: at once, not at the next check."""
        await self.alerts.fire(f"account:{name}:credentials", f"{name}: credentials refused: {why}", "critical")

    async def _credentials(
        self, name: str, runner: WatchedRunner, active: Mapping[str, Any], refused_now: bool, now: float
    ) -> None:
        key = f"account:{name}:credentials"
        proof = self._proofs.get(name)
        if proof is None or proof.tenure != runner.tenure:
            proof = self._proofs[name] = _Proof(runner.tenure, runner.tenure[0], runner.tenure[1])
        if runner.refused_at is not None and runner.refused_at != proof.refused_at:
            proof.refused_at = runner.refused_at
            proof.since, proof.progress = now, progress(self.metrics, name)
        if refused_now:  # refused right now (an adapter probing by itself reports it meanwhile)
            proof.since, proof.progress = now, progress(self.metrics, name)
        if runner.refused is not None and not refused_now and self._proven(name, runner, proof, now):
            runner.refused = None
        if refused_now or runner.refused is not None:
            if key not in active:
                why = runner.refused or "the server refuses the account's credentials"
                await self.alerts.fire(key, f"{name}: credentials refused: {why}", "critical")
        elif key in active and self._proven(name, runner, proof, now):
            await self.alerts.clear(key, f"{name}: credentials accepted again")

    def _proven(self, name: str, runner: WatchedRunner, proof: _Proof, now: float) -> bool:
        """The account worked since its last refusal here (or since this
        instance took it): traffic went through, or its receive loop ran
        ``proof_seconds`` without being refused."""
        if progress(self.metrics, name) > proof.progress:
            return True
        since = runner.receive_since
        return (
            runner.has_receive_loop()
            and runner.receive_down is None
            and since is not None
            and now - max(since, proof.since) >= self.proof_seconds
        )

    async def _down(self, name: str, runner: WatchedRunner, active: Mapping[str, Any], now: float) -> None:
        why = None
        if not runner.connected:
            why = "not connected (its connect keeps failing)"
        elif runner.receive_down is not None and runner.refused is None:
            why = runner.receive_down
        await self._observe(f"account:{name}:down", f"{name}: down", why, active, now, grace=0.0)

    async def _rooms(self, active: Mapping[str, Any], now: float) -> None:
        failing: dict[str, str] = {}
        for name, health in self.health.items():
            if self._owned(name):
                for room in health.failing_rooms():
                    failing[f"room:{name}:{room}"] = "receiving from it fails (see the log)"
        for name, runner in self.runners.items():
            if runner.owned:
                for room, why in runner.failing_rooms().items():
                    failing.setdefault(f"room:{name}:{room}", why)
        keys = set(failing) | {k for k in self._sustained if k.startswith("room:")}
        keys |= {k for k in active if k.startswith("room:")}
        grace = min(self.room_grace, self.settings.failed_seconds)
        for key in sorted(keys):
            parts = key.split(":", 2)
            if len(parts) != 3:
                continue  # not one of ours (a worker's key shaped otherwise)
            _, account, room = parts
            if not self._owned(account):  # its owner judges it
                self._sustained.pop(key, None)
                continue
            await self._observe(key, f"{account}: room {room} failing", failing.get(key), active, now, grace)

    def _owned(self, account: str | None) -> bool:
        runner = self.runners.get(account or "")
        return runner is not None and runner.owned

    async def _observe(
        self, key: str, what: str, why: str | None, active: Mapping[str, Any], now: float, grace: float
    ) -> None:
        """Fire once ``why`` (failing) has held for FailedMinutes; clear once
        it has not held for ``grace`` (at once for an alert an earlier owner
        fired)."""
        state = self._sustained.get(key)
        if why is not None:
            if state is None:
                state = self._sustained[key] = _Sustained(now, now, why)
            state.last, state.why = now, why
            if now - state.first >= self.settings.failed_seconds and key not in active:
                await self.alerts.fire(key, f"{what} for {format_duration(now - state.first)}: {why}", "error")
            return
        if state is not None and now - state.last < grace:
            return  # between two failures (a parked room's retry in flight)
        self._sustained.pop(key, None)
        if key in active:
            await self.alerts.clear(key, f"{what}: recovered")

    # fleet-wide -------------------------------------------------------------------------------
    async def _dead_letters(self, active: Mapping[str, Any]) -> None:
        key = "dead-letters"
        threshold = self.settings.dead_letter_threshold
        window = self.settings.dead_letter_window
        cap = max(threshold, 1000)
        start_ms = int((self.wall() - window) * 1000)
        recent = await self.count_after(self.dlq_key, f"{start_ms}-0", cap)
        if recent >= threshold and key not in active:
            total = await self.redis.xlen(self.dlq_key)
            shown = f"{recent}+" if recent >= cap else str(recent)
            await self.alerts.fire(
                key,
                f"dead letters growing: {shown} in the last {format_duration(window)} ({total} in all); "
                "see them with talkbridge dlq list, replay with talkbridge dlq replay",
                "error",
            )
        elif recent == 0 and key in active:
            total = await self.redis.xlen(self.dlq_key)
            await self.alerts.clear(key, f"no new dead letters for {format_duration(window)} ({total} in all)")

    async def _fleet(self, active: Mapping[str, Any]) -> None:
        """Instances gone: one whose heartbeat lapsed (a clean stop removes
        itself from the set before it lapses: no alert). Cleared once as many
        instances are alive as there were before it went."""
        now_ms = self.wall() * 1000
        rows = await self.redis.zrange(self.instances_key, 0, -1, withscores=True)
        live = {as_str(member): score for member, score in rows if score > now_ms}
        lapsed = {as_str(member): score for member, score in rows if score <= now_ms}
        # seen before and now lapsed, or removed (by a heartbeat's sweep) after it lapsed
        gone = {i: e for i, e in self._instances.items() if i not in live and (i in lapsed or e <= now_ms)}
        gone.update({i: e for i, e in lapsed.items() if i not in self._instances})  # lapsed before we looked
        gone.pop(self.instance_id, None)
        fleet = len(live) + len(gone)
        for instance, expiry in sorted(gone.items()):
            await self.alerts.fire(
                f"instance:{instance}",
                f"instance {instance} stopped without leaving: its heartbeat lapsed at {format_time(expiry / 1000)}; "
                f"{len(live)} instance(s) alive",
                "error",
                details={"fleet": fleet},
            )
        self._instances = live
        for key, record in active.items():
            if not key.startswith("instance:"):
                continue
            wanted = (record.get("details") or {}).get("fleet")
            if isinstance(wanted, int) and len(live) >= wanted:
                await self.alerts.clear(key, f"{key.removeprefix('instance:')} replaced: {len(live)} instances alive")

    async def _redis_regained(self, lost_at: float) -> None:
        """Redis answers again: both messages at once (while it was away,
        nothing could be recorded or posted)."""
        lasted = format_duration(self.wall() - lost_at)
        await self.alerts.fire(
            "redis", f"Redis unreachable from {self.instance_id} since {format_time(lost_at)}", "error"
        )
        await self.alerts.clear("redis", f"Redis reachable again from {self.instance_id} after {lasted}")


def watch_interval(settings: AlertSettings, lease_seconds: float) -> float:
    """Often enough to tell an instance that died (its heartbeat lapsed) from
    one that left (it removed itself before lapsing)."""
    return max(0.05, min(settings.check_seconds, lease_seconds / 3))
