"""An account's degraded mark in Redis, so ``talkbridge status`` (another
process, maybe on another host) sees what the owning daemon's ``/readyz`` says.

The mark expires by itself: an owner that dies while its account is degraded
leaves no stale mark beyond the pause it announced plus one lease period.
"""

from __future__ import annotations

from collections.abc import Iterable

from redis.asyncio import Redis


def degraded_key(prefix: str, account: str) -> str:
    return f"{prefix}:degraded:{{{account}}}"


async def mark_degraded(redis: Redis, prefix: str, account: str, reason: str, seconds: float) -> None:
    await redis.set(degraded_key(prefix, account), reason, px=max(1, int(seconds * 1000)))


async def clear_degraded(redis: Redis, prefix: str, account: str) -> None:
    await redis.delete(degraded_key(prefix, account))


async def degraded_accounts(redis: Redis, prefix: str, accounts: Iterable[str]) -> dict[str, str]:
    """Account -> why it is degraded, for those marked."""
    names = list(accounts)
    if not names:
        return {}
    # One GET each rather than an MGET: on Redis Cluster the keys live in different slots.
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.get(degraded_key(prefix, name))
    reasons = await pipe.execute()
    return {name: reason.decode() for name, reason in zip(names, reasons, strict=True) if reason is not None}
