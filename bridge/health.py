"""An account's health: its degraded mark in Redis, so ``talkbridge status``
(another process, maybe on another host) sees what the owning daemon's
``/readyz`` says, and ``AccountHealth``, what its adapter reports (failing
rooms, refused credentials) kept in one place for the gauges, the mark and
the alert watch.

The mark expires by itself: an owner that dies while its account is degraded
leaves no stale mark beyond the pause it announced plus one lease period.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from bridge.metrics import Metrics

from bridge.keys import degraded_key


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


SHOWN_ROOMS = 5  # failing rooms named in the degraded mark; the rest are counted
REFUSED_MARK_SECONDS = 3600.0  # how long a refusal with no retry of the adapter's own stays marked


class AccountHealth:
    """One account's health as its adapter reports it, kept in one place.

    The adapter calls it through its ``AdapterContext`` (``room_failed``,
    ``room_recovered``, ``receive_failed``, ``receive_recovered``,
    ``credentials_refused``, ``credentials_accepted``); each call sets the
    Prometheus gauges (``talkbridge_room_failed``, ``talkbridge_account_failed``),
    writes the degraded mark ``talkbridge status`` and the management page
    show, and changes the state the alert watch (bridge/alerts_watch.py)
    reads — so an adapter cannot update one and forget another. The gauges
    are written here and never read back.

    Held by the account's owner only, in memory: a new owner starts clean
    (the gauges of an account owned elsewhere are not this process's), and
    the degraded mark expires by itself (twice the retry, at least a minute)
    should the owner die."""

    def __init__(self, redis: Redis, prefix: str, account: str, metrics: Metrics, log: logging.Logger) -> None:
        self.redis = redis
        self.prefix = prefix
        self.account = account
        self.metrics = metrics
        self.log = log
        self.refused: str | None = None  # why the credentials are refused, until accepted again
        self._refused_retry: float | None = None  # the adapter's own probe interval, if it probes
        self._rooms: dict[str, str] = {}  # room -> why it fails
        self._receive: str | None = None  # why receiving as a whole fails (the server away)

    def disowned(self) -> None:
        """This instance no longer owns the account: its gauges go back to 0
        and its state is forgotten, so a fleet's alerts see only the owner's
        (a stale 1 here would alert for ever once another instance took over).
        The degraded mark in Redis is the account's, not this instance's: the
        new owner rewrites it, or it expires."""
        self.metrics.account_failed.labels(self.account).set(0)
        for room in self._rooms:
            self.metrics.room_failed.labels(self.account, room).set(0)
        self.refused, self._refused_retry, self._rooms, self._receive = None, None, {}, None

    def failing_rooms(self) -> dict[str, str]:
        """Rooms the adapter reported failing and not recovered: room -> why."""
        return dict(self._rooms)

    async def room_failed(self, room: str, reason: str, retry_in: float) -> None:
        self._rooms[room] = reason
        self.metrics.room_failed.labels(self.account, room).set(1)
        await self._mark(retry_in)

    async def room_recovered(self, room: str) -> None:
        """``room`` works again, or the account left it; nothing when it was not failing."""
        if self._rooms.pop(room, None) is None:
            return
        self.metrics.room_failed.labels(self.account, room).set(0)
        await self._mark(0)

    async def receive_failed(self, reason: str, retry_in: float) -> None:
        """Receiving as a whole fails (one sync for every room: the server is
        away). Shown as degraded; the runner's watch alerts on rooms and
        credentials, not on this."""
        self._receive = reason
        await self._mark(retry_in)

    async def receive_recovered(self) -> None:
        if self._receive is None:
            return
        self._receive = None
        await self._mark(0)

    async def credentials_refused(self, reason: str, retry_in: float | None = None) -> None:
        """The server refused the account's credentials. ``retry_in``: the
        adapter probes again by itself that often (None: it does not; the
        runner pauses the account)."""
        self.refused, self._refused_retry = reason, retry_in
        self.metrics.account_failed.labels(self.account).set(1)
        if retry_in is not None:  # otherwise the runner, pausing the account, marks it
            await self._mark(retry_in)

    async def credentials_accepted(self) -> None:
        """The credentials work again (a probe passed), or the runner's pause
        after a refusal is over and the account tries them again."""
        marked = self.refused is not None and self._refused_retry is not None
        self.refused, self._refused_retry = None, None
        self.metrics.account_failed.labels(self.account).set(0)
        if marked:
            await self._mark(0)

    async def _mark(self, retry_in: float) -> None:
        """The degraded mark from the whole state: refused credentials first,
        else what fails (receiving, then the rooms), else none."""
        problems = ([("receiving", self._receive)] if self._receive is not None else []) + [
            (f"room {room}", why) for room, why in sorted(self._rooms.items())
        ]
        try:
            if self.refused is not None:
                why = f"credentials refused ({self.refused})"
                if self._refused_retry:
                    why += f"; one probe every {self._refused_retry:.0f}s"
                seconds = (self._refused_retry or REFUSED_MARK_SECONDS) + 60
                await mark_degraded(self.redis, self.prefix, self.account, why, seconds)
            elif problems:
                text = "; ".join(f"{what}: {why}" for what, why in problems[:SHOWN_ROOMS])
                if len(problems) > SHOWN_ROOMS:
                    text += f" (and {len(problems) - SHOWN_ROOMS} more)"
                await mark_degraded(self.redis, self.prefix, self.account, text, max(60.0, 2 * retry_in))
            else:
                await clear_degraded(self.redis, self.prefix, self.account)
        except (RedisError, OSError) as exc:  # the gauges and the watch have it; only status misses it
            self.log.warning("%s: could not record the account's health: %s", self.account, exc)
