"""The fleet's control plane in Redis: what operators ask of an account, and
what every daemon instance announces about itself and the accounts it owns.

Operators (the admin page, ``bridge/admin``) write *requests*; whichever
instance owns the account (its lease, ``bridge/lease.py``) obeys. Nothing is
sent to an instance directly: a request is durable state in Redis, so an
owner that starts, takes over or reconnects later obeys it too.

- **Pause** (``P:paused:{ACCOUNT}``, present while paused): the account's
  traffic is held both ways. What it receives is still accepted and stored
  in its inbound stream (webhooks answered, polls go on), but not routed;
  what is sent to it waits in its outbound stream. Nothing is dropped and
  nothing is dead-lettered for waiting; resuming releases it all in stream
  order. A send already in flight when the pause arrives completes.
- **Restart** (``P:restart:{ACCOUNT}``, a counter): the owner disconnects
  the adapter, hands the lease back and competes for it again at once (it
  usually takes it back; another instance may). Pending work is claimed by
  whoever owns the account next, as after any takeover.

Every request is also published on ``P:control`` (the account's name) so
owners act within milliseconds; owners also re-read their requests every
third of a lease period, so a missed message (a reconnect, Redis Cluster
without pub/sub) costs only that delay.

What instances announce, read by the admin page and ``talkbridge status``:

- ``P:instance:ID`` — a small hash beside the heartbeat sorted set
  ``P:instances``: version, host, pid, start time; expires with the
  heartbeat.
- ``P:worker:ID`` beside ``P:workers``: the same for each ``talkbridge
  worker`` (written by workers/heartbeat.py), with its job counts; the
  workers' queue is ``P:arq:queue`` (``queue_name``).
- ``P:state:{ACCOUNT}`` — the owner's view of the account: ``connecting``,
  ``connected`` or ``failed`` with the last error, and since when; expires
  three lease periods after the owner stops refreshing it.
- ``P:rates:BUCKET`` — events in and out per account in 10-second buckets,
  every instance adding what its own counters gained since its last flush,
  so the page shows the fleet's rate whichever instance did the work.

Keys that name one account carry it as a hash tag (Redis Cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.keys import (
    control_channel,
    paused_key,
    rate_key,
    restart_key,
    state_key,
    worker_key,
    workers_key,
)

RATE_BUCKET_SECONDS = 10  # the width of one rate bucket
RATE_WINDOW_BUCKETS = 6  # the page's "per minute": the current bucket and the five before it
RATE_KEEP_SECONDS = 180  # a bucket's lifetime in Redis
STATE_TTL_LEASES = 3  # an owner's state report outlives its last refresh by this many lease periods
LISTEN_BACKOFF_MAX = 10.0  # seconds between attempts to subscribe again
# The state report's field saying the owner has applied a pause ("1") or not
# ("0"). The page calls that "held"; so does this string, on the wire: admin
# pages of another version in the same fleet read it.
PAUSE_APPLIED = "held"


def rate_bucket(now: float) -> int:
    return int(now // RATE_BUCKET_SECONDS)


# operators' requests ----------------------------------------------------------------
async def pause(redis: Redis, prefix: str, account: str, by: str) -> bool:
    """Hold the account's traffic; False if it was paused already."""
    record = json.dumps({"at": round(time.time(), 3), "by": by})
    created = await redis.set(paused_key(prefix, account), record, nx=True)
    await redis.publish(control_channel(prefix), account)
    return bool(created)


async def resume(redis: Redis, prefix: str, account: str) -> bool:
    """Release the account's traffic; False if it was not paused."""
    removed = await redis.delete(paused_key(prefix, account))
    await redis.publish(control_channel(prefix), account)
    return bool(removed)


async def restart(redis: Redis, prefix: str, account: str) -> int:
    """Ask the owner to reconnect the account; returns the request's number."""
    generation = int(await redis.incr(restart_key(prefix, account)))
    await redis.publish(control_channel(prefix), account)
    return generation


async def paused_accounts(redis: Redis, prefix: str, accounts: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Account -> its pause record ({"at", "by"}), for those paused."""
    names = list(accounts)
    if not names:
        return {}
    pipe = redis.pipeline(transaction=False)  # one GET each: different Cluster slots
    for name in names:
        pipe.get(paused_key(prefix, name))
    out: dict[str, dict[str, Any]] = {}
    for name, raw in zip(names, await pipe.execute(), strict=True):
        if raw is not None:
            try:
                record = json.loads(raw)
            except ValueError:
                record = {}
            out[name] = record if isinstance(record, dict) else {}
    return out


# the owner's side ---------------------------------------------------------------------
async def never_paused() -> None:
    """The ``wait_unpaused`` of a loop nobody pauses (tests, tools)."""


class PauseGate:
    """Whether an account's traffic waits: an in-memory gate the owner keeps
    in step with Redis, so the delivery and route loops pay nothing per
    message for it (``wait`` returns at once while open)."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()

    @property
    def paused(self) -> bool:
        return not self._open.is_set()

    def set(self, paused: bool) -> None:
        if paused:
            self._open.clear()
        else:
            self._open.set()

    async def wait(self) -> None:
        await self._open.wait()


class RestartRequested(Exception):
    """An operator asked the owner to reconnect the account."""


class AccountControl:
    """One account's requests as its owner sees them.

    ``begin`` at the start of a tenure, then ``refresh`` (at start, on a
    ``poke`` from the control channel and every few seconds) applies a pause
    or resume to ``pause_gate`` and tells whether a restart was asked since the
    tenure began. ``report`` writes the owner's state for the admin page."""

    def __init__(self, redis: Redis, prefix: str, account: str, instance: str, lease_seconds: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.account = account
        self.instance = instance
        self.lease_seconds = lease_seconds
        self.pause_gate = PauseGate()
        self.woken = asyncio.Event()
        self._restart_seen: int | None = None
        # the owner's state, as the admin page shows it
        self.state = "connecting"
        self.error = ""
        self.since = time.time()

    def begin(self) -> None:
        """A new tenure: requests made before it are done with."""
        self._restart_seen = None
        self.set_state("connecting")

    def poke(self) -> None:
        """The control channel named this account: refresh now."""
        self.woken.set()

    def set_state(self, state: str, error: str = "") -> None:
        if (state, error) != (self.state, self.error):
            self.state, self.error, self.since = state, error[:500], time.time()
            self.woken.set()  # written at the next refresh, which this starts

    async def refresh(self) -> bool:
        """Apply the account's requests and write our state; True when a
        restart was asked during this tenure."""
        prefix, account = self.prefix, self.account
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(paused_key(prefix, account))
        pipe.get(restart_key(prefix, account))
        paused, generation = await pipe.execute()
        self.pause_gate.set(paused is not None)
        # written after the gate is set: PAUSE_APPLIED tells the page (and tests) the pause is in force
        key = state_key(prefix, account)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping=self._state_fields())
        pipe.pexpire(key, int(STATE_TTL_LEASES * self.lease_seconds * 1000))
        await pipe.execute()
        current = int(generation or 0)
        if self._restart_seen is None:
            self._restart_seen = current
            return False
        return current != self._restart_seen

    def _state_fields(self) -> dict[str, str]:
        return {
            "instance": self.instance,
            "state": self.state,
            "error": self.error,
            "since": f"{self.since:.3f}",
            "at": f"{time.time():.3f}",
            PAUSE_APPLIED: "1" if self.pause_gate.paused else "0",
        }

    async def obey(self, log: logging.Logger, sleep: Callable[[float], Awaitable[Any]] | None = None) -> None:
        """Run while the account is owned: refresh on every poke and every
        third of a lease period; raise ``RestartRequested`` when asked. A
        Redis error only delays the next refresh (the lease loop decides
        whether the account is still ours)."""
        interval = self.lease_seconds / 3
        while True:
            self.woken.clear()
            try:
                if await self.refresh():
                    raise RestartRequested(self.account)
            except (RedisError, OSError) as exc:
                log.warning("%s: could not read the account's requests: %s", self.account, exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self.woken.wait()

    async def clear_state(self) -> None:
        """The tenure ended here: forget our report (another owner writes its own)."""
        key = state_key(self.prefix, self.account)
        # only if it is still ours: a successor may have written already
        current = await self.redis.hget(key, "instance")
        if current is not None and current.decode() == self.instance:
            await self.redis.delete(key)


async def listen(redis: Redis, prefix: str, poke: Callable[[str], None], log: logging.Logger) -> None:
    """Forward the control channel's account names to ``poke``; never ends.

    Subscribes again after a lost connection. Without pub/sub (redis-py's
    Cluster client has none) owners still refresh every third of a lease."""
    if not hasattr(redis, "pubsub"):
        log.info("control: this Redis client has no pub/sub; accounts obey requests at their next refresh")
        await asyncio.Event().wait()
    delay = 0.5
    channel = control_channel(prefix)
    while True:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            delay = 0.5
            async for message in pubsub.listen():
                data = message.get("data")
                if isinstance(data, bytes):
                    poke(data.decode(errors="replace"))
        except (RedisError, OSError) as exc:
            log.warning("control: subscription to %s lost (%s); again in %.1fs", channel, exc, delay)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
        await asyncio.sleep(delay)
        delay = min(delay * 2, LISTEN_BACKOFF_MAX)


# announcements -------------------------------------------------------------------------
def talkbridge_version() -> str:
    try:
        return importlib.metadata.version("talkbridge")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


def announcement(started: float) -> dict[str, str]:
    """What a daemon or a worker says of itself at each heartbeat (the admin
    page's Instances and Workers tables)."""
    return {
        "version": talkbridge_version(),
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "started": f"{started:.3f}",
    }


def announce(pipe: Any, key: str, info: Mapping[str, str], ttl_ms: int) -> None:
    """Add an announcement hash to a heartbeat's pipeline, expiring with it."""
    pipe.hset(key, mapping=dict(info))
    pipe.pexpire(key, ttl_ms)


async def live_announced(
    redis: Redis, members_key: str, info_key: Callable[[str], str]
) -> list[tuple[str, float, dict[str, str]]]:
    """(id, expiry in seconds since the epoch, announcement) of every member
    of a heartbeat set (id -> expiry in ms) whose expiry has not passed."""
    now_ms = int(time.time() * 1000)
    live = await redis.zrangebyscore(members_key, now_ms, "+inf", withscores=True)
    if not live:
        return []
    pipe = redis.pipeline(transaction=False)
    for member, _ in live:
        pipe.hgetall(info_key(_text(member)))
    infos = await pipe.execute()
    return [
        (_text(member), score / 1000, {_text(k): _text(v) for k, v in (info or {}).items()})
        for (member, score), info in zip(live, infos, strict=True)
    ]


async def live_workers(redis: Redis, prefix: str) -> list[tuple[str, float, dict[str, str]]]:
    """(id, expiry in seconds since the epoch, announcement) of every worker
    whose heartbeat (workers/heartbeat.py) has not expired, oldest first."""
    live = await live_announced(redis, workers_key(prefix), functools.partial(worker_key, prefix))
    return sorted(live, key=lambda row: row[2].get("started", ""))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def counter_totals(counter: Counter) -> dict[str, float]:
    """A Prometheus counter labelled by account: account -> its total."""
    out: dict[str, float] = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out[sample.labels.get("account", "")] = sample.value
    return out


class RateRecorder:
    """Adds what this instance's events-in and events-out counters gained
    since the last flush to the fleet's current rate bucket."""

    def __init__(self, redis: Redis, prefix: str, events_in: Counter, events_out: Counter) -> None:
        self.redis = redis
        self.prefix = prefix
        self.counters = {"in": events_in, "out": events_out}
        self._flushed: dict[str, float] = {}

    async def flush(self, now: float | None = None) -> None:
        gained: dict[str, int] = {}
        totals: dict[str, float] = {}
        for direction, counter in self.counters.items():
            for account, total in counter_totals(counter).items():
                field = f"{direction}:{account}"
                totals[field] = total
                delta = int(total - self._flushed.get(field, 0.0))
                if delta > 0:
                    gained[field] = delta
        if gained:
            key = rate_key(self.prefix, rate_bucket(time.time() if now is None else now))
            pipe = self.redis.pipeline(transaction=False)
            for field, delta in gained.items():
                pipe.hincrby(key, field, delta)
            pipe.expire(key, RATE_KEEP_SECONDS)
            await pipe.execute()
        # only once written: a failed flush is added to the next one
        self._flushed = {field: self._flushed.get(field, 0.0) + gained.get(field, 0) for field in totals}
