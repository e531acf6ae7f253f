"""Receiving from a Matterbridge api account: a ``Receiver`` loop (the core's
backoff and health reports) whose step reads the next batch from one of
three sessions and commits it.

- ``websocket``: ``GET /api/websocket`` (api.go ``handleWebsocket``, melody:
  the ``api_connected`` greeting, then every message the api bridge's
  ``Send`` gets) *with ``GET /api/stream`` beside it*. 1.26 sends no history
  on a websocket, and its ring (``Buffer`` messages) is handed over only by
  the stream (``handleStream``: dequeued one per 100 ms) or by
  ``/api/messages``, which afterwards leaves the ring its default capacity
  of 10 (``handleMessages`` replaces it with a zero ``ring.Ring``): so the
  stream it is. It hands over the backlog first (the websocket's frames held
  back meanwhile, ``WebsocketSession``), then carries a copy of everything
  the websocket carries, recognised and skipped, and whatever melody dropped.
- ``stream``: the stream alone (latency up to 100 ms, at most 10 messages a
  second; more wait in the ring, which may overflow).
- ``poll``: ``GET /api/messages`` every ``PollSeconds`` (the ring, drained;
  in 1.26 its capacity is 10 from the first read on).

``Receive = "auto"`` is the first of them the server serves: a proxy without
WebSocket falls back to the stream, one without a stream to polling (a
websocket without a stream reads ``/api/messages`` once per connect); a
server that is down is waited for, never fallen back from.

Every message handed over is recognised by its digest (messages.py
``digest_of``), committed in the same fenced script as the events it
became (``ctx.commit_inbound``) into a sorted set of the last
``ReplayWindow`` digests: a message handed over a second time (the stream's
copy, a newer Matterbridge replaying its ring on connect) is skipped, and a
commit that did not happen leaves the message to be taken again. Streams
and websockets are kept alive: websocket pings every 30 s, TCP keepalive on
a stream (Matterbridge's stream says nothing while idle).

A mixin of ``MatterbridgeClient`` (adapter.py), which holds the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from adapters.api.encoding import API_CONNECTED
from adapters.matterbridge.messages import BadMessage, digest_of, parse_json, received
from bridge.adapter import AccountFailed, TransientError
from bridge.bus import Write
from bridge.receiver import Backoff, Receiver

if TYPE_CHECKING:
    from bridge.adapter import AdapterContext

MODES = ("auto", "websocket", "stream", "poll")
PING_SECONDS = 30.0  # the websocket's heartbeat (melody's own pings come every 54 s)
# TCP keepalive on a stream: first probe after 30 s idle, then every 10 s, gone after 3 unanswered
KEEPALIVE = (
    ((socket.TCP_KEEPIDLE, 30), (socket.TCP_KEEPINTVL, 10), (socket.TCP_KEEPCNT, 3))
    if hasattr(socket, "TCP_KEEPIDLE")
    else ()
)
QUIET = 0.5  # a stream silent this long has handed its backlog over (1.26 writes one message per 100 ms)
HOLD_MAX = 10_000  # websocket frames held back while the stream hands over the backlog, at most
NOT_SERVED = frozenset({400, 404, 405, 426, 501})  # a route this server (or its proxy) does not serve


class Lost(TransientError):
    """The connection ended or Matterbridge answered what it never answers:
    connect again after the backoff."""


class Refused(Exception):
    """The api account refused the Token (401), or wants one we do not send."""


class NotServed(Exception):
    """The route is not served here: the next mode, in ``auto``."""


def _refusal(status: int, body: str) -> Refused | None:
    if status == 401:
        return Refused(f"Matterbridge refused the Token (401 {body.strip()[:120]})")
    if status == 400 and "missing key" in body:  # echo's KeyAuth: no Authorization header
        return Refused("Matterbridge wants a Token, and URL's account has none configured")
    return None


class Session:
    """One connection to the api account: ``first`` is what its opening read
    (the drain), ``next`` waits for the next batch."""

    first: list[Any]

    async def next(self) -> list[Any]:
        raise NotImplementedError

    async def close(self) -> None:
        """Nothing to close by default."""


class WebsocketSession(Session):
    """The websocket for what arrives now, with the stream beside it for what
    Matterbridge buffered (its ring). In 1.26 every message is on both (the
    ring keeps what the websocket was sent; the stream dequeues it, one per
    100 ms), so the stream's copies are recognised and skipped, and one that
    melody dropped for a slow session (its buffer of 256 full) still arrives.

    After a connect the stream first hands over the backlog: until it does,
    the websocket's frames are held back, and released (in order, the ones
    the stream already gave skipped) as soon as the stream gives one of them
    (it has reached what arrived live) or has been silent for ``QUIET``
    seconds. So the backlog comes before what arrived after it.

    ``stream`` None: a server that serves no stream; ``first`` is then the
    ring, drained once."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, stream: StreamSession | None, first: list[Any]) -> None:
        self.ws, self.stream, self.first = ws, stream, first
        self.catching_up = stream is not None
        self.held: list[Any] = []  # frames while catching up
        self._held_digests: set[str] = set()
        self._stream_at = time.monotonic()  # when the stream last said something
        self._frame: asyncio.Task[aiohttp.WSMessage] | None = None
        self._lines: asyncio.Task[list[Any]] | None = None

    async def next(self) -> list[Any]:
        if self._frame is None:
            self._frame = asyncio.ensure_future(self.ws.receive())
        waiting: set[asyncio.Future[Any]] = {self._frame}
        if self.stream is not None:
            if self._lines is None:
                self._lines = asyncio.ensure_future(self.stream.next())
            waiting.add(self._lines)
        timeout = None
        if self.catching_up:
            timeout = self._stream_at + QUIET - time.monotonic()
            if timeout <= 0:
                return self._caught_up([])
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        out: list[Any] = []
        if self._frame in done:
            frame, self._frame = self._frame.result(), None
            message = self._message(frame)
            if not self.catching_up:
                out.append(message)
            else:
                self.held.append(message)
                digest = _digest(message)
                if digest is not None:
                    self._held_digests.add(digest)
                if len(self.held) >= HOLD_MAX:  # a stream that never reaches them: memory first
                    return self._caught_up(out)
        if self._lines is not None and self._lines in done:
            lines, self._lines = self._lines.result(), None
            self._stream_at = time.monotonic()
            out.extend(lines)
            if self.catching_up and any(_digest(m) in self._held_digests for m in lines):
                return self._caught_up(out)
        if self.catching_up and not done:
            return self._caught_up(out)
        return out

    def _caught_up(self, out: list[Any]) -> list[Any]:
        self.catching_up = False
        held, self.held, self._held_digests = self.held, [], set()
        return out + held

    def _message(self, frame: aiohttp.WSMessage) -> Any:
        if frame.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            try:
                return parse_json(frame.data)
            except BadMessage as exc:
                return _Malformed(str(exc))
        reason = self.ws.exception() or frame.extra or frame.type.name
        raise Lost(f"websocket closed ({reason})")

    async def close(self) -> None:
        for task in (self._frame, self._lines):
            if task is not None:
                task.cancel()
        await self.ws.close()
        if self.stream is not None:
            await self.stream.close()


class StreamSession(Session):
    def __init__(self, answer: aiohttp.ClientResponse, max_line: int) -> None:
        self.answer, self.max_line, self.first = answer, max_line, []
        self._buffer = bytearray()

    async def line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            # a whole line may arrive in one read (readany gives all that came): measured either way
            if end > self.max_line or (end < 0 and len(self._buffer) > self.max_line):
                raise Lost(f"a stream line longer than MaxAnswerBytes ({self.max_line})")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line
            chunk = await self.answer.content.readany()
            if not chunk:
                raise Lost("the stream ended")
            self._buffer += chunk

    async def next(self) -> list[Any]:
        out: list[Any] = []
        # every whole line there is, at least one; one too long is the next call's (what came before it is kept)
        while not out or 0 <= self._buffer.find(b"\n") <= self.max_line:
            line = await self.line()
            if line.strip():
                try:
                    out.append(parse_json(line))
                except BadMessage as exc:
                    out.append(_Malformed(str(exc)))
        return out

    async def close(self) -> None:
        self.answer.close()


class PollSession(Session):
    def __init__(self, read: Callable[[], Awaitable[list[Any]]], first: list[Any], every: float,
                 pause: Callable[[float], Awaitable[None]]) -> None:  # fmt: skip
        self.read, self.first, self.every, self.pause = read, first, every, pause

    async def next(self) -> list[Any]:
        await self.pause(self.every)
        return await self.read()


class _Malformed:
    """A frame or line that is not JSON: counted and logged, never published."""

    def __init__(self, why: str) -> None:
        self.why = why


class Receiving:
    """``MatterbridgeClient``'s receive side."""

    ctx: AdapterContext
    name: str
    url: str
    mode: str
    poll_seconds: float
    timeout: float
    reconnect_min: float
    reconnect_max: float
    max_answer: int
    max_file: int
    replay_window: int
    gateways: frozenset[str]
    seen_key: str
    mark: str
    pause: Callable[[float], Awaitable[None]]

    def _http(self) -> aiohttp.ClientSession:
        raise NotImplementedError

    async def receive(self) -> None:
        receiver = Receiver(
            self.ctx, "receive", room=None,
            transient=(TransientError, aiohttp.ClientError, asyncio.TimeoutError, OSError),
            backoff=Backoff(self.reconnect_min, self.reconnect_max), pause=self.pause,
        )  # fmt: skip
        session: Session | None = None

        async def step() -> None:
            nonlocal session
            if session is None:
                session = await self._open()
                self.ctx.log.info("%s: receiving from %s", self.name, type(session).__name__.removesuffix("Session"))
                await self._commit(session.first)
                return
            try:
                batch = await session.next()
            except BaseException:
                closing, session = session, None
                await closing.close()
                raise
            await self._commit(batch)

        try:
            await receiver.run(step)
        finally:
            if session is not None:
                await session.close()

    # opening -------------------------------------------------------------------------
    async def _open(self) -> Session:
        modes = ["websocket", "stream", "poll"] if self.mode == "auto" else [self.mode]
        openers = {"websocket": self._open_websocket, "stream": self._open_stream, "poll": self._open_poll}
        for i, mode in enumerate(modes):
            try:
                return await openers[mode]()
            except NotServed as exc:
                if i + 1 == len(modes):
                    raise Lost(f"{mode}: {exc}") from None
                self.ctx.log.warning("%s: %s not served (%s); trying %s", self.name, mode, exc, modes[i + 1])
            except Refused as exc:  # the runner reports it and pauses the account (a fixed Token needs a restart)
                raise AccountFailed(f"{self.name}: {exc}") from None
        raise AssertionError("unreachable")

    async def _open_websocket(self) -> Session:
        try:  # the session's timeouts bound the connect, not the answer: Timeout does
            ws = await asyncio.wait_for(self._http().ws_connect(
                self.url + "/api/websocket", heartbeat=PING_SECONDS, max_msg_size=self.max_answer,
                timeout=aiohttp.ClientWSTimeout(ws_close=self.timeout), autoping=True,
            ), self.timeout)  # fmt: skip
        except aiohttp.WSServerHandshakeError as exc:
            # a failed handshake keeps no body, and only echo's body tells a 400 "missing key" from another 400
            said = await self._body_of("/api/websocket") if exc.status == 400 else exc.message
            refusal = _refusal(exc.status, said)
            if refusal is not None:
                raise refusal from None
            if exc.status in NOT_SERVED or exc.status == 200:  # 200: answered, but not upgraded
                raise NotServed(f"{exc.status} {exc.message}") from None
            raise Lost(f"websocket: {exc.status} {exc.message}") from None
        stream: StreamSession | None = None
        first: list[Any] = []
        try:
            greeting = await asyncio.wait_for(ws.receive(), self.timeout)
            if greeting.type != aiohttp.WSMsgType.TEXT or not _is_greeting(greeting.data):
                raise Lost(f"websocket: the first frame is not Matterbridge's greeting ({greeting.type.name})")
            try:
                stream = await self._open_stream()
            except NotServed as exc:
                # Only /api/messages hands the ring over then; 1.26 gives the ring
                # its default capacity (10) after that read (api.go handleMessages)
                self.ctx.log.warning("%s: no stream (%s): the ring is read once from /api/messages", self.name, exc)
                first = await self._read_messages()
        except BaseException:
            await ws.close()
            if stream is not None:
                await stream.close()
            raise
        return WebsocketSession(ws, stream, first)

    async def _body_of(self, path: str) -> str:
        """What a plain ``GET path`` answers (its first 512 bytes; "" if nothing)."""
        try:
            async with self._http().get(self.url + path, timeout=aiohttp.ClientTimeout(total=self.timeout)) as answer:
                return (await read_at_most(answer.content, 512)).decode("utf-8", "replace")
        except (aiohttp.ClientError, TimeoutError, OSError):
            return ""

    async def _open_stream(self) -> StreamSession:
        answer = await asyncio.wait_for(  # the answer's head in Timeout; then the stream may be silent
            self._http().get(
                self.url + "/api/stream",
                timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_connect=self.timeout),
            ),
            self.timeout,
        )
        try:
            if answer.status != 200:
                head = await asyncio.wait_for(read_at_most(answer.content, 512), self.timeout)
                body = head.decode("utf-8", "replace")
                refusal = _refusal(answer.status, body)
                if refusal is not None:
                    raise refusal
                if answer.status in NOT_SERVED:
                    raise NotServed(f"{answer.status} {body.strip()[:120]}")
                raise Lost(f"stream: {answer.status} {body.strip()[:120]}")
            _keepalive(answer)
            session = StreamSession(answer, self.max_answer)
            line = await asyncio.wait_for(session.line(), self.timeout)
            if not _is_greeting(line):
                raise Lost("stream: the first line is not Matterbridge's greeting")
        except BaseException:
            answer.close()
            raise
        return session

    async def _open_poll(self) -> Session:
        first = await self._read_messages()
        return PollSession(self._read_messages, first, self.poll_seconds, self.pause)

    async def _read_messages(self) -> list[Any]:
        """``GET /api/messages``: the ring, which Matterbridge clears as it answers."""
        async with self._http().get(
            self.url + "/api/messages", timeout=aiohttp.ClientTimeout(total=self.timeout)
        ) as answer:
            body = await read_at_most(answer.content, self.max_answer + 1)
            if answer.status != 200:
                text = body[:512].decode("utf-8", "replace")
                refusal = _refusal(answer.status, text)
                if refusal is not None:
                    raise refusal
                if answer.status in NOT_SERVED:
                    raise NotServed(f"{answer.status} {text.strip()[:120]}")
                raise Lost(f"/api/messages: {answer.status} {text.strip()[:120]}")
        if len(body) > self.max_answer:
            # Matterbridge has cleared its ring already: what was in it is gone
            raise Lost(f"/api/messages: an answer over MaxAnswerBytes ({self.max_answer}), dropped")
        try:
            messages = parse_json(body)
        except BadMessage as exc:
            raise Lost(f"/api/messages: {exc}") from None
        if messages is None:  # golang-ring's empty ring marshals as null
            return []
        if not isinstance(messages, list):
            raise Lost("/api/messages: the answer is not a list")
        return messages

    # committing ----------------------------------------------------------------------
    async def _commit(self, batch: list[Any]) -> None:
        """Publish what is new in ``batch`` with its digests, in one fenced script."""
        digests: dict[str, None] = {}
        events = []
        for raw in batch:
            if isinstance(raw, _Malformed):
                self._rejected("not JSON", raw.why)
                continue
            try:
                item = received(raw, account=self.name, gateways=self.gateways, mark=self.mark, max_file=self.max_file)
            except BadMessage as exc:
                self._rejected("malformed", str(exc))
                with contextlib.suppress(BadMessage):  # too deep for a digest: refused again if handed over again
                    digests.setdefault(digest_of(raw), None)  # not Matterbridge's: not read again either
                continue
            if item.digest in digests:
                continue
            digests[item.digest] = None
            if item.event is not None:
                events.append((item.digest, item.event))
        if not digests:
            return
        seen = await self.ctx.redis.zmscore(self.seen_key, list(digests))
        known = {d for d, score in zip(digests, seen, strict=True) if score is not None}
        fresh = [d for d in digests if d not in known]
        if not fresh:
            return
        new_events = [event for d, event in events if d not in known]
        score = repr(time.time())
        writes = [
            Write("ZADD", self.seen_key, tuple(x for d in fresh for x in (score, d))),
            Write("ZREMRANGEBYRANK", self.seen_key, (0, -(self.replay_window + 1))),
        ]
        await self.ctx.commit_inbound(new_events, writes)
        if new_events:
            self.ctx.metrics.events_in.labels(self.name).inc(len(new_events))

    def _rejected(self, cause: str, detail: str) -> None:
        self.ctx.metrics.rejected.labels(self.name, cause).inc()
        self.ctx.rejections.note(self.name, "message", cause, detail, peer=self.url)


async def read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to ``limit`` bytes: ``StreamReader.read(n)`` returns what has
    arrived so far, a part of an answer that came in several pieces."""
    body = bytearray()
    while len(body) < limit:
        chunk = await content.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


def _digest(raw: Any) -> str | None:
    """A message's digest; None for what has none (not an object, nested too deep)."""
    if not isinstance(raw, dict):
        return None
    try:
        return digest_of(raw)
    except BadMessage:
        return None


def _is_greeting(data: str | bytes) -> bool:
    try:
        body = parse_json(data)
    except BadMessage:
        return False
    return isinstance(body, dict) and body.get("event") == API_CONNECTED


def _keepalive(answer: aiohttp.ClientResponse) -> None:
    """TCP keepalive on a stream's socket: Matterbridge's stream is silent while
    idle, so a peer gone without a FIN is found only this way (~1 minute)."""
    conn = answer.connection
    sock = conn.transport.get_extra_info("socket") if conn is not None and conn.transport is not None else None
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in KEEPALIVE:
        sock.setsockopt(socket.IPPROTO_TCP, option, value)
