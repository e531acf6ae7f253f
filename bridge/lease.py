"""A lease in Redis: which daemon instance owns an account right now.

``SET key owner NX PX ttl`` to take it, a compare-and-expire script to renew
it, a compare-and-delete script to hand it back. An owner that stops renewing
(killed, partitioned) loses it after ``ttl`` and another instance takes over.
"""

from __future__ import annotations

from redis.asyncio import Redis

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
    def __init__(self, redis: Redis, key: str, owner: str, ttl_seconds: float) -> None:
        self.redis = redis
        self.key = key
        self.owner = owner
        self.ttl_ms = int(ttl_seconds * 1000)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    async def acquire(self) -> bool:
        if await self.redis.set(self.key, self.owner, nx=True, px=self.ttl_ms):
            return True
        return await self.renew()  # already ours (a quick restart with the same id)

    async def renew(self) -> bool:
        return bool(await self._renew(keys=[self.key], args=[self.owner, self.ttl_ms]))

    async def release(self) -> None:
        await self._release(keys=[self.key], args=[self.owner])

    async def holder(self) -> str | None:
        value = await self.redis.get(self.key)
        return value.decode() if value is not None else None
