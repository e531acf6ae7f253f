"""The connections a matterbridge account receives through
(adapters/matterbridge/receiving.py opens them): the websocket with the
stream beside it, the stream alone, or polling; each hands over batches of
messages as parsed JSON (or ``Malformed`` for what is not JSON), and raises
``Lost`` when the connection ends. Also what an answer's status means
(``answer_error``) and reading a body whole up to a bound."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp

from adapters.api.encoding import API_CONNECTED
from adapters.matterbridge.messages import BadMessage, digest_of, parse_json
from bridge.adapter import TransientError

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


def wants_token(status: int, body: str) -> bool:
    """echo's KeyAuth refusing a request without an Authorization header: the
    api account has a Token and we send none."""
    return status == 400 and "missing key" in body


def answer_error(what: str, status: int, body: str) -> Exception:
    """What an answer other than 200 to a GET means: a refused Token
    (``Refused``: 401, or echo's 400 "missing key in request header" when we
    send none), a route not served here (``NotServed``: the next mode), a
    redirect (``Lost``: talkbridge does not follow one, URL should name where
    it points), or trouble to wait out (``Lost``)."""
    said = body.strip()[:120]
    if status == 401:
        return Refused(f"Matterbridge refused the Token (401 {said})")
    if wants_token(status, body):
        return Refused("Matterbridge wants a Token, and URL's account has none configured")
    if status in NOT_SERVED:
        return NotServed(f"{status} {said}")
    if 300 <= status < 400:
        return Lost(f"{what}: {status}, a redirect (set URL to where it points: talkbridge does not follow it)")
    return Lost(f"{what}: {status} {said}")


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
        self._lost: Lost | None = None  # the websocket closed: raised once what came with it is handed over
        # After the catch-up: the newest websocket frame's timestamp, and the stream's lines newer than it,
        # held back until the websocket brings them (the router stamps and sends in one order) or passes
        # them without (melody dropped them): a websocket that fell behind keeps its order.
        self._ws_latest: int | None = None
        self._ahead: dict[str, tuple[int, Any]] = {}

    async def next(self) -> list[Any]:
        if self._lost is not None:
            raise self._lost
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
        if self._lost is not None:
            raise self._lost
        out: list[Any] = []
        if self._frame in done:
            frame, self._frame = self._frame.result(), None
            try:
                message = self._message(frame)
            except Lost as exc:
                # the stream's lines that came (dequeued: Matterbridge has them no more) are kept first
                self._lost = exc
                lines = self._lines.result() if self._lines is not None and self._lines in done else []
                self._lines = None
                rest = [*lines, *(self.stream.complete() if self.stream is not None else [])]
                rest = [m for _, m in sorted(self._ahead.values(), key=lambda a: a[0])] + rest
                self._ahead.clear()
                if not rest and not (self.catching_up and self.held):
                    raise
                return self._caught_up(rest) if self.catching_up else rest
            if not self.catching_up:
                out.extend(self._passed(message))
                out.append(message)
            else:
                self.held.append(message)
                digest = digest_or_none(message)
                if digest is not None:
                    self._held_digests.add(digest)
                if len(self.held) >= HOLD_MAX:  # a stream that never reaches them: memory first
                    return self._caught_up(out)
        if self._lines is not None and self._lines in done:
            lines, self._lines = self._lines.result(), None
            self._stream_at = time.monotonic()
            if self.catching_up:
                out.extend(lines)
                if any(digest_or_none(m) in self._held_digests for m in lines):
                    return self._caught_up(out)
            else:
                out.extend(self._not_ahead(lines))
        if self.catching_up and not done:
            return self._caught_up(out)
        return out

    def _passed(self, message: Any) -> list[Any]:
        """A frame arrived: its stream copy is awaited no more, and the lines
        held back that the websocket has passed without (older than it) are
        let go, oldest first, before it."""
        digest, at = digest_or_none(message), stamp_of(message)
        if digest is not None:
            self._ahead.pop(digest, None)
        if at is None or (self._ws_latest is not None and at <= self._ws_latest):
            return []
        self._ws_latest = at
        passed = sorted((a for a in self._ahead.items() if a[1][0] < at), key=lambda a: a[1][0])
        for d, _ in passed:
            del self._ahead[d]
        return [line for _, (_, line) in passed]

    def _not_ahead(self, lines: list[Any]) -> list[Any]:
        """The stream's lines to hand over now: not those newer than the newest frame."""
        out = []
        for line in lines:
            digest, at = digest_or_none(line), stamp_of(line)
            latest = self._ws_latest
            if digest is not None and at is not None and latest is not None and at > latest:
                if len(self._ahead) < HOLD_MAX:
                    self._ahead[digest] = (at, line)
                    continue
            out.append(line)
        return out

    def _caught_up(self, out: list[Any]) -> list[Any]:
        self.catching_up = False
        held, self.held, self._held_digests = self.held, [], set()
        stamps = [at for at in map(stamp_of, held) if at is not None]
        if stamps:
            self._ws_latest = max(stamps)
        return out + held

    def _message(self, frame: aiohttp.WSMessage) -> Any:
        if frame.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            return parsed(frame.data)
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
                out.append(parsed(line))
        return out

    def complete(self) -> list[Any]:
        """The whole lines already read and not yet handed over (the connection
        is being given up: Matterbridge dequeued them)."""
        out: list[Any] = []
        while 0 <= (end := self._buffer.find(b"\n")) <= self.max_line:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if line.strip():
                out.append(parsed(line))
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


class Malformed:
    """A frame or line that is not JSON: counted and logged, never published."""

    def __init__(self, why: str) -> None:
        self.why = why


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


def digest_or_none(raw: Any) -> str | None:
    """A message's digest; None for what has none (not an object, nested too deep)."""
    if not isinstance(raw, dict):
        return None
    try:
        return digest_of(raw)
    except BadMessage:
        return None


_STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)")


def parsed(data: str | bytes) -> Any:
    """A frame's or a line's message as JSON, or ``Malformed`` (counted, never published)."""
    try:
        return parse_json(data)
    except BadMessage as exc:
        return Malformed(str(exc))


def stamp_of(message: Any) -> int | None:
    """A message's ``timestamp`` (Go's RFC 3339 with nanoseconds) in ns since
    the epoch; None where it has none that reads so."""
    value = message.get("timestamp") if isinstance(message, dict) else None
    match = _STAMP.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None
    base, fraction, zone = match.groups()
    try:
        seconds = datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone)).timestamp()
    except ValueError:
        return None
    return int(seconds) * 1_000_000_000 + int((fraction or "").ljust(9, "0"))


def is_greeting(data: str | bytes) -> bool:
    try:
        body = parse_json(data)
    except BadMessage:
        return False
    return isinstance(body, dict) and body.get("event") == API_CONNECTED


def keepalive(answer: aiohttp.ClientResponse) -> None:
    """TCP keepalive on a stream's socket: Matterbridge's stream is silent while
    idle, so a peer gone without a FIN is found only this way (~1 minute)."""
    conn = answer.connection
    sock = conn.transport.get_extra_info("socket") if conn is not None and conn.transport is not None else None
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in KEEPALIVE:
        sock.setsockopt(socket.IPPROTO_TCP, option, value)
