"""``bridge.logstream``: WARN+ records into the capped ``{prefix}:log`` stream
(the admin page's log view), written by a task so logging never waits for
Redis; what cannot be written is dropped and counted, then said in the
stream. Against a real Redis (and one that goes away)."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from bridge.keys import log_key
from bridge.logstream import FIELDS, LogStream, install
from tests.helpers import free_port, start_redis_server
from tests.talkbot_rig import until

KEY = log_key("tb")


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    """A private ``talkbridge`` tree: the handler is attached here, not to the root."""
    log = logging.getLogger("talkbridge")
    old_level, old_propagate = log.level, log.propagate
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        yield log
    finally:
        for handler in list(log.handlers):
            if isinstance(handler, LogStream):
                log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate


@pytest.fixture
async def stream(logger: logging.Logger) -> AsyncIterator[LogStream]:
    handler = LogStream("tb", ["api.a", "api.b"])
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        await handler.aclose()


async def entries(redis: Redis) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in fields.items()} for _id, fields in await redis.xrange(KEY)]


async def test_warnings_and_errors_are_streamed_with_their_context(
    redis: Redis, stream: LogStream, logger: logging.Logger
) -> None:
    stream.start(redis, "host-1-abc")
    logger.info("not streamed")
    logging.getLogger("talkbridge.api.a").warning("api.a: slow answer from %s", "there")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("talkbridge.api.a").exception("api.a: send failed")
    logging.getLogger("talkbridge.alerts").critical("ALERT x", extra={"account": "api.b"})
    logging.getLogger("talkbridge.http").error("http: cannot store")
    logging.getLogger("talkbridge.unknown.acct").warning("a logger naming no account of the config")
    logging.getLogger("talkbridge.api.a").debug("not streamed either")
    got = await until(lambda: entries_if(redis, 5), what="five entries")
    assert [(e["level"], e["logger"], e["account"]) for e in got] == [
        ("WARNING", "talkbridge.api.a", "api.a"),
        ("ERROR", "talkbridge.api.a", "api.a"),
        ("CRITICAL", "talkbridge.alerts", "api.b"),
        ("ERROR", "talkbridge.http", ""),
        ("WARNING", "talkbridge.unknown.acct", ""),
    ]
    assert all(tuple(e) == FIELDS and e["instance"] == "host-1-abc" for e in got)
    assert got[0]["message"] == "api.a: slow answer from there"
    assert got[1]["message"].startswith("api.a: send failed\nTraceback (most recent call last):")
    assert got[1]["message"].endswith("RuntimeError: boom")
    assert all(abs(float(e["ts"]) - float(got[0]["ts"])) < 60 for e in got) and "." in got[0]["ts"]
    assert stream.dropped == 0


async def entries_if(redis: Redis, count: int) -> list[dict[str, str]] | None:
    got = await entries(redis)
    return got if len(got) >= count else None


async def test_what_is_logged_before_start_is_written_once_started_and_overflow_is_counted(
    redis: Redis, logger: logging.Logger
) -> None:
    handler = LogStream("tb", capacity=3)
    logger.addHandler(handler)
    try:
        for i in range(5):
            logger.warning("config: warning %d", i)
        assert handler.dropped == 2  # the queue holds three
        handler.start(redis, "inst")
        got = await until(lambda: entries_if(redis, 4), what="the queued records and the note")
        assert got[0]["logger"] == "talkbridge.logstream" and got[0]["level"] == "WARNING"
        assert got[0]["message"].startswith("2 log record(s) were not streamed here")
        assert [e["message"] for e in got[1:]] == ["config: warning 0", "config: warning 1", "config: warning 2"]
    finally:
        await handler.aclose()


async def test_with_redis_away_records_are_dropped_and_counted_and_said_once_it_is_back(
    tmp_path: Path, logger: logging.Logger
) -> None:
    port = free_port()
    client = Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    handler = LogStream("tb", capacity=100)
    logger.addHandler(handler)
    server = None
    try:
        handler.start(client, "inst")
        for i in range(1000):  # never waits: a full queue drops
            logger.error("while Redis is away %d", i)
        await until(lambda: handler.dropped == 1000, what="every record counted as dropped")
        server = start_redis_server(tmp_path, port)
        logger.error("Redis is back")
        got = await until(lambda: entries_if(client, 2), what="the note and the new record")
        assert got[0]["message"].startswith("1000 log record(s) were not streamed here")
        assert got[1]["message"] == "Redis is back"
        assert handler.dropped == 1000
    finally:
        await handler.aclose()
        await client.aclose()
        if server is not None:
            server.stop()


async def test_the_stream_is_capped(redis: Redis, logger: logging.Logger) -> None:
    handler = LogStream("tb", maxlen=100)
    logger.addHandler(handler)
    try:
        handler.start(redis, "inst")
        for i in range(1000):
            logger.warning("record %d", i)
        await until(lambda: handler.written >= 1000, what="every record written")
        length = await redis.xlen(KEY)
        assert 100 <= length <= 300  # MAXLEN ~ trims whole macro nodes (100 entries each by default)
        last = await redis.xrevrange(KEY, count=1)
        assert last[0][1][b"message"] == b"record 999"
    finally:
        await handler.aclose()


async def test_records_from_other_threads_are_streamed(redis: Redis, stream: LogStream) -> None:
    stream.start(redis, "inst")
    threads = [
        threading.Thread(target=logging.getLogger("talkbridge.api.b").warning, args=(f"from thread {i}",))
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got = await until(lambda: entries_if(redis, 4), what="the threads' records")
    assert sorted(e["message"] for e in got) == [f"from thread {i}" for i in range(4)]
    assert {e["account"] for e in got} == {"api.b"}


async def test_aclose_writes_what_is_left(redis: Redis, logger: logging.Logger) -> None:
    handler = LogStream("tb")
    logger.addHandler(handler)
    handler.start(redis, "inst")
    logger.critical("the last words")
    await handler.aclose()
    assert [e["message"] for e in await entries(redis)] == ["the last words"]


def test_install_keeps_warnings_flowing_when_the_console_logs_errors_only() -> None:
    root = logging.Logger("isolated-root")
    console = logging.StreamHandler()
    root.addHandler(console)
    root.setLevel(logging.ERROR)
    handler = install("tb", ["api.a"], root=root)
    assert handler in root.handlers and handler.level == logging.WARNING
    assert root.level == logging.WARNING and console.level == logging.ERROR  # the console still shows errors only
    assert handler.account_of(root.makeRecord("talkbridge.api.a", logging.WARNING, "f", 1, "m", (), None)) == "api.a"
