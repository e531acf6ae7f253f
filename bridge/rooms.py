"""The rooms an account is in: the one place the core and the adapters share.

A gateway entry whose channel is ``*`` means "every room the account is in"
(a Talk bot is enabled per room, so the set changes at run time). The adapter
keeps the set up to date through ``AdapterContext.rooms``; the route loop
reads it through the same class, so neither side knows the other's key names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridge.keys import rooms_key

if TYPE_CHECKING:
    from redis.asyncio import Redis


class Rooms:
    """One account's room set in Redis."""

    __slots__ = ("key", "redis")

    def __init__(self, redis: Redis, key_prefix: str, account: str) -> None:
        self.redis = redis
        # Public so an adapter can put membership changes into its own atomic
        # batch beside other keys (the Talk bot moves a room between this set
        # and its refused-rooms set in one round trip).
        self.key = rooms_key(key_prefix, account)

    async def add(self, *rooms: str) -> None:
        if rooms:
            await self.redis.sadd(self.key, *rooms)

    async def remove(self, *rooms: str) -> None:
        if rooms:
            await self.redis.srem(self.key, *rooms)

    async def members(self) -> set[str]:
        return {member.decode() for member in await self.redis.smembers(self.key)}
