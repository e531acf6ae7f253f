"""The receive loop a pull adapter runs: the Talk user account's long poll
per room (adapters/nctalk/polling.py), Matrix's one ``/sync``
(adapters/matrix/receiving.py).

The adapter keeps its protocol — one ``step``: fetch a batch, turn it into
events and cursor writes, ``ctx.commit_inbound`` them — and ``Receiver``
keeps the rest, which both did alike: the step again and again; a failure
the adapter names transient (the server away, a 5xx, a 429, an answer that
does not parse) waits a capped, jittered backoff (or what the server asked,
up to ``HINT_MAX``) and is reported through the context's health calls
(``room_failed`` for a room's loop, ``receive_failed`` for the account's
one loop: the gauge, ``talkbridge status``, the alert) and logged, the
first time as an ALERT; the first success after failures reports the
recovery.

Everything else ends the loop by raising: ``Fenced`` (a commit under a stale
lease token: the account runner stops the account here), ``AccountFailed``
or the adapter's own refusal (the adapter reports it with
``ctx.credentials_refused`` and decides: probe by itself, or leave the pause
to the runner), a bug (the runner restarts ``receive``).

Limits: one step at a time per loop, and no deadline of its own on a step
(the adapter's request timeouts bound it).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge.adapter import AdapterContext

HINT_MAX = 600.0  # the longest wait a server's Retry-After (or retry_after_ms) gets
# Past this many doublings every cap is reached; a float doubled 1,024 times
# overflows, which a server away for a day of 1-minute retries would reach.
MAX_DOUBLINGS = 62


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential from ``first`` seconds up to ``cap``, each wait drawn from
    its upper half, so the rooms (and instances) of a fleet do not come back
    in step; a wait the server asked for is honoured instead, up to HINT_MAX."""

    first: float
    cap: float
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, failures: int, hint: float | None = None) -> float:
        if hint is not None:
            return min(max(0.0, hint), HINT_MAX)
        step = min(self.first * 2 ** min(failures - 1, MAX_DOUBLINGS), self.cap)
        return step / 2 + self.rng.uniform(0, step / 2)


class Receiver:
    """One receive loop: ``run(step)`` until ``until()`` is false or the step
    raises something not ``transient``.

    ``what`` names the loop in the log ("room X", "sync"); ``room`` is the
    room it reads (its failures are the room's, alerted per room), None when
    the loop reads the whole account. ``retry_after`` reads a transient
    failure's server-given wait. ``pause`` is how it waits (a test records
    the delays instead)."""

    def __init__(
        self,
        ctx: AdapterContext,
        what: str,
        *,
        room: str | None,
        transient: tuple[type[BaseException], ...],
        backoff: Backoff,
        pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
        retry_after: Callable[[BaseException], float | None] = lambda exc: None,
    ) -> None:
        self.ctx = ctx
        self.what = what
        self.room = room
        self.transient = transient
        self.backoff = backoff
        self.pause = pause
        self.retry_after = retry_after
        self.failures = 0  # in a row, since the last success
        self._since = 0.0  # wall time of the first of them

    async def run(self, step: Callable[[], Awaitable[object]], until: Callable[[], bool] = lambda: True) -> None:
        while until():
            try:
                await step()
            except self.transient as exc:
                self.failures += 1
                delay = self.backoff.delay(self.failures, self.retry_after(exc))
                await self._failed(str(exc), delay)
                await self.pause(delay)
                continue
            if self.failures:
                await self._recovered()

    async def _failed(self, why: str, delay: float) -> None:
        name, log = self.ctx.account.name, self.ctx.log
        if self.failures == 1:
            self._since = time.time()
            log.error("%s: ALERT: %s failing: %s; retrying in %.1fs", name, self.what, why, delay)
        else:
            log.warning(
                "%s: %s still failing (%d times): %s; retry in %.1fs", name, self.what, self.failures, why, delay
            )
        if self.room is not None:
            await self.ctx.room_failed(self.room, why, delay)
        else:
            await self.ctx.receive_failed(why, delay)

    async def _recovered(self) -> None:
        self.ctx.log.warning(
            "%s: %s recovered after %d failures (%.0fs)",
            self.ctx.account.name, self.what, self.failures, time.time() - self._since,
        )  # fmt: skip
        self.failures = 0
        if self.room is not None:
            await self.ctx.room_recovered(self.room)
        else:
            await self.ctx.receive_recovered()
