"""WARN+ log records of every instance in one capped Redis stream: the admin
page's log view reads the fleet's warnings and errors there (issue 12).

The stream is ``{prefix}:log``, trimmed approximately (``MAXLEN ~``) to
``LOG_STREAM_MAXLEN`` entries. Every entry has these fields, all strings:

============  =============================================================
``ts``        when it was logged: seconds since the epoch, milliseconds
              after the point (``"1718000000.123"``)
``level``     ``WARNING``, ``ERROR`` or ``CRITICAL``
``logger``    the logger's name (``"talkbridge.api.a"``)
``account``   the account concerned, or ``""``: the record's ``account``
              extra, else the logger's name when it is ``talkbridge.ACCOUNT``
``instance``  the daemon or worker instance that logged it
``message``   the formatted message; a traceback follows on later lines
============  =============================================================

Logging never waits for Redis. ``emit`` (under the handler's lock, from any
thread) appends to a bounded in-memory queue; a task on the event loop
writes the queue out in pipelined batches. While Redis is away or slow a
batch is dropped and counted, records keep queueing up to the queue's
capacity (beyond it they are dropped and counted too), and the first write
that succeeds afterwards adds one WARNING entry saying how many were lost.
The writer's own troubles (and anything logged while it writes, redis-py's
included) never come back into the stream.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.keys import log_key

LOG_STREAM_MAXLEN = 10_000  # entries kept (approximately: MAXLEN ~)
QUEUE_CAPACITY = 2_000  # records waiting in memory for Redis; beyond this they are dropped
BATCH = 200  # records per pipelined write
WRITE_TIMEOUT = 2.0  # seconds a write may take before its batch counts as lost
RETRY_MIN = 0.5  # seconds before writing again after a failed write…
RETRY_MAX = 30.0  # …doubling while Redis stays away, up to this
MESSAGE_MAX = 8_000  # characters of a message (with its traceback) kept
FIELDS = ("ts", "level", "logger", "account", "instance", "message")

# Set inside the writer task: whatever is logged from there is not streamed.
_WRITING: contextvars.ContextVar[bool] = contextvars.ContextVar("talkbridge_logstream_writing", default=False)


class LogStream(logging.Handler):
    """A logging handler feeding ``{prefix}:log`` (see the module's docstring).

    Records queue from the moment the handler is installed; ``start`` (on
    the running loop, once Redis and the instance's id are known) begins
    writing them out, ``aclose`` writes what is left, briefly, and stops."""

    def __init__(
        self,
        prefix: str,
        accounts: Iterable[str] = (),
        *,
        maxlen: int = LOG_STREAM_MAXLEN,
        capacity: int = QUEUE_CAPACITY,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(logging.WARNING)
        self.key = log_key(prefix)
        self.accounts = frozenset(accounts)
        self.maxlen = maxlen
        self.capacity = capacity
        self.on_drop = on_drop  # e.g. a Prometheus counter's inc
        self.instance = ""
        self.dropped = 0  # records lost in all (queue full, or Redis away)
        self.written = 0  # entries written
        self._unreported = 0  # lost since the last entry that said so
        self._queue: deque[dict[str, str]] = deque()
        self._formatter = logging.Formatter()
        self._redis: Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    # logging's side: any thread, under self.lock (Handler.handle takes it) ----------------
    def emit(self, record: logging.LogRecord) -> None:
        if _WRITING.get():
            return
        try:
            entry = self._entry(record)
        except Exception:
            self.handleError(record)
            return
        if len(self._queue) >= self.capacity:
            self._lost(1)
            return
        self._queue.append(entry)
        if len(self._queue) == 1:
            self._notify()

    def _entry(self, record: logging.LogRecord) -> dict[str, str]:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self._formatter.formatException(record.exc_info)
        elif record.exc_text:
            message += "\n" + record.exc_text
        if len(message) > MESSAGE_MAX:
            message = message[:MESSAGE_MAX] + "…"
        instance = getattr(record, "instance", None)
        return {
            "ts": f"{record.created:.3f}",
            "level": record.levelname,
            "logger": record.name,
            "account": self.account_of(record),
            "instance": instance if isinstance(instance, str) else "",
            "message": message,
        }

    def account_of(self, record: logging.LogRecord) -> str:
        """The record's ``account`` extra; else the account a daemon logger
        (``talkbridge.ACCOUNT``) names; else ``""``."""
        account = getattr(record, "account", None)
        if isinstance(account, str):
            return account
        name = record.name
        if name.startswith("talkbridge."):
            suffix = name[len("talkbridge.") :]
            # without the config's names: an account is always "protocol.name"
            if suffix in self.accounts or (not self.accounts and "." in suffix):
                return suffix
        return ""

    def _lost(self, count: int) -> None:
        self.dropped += count
        self._unreported += count
        if self.on_drop is not None:
            self.on_drop(count)

    def _notify(self) -> None:
        wake, loop = self._wake, self._loop
        if wake is None or loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            wake.set()
        else:
            loop.call_soon_threadsafe(wake.set)

    # the writer: on the event loop ------------------------------------------------------------
    def start(self, redis: Redis, instance: str, registry: CollectorRegistry | None = None) -> None:
        """Begin writing (on the running loop): what queued before goes first.
        ``registry``: count the records dropped there too
        (``talkbridge_log_stream_dropped_total``)."""
        if registry is not None:
            counter = Counter(
                "talkbridge_log_stream_dropped",
                "WARN+ log records not written to the fleet's log stream (Redis away, or the queue full)",
                registry=registry,
            )
            counter.inc(self.dropped)
            self.on_drop = counter.inc
        self._redis = redis
        self.instance = instance
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._writer(), name="logstream")

    async def aclose(self, within: float = WRITE_TIMEOUT) -> None:
        """Stop the writer; write what is still queued if Redis answers within
        ``within`` seconds (a stopping daemon's last errors are the interesting ones)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        token = _WRITING.set(True)
        try:
            async with asyncio.timeout(within):
                while self._queue:
                    await self._write_batch()
        except (RedisError, OSError, TimeoutError):
            with self.lock:
                self._lost(len(self._queue))
                self._queue.clear()
        finally:
            _WRITING.reset(token)
            self._wake = None

    async def _writer(self) -> None:
        _WRITING.set(True)  # this task's context only
        assert self._wake is not None
        pause = RETRY_MIN
        while True:
            if not self._queue:
                self._wake.clear()
                if not self._queue:  # emptied before the clear: nothing was missed
                    await self._wake.wait()
                continue
            try:
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await self._write_batch()
            except (RedisError, OSError, TimeoutError):
                # keep logging alive: what queues meanwhile is written once Redis answers
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX)
            else:
                pause = RETRY_MIN

    async def _write_batch(self) -> None:
        """Write up to BATCH queued records (and the note of earlier losses);
        on failure they are counted as lost, never retried (no duplicates)."""
        assert self._redis is not None
        with self.lock:
            batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            unreported = self._unreported
        entries = list(batch)
        if unreported:
            entries.insert(0, self._loss_note(unreported))
        pipe = self._redis.pipeline(transaction=False)
        for entry in entries:
            entry["instance"] = entry["instance"] or self.instance
            pipe.xadd(self.key, entry, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
        try:
            await pipe.execute()
        except BaseException:
            with self.lock:
                self._lost(len(batch))
            raise
        with self.lock:
            self._unreported -= unreported
        self.written += len(entries)

    def _loss_note(self, count: int) -> dict[str, str]:
        return {
            "ts": f"{time.time():.3f}",
            "level": "WARNING",
            "logger": "talkbridge.logstream",
            "account": "",
            "instance": self.instance,
            "message": f"{count} log record(s) were not streamed here (Redis unavailable or the queue full); "
            "this instance's own log has them",
        }


def install(prefix: str, accounts: Iterable[str], root: logging.Logger | None = None) -> LogStream:
    """Add a LogStream to the root logger; WARNING records reach it even when
    the configured level (the console's) is ERROR."""
    root = root or logging.getLogger()
    if root.level > logging.WARNING:
        for handler in root.handlers:
            if handler.level < root.level:
                handler.setLevel(root.level)  # the console keeps the configured level
        root.setLevel(logging.WARNING)
    handler = LogStream(prefix, accounts)
    root.addHandler(handler)
    return handler
