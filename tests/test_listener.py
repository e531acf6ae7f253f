"""bridge/listener.py in-process: timeouts, the connection cap, and how
refusals are answered and logged (short limits; waits are on conditions)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError

from adapters import AdapterRegistry
from bridge.cli import check_file_budget, protocol_specs
from bridge.config import ConfigError, load_config
from bridge.http import build_app
from bridge.listener import Listener, ListenerLimits, Refused, read_body
from bridge.metrics import Metrics
from tests.talkbot_rig import until

SHORT = ListenerLimits(request_timeout=0.5, idle_timeout=0.5, max_connections=3)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]

    def bad(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("test.listener", "aiohttp.server", "talkbridge.http")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


Start = Callable[..., Awaitable[Listener]]


@pytest.fixture
async def serve() -> AsyncIterator[Start]:
    started: list[Listener] = []

    async def start(app: web.Application, limits: ListenerLimits = SHORT) -> Listener:
        listener = Listener(app, "test", limits, logging.getLogger("test.listener"))
        await listener.start("127.0.0.1", 0)
        started.append(listener)
        return listener

    yield start
    for listener in started:
        await listener.cleanup()


def echo_app(release: asyncio.Event | None = None) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        try:
            body = await read_body(request, 1024)
        except Refused as exc:
            return web.json_response({"error": exc.reason}, status=exc.status)
        return web.json_response({"bytes": len(body)})

    async def wait(request: web.Request) -> web.Response:
        assert release is not None
        await release.wait()
        return web.json_response({"released": True})

    async def stubborn(request: web.Request) -> web.Response:
        try:
            await request.read()
        except Exception:
            await asyncio.Event().wait()  # never answers
        return web.json_response({})

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    async def redis_down(request: web.Request) -> web.Response:
        raise RedisConnectionError("Connection refused")

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_get("/wait", wait)
    app.router.add_get("/broken", broken)
    app.router.add_post("/stubborn", stubborn)
    app.router.add_get("/redis", redis_down)
    return app


async def send(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def answer(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends up to its close."""
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


POST_3 = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"


# timeouts -------------------------------------------------------------------------------------
async def test_an_unfinished_request_head_is_answered_408_and_closed(serve: Start, records: Records) -> None:
    listener = await serve(echo_app())
    reader, writer = await send(listener.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    raw = await asyncio.wait_for(answer(reader), 10)  # the deadline bounds a failure only
    writer.close()
    assert status_of(raw) == 408 and b'"error":"request head not received within 0.5 s"' in raw
    assert listener.open_connections == 0
    await until(lambda: any("1 head timeout" in m for m in records.at(logging.INFO)), what="summary line")
    assert not records.bad()


async def test_a_connection_that_never_speaks_is_closed_without_an_answer(serve: Start) -> None:
    listener = await serve(echo_app())
    reader, writer = await send(listener.port, b"")
    assert await asyncio.wait_for(answer(reader), 10) == b""
    writer.close()


async def test_an_unfinished_body_is_answered_408_and_closed(serve: Start, records: Records) -> None:
    listener = await serve(echo_app())
    reader, writer = await send(listener.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
    raw = await asyncio.wait_for(answer(reader), 10)
    writer.close()
    assert status_of(raw) == 408 and b"request body not received within 0.5 s" in raw
    await until(lambda: listener.open_connections == 0, what="the connection closed")
    assert not records.bad()


async def test_a_handler_that_does_not_answer_a_body_timeout_is_cut_off(serve: Start, records: Records) -> None:
    listener = await serve(echo_app())
    request = b"POST /stubborn HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab"
    reader, writer = await send(listener.port, request)
    assert await asyncio.wait_for(answer(reader), 10) == b""
    writer.close()
    await until(lambda: listener.open_connections == 0, what="the connection closed")
    await until(lambda: any("1 body timeout" in m for m in records.at(logging.INFO)), what="summary line")


async def test_an_idle_keep_alive_connection_is_closed_after_its_answer(serve: Start) -> None:
    listener = await serve(echo_app())
    reader, writer = await send(listener.port, POST_3)
    raw = await asyncio.wait_for(answer(reader), 10)  # kept alive, then closed when idle
    writer.close()
    assert status_of(raw) == 200 and raw.endswith(b'{"bytes": 3}')


async def test_a_kept_alive_connection_serves_several_requests(serve: Start) -> None:
    listener = await serve(echo_app(), ListenerLimits(request_timeout=5, idle_timeout=5, max_connections=3))
    reader, writer = await send(listener.port, POST_3)
    for _ in range(3):
        head = await asyncio.wait_for(reader.readuntil(b'{"bytes": 3}'), 10)
        assert status_of(head) == 200
        writer.write(POST_3)
    writer.close()


# the cap ---------------------------------------------------------------------------------------
async def test_at_the_cap_the_oldest_incomplete_connection_makes_room(serve: Start, records: Records) -> None:
    listener = await serve(echo_app(), ListenerLimits(request_timeout=30, idle_timeout=30, max_connections=3))
    silent = [await send(listener.port, b"GET /slo") for _ in range(3)]
    await until(lambda: listener.open_connections == 3, what="three connections")
    reader, writer = await send(listener.port, POST_3 + b"")
    oldest_reader = silent[0][0]
    assert await asyncio.wait_for(answer(oldest_reader), 10) == b""  # evicted, silently
    head = await asyncio.wait_for(reader.readuntil(b'{"bytes": 3}'), 10)
    assert status_of(head) == 200
    assert not silent[1][0].at_eof() and not silent[2][0].at_eof()
    for _, w in [*silent, (reader, writer)]:
        w.close()
    assert not records.bad()


async def test_at_the_cap_with_every_connection_busy_a_new_one_is_refused(serve: Start) -> None:
    release = asyncio.Event()
    listener = await serve(echo_app(release), ListenerLimits(request_timeout=30, idle_timeout=30, max_connections=3))
    busy = [await send(listener.port, b"GET /wait HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") for _ in range(3)]
    await until(lambda: listener.open_connections == 3, what="three busy connections")
    reader, writer = await send(listener.port, POST_3)
    assert await asyncio.wait_for(answer(reader), 10) == b""  # refused: work in progress is never cut
    writer.close()
    release.set()
    for r, w in busy:
        assert status_of(await asyncio.wait_for(answer(r), 10)) == 200
        w.close()


async def test_at_the_cap_an_idle_connection_goes_before_busy_ones(serve: Start) -> None:
    release = asyncio.Event()
    listener = await serve(echo_app(release), ListenerLimits(request_timeout=30, idle_timeout=30, max_connections=3))
    idle_reader, idle_writer = await send(listener.port, POST_3)
    await asyncio.wait_for(idle_reader.readuntil(b'{"bytes": 3}'), 10)  # answered, kept alive
    busy = [await send(listener.port, b"GET /wait HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") for _ in range(2)]
    await until(lambda: listener.open_connections == 3, what="three connections")
    reader, writer = await send(listener.port, b"GET /wait HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert await asyncio.wait_for(answer(idle_reader), 10) == b""  # the idle one made room
    release.set()
    for r, w in [*busy, (reader, writer)]:
        assert status_of(await asyncio.wait_for(answer(r), 10)) == 200
        w.close()
    idle_writer.close()


# refusals and logging ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: \x00\r\n\r\n",
    ],
)
async def test_a_request_aiohttp_refuses_is_a_400_and_one_info_line(
    serve: Start, records: Records, request_bytes: bytes
) -> None:
    listener = await serve(echo_app())
    reader, writer = await send(listener.port, request_bytes)
    raw = await asyncio.wait_for(answer(reader), 10)
    writer.close()
    assert status_of(raw) == 400 and b'{"error":"malformed request: ' in raw
    lines = [m for m in records.at(logging.INFO) + records.at(logging.DEBUG) if "malformed request from" in m]
    assert len(lines) == 1 and "127.0.0.1:" in lines[0] and "\n" not in lines[0], lines
    assert not records.bad()


async def test_non_http_traffic_is_logged_at_debug(serve: Start, records: Records) -> None:
    listener = await serve(echo_app())
    reader, writer = await send(listener.port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n")  # TLS hello
    assert status_of(await asyncio.wait_for(answer(reader), 10)) == 400
    writer.close()
    assert [m for m in records.at(logging.DEBUG) if "malformed request from" in m]
    assert not [m for m in records.at(logging.INFO) if "malformed request from" in m]


async def test_a_body_that_does_not_decode_is_a_400_without_a_traceback(serve: Start, records: Records) -> None:
    listener = await serve(echo_app())
    request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc"
    reader, writer = await send(listener.port, request)
    raw = await asyncio.wait_for(answer(reader), 10)
    writer.close()
    assert status_of(raw) == 400 and b"body is malformed" in raw
    assert not records.bad()


async def test_a_body_over_the_limit_is_a_413(serve: Start) -> None:
    listener = await serve(echo_app())
    chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"a" * 1024
    reader, writer = await send(listener.port, chunked + b"\r\n400\r\n" + b"a" * 1024 + b"\r\n0\r\n\r\n")
    raw = await asyncio.wait_for(answer(reader), 10)
    writer.close()
    assert status_of(raw) == 413


async def test_redis_unreachable_in_a_handler_is_a_503_in_one_line(serve: Start, records: Records) -> None:
    listener = await serve(echo_app())
    reader, writer = await send(listener.port, b"GET /redis HTTP/1.1\r\nHost: x\r\n\r\n")
    raw = await asyncio.wait_for(answer(reader), 10)
    writer.close()
    assert status_of(raw) == 503
    errors = [r for r in records.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and not errors[0].exc_info and "cannot store" in errors[0].getMessage()


async def test_a_bug_in_a_handler_is_still_a_500_with_its_traceback(serve: Start, records: Records) -> None:
    listener = await serve(echo_app())
    reader, writer = await send(listener.port, b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(await asyncio.wait_for(answer(reader), 10)) == 500
    writer.close()
    assert any(r.exc_info for r in records.records)  # bugs stay loud


async def test_an_expect_header_that_is_not_utf8_is_a_417(serve: Start, records: Records) -> None:
    listener = await serve(echo_app())
    reader, writer = await send(listener.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: \xab\xff\r\n\r\n")
    assert status_of(await asyncio.wait_for(answer(reader), 10)) == 417
    writer.close()
    assert not records.bad()


# the shared app --------------------------------------------------------------------------------
async def test_metrics_answer_when_refreshing_them_fails_and_say_why_in_one_line(
    serve: Start, records: Records
) -> None:
    async def refresh() -> None:
        raise RedisConnectionError("Error 111 connecting to localhost:6379. Connection refused.")

    async def readiness() -> tuple[bool, dict]:
        raise RedisConnectionError("gone")

    log = logging.getLogger("test.listener")
    app = build_app(Metrics(), readiness, refresh, [], 1 << 20, log)
    listener = await serve(app, ListenerLimits())
    reader, writer = await send(listener.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(answer(reader), 10)
    writer.close()
    assert status_of(raw) == 200 and b"talkbridge_events_in" in raw
    [line] = records.at(logging.WARNING)
    assert "stream gauges not refreshed" in line and "Connection refused" in line
    reader, writer = await send(listener.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(answer(reader), 10)
    writer.close()
    assert status_of(raw) == 503 and b'"ready":false' in raw.replace(b" ", b"")
    assert not records.bad()


# configuration ----------------------------------------------------------------------------------
def _config(tmp_path: Path, http: str) -> Path:
    path = tmp_path / "talkbridge.toml"
    path.write_text(f'[api.a]\nBindAddress = "127.0.0.1:1"\n\n[http]\n{http}\n')
    return path


def test_http_limits_are_read_from_the_config(tmp_path: Path) -> None:
    path = _config(tmp_path, "RequestTimeoutSeconds = 2.5\nIdleTimeoutSeconds = 30\nMaxConnections = 50")
    config = load_config(path, protocol_specs(AdapterRegistry()))
    assert ListenerLimits.from_section(config.http) == ListenerLimits(2.5, 30.0, 50)
    defaults = load_config(_config(tmp_path, ""), protocol_specs(AdapterRegistry()))
    assert ListenerLimits.from_section(defaults.http) == ListenerLimits()


def test_bad_http_limits_name_the_key(tmp_path: Path) -> None:
    path = _config(tmp_path, "RequestTimeoutSeconds = 0\nIdleTimeoutSeconds = -1\nMaxConnections = 0")
    with pytest.raises(ConfigError) as err:
        load_config(path, protocol_specs(AdapterRegistry()))
    assert "http.RequestTimeoutSeconds: must be more than 0 and at most 86400" in err.value.problems
    assert "http.IdleTimeoutSeconds: must be more than 0 and at most 86400" in err.value.problems
    assert "http.MaxConnections: must be at least 1" in err.value.problems


def test_a_file_limit_below_the_listeners_needs_is_warned_about(tmp_path: Path, caplog) -> None:
    config = load_config(_config(tmp_path, "MaxConnections = 1000"), protocol_specs(AdapterRegistry()))
    log = logging.getLogger("test.budget")
    with caplog.at_level(logging.WARNING, logger="test.budget"):
        check_file_budget(config, 20000, log)
        assert not caplog.records
        check_file_budget(config, 1024, log)  # the shared listener and api.a's: 2,256 needed
    [record] = caplog.records
    assert "1024 open files is less than 2 listener(s)" in record.getMessage()
