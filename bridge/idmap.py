"""Source id <-> delivered ids, so replies, edits, deletions and reactions
follow a message across networks.

Every message has a *canonical* reference: where it was first written
(account, channel, native id). Delivering a copy records

- ``P:map:CANONICAL␟ACCOUNT␟CHANNEL``  the copy's native id in that channel
- ``P:rev:COPY``                         the canonical reference of a copy

(two plain keys with their own expiry: one SET each, no HSET + EXPIRE)

so an event that refers to *any* copy (a Talk user replying to the bridged
copy of a Matrix message) resolves to the right native id in every other
channel. Unlike Matterbridge's 5,000-entry in-memory cache this survives
restarts and is shared by every daemon; entries expire after
``MessageMapDays``.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from bridge.events import Delivery, EventKind

SEP = "\x1f"  # never appears in account names, channel names or ids


def ref(account: str, channel: str, native_id: str) -> str:
    return f"{account}{SEP}{channel}{SEP}{native_id}"


def canonical_of(delivery: Delivery) -> str | None:
    """The canonical reference of the message a delivery copies (None unless
    it is a new message with a source id: only those get copies to map)."""
    event = delivery.event
    if event.kind != EventKind.MESSAGE or not event.native_id:
        return None
    return ref(event.account, event.channel, event.native_id)


def split_ref(value: str) -> tuple[str, str, str]:
    account, channel, native_id = value.split(SEP, 2)
    return account, channel, native_id


class IdMap:
    def __init__(self, redis: Redis, prefix: str, ttl_seconds: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl = ttl_seconds

    def _map(self, canonical: str, dest_account: str, dest_channel: str) -> str:
        return f"{self.prefix}:map:{canonical}{SEP}{dest_account}{SEP}{dest_channel}"

    def _rev(self, copy: str) -> str:
        return f"{self.prefix}:rev:{copy}"

    async def canonical(self, account: str, channel: str, native_id: str) -> str:
        """The canonical reference of a message seen as ``native_id`` here."""
        here = ref(account, channel, native_id)
        found = await self.redis.get(self._rev(here))
        return found.decode() if found is not None else here

    async def resolve(
        self, account: str, channel: str, native_id: str, dest_account: str, dest_channel: str
    ) -> str | None:
        """The native id, in the destination, of the message ``native_id``."""
        canonical = await self.canonical(account, channel, native_id)
        c_account, c_channel, c_native = split_ref(canonical)
        if (c_account, c_channel) == (dest_account, dest_channel):
            return c_native
        found = await self.redis.get(self._map(canonical, dest_account, dest_channel))
        return found.decode() if found is not None else None

    async def learn(self, canonical: str, dest_account: str, dest_channel: str, dest_native_id: str) -> None:
        """Record a copy whose id became known only after its delivery."""
        pipe = self.redis.pipeline(transaction=False)
        self.record(pipe, canonical, dest_account, dest_channel, dest_native_id)
        await pipe.execute()

    def record(
        self,
        pipe: Any,
        canonical: str,
        dest_account: str,
        dest_channel: str,
        dest_native_id: str,
    ) -> None:
        """Queue the writes for one delivered copy on ``pipe``."""
        pipe.set(self._map(canonical, dest_account, dest_channel), dest_native_id, ex=self.ttl)
        pipe.set(self._rev(ref(dest_account, dest_channel, dest_native_id)), canonical, ex=self.ttl)
