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

Replicas (``min_replicas``, ``[redis] MinReplicas``): Redis replicates
asynchronously, so "stored" on the master is not yet "survives a failover".
With ``min_replicas`` > 0 every pipeline ends with ``WAIT min_replicas
timeout``, which returns once the replicas have every write this connection
made (and so everything the master wrote before it: the replication stream
is one ordered stream). One WAIT per pipeline: concurrent callers share it
as they share the round trip. A WAIT that answers fewer replicas fails every
caller of that pipeline with ``NotReplicated`` (their writes are on the
master and may or may not survive a failover: the caller answers 503 and
its client retries) and no caller of any other pipeline. ``barrier`` waits
for whatever this process wrote before it (a tiny write, then WAIT), for
writes that did not go through here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from bridge.keys import replicated_key

Op = tuple[str, tuple[Any, ...], dict[str, Any]]  # (redis method, args, kwargs)
Waiting = tuple[list[Op], asyncio.Future[list[Any]]]


class NotReplicated(RedisError):
    """The master stored the writes, but fewer replicas than ``[redis]
    MinReplicas`` confirmed them in time: a failover now could lose them.
    A RedisError, so whoever answers a client answers 503 (retry later) and a
    loop backs off and retries, its entries still pending."""

    def __init__(self, confirmed: int, wanted: int, timeout_ms: int) -> None:
        self.confirmed, self.wanted = confirmed, wanted
        super().__init__(
            f"stored on the Redis master but on {confirmed} of the {wanted} replicas [redis] MinReplicas "
            f"asks for within {timeout_ms / 1000:g} s (replicas down or lagging); retry later"
        )


class GroupCommit:
    """Run lists of commands, batching concurrent callers into one pipeline."""

    def __init__(self, redis: Any, min_replicas: int = 0, wait_seconds: float = 2.0, barrier_key: str = "") -> None:
        self.redis = redis
        self.min_replicas = min_replicas
        self.wait_ms = max(1, round(wait_seconds * 1000))  # WAIT's 0 would mean forever
        self._barrier: Op = ("set", (barrier_key or replicated_key("tb"), b"1"), {"px": 60_000})
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
            if self.min_replicas > 0:  # a pipeline of its own, with its WAIT
                future = asyncio.get_running_loop().create_future()
                await self._execute([(ops, future)])
                return future.result()
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

    async def barrier(self, reads: Sequence[Op] = ()) -> list[Any]:
        """Return once everything this process wrote before the call (through
        here or not) is on ``min_replicas`` replicas; raises ``NotReplicated``
        when they do not confirm it in time. At once when none are asked for.
        ``reads`` go out in the same round trip; their answers are returned.

        A write of its own first: WAIT waits for the connection's last write
        (a read need not move that mark), and another connection's earlier
        writes precede it in the replication stream."""
        if self.min_replicas > 0 and not self._alone:
            return (await self.run([*reads, self._barrier]))[:-1]
        return [await getattr(self.redis, name)(*args, **kw) for name, args, kw in reads]

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
        if self.min_replicas > 0:
            pipe.wait(self.min_replicas, self.wait_ms)
        try:
            # One caller's failing command must not fail the others'.
            results = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection itself: everyone's problem
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        short: Exception | None = None
        if self.min_replicas > 0:
            confirmed = results.pop()
            if isinstance(confirmed, Exception):  # WAIT refused (a replica answered): nobody's write is confirmed
                short = confirmed
            elif int(confirmed) < self.min_replicas:
                short = NotReplicated(int(confirmed), self.min_replicas, self.wait_ms)
        at = 0
        for ops, future in batch:
            mine = results[at : at + len(ops)]
            at += len(ops)
            if future.done():
                continue
            # its own error first: it says more (FENCED: nothing was written)
            error = next((r for r in mine if isinstance(r, Exception)), short)
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(mine)
