"""One circuit breaker for every worker's Instagram fetches, in Redis.

When Instagram answers a fetch with its rate limit or a login wall, every
other fetch would get the same answer, and each one makes it worse: the
breaker opens for all workers at once and stays open for a backoff that
doubles at each consecutive trip (``base``, 2 x ``base``, ... up to ``cap``).
When it has run out, one job is let through as the probe (half-open): its
success closes the breaker, its failure opens it again for twice as long.
Jobs that find it open wait (arq ``Retry``) instead of fetching: queued,
not dropped.

Fetches that were already running when it opened fail the same way; they do
not count as further trips (only the first failure of an episode, or the
probe's, doubles the backoff), and their successes do not close it (only a
fetch started after the trip, or the probe's, does).

All times are Redis's (``TIME`` in the scripts): one clock for every worker.
State: one hash, ``{prefix}:ig:breaker``, without expiry (a breaker that
opened stays known until a fetch succeeds, whatever the idle time between).
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from bridge.keys import instagram_breaker_key

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_CHECK = (
    _NOW
    + """
local trips = tonumber(redis.call('HGET', KEYS[1], 'trips') or '0')
if trips == 0 then return {0, 0, now} end
local open_until = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
if now < open_until then return {1, open_until - now, now} end
local probe = redis.call('HGET', KEYS[1], 'probe')
local probe_until = tonumber(redis.call('HGET', KEYS[1], 'probe_until') or '0')
if (not probe) or probe == ARGV[1] or now >= probe_until then
  redis.call('HSET', KEYS[1], 'probe', ARGV[1], 'probe_until', now + tonumber(ARGV[2]))
  return {2, 0, now}
end
-- the probe is out: ask again in a while (half the base backoff), not after its whole allowance
return {1, math.max(math.min(probe_until - now, tonumber(ARGV[3]) / 2), 250), now}
"""
)

_TRIP = (
    _NOW
    + """
local trips = tonumber(redis.call('HGET', KEYS[1], 'trips') or '0')
local open_until = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
local probe = redis.call('HGET', KEYS[1], 'probe')
local started = tonumber(ARGV[4])
local tripped_at = tonumber(redis.call('HGET', KEYS[1], 'tripped_at') or '0')
if trips > 0 and probe ~= ARGV[1] and (now < open_until or started <= tripped_at) then
  -- part of the episode already counted: the breaker is open, or this fetch began before its last trip
  return {trips, math.max(open_until - now, 1000), 0}
end
trips = trips + 1
local backoff = math.min(tonumber(ARGV[2]) * 2 ^ (trips - 1), tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'trips', trips, 'until', now + backoff, 'tripped_at', now)
redis.call('HDEL', KEYS[1], 'probe', 'probe_until')
return {trips, backoff, 1}
"""
)

_SUCCESS = """
local trips = tonumber(redis.call('HGET', KEYS[1], 'trips') or '0')
if trips == 0 then return 0 end
local probe = redis.call('HGET', KEYS[1], 'probe')
local tripped_at = tonumber(redis.call('HGET', KEYS[1], 'tripped_at') or '0')
if probe == ARGV[1] or tonumber(ARGV[2]) > tripped_at then
  redis.call('DEL', KEYS[1])
  return trips
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Gate:
    """May this job fetch? ``wait``: seconds until asking again makes sense."""

    fetch: bool
    wait: float
    probe: bool  # the half-open probe: its outcome decides
    now: float  # Redis's clock, seconds: the fetch's start, if it fetches


@dataclass(frozen=True, slots=True)
class Trip:
    trips: int  # consecutive trips, this one included
    wait: float  # seconds until the next probe
    counted: bool  # this failure opened it (or reopened it): alert the admin


class Breaker:
    def __init__(self, redis: Redis, prefix: str, *, base: float = 60.0, cap: float = 3600.0,
                 probe_seconds: float = 120.0) -> None:  # fmt: skip
        if base <= 0 or cap < base or probe_seconds <= 0:
            raise ValueError("backoff must be positive, its cap at least its base")
        self.key = instagram_breaker_key(prefix)
        self.base_ms = round(base * 1000)
        self.cap_ms = round(cap * 1000)
        self.probe_ms = round(probe_seconds * 1000)
        self._check = redis.register_script(_CHECK)
        self._trip = redis.register_script(_TRIP)
        self._success = redis.register_script(_SUCCESS)

    async def check(self, job: str) -> Gate:
        state, wait_ms, now_ms = await self._check(keys=[self.key], args=[job, self.probe_ms, self.base_ms])
        return Gate(fetch=int(state) != 1, wait=int(wait_ms) / 1000, probe=int(state) == 2, now=int(now_ms) / 1000)

    async def trip(self, job: str, started: float) -> Trip:
        """Instagram refused a fetch that ``job`` started at ``started`` (Redis time, s)."""
        trips, wait_ms, counted = await self._trip(
            keys=[self.key], args=[job, self.base_ms, self.cap_ms, round(started * 1000)]
        )
        return Trip(int(trips), int(wait_ms) / 1000, bool(int(counted)))

    async def success(self, job: str, started: float) -> int:
        """A fetch went through; the number of trips it ended (0: it was closed, or this fetch proves nothing)."""
        return int(await self._success(keys=[self.key], args=[job, round(started * 1000)]))
