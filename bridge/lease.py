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

Both keys carry the account as a hash tag so one script can check the fence
and write the account's streams and map on Redis Cluster. The inbound stream
(``P:in:ACCOUNT``) is the exception: its name has no tag (renaming it would
strand the entries and cursors of every running deployment), so it lives in
another slot than the fence. Every acquisition therefore also raises a copy
of the token kept in the inbound stream's slot (``inbound_fence_key``) — to
the new token, never lower, so a stale owner's late copy cannot undo its
successor's — before ``acquire`` returns and the new owner does anything;
``Bus.commit_inbound`` checks that copy in the script that writes the stream.
A stale owner can still commit between its successor's two steps, but only
before the successor has read any cursor, as if it had committed just
before losing the lease.
"""

from __future__ import annotations

from redis.asyncio import Redis

from bridge.bus import inbound_fence_key
from bridge.idmap import Fence

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


# KEYS: the inbound stream's copy of the token. ARGV: the new token. Only
# ever raised: the copy is the highest token acquired.
_RAISE_COPY = """
if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""


def lease_key(prefix: str, account: str) -> str:
    return f"{prefix}:lease:{{{account}}}"


def fence_key(prefix: str, account: str) -> str:
    return f"{prefix}:fence:{{{account}}}"


class Lease:
    def __init__(self, redis: Redis, prefix: str, account: str, owner: str, ttl_seconds: float) -> None:
        self.redis = redis
        self.key = lease_key(prefix, account)
        self.fence_key = fence_key(prefix, account)
        self.inbound_fence_key = inbound_fence_key(prefix, account)
        self.owner = owner
        self.ttl_ms = int(ttl_seconds * 1000)
        self.token = 0  # the fencing token of the current tenure; 0 when not held
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._raise_copy = redis.register_script(_RAISE_COPY)

    @property
    def fence(self) -> Fence:
        return Fence(self.fence_key, str(self.token))

    async def acquire(self) -> bool:
        token = int(await self._acquire(keys=[self.key, self.fence_key], args=[self.owner, self.ttl_ms]))
        if token > 0:  # a second script: the copy is in another Cluster slot (module docstring)
            await self._raise_copy(keys=[self.inbound_fence_key], args=[token])
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
