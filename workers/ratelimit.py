"""Rate limits shared by every worker on every machine: a global limit and a
per-room one, with a waiting line, on Redis's clock.

``RateLimiter.acquire(job, room)`` either admits the job (0.0: start the
fetch now) or answers how long it should wait; a job that is told to wait
keeps its place in line, so asking again after that wait (an arq ``Retry``
with that defer) finds it admitted, or nearly: requests are queued, never
dropped, and served in the order they first asked.

What is guaranteed: in any window of ``period`` seconds at most ``limit``
jobs are admitted globally and at most ``room_limit`` per room (a sliding
log: the admission times are kept for one period, and a job is admitted only
while fewer than the limit are in the window ending now). The check, the
line and the admission are one Lua script, so workers racing for the last
slot cannot both win, and the script reads the time with Redis's ``TIME``:
one clock for every worker, however far the machines' own clocks drift.

The line: a job first waits in its room's line; once the room has a free
slot for it, it joins the global line, placed by the time it first asked
(so one busy room does not hold up the others in the global line). The
wait answered is the time until enough admissions leave the window for
everyone ahead of it in the line it is in (the room's, then the global one):
an estimate, exact when those ahead come back on time. Jobs whose turns fall
in the same release of slots may start in any order among themselves; a job
is never pushed a period later by one that asked after it. A job that does
not come back within its wait plus ``grace`` (its worker died, it was
answered from the cache meanwhile) loses its place, so a dead job cannot
hold the line; coming back later it queues again at the end.

Why not a library (docs/instagram.md has the details): ``limits``' moving
window is a strict log but stamps entries with each worker's own
``time.time()``; ``pyrate-limiter``'s Redis bucket is a strict log stamped by
the client's clock too (its source says so), checks one bucket at a time (a
room slot taken while the global one is refused is lost) and keeps no line;
``throttled-py`` reads Redis's clock in its GCRA and token-bucket scripts,
but those admit up to 2N-1 in a period after a burst (or, with a burst of
one, space every request period/N apart), and its sliding window is the
two-counter estimate, which can exceed N. None keeps a waiting line, and
"queued, about N s" needs one.

Keys (one hash tag, one cluster slot): ``{prefix}:rl:{NAME}:...``, each with
an expiry, so an idle limiter leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import math

from redis.asyncio import Redis

from bridge.keys import rate_limiter_key

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local job = ARGV[1]
local period = tonumber(ARGV[2])
local room_limit = tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local grace = tonumber(ARGV[5])
local rlog, rline, rdead, glog, gline, gdead = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]

local function prune(log, line, dead)
  redis.call('ZREMRANGEBYSCORE', log, '-inf', now - period)
  local gone = redis.call('ZRANGEBYSCORE', dead, '-inf', now)
  for _, member in ipairs(gone) do redis.call('ZREM', line, member) end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', dead, '-inf', now) end
end

-- How long the waiter with 0-based place `rank` waits: every admission in
-- the window leaves it `period` after it was made, and the free slots are
-- taken now; the j-th release after the free ones is the (j mod limit)-th of
-- those, `period` later for each round of the line before it.
local function wait_of(log, lim, rank)
  local count = redis.call('ZCARD', log)
  local free = lim - count
  if rank < free then return 0 end
  local j = rank - math.max(free, 0)
  local round = math.floor(j / lim)
  local idx = j % lim
  local base = now
  if idx < count then
    base = tonumber(redis.call('ZRANGE', log, idx, idx, 'WITHSCORES')[2])
  end
  return math.max(base + period * (round + 1) - now, 1)
end

local function keep(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end

local function wait_in(line, dead, ms)
  redis.call('ZADD', dead, now + ms + grace, job)
  keep(line, ms + grace + period)
  keep(dead, ms + grace + period)
end

prune(rlog, rline, rdead)
prune(glog, gline, gdead)

redis.call('ZADD', rline, 'NX', now, job)
local arrival = redis.call('ZSCORE', rline, job)
local room_wait = wait_of(rlog, room_limit, redis.call('ZRANK', rline, job))
if room_wait > 0 then
  -- not the room's turn yet: back when it is (the global line is counted then)
  wait_in(rline, rdead, room_wait)
  return room_wait
end

redis.call('ZADD', gline, 'NX', arrival, job)
local global_wait = wait_of(glog, limit, redis.call('ZRANK', gline, job))
if global_wait > 0 then
  wait_in(rline, rdead, global_wait)
  wait_in(gline, gdead, global_wait)
  return global_wait
end

local entry = job .. '@' .. now
redis.call('ZADD', rlog, now, entry)
redis.call('ZADD', glog, now, entry)
for _, key in ipairs({rline, rdead, gline, gdead}) do redis.call('ZREM', key, job) end
keep(rlog, period + 1000)
keep(glog, period + 1000)
return 0
"""

_LEAVE = """
for _, key in ipairs(KEYS) do redis.call('ZREM', key, ARGV[1]) end
return 0
"""


class RateLimiter:
    """``limit`` admissions per ``period`` seconds in all, ``room_limit`` per room."""

    def __init__(self, redis: Redis, prefix: str, name: str, *, limit: int, room_limit: int, period: float = 60.0,
                 grace: float = 30.0) -> None:  # fmt: skip
        if limit < 1 or room_limit < 1 or period <= 0 or grace < 0:
            raise ValueError("limits must be at least 1, the period positive and the grace not negative")
        self.redis = redis
        self.base = rate_limiter_key(prefix, name)
        self.limit = limit
        self.room_limit = room_limit
        self.period_ms = max(1, round(period * 1000))
        self.grace_ms = round(grace * 1000)
        self._acquire = redis.register_script(_ACQUIRE)
        self._leave = redis.register_script(_LEAVE)

    def _keys(self, room: str) -> list[str]:
        # Room names are any text: hashed, so a key is short and free of the hash-tag braces.
        r = hashlib.sha1(room.encode()).hexdigest()[:20]
        b = self.base
        return [f"{b}:room:{r}:log", f"{b}:room:{r}:line", f"{b}:room:{r}:dl", f"{b}:log", f"{b}:line", f"{b}:dl"]

    async def acquire(self, job: str, room: str) -> float:
        """0.0: admitted, start now (the admission counts from this moment);
        otherwise the seconds to wait before asking again, place kept."""
        waited = await self._acquire(
            keys=self._keys(room), args=[job, self.period_ms, self.room_limit, self.limit, self.grace_ms]
        )
        return int(waited) / 1000

    async def leave(self, job: str, room: str) -> None:
        """Give up a place in line (the job was answered another way)."""
        keys = self._keys(room)
        await self._leave(keys=[keys[1], keys[2], keys[4], keys[5]], args=[job])

    async def admitted_in_window(self, room: str | None = None) -> int:
        """Admissions in the window ending now (global, or one room's): for metrics and tests."""
        keys = self._keys(room or "")
        log = keys[0] if room is not None else keys[3]
        now_s, now_us = await self.redis.time()
        now_ms = now_s * 1000 + now_us // 1000
        return int(await self.redis.zcount(log, f"({now_ms - self.period_ms}", "+inf"))


def seconds_text(seconds: float) -> str:
    """How a wait is told to a room: "12 s", "3 min"."""
    if seconds < 90:
        return f"{max(1, math.ceil(seconds))} s"
    return f"{math.ceil(seconds / 60)} min"
