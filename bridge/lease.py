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
"""

from __future__ import annotations

from redis.asyncio import Redis

from bridge.idmap import Fence
from bridge.keys import fence_key, lease_key

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

    async def release(self) -> None:
        self.token = 0
        await self._release(keys=[self.key], args=[self.owner])

    async def holder(self) -> str | None:
        value = await self.redis.get(self.key)
        return value.decode() if value is not None else None
