"""A lease in Redis: which daemon instance owns an account right now, and
the fencing token its writes carry.

``SET key owner NX PX ttl`` to take it, a compare-and-expire script to renew
it, a compare-and-delete script to hand it back. An owner that stops renewing
(killed, partitioned, paused) loses it after ``ttl`` and another instance
takes over.

Every acquisition increments the account's fencing counter and hands the new
value to the owner (``Lease.fence``). Scripts that write delivery state
(``bridge.idmap``, the api buffer) refuse a token that is not the current
one, so an owner that stalled past its lease (a GC pause, SIGSTOP, a frozen
VM) and resumed cannot record, acknowledge or buffer anything alongside its
successor: its next write fails with ``Fenced`` and it stops.

Both keys carry the account's hash tag (bridge/keys.py), as every key of
the account does, so on Redis Cluster one script can check the fence and
write the account's streams, map and cursors. (Until the keys had one tag,
the inbound stream lived in another slot and every acquisition also raised a
copy of the token there; bridge/migrate_keys.py deletes that copy.)

Takeover in seconds (``Liveness``). The lease is long (``[bus]
LeaseSeconds``, 15 s) so that an owner keeps serving through a Redis outage
shorter than that: nobody can take its lease meanwhile. A dead owner
(SIGKILL, machine gone) would then be replaced only once its leases expire.
So each instance also beats its own alive key (``P:alive:INSTANCE``, ``SET
PX`` with ``[bus] TakeoverSeconds``, 3 s, on Redis's clock; beaten every
third of that), and every heartbeat looks at the alive keys of the others
in the instances set: one that this instance saw alive and whose key has
lapsed is dead. Its accounts' leases are then deleted if they still name it
(``Lease.take_over``, a compare-and-delete) and the runners of those
accounts woken to acquire them the normal way, which raises the fence: if
the "dead" owner was only frozen (SIGSTOP, a GC pause, a VM migration) and
resumes, its next write carries a stale token, fails with ``Fenced``, and it
stops; its next renewal fails too. The alive check and the delete are not
one atomic step (on Cluster the keys are in different slots) and the check
may be wrong (an owner that is alive but slow); fencing makes a wrong guess
cost a reconnection, never two writers.

Guards against stealing when nobody is dead:

- after a Redis outage or failover every instance's key lapsed at once, so
  an instance judges the others only once its own beats have kept its own
  key alive for a whole takeover window (``Liveness.beat``: the ``SET ...
  GET``, Redis 6.2+, finds the previous beat's key, on Redis's clock, or the
  clock starts over) — by then every live instance has beaten again;
- an instance is judged only if this one has seen its key alive, so one that
  writes no alive key (an older version during a rolling upgrade) or died
  before this one started loses its accounts by lease expiry as before.

The same look counts the live instances (``Daemon.fair_share``) with the
short window, so the survivors' shares grow at once and they take the
orphaned accounts without waiting for them to lie free. A daemon that stops
cleanly hands its leases back and leaves the instances set; the next
heartbeat sees it gone and wakes the runners, so its accounts are taken
within a third of a takeover window too (no pub/sub needed: Cluster clients
have none).
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from bridge.idmap import Fence
from bridge.keys import alive_key, fence_key, lease_key

# KEYS: lease, fence counter. ARGV: owner, ttl ms. Returns the token, 0 if
# another instance holds the lease.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local token = tonumber(redis.call('GET', KEYS[2]) or '0')
  if token == 0 then token = redis.call('INCR', KEYS[2]) end
  return token
end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    def __init__(self, redis: Redis, prefix: str, account: str, owner: str, ttl_seconds: float) -> None:
        self.redis = redis
        self.key = lease_key(prefix, account)
        self.fence_key = fence_key(prefix, account)
        self.owner = owner
        self.ttl_ms = int(ttl_seconds * 1000)
        self.token = 0  # the fencing token of the current tenure; 0 when not held
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    @property
    def fence(self) -> Fence:
        return Fence(self.fence_key, str(self.token))

    async def acquire(self) -> bool:
        token = int(await self._acquire(keys=[self.key, self.fence_key], args=[self.owner, self.ttl_ms]))
        self.token = token
        return token > 0

    async def renew(self) -> bool:
        return bool(await self._renew(keys=[self.key], args=[self.owner, self.ttl_ms]))

    async def take_over(self, dead_owner: str) -> bool:
        """Delete the lease if it still names ``dead_owner`` (an instance whose
        heartbeat lapsed), so that it can be acquired at once; True if deleted.
        The acquisition that follows raises the fence."""
        return bool(await self._release(keys=[self.key], args=[dead_owner]))

    async def release(self) -> None:
        self.token = 0
        await self._release(keys=[self.key], args=[self.owner])

    async def holder(self) -> str | None:
        value = await self.redis.get(self.key)
        return value.decode() if value is not None else None


class Liveness:
    """This instance's alive key, and the judgement of the others' (see the
    module's docstring)."""

    def __init__(self, redis: Redis, prefix: str, instance: str, window_seconds: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.instance = instance
        self.key = alive_key(prefix, instance)
        self.window = window_seconds
        self.window_ms = max(1, int(window_seconds * 1000))
        self.steady_since: float | None = None  # since when our own beats kept our key alive
        self.seen_alive: set[str] = set()  # others whose alive key this instance has seen
        self.dead: set[str] = set()  # others judged dead, still in the instances set

    async def beat(self) -> bool:
        """Renew our alive key; True when this instance may judge the others
        (its own key has not lapsed for a whole window)."""
        previous = await self.redis.set(self.key, b"1", px=self.window_ms, get=True)
        now = time.monotonic()
        if previous is None or self.steady_since is None:
            self.steady_since = now  # our key had lapsed (outage, failover, we were frozen): start over
        return now - self.steady_since >= self.window

    def lapsed(self) -> None:
        """A beat failed: judge nobody until a window of good ones."""
        self.steady_since = None

    async def judge(self, instances: list[str]) -> tuple[set[str], int]:
        """Look at the alive keys of the ``instances`` set's others: (the ones
        newly found dead, the number of live instances counting this one).

        Dead: seen alive before, its key lapsed now. Reported once (``retry``
        reports it again); counted out of the live ones until its key is back
        or it leaves the instances set."""
        others = [i for i in instances if i != self.instance]
        present = set(others)
        self.seen_alive &= present  # one that left the set is forgotten
        self.dead &= present
        alive: set[str] = set()
        if others:
            pipe = self.redis.pipeline(transaction=False)
            for other in others:
                pipe.exists(alive_key(self.prefix, other))
            alive = {other for other, found in zip(others, await pipe.execute(), strict=True) if found}
        self.dead -= alive  # it was only slow: it beats again
        newly_dead = self.seen_alive - alive - self.dead
        self.dead |= newly_dead
        self.seen_alive |= alive
        return newly_dead, 1 + len(others) - len(self.dead)

    def retry(self, dead: set[str]) -> None:
        """Taking over from ``dead`` failed part way: report them again at the next look."""
        self.dead -= dead

    async def leave(self) -> None:
        await self.redis.delete(self.key)
