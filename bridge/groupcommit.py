"""Group commit for Redis commands issued by many concurrent requests.

Commands queued while a pipeline is in flight go out together in the next
one: one write and one read for many concurrent webhooks or POSTs, instead
of one round trip each. Every caller still gets its own results only once
Redis has answered, so "acknowledged" keeps meaning "stored".
"""

from __future__ import annotations

import asyncio
from typing import Any

Op = tuple[str, tuple[Any, ...], dict[str, Any]]  # (redis method, args, kwargs)


class GroupCommit:
    """Run lists of commands, batching concurrent callers into one pipeline."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._queue: list[tuple[list[Op], asyncio.Future[list[Any]]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def run(self, ops: list[Op]) -> list[Any]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((ops, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let requests already being handled join this batch
        while self._queue:
            batch, self._queue = self._queue, []
            pipe = self.redis.pipeline(transaction=False)
            for ops, _ in batch:
                for name, args, kw in ops:
                    getattr(pipe, name)(*args, **kw)
            try:
                # One caller's failing command must not fail the others'.
                results = await pipe.execute(raise_on_error=False)
            except Exception as exc:  # the connection itself: everyone's problem
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            at = 0
            for ops, future in batch:
                mine = results[at : at + len(ops)]
                at += len(ops)
                if future.done():
                    continue
                error = next((r for r in mine if isinstance(r, Exception)), None)
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(mine)
