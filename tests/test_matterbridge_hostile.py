"""The matterbridge client (adapters/matterbridge/) against a Matterbridge
that is hostile, broken or not Matterbridge at all: a compromised server, a
misconfigured one, a URL that points at another web server, a proxy.

``Hostile`` is a scriptable server on loopback that answers the api account's
four routes (``/api/websocket``, ``/api/stream``, ``/api/messages``,
``/api/message``) with whatever a test queues, and like Matterbridge 1.26
otherwise (tests/mbserver.py is the faithful one). The real adapter runs
against it with a real Redis; each test asserts what is published on the
account's inbound stream, what the health calls, metrics and log say, and
that the loop receives again afterwards or stops with the right error.

What must hold: what is not Matterbridge's is never published, is counted
in ``talkbridge_ingress_rejected{account,reason}``, and the next message
still arrives; an answer over ``MaxAnswerBytes`` is never held whole; a
server away or talking nonsense is reconnected to with a growing, capped
backoff (``pause`` records the waits instead of sleeping them); a refused
Token stops the account after one request, not a retry loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import struct
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.exceptions
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

import adapters
from adapters.matterbridge import MatterbridgeClient
from adapters.matterbridge.messages import MARK_KEY
from bridge.adapter import AccountFailed, AdapterContext, PermanentError, ServerUnavailable, TransientError
from bridge.cli import load
from bridge.events import Event, EventKind
from bridge.health import AccountHealth
from bridge.keys import degraded_key
from tests.adapter_rig import AdapterRig, connected_parts, delivery
from tests.helpers import ConfigToml, free_port, metric
from tests.ingress_props import PROPS
from tests.talkbot_rig import until
from tests.test_matterbridge_messages import json_values, messages_like

ACCOUNT = "matterbridge.mb"
GW = "gw1"  # the Matterbridge gateway this account bridges
TOKEN = "the-api-token"
MAX_ANSWER = 1 << 16  # MaxAnswerBytes: its smallest allowed value
LOW, HIGH = 0.05, 0.4  # ReconnectMinSeconds, ReconnectMaxSeconds
STABLE = 0.3  # the adapter's stable_seconds here
WS, STREAM, MESSAGES, MESSAGE = "/api/websocket", "/api/stream", "/api/messages", "/api/message"
UNAUTHORIZED = b'{"message":"Unauthorized"}\n'  # echo's KeyAuth: a Token that is not the api account's
MISSING_KEY = b'{"message":"missing key in request header"}\n'  # echo's KeyAuth: no Authorization header


def message(text: str, **fields: object) -> dict[str, Any]:
    """A message as api.go ``Send`` marshals it; the router's nanosecond
    timestamp tells two messages of the same text apart."""
    stamp = time.time_ns()
    base: dict[str, Any] = {
        "text": text, "channel": "#talk", "username": "[irc] <alice> ", "userid": "alice!a@host", "avatar": "",
        "account": "irc.libera", "event": "", "protocol": "irc", "gateway": GW, "parent_id": "",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp // 10**9)) + f".{stamp % 10**9:09d}Z",
        "id": "", "Extra": None,
    }  # fmt: skip
    base.update(fields)
    return base


GREETING = orjson.dumps({**message("", gateway="", account="", protocol="", username="", userid="", channel=""),
                         "event": "api_connected"}).decode()  # fmt: skip


# the hostile server ------------------------------------------------------------------------
Answer = Callable[["Hostile", web.Request], Awaitable[web.StreamResponse]]
Frame = str | bytes  # a websocket frame: text or binary; a stream line (without its newline)


class Hostile:
    """A Matterbridge api account that answers what a test queues.

    ``queue(path, *answers)``: the next requests to ``path`` get these answers,
    in turn; ``default[path]`` answers when none is queued (Matterbridge-like:
    the websocket and the stream greet and stay open, ``/api/messages`` drains
    ``ring``, ``POST /api/message`` is taken). ``deliver`` hands a message
    over as Matterbridge does: to the open sessions (a websocket's stays in
    the ring too: 1.26 never dequeues while one is open), else into the ring.
    ``requests`` records what was asked (method, path, Authorization)."""

    def __init__(self) -> None:
        self.queued: dict[str, deque[Answer]] = defaultdict(deque)
        self.default: dict[str, Answer] = matterbridge_like()
        self.requests: list[tuple[str, str, str]] = []
        self.ring: list[dict[str, Any]] = []
        self.sessions: list[tuple[str, asyncio.Queue[Frame | None]]] = []  # (kind, its outbox), open ones
        self.posted: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.sock = socket.create_server(("127.0.0.1", 0))  # bound now: no other process takes the port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def queue(self, path: str, *answers: Answer) -> None:
        self.queued[path].extend(answers)

    def count(self, path: str) -> int:
        return sum(1 for _method, p, _auth in self.requests if p == path)

    def deliver(self, msg: dict[str, Any]) -> None:
        kinds = {kind for kind, _outbox in self.sessions}
        if not kinds or "websocket" in kinds:
            self.ring.append(msg)
        for _kind, outbox in self.sessions:
            outbox.put_nowait(orjson.dumps(msg).decode())

    def send(self, *frames: Frame) -> None:
        """Frames (lines) to every open session, as they are."""
        for _kind, outbox in self.sessions:
            for frame in frames:
                outbox.put_nowait(frame)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path, request.headers.get("Authorization", "")))
        queued = self.queued[request.path]
        answer = queued.popleft() if queued else self.default.get(request.path, status(404, b"404 page not found"))
        return await answer(self, request)

    async def start(self) -> Hostile:
        app = web.Application(client_max_size=1 << 24)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        await web.SockSite(self.runner, self.sock).start()
        return self

    async def stop(self) -> None:
        for _kind, outbox in self.sessions:
            outbox.put_nowait(None)
        if self.runner is not None:
            await self.runner.cleanup()
        self.sock.close()


def matterbridge_like() -> dict[str, Answer]:
    """The answers of Matterbridge itself, by route."""
    return {WS: websocket(), STREAM: stream(), MESSAGES: drain, MESSAGE: taken}


def status(code: int, body: bytes = b"", content_type: str = "application/json") -> Answer:
    async def answer(server: Hostile, request: web.Request) -> web.StreamResponse:
        return web.Response(status=code, body=body, content_type=content_type)

    return answer


def body(data: bytes, parts: int = 1) -> Answer:
    """200 with ``data``, written in ``parts`` writes (a slow network splits an answer)."""

    async def answer(server: Hostile, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        size = -(-len(data) // parts)
        for i in range(0, len(data), size or 1):
            await response.write(data[i : i + size])
            await asyncio.sleep(0.01)  # the network's pace, not the test's synchronization
        await response.write_eof()
        return response

    return answer


async def drain(server: Hostile, request: web.Request) -> web.StreamResponse:
    """``/api/messages`` as api.go ``handleMessages``: the ring, cleared (an empty one is ``null``)."""
    ring, server.ring = server.ring, []
    return web.Response(body=orjson.dumps(ring or None), content_type="application/json")


async def taken(server: Hostile, request: web.Request) -> web.StreamResponse:
    posted = await request.json()
    server.posted.append(posted)
    return web.json_response(posted)


def endless(start: bytes) -> Answer:
    """200, ``start``, then spaces for ever, never a newline: only the reader can stop it."""

    async def answer(server: Hostile, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            await response.write(start)
            while True:
                await response.write(b" " * 8192)
        except (ConnectionError, RuntimeError):
            return response

    return answer


async def silent(server: Hostile, request: web.Request) -> web.StreamResponse:
    """Takes the request and never answers."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def head_only(code: int) -> Answer:
    """The status line and headers of an answer whose body never comes."""

    async def answer(server: Hostile, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=code, headers={"Content-Length": "100"})
        await response.prepare(request)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return answer


def reset(request: web.Request) -> None:
    """The connection ends with a TCP RST, as a crashed peer or a proxy's timeout does."""
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def websocket(*frames: Frame, greet: Frame | None = GREETING, end: str = "open",
              before_end: asyncio.Event | None = None, max_msg_size: int = 1 << 24) -> Answer:  # fmt: skip
    """Upgrades, greets (``greet``; None: never), sends ``frames``, then: "open"
    (what ``deliver``/``send`` hand it, until the client leaves), "close", or
    "reset" (after ``before_end`` is set, when given)."""

    async def answer(server: Hostile, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=max_msg_size)
        await ws.prepare(request)
        for frame in ([greet] if greet is not None else []) + list(frames):
            await (ws.send_str(frame) if isinstance(frame, str) else ws.send_bytes(frame))
        if before_end is not None:
            await before_end.wait()
        if end == "reset":
            reset(request)
            return ws
        if end == "open":
            await _forward(server, "websocket", lambda f: ws.send_str(f) if isinstance(f, str) else ws.send_bytes(f),
                           ws.receive())  # fmt: skip
        await ws.close()
        return ws

    return answer


def stream(*lines: Frame, greet: Frame | None = GREETING, end: str = "open",
           before_end: asyncio.Event | None = None) -> Answer:  # fmt: skip
    """``/api/stream``: the greeting line, ``lines``, what the ring held
    (dequeued, as ``handleStream`` does), then as ``websocket``'s ``end``."""

    async def answer(server: Hostile, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        ring, server.ring = server.ring, []
        out = ([greet] if greet is not None else []) + list(lines) + [orjson.dumps(m) for m in ring]
        for line in out:
            await response.write((line.encode() if isinstance(line, str) else line) + b"\n")
        if before_end is not None:
            await before_end.wait()
        if end == "reset":
            reset(request)
            return response
        if end == "open":

            async def write(line: Frame) -> None:
                await response.write((line.encode() if isinstance(line, str) else line) + b"\n")

            await _forward(server, "stream", write, asyncio.Event().wait())
        return response

    return answer


async def _forward(server: Hostile, kind: str, send: Callable[[Frame], Awaitable[object]],
                   gone: Awaitable[object]) -> None:  # fmt: skip
    """Hand the session what the server's ``deliver``/``send`` give it until
    ``gone`` completes (the client left) or the server stops."""
    outbox: asyncio.Queue[Frame | None] = asyncio.Queue()
    entry = (kind, outbox)
    server.sessions.append(entry)
    left = asyncio.ensure_future(gone)
    try:
        while True:
            item = asyncio.ensure_future(outbox.get())
            done, _ = await asyncio.wait({item, left}, return_when=asyncio.FIRST_COMPLETED)
            if left in done:
                item.cancel()
                return
            frame = item.result()
            if frame is None:
                return
            await send(frame)
    except (ConnectionError, RuntimeError):
        return
    finally:
        left.cancel()
        server.sessions.remove(entry)


# the adapter ------------------------------------------------------------------------------
class Pauses:
    """The receive loop's waits, recorded; each is waited at most 10 ms
    (the backoff's and the poll interval's length are the adapter's, the
    test's time is not)."""

    def __init__(self, poll: float | None = None) -> None:
        self.poll = poll  # PollSeconds: the poll mode's own wait, kept apart from the backoff
        self.delays: list[float] = []
        self.polls = 0

    async def __call__(self, seconds: float) -> None:
        if seconds == self.poll:
            self.polls += 1
        else:
            self.delays.append(seconds)
        await asyncio.sleep(min(seconds, 0.01))


class HealthCalls(AccountHealth):
    """The account's health as the adapter reports it, every call kept in order."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.calls: list[tuple[str, str]] = []

    async def receive_failed(self, reason: str, retry_in: float) -> None:
        self.calls.append(("receive_failed", reason))
        await super().receive_failed(reason, retry_in)

    async def receive_recovered(self) -> None:
        self.calls.append(("receive_recovered", ""))
        await super().receive_recovered()

    def said(self, call: str) -> list[str]:
        return [reason for name, reason in self.calls if name == call]


@dataclass
class Rig(AdapterRig[MatterbridgeClient]):
    pauses: Pauses = field(default_factory=Pauses)
    health: HealthCalls | None = None

    @property
    def reported(self) -> HealthCalls:
        """What the adapter reported about its health."""
        assert self.health is not None
        return self.health

    def rejected(self, reason: str) -> float:
        return metric(self.metrics, "talkbridge_ingress_rejected_total", account=ACCOUNT, reason=reason)

    async def failure(self) -> BaseException:
        """How the receive loop ended (waited for)."""
        task = self.task
        assert task is not None
        await until(task.done, what="the receive loop to end")
        exc = task.exception()
        assert exc is not None
        return exc


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def mb() -> AsyncIterator[Hostile]:
    server = await Hostile().start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def client(tmp_path: Path, redis: Redis, mb: Hostile) -> AsyncIterator[RigFactory]:
    """``await client(**account keys)``: the adapter connected to ``mb`` (or
    to ``url``), its waits recorded, its health calls kept, receiving."""
    made: list[Rig] = []

    async def make(*, url: str | None = None, receive: bool = True, **keys: Any) -> Rig:
        account = {"URL": url or mb.url, "Token": TOKEN, "ReconnectMinSeconds": LOW, "ReconnectMaxSeconds": HIGH,
                   "Timeout": 2, "MaxAnswerBytes": MAX_ANSWER, **keys}  # fmt: skip
        toml = ConfigToml().section(ACCOUNT, **account).api("a", 0, "t").gateway("g", (ACCOUNT, GW), ("api.a", "api"))
        config = load(str(toml.write(tmp_path / f"talkbridge{len(made)}.toml")), adapters.AdapterRegistry())
        rig = Rig(*await connected_parts(MatterbridgeClient, config, ACCOUNT, redis))
        made.append(rig)
        ctx = rig.adapter.ctx
        ctx.health = rig.health = HealthCalls(ctx.redis, ctx.key_prefix, ACCOUNT, ctx.metrics, ctx.log)
        rig.pauses = Pauses(poll=keys.get("PollSeconds"))
        rig.adapter.pause = rig.pauses
        rig.adapter.stable_seconds = STABLE  # a connection that holds this long is made (5 s in the daemon)
        if receive:
            rig.start()
        return rig

    try:
        yield make
    finally:
        for rig in made:
            await rig.close()


async def arrives(rig: Rig, mb: Hostile, text: str) -> list[str]:
    """Matterbridge hands over one more message; the texts published, once it is among them."""
    mb.deliver(message(text))
    return await until(lambda: _with(rig, text), what=f"{text!r} published")


async def _with(rig: Rig, text: str) -> list[str] | None:
    if rig.task is not None and rig.task.done():  # fail now, with why, not at the deadline
        raise AssertionError(f"the receive loop ended: {rig.task.exception()!r}")
    texts = await rig.texts()
    return texts if text in texts else None


def assert_backoff(delays: list[float]) -> None:
    """Each wait in the upper half of its step, the steps doubling from
    ReconnectMinSeconds up to ReconnectMaxSeconds (bridge/receiver.py Backoff)."""
    for i, delay in enumerate(delays):
        step = min(LOW * 2**i, HIGH)
        assert step / 2 <= delay <= step, (i, delay, delays)
    assert max(delays) > HIGH / 2  # reached the cap


MODES = ["websocket", "stream"]
NO_STREAM = {STREAM: status(404, b"404 page not found")}  # the websocket then reads the ring from /api/messages


def session(mode: str, *frames: Frame, **kw: Any) -> tuple[str, Answer]:
    return (WS, websocket(*frames, **kw)) if mode == "websocket" else (STREAM, stream(*frames, **kw))


# not Matterbridge's: refused, counted, the next one arrives -----------------------------------
def changed(**fields: object) -> str:
    """A message with ``fields`` set to what Matterbridge never sends there."""
    return orjson.dumps(message("x") | fields).decode()


MALFORMED: dict[str, tuple[Frame, str]] = {
    "not JSON": ("<html><body>502 Bad Gateway</body></html>", "not JSON"),
    "truncated JSON": ('{"text": "hi", "gateway": "gw1"', "not JSON"),
    "binary garbage": (b"\xff\xfe\x00\x01", "not JSON"),
    "a list": (orjson.dumps([message("in a list")]).decode(), "malformed"),
    "a number": ("42", "malformed"),
    "null": ("null", "malformed"),
    "a string": ('"text"', "malformed"),
    "text a number": (changed(text=5), "malformed"),
    "gateway an object": (changed(gateway={"name": GW}), "malformed"),
    "Extra a list": (changed(Extra=["file"]), "malformed"),
    "a file list an object": (changed(Extra={"file": {"Name": "a.png"}}), "malformed"),
    "a file a string": (changed(Extra={"file": ["a.png"]}), "malformed"),
    # JSON orjson reads (1024 levels) but cannot write again (254): no digest to recognise it by
    "nested 300 deep": (changed(Extra={"deep": "@"}).replace('"@"', "[" * 300 + "]" * 300), "malformed"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_what_is_not_a_message_is_counted_and_the_next_one_arrives(client, mb, mode, case, caplog) -> None:
    frame, reason = MALFORMED[case]
    caplog.set_level(logging.INFO, "talkbridge")
    mb.queue(*session(mode, frame, orjson.dumps(message("after")).decode()))
    rig = await client(Receive=mode)
    assert await until(lambda: _with(rig, "after"), what="the message after") == ["after"]
    assert rig.rejected(reason) == 1
    assert f"{ACCOUNT}: message refused ({reason})" in caplog.text
    assert rig.reported.calls == [] and mb.count(WS if mode == "websocket" else STREAM) == 1  # no reconnect
    assert await arrives(rig, mb, "later") == ["after", "later"]


async def test_a_ring_read_refuses_each_malformed_message_and_keeps_the_rest(client, mb) -> None:
    ring = [message("first"), "text", {"text": 5}, message("x") | {"Extra": {"file": {}}}]
    deep = MALFORMED["nested 300 deep"][0].encode()  # written by hand: orjson cannot
    mb.queue(MESSAGES, body(b"[" + b",".join([*map(orjson.dumps, ring), deep, orjson.dumps(message("last"))]) + b"]"))
    rig = await client(Receive="poll", PollSeconds=0.01)
    assert await until(lambda: _with(rig, "last"), what="the messages read") == ["first", "last"]
    assert rig.rejected("malformed") == 4 and rig.reported.calls == []


FILES = {  # Extra.file[0], and the text and attachments of the message published
    "data that is not base64": ({"Name": "a.png", "Data": "%%%not base64%%%"}, "x\n[file a.png]", []),
    "a path for a name": ({"Name": "../../etc/passwd", "Data": "AA=="}, "x", ["passwd"]),
    "no name": ({"Data": "AA=="}, "x", ["file"]),
    "a name of control characters": ({"Name": "\x1b[2J\x00", "Data": "AA=="}, "x", ["[2J"]),
}


@pytest.mark.parametrize("case", sorted(FILES))
async def test_a_file_that_cannot_travel_as_it_is_keeps_its_message(client, mb, case) -> None:
    file, text, names = FILES[case]
    mb.ring = [message("x", Extra={"file": [file]})]
    rig = await client(Receive="stream")
    [event] = await until(rig.events, what="the message")
    assert (event.text, [a.name for a in event.attachments]) == (text, names)
    assert rig.rejected("malformed") == 0


# too large: never held whole, nothing of it published, the loop connects again -------------------
def padded(text: str) -> bytes:
    """A valid message over MaxAnswerBytes."""
    return orjson.dumps(message(text, avatar="x" * MAX_ANSWER))


async def test_a_stream_line_over_max_answer_bytes_is_never_published(client, mb) -> None:
    before, after = (orjson.dumps(message(text)) for text in ("before", "same connection"))
    mb.queue(STREAM, stream(before + b"\n" + padded("huge") + b"\n" + after))  # one write: likely one read
    rig = await client(Receive="stream")
    await until(lambda: rig.reported.said("receive_recovered"), what="a new stream")
    [why] = rig.reported.said("receive_failed")
    assert "longer than MaxAnswerBytes" in why and mb.count(STREAM) == 2
    assert await arrives(rig, mb, "after") == ["before", "after"]


async def test_a_stream_line_that_never_ends_is_cut_at_max_answer_bytes(client, mb) -> None:
    mb.queue(STREAM, endless(GREETING.encode() + b"\n{"))
    rig = await client(Receive="stream")
    await until(lambda: rig.reported.said("receive_recovered"), what="a new stream")
    assert "longer than MaxAnswerBytes" in rig.reported.said("receive_failed")[0]
    assert await arrives(rig, mb, "after") == ["after"]


async def test_a_websocket_frame_over_max_answer_bytes_is_never_published(client, mb) -> None:
    mb.queue(WS, websocket(padded("huge").decode(), orjson.dumps(message("same connection")).decode()))
    rig = await client(Receive="websocket")
    await until(lambda: rig.reported.said("receive_recovered"), what="a new websocket")
    [why] = rig.reported.said("receive_failed")
    assert "websocket closed" in why and mb.count(WS) == 2
    assert await arrives(rig, mb, "after") == ["after"]


@pytest.mark.parametrize("mode", ["websocket", "poll"])
async def test_a_messages_answer_over_max_answer_bytes_is_not_read_whole(client, mb, mode) -> None:
    mb.default.update(NO_STREAM)  # the websocket reads the ring from /api/messages then
    mb.queue(MESSAGES, endless(b"["))
    rig = await client(Receive=mode, PollSeconds=0.01)
    await until(lambda: rig.reported.said("receive_recovered"), what="a new connection")
    assert "MaxAnswerBytes" in rig.reported.said("receive_failed")[0]
    assert await rig.texts() == []
    assert await arrives(rig, mb, "after") == ["after"]


async def test_a_messages_answer_in_many_pieces_is_read_whole(client, mb) -> None:
    batch = [message(f"m{i}", avatar="a" * 1000) for i in range(40)]  # ~50 KB: under MaxAnswerBytes
    mb.queue(MESSAGES, body(orjson.dumps(batch, option=orjson.OPT_INDENT_2), parts=8))
    rig = await client(Receive="poll", PollSeconds=0.01)
    texts = await until(lambda: _with(rig, "m39"), what="the batch")
    assert texts == [f"m{i}" for i in range(40)] and rig.reported.calls == []


# transient: reconnect with a growing, capped backoff --------------------------------------------
WRONG = orjson.dumps(message("not a greeting")).decode()
NOT_GREETING = "not Matterbridge's greeting"
TRANSIENT: dict[str, tuple[str, dict[str, Answer], str]] = {  # the failing route last
    "websocket: a wrong greeting": ("websocket", {WS: websocket(greet=WRONG)}, NOT_GREETING),
    "websocket: a binary greeting": ("websocket", {WS: websocket(greet=GREETING.encode())}, NOT_GREETING),
    "websocket: never greets": ("websocket", {WS: websocket(greet=None)}, ""),
    "websocket: never answers": ("websocket", {WS: silent}, ""),
    "websocket: 500": ("websocket", {WS: status(500, b"Internal Server Error")}, "500"),
    "websocket: 503": ("websocket", {WS: status(503, b"Service Unavailable")}, "503"),
    "websocket: the stream beside it 500": ("websocket", {STREAM: status(500, b"Internal Server Error")}, "500"),
    "websocket: the stream beside it never greets": ("websocket", {STREAM: stream(greet=None)}, ""),
    "websocket: the ring read is not a list": ("websocket", {**NO_STREAM, MESSAGES: status(200, b'{"a": 1}')},
                                               "not a list"),
    "websocket: the ring read is HTML": ("websocket", {**NO_STREAM, MESSAGES: status(200, b"<html>", "text/html")},
                                         "not JSON"),
    "websocket: greets and hangs up": ("websocket", {WS: websocket(end="close")}, "websocket closed"),
    "stream: greets and hangs up": ("stream", {STREAM: stream(end="close")}, "the stream ended"),
    "stream: a wrong greeting": ("stream", {STREAM: stream(greet=WRONG)}, NOT_GREETING),
    "stream: never greets": ("stream", {STREAM: stream(greet=None)}, ""),
    "stream: never answers": ("stream", {STREAM: silent}, ""),
    "stream: 500": ("stream", {STREAM: status(500, b"Internal Server Error")}, "500"),
    "stream: 503": ("stream", {STREAM: status(503, b"Service Unavailable")}, "503"),
    "stream: 500, its body never comes": ("stream", {STREAM: head_only(500)}, ""),
    "poll: not a list": ("poll", {MESSAGES: status(200, b'"ring"')}, "not a list"),
    "poll: 500": ("poll", {MESSAGES: status(500, b"Internal Server Error")}, "500"),
    "poll: 503": ("poll", {MESSAGES: status(503, b"Service Unavailable")}, "503"),
    "poll: never answers": ("poll", {MESSAGES: silent}, ""),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(TRANSIENT))
async def test_a_broken_server_is_reconnected_to_with_backoff(client, mb, case, caplog) -> None:
    mode, answers, why = TRANSIENT[case]
    path = list(answers)[-1]
    caplog.set_level(logging.WARNING, "talkbridge")
    mb.default.update(answers)
    rig = await client(Receive=mode, Timeout=0.2, PollSeconds=0.01)
    await until(lambda: len(rig.pauses.delays) >= 6, what="six failed connects")
    assert_backoff(rig.pauses.delays[:6])
    assert mb.count(path) <= len(rig.pauses.delays) + 1  # one request a wait: no tight loop
    failed = rig.reported.said("receive_failed")
    assert len(failed) >= 6 and all(why in reason for reason in failed)
    assert f"{ACCOUNT}: ALERT: receive failing" in caplog.text
    assert (await rig.redis.get(degraded_key(rig.bus.prefix, ACCOUNT)) or b"").startswith(b"receiving: ")
    assert await rig.texts() == [] and not rig.task.done()
    mb.default = matterbridge_like()  # Matterbridge is itself again
    await until(lambda: rig.reported.calls[-1] == ("receive_recovered", ""), what="connected again")
    assert await rig.redis.get(degraded_key(rig.bus.prefix, ACCOUNT)) is None
    assert await arrives(rig, mb, "after") == ["after"]


@pytest.mark.parametrize("end", ["reset", "close"])
@pytest.mark.parametrize("mode", MODES)
async def test_a_session_cut_after_it_began_is_reconnected_to(client, mb, mode, end) -> None:
    """A reset, or a server that ends the session after it handed something
    over: connected again after the first step of the backoff (the session
    was made; one that greets and hangs up at once is not: TRANSIENT)."""
    seen = asyncio.Event()
    mb.queue(*session(mode, orjson.dumps(message("before")).decode(), end=end, before_end=seen))
    rig = await client(Receive=mode)
    await until(lambda: _with(rig, "before"), what="the message before")
    seen.set()
    await until(lambda: rig.reported.said("receive_recovered"), what="a new session")
    assert len(rig.reported.said("receive_failed")) == 1 and LOW / 2 <= rig.pauses.delays[0] <= LOW
    assert await arrives(rig, mb, "after") == ["before", "after"]


# refused: the account stops after one request ---------------------------------------------------
REFUSALS = {
    "401 on the websocket": ("auto", {WS: status(401, UNAUTHORIZED)}, 1, "refused the Token"),
    "401 on the stream": ("stream", {STREAM: status(401, UNAUTHORIZED)}, 1, "refused the Token"),
    "401 on the stream beside the websocket": ("websocket", {STREAM: status(401, UNAUTHORIZED)}, 2,
                                               "refused the Token"),
    "401 polling": ("poll", {MESSAGES: status(401, UNAUTHORIZED)}, 1, "refused the Token"),
    "400 missing key, auto": (
        "auto", {WS: status(400, MISSING_KEY), STREAM: status(400, MISSING_KEY)}, 2, "wants a Token",
    ),
    "400 missing key on the websocket": ("websocket", {WS: status(400, MISSING_KEY)}, 2, "wants a Token"),
    "400 missing key on the stream": ("stream", {STREAM: status(400, MISSING_KEY)}, 1, "wants a Token"),
    "400 missing key polling": ("poll", {MESSAGES: status(400, MISSING_KEY)}, 1, "wants a Token"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_a_refused_token_stops_receiving_after_one_request(client, mb, case) -> None:
    mode, answers, requests, why = REFUSALS[case]
    mb.default.update(answers)
    rig = await client(Receive=mode, Token="")
    exc = await rig.failure()  # the runner reports it and pauses the account (bridge/account_runner.py)
    assert isinstance(exc, AccountFailed) and why in str(exc) and rig.pauses.delays == []
    assert len(mb.requests) <= requests and all(auth == "" for _m, _p, auth in mb.requests), mb.requests
    assert await rig.texts() == []


# posting -------------------------------------------------------------------------------------
def a_delivery(text: str = "hi from talk") -> Any:
    source = Event(kind=EventKind.MESSAGE, account="api.a", channel="api", sender_id="bob", sender_name="bob",
                   text=text, native_id="api-1")  # fmt: skip
    return delivery(source, ACCOUNT, GW)


POSTS: dict[str, tuple[Answer, type[Exception], str]] = {
    "401": (status(401, UNAUTHORIZED), AccountFailed, "401"),
    "400 missing key": (status(400, MISSING_KEY), AccountFailed, "wants a Token"),
    "500": (status(500, b"Internal Server Error"), TransientError, "500"),
    "502": (status(502, b"Bad Gateway", "text/html"), ServerUnavailable, "502"),
    "503": (status(503, b"Service Unavailable"), ServerUnavailable, "503"),
    "504": (status(504, b"Gateway Timeout"), ServerUnavailable, "504"),
    "400": (status(400, b'{"message":"code=400, message=Syntax error"}'), PermanentError, "400"),
    "404": (status(404, b"404 page not found"), PermanentError, "404"),
    "413": (status(413, b'{"message":"Request Entity Too Large"}'), PermanentError, "413"),
    "never answers": (silent, ServerUnavailable, "TimeoutError"),
}


@pytest.mark.parametrize("case", sorted(POSTS))
async def test_a_refused_post_says_what_the_core_does_next(client, mb, case) -> None:
    answer, error, said = POSTS[case]
    mb.queue(MESSAGE, answer)
    rig = await client(receive=False, Timeout=0.3)
    with pytest.raises(error, match=said) as raised:
        await rig.adapter.send(a_delivery())
    if error is TransientError:
        assert not isinstance(raised.value, ServerUnavailable)
    assert mb.count(MESSAGE) == 1
    assert (await rig.adapter.send(a_delivery("again"))).startswith("tb-")  # the server is itself again
    assert [p["text"] for p in mb.posted] == ["again"]


async def test_a_post_to_nobody_is_server_unavailable(client) -> None:
    rig = await client(url=f"http://127.0.0.1:{free_port()}", receive=False)
    with pytest.raises(ServerUnavailable, match="POST /api/message"):
        await rig.adapter.send(a_delivery())


@dataclass
class Raw:
    """A TCP server that answers every connection with ``reply`` and hangs up:
    the bytes no web framework would send (URL names another service's port)."""

    reply: bytes
    server: asyncio.Server | None = None
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await reader.read(1)
        writer.write(self.reply)
        await writer.drain()
        writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[bytes], Awaitable[Raw]]]:
    started: list[Raw] = []

    async def start(reply: bytes) -> Raw:
        server = Raw(reply)
        server.server = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            assert server.server is not None
            server.server.close()


NOT_HTTP = {
    "another protocol": b"SSH-2.0-OpenSSH_9.6\r\n",
    "a bad status line": b"HTTP/1.1 two hundred\r\n\r\n",
    "bad chunks": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
}


@pytest.mark.parametrize("case", sorted(NOT_HTTP))
async def test_a_post_answered_with_what_is_not_http_is_retried(client, raw, case) -> None:
    server = await raw(NOT_HTTP[case])
    rig = await client(url=server.url, receive=False)
    with pytest.raises(TransientError, match="POST /api/message"):
        await rig.adapter.send(a_delivery())


@pytest.mark.parametrize("case", sorted(NOT_HTTP))
async def test_a_server_that_does_not_speak_http_is_reconnected_to_with_backoff(client, raw, case) -> None:
    server = await raw(NOT_HTTP[case])
    rig = await client(url=server.url)
    await until(lambda: len(rig.pauses.delays) >= 6, what="six failed connects")
    assert_backoff(rig.pauses.delays[:6])
    assert server.connections <= len(rig.pauses.delays) + 1 and not rig.task.done()
    assert len(rig.reported.said("receive_failed")) >= 6 and await rig.texts() == []


# auto: what is not served is fallen back from ---------------------------------------------------
FALLBACKS = {  # what the server answers, the route then read, how often the websocket was asked
    "websocket 404": ({WS: status(404, b"404 page not found")}, STREAM, 1),
    "websocket 200, not upgraded": ({WS: status(200, b"<html>a proxy</html>", "text/html")}, STREAM, 1),
    "websocket 405": ({WS: status(405, b"Method Not Allowed")}, STREAM, 1),
    "websocket 400, not echo's": ({WS: status(400, b"Bad Request")}, STREAM, 2),  # a plain GET asks why
    "both 404": ({WS: status(404, b""), STREAM: status(404, b"")}, MESSAGES, 1),
}


@pytest.mark.parametrize("case", sorted(FALLBACKS))
async def test_auto_falls_back_from_what_is_not_served(client, mb, case, caplog) -> None:
    answers, used, asked = FALLBACKS[case]
    caplog.set_level(logging.INFO, "talkbridge")
    mb.default.update(answers)
    rig = await client(PollSeconds=0.01)
    await until(lambda: mb.count(used), what=f"{used} asked")
    assert await arrives(rig, mb, "after") == ["after"]
    assert rig.reported.calls == [] and mb.count(WS) == asked
    assert {auth for _method, _path, auth in mb.requests} == {f"Bearer {TOKEN}"}
    expected = {STREAM: "receiving from Stream", MESSAGES: "receiving from Poll"}[used]
    assert f"{ACCOUNT}: {expected}" in caplog.text and "not served" in caplog.text


# handed over twice: published once ------------------------------------------------------------
async def test_a_message_in_the_drain_and_in_a_frame_is_published_once(client, mb) -> None:
    twice = message("twice")
    mb.ring = [twice]
    mb.queue(WS, websocket(orjson.dumps(twice).decode(), orjson.dumps(twice, option=orjson.OPT_INDENT_2).decode()))
    rig = await client(Receive="websocket")
    assert await arrives(rig, mb, "sentinel") == ["twice", "sentinel"]


async def test_a_message_twice_in_one_batch_is_published_once(client, mb) -> None:
    twice = message("twice")
    mb.ring = [twice, twice, message("other"), twice]
    rig = await client(Receive="poll", PollSeconds=0.01)
    assert await arrives(rig, mb, "sentinel") == ["twice", "other", "sentinel"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_message_handed_over_on_two_connections_is_published_once(client, mb, mode) -> None:
    again = orjson.dumps(message("again")).decode()
    mb.queue(*session(mode, again, end="close"))
    mb.queue(*session(mode, again))
    rig = await client(Receive=mode)
    await until(lambda: rig.reported.said("receive_recovered"), what="the second connection")
    assert sorted(await arrives(rig, mb, "sentinel")) == ["again", "sentinel"]  # a held frame may come later


async def test_our_own_post_echoed_back_is_not_published(client, mb, redis) -> None:
    rig = await client(Receive="websocket")
    mark = (await redis.get(rig.adapter.mark_key)).decode()
    assert mark
    await rig.adapter.send(a_delivery("ours"))
    [posted] = mb.posted
    assert posted["Extra"][MARK_KEY] == [mark]
    mb.deliver(posted | {"account": "api.tb", "protocol": "api", "channel": "api", "timestamp": "t1"})
    mb.deliver(message("another bridge's", Extra={MARK_KEY: ["someone else"]}))
    assert await arrives(rig, mb, "sentinel") == ["another bridge's", "sentinel"]


# generated ------------------------------------------------------------------------------------
# one server and one adapter per test, kept across its examples (``kept``): the fixtures are shared on purpose
SHARED = settings(PROPS, suppress_health_check=[*PROPS.suppress_health_check, HealthCheck.function_scoped_fixture])
json_frames = st.one_of(
    json_values.map(lambda v: orjson.dumps(v).decode()),
    messages_like.map(lambda v: orjson.dumps(v).decode()),
    # nesting at orjson's limits (it writes 254 levels, reads 1024), in a message and bare
    st.integers(200, 1100).map(lambda d: changed(Extra={"deep": "@"}).replace('"@"', "[" * d + "]" * d)),
    st.integers(200, 1100).map(lambda d: "{" + '"a":{' * d + "}" * (d + 1)),
)
frames = st.one_of(st.binary(max_size=200), st.text(max_size=200), json_frames)


async def published_then(rig: Rig, mb: Hostile, sentinel: str, send: Callable[[], None]) -> list[Event]:
    """``send()`` hostile input, then one valid message; the events published
    once that one arrived; the stream emptied for the next example."""
    send()
    mb.deliver(message(sentinel))

    async def arrived() -> list[Event] | None:
        if rig.task is None or rig.task.done():  # fail now, not at the deadline (and not at each shrink's)
            raise AssertionError(f"the receive loop ended: {rig.task and rig.task.exception()!r}")
        events = await rig.events()
        return events if any(e.text == sentinel for e in events) else None

    events = await until(arrived, what="the message after the generated input")
    await rig.redis.delete(rig.bus.inbound(ACCOUNT))
    return events


def assert_bridged(events: list[Event]) -> None:
    for event in events:
        assert event.account == ACCOUNT and event.channel == GW and event.origin == [f"{ACCOUNT}/{GW}"]
        assert event.kind in (EventKind.MESSAGE, EventKind.JOIN, EventKind.OTHER)
        assert event.text or event.attachments or event.kind != EventKind.MESSAGE


@pytest.fixture
def kept() -> dict[str, Any]:
    """What a generated test keeps across its examples: one adapter, one count."""
    return {}


async def _one_rig(client: RigFactory, mb: Hostile, kept: dict[str, Any], mode: str) -> tuple[Rig, str]:
    """The test's one adapter (made at its first example) and a sentinel text new to it."""
    if "rig" not in kept:
        kept["rig"], kept["count"] = await client(Receive=mode, PollSeconds=0.01), itertools.count()
        if mode != "poll":
            await until(lambda: mb.sessions, what="the session open")
    return kept["rig"], f"sentinel {next(kept['count'])}"


@pytest.mark.parametrize("mode", MODES)
@SHARED
@given(batch=st.lists(frames, min_size=1, max_size=4))
async def test_generated_frames_and_lines_never_stop_the_loop(client, mb, kept, mode, batch: list[Frame]) -> None:
    rig, sentinel = await _one_rig(client, mb, kept, mode)
    assert_bridged(await published_then(rig, mb, sentinel, lambda: mb.send(*batch)))
    assert mb.count(WS if mode == "websocket" else STREAM) == 1  # never a reason to connect again


answers = st.one_of(
    st.lists(json_frames, max_size=4).map(lambda items: ("[" + ",".join(items) + "]").encode()),
    frames.map(lambda f: f.encode() if isinstance(f, str) else f),
)


@SHARED
@given(answer=answers)
async def test_generated_messages_answers_never_stop_polling(client, mb, kept, answer: bytes) -> None:
    rig, sentinel = await _one_rig(client, mb, kept, "poll")
    mb.queue(MESSAGES, status(200, answer))
    assert_bridged(await published_then(rig, mb, sentinel, lambda: None))


@pytest.mark.parametrize("mode", ["stream", "websocket"])
async def test_what_redis_refused_to_commit_is_committed_when_it_is_back(client, mb, mode, monkeypatch) -> None:
    """The stream dequeued it: Matterbridge will not hand it over again. A
    commit Redis refused ends the loop (the runner starts it again); the
    next loop commits what the last one held, before anything new."""
    commit = AdapterContext.commit_inbound
    refused: list[int] = []

    async def away_once(self: AdapterContext, events: Any, writes: Any = ()) -> list[str]:
        if not refused:
            refused.append(len(events))
            raise redis.exceptions.ConnectionError("Redis is away")
        return await commit(self, events, writes)

    monkeypatch.setattr(AdapterContext, "commit_inbound", away_once)
    rig = await client(Receive=mode)
    mb.deliver(message("while redis is away"))
    await until(lambda: rig.task.done(), what="the loop ended by the refused commit")
    assert isinstance(rig.task.exception(), redis.exceptions.ConnectionError) and refused == [1]
    rig.start()  # as the runner does
    assert await arrives(rig, mb, "after") == ["while redis is away", "after"]
