"""Group commit for Redis commands issued by many concurrent requests.

While one round trip is in flight, the commands of every caller that arrives
meanwhile are queued and go out together in the next pipeline: one write and
one read for many concurrent webhooks or POSTs, instead of one round trip
each. A caller that finds nothing in flight goes out at once, alone — one
request at a time (a bot posting message after message) pays no batching
delay. Every caller still gets its own results only once Redis has answered,
so "acknowledged" keeps meaning "stored".

On Redis Cluster nothing is batched: redis-py's cluster pipeline refuses
scripts (EVALSHA), so there every caller's commands go out one by one, each
caller on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

Op = tuple[str, tuple[Any, ...], dict[str, Any]]  # (redis method, args, kwargs)
Waiting = tuple[list[Op], asyncio.Future[list[Any]]]


class GroupCommit:
    """Run lists of commands, batching concurrent callers into one pipeline."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._queue: list[Waiting] = []
        self._busy = False  # a round trip is in flight (ours or the flusher's)
        self._flusher: asyncio.Task[None] | None = None
        self._alone = isinstance(redis, RedisCluster)  # no pipelines (module docstring)

    async def run(self, ops: list[Op]) -> list[Any]:
        if self._alone:
            return [await getattr(self.redis, name)(*args, **kw) for name, args, kw in ops]
        if self._busy:  # join the next pipeline
            future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            self._queue.append((ops, future))
            return await future
        self._busy = True
        try:
            if len(ops) == 1:  # one command: no pipeline object to build
                name, args, kw = ops[0]
                return [await getattr(self.redis, name)(*args, **kw)]
            pipe = self.redis.pipeline(transaction=False)
            for name, args, kw in ops:
                getattr(pipe, name)(*args, **kw)
            return list(await pipe.execute())
        finally:
            if self._queue:
                self._flusher = asyncio.create_task(self._flush())  # keeps _busy until the queue is empty
            else:
                self._busy = False

    async def run_script(
        self, script: Any, keys: Sequence[Any], args: Sequence[Any], also: Sequence[Op] = ()
    ) -> list[Any]:
        """A registered Lua ``script`` (redis-py's ``register_script``) by its
        SHA, then ``also``, like ``run``. A server that lacks the script (new,
        restarted, flushed) answers NOSCRIPT having run none of it: the script
        is loaded and the list run once more, so ``also`` must be safe to run
        twice."""
        ops: list[Op] = [("evalsha", (script.sha, len(keys), *keys, *args), {}), *also]
        try:
            return await self.run(ops)
        except NoScriptError:
            await self.redis.script_load(script.script)
            return await self.run(ops)

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._execute(batch)
        finally:
            self._busy = False

    async def _execute(self, batch: list[Waiting]) -> None:
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
            return
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
