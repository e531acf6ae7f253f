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
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from adapters.matterbridge.messages import BadMessage, digest_of, parse_json, received
from adapters.matterbridge.sessions import (
    PING_SECONDS,
    Lost,
    Malformed,
    NotServed,
    PollSession,
    Refused,
    Session,
    StreamSession,
    WebsocketSession,
    answer_error,
    is_greeting,
    keepalive,
    read_at_most,
)
from bridge.adapter import AccountFailed, TransientError
from bridge.bus import Write
from bridge.receiver import Backoff, Receiver

if TYPE_CHECKING:
    from bridge.adapter import AdapterContext

MODES = ("auto", "websocket", "stream", "poll")


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
    stable_seconds: float
    unsaved: list[Any]

    def _http(self) -> aiohttp.ClientSession:
        raise NotImplementedError

    async def receive(self) -> None:
        receiver = Receiver(
            self.ctx, "receive", room=None,
            transient=(TransientError, aiohttp.ClientError, asyncio.TimeoutError, OSError),
            backoff=Backoff(self.reconnect_min, self.reconnect_max), pause=self.pause,
        )  # fmt: skip
        session: Session | None = None
        pending: asyncio.Future[list[Any]] | None = None  # the next batch, asked for by the step that connected

        async def step() -> None:
            nonlocal session, pending
            if session is None:
                session = await self._open()
                self.ctx.log.info("%s: receiving from %s", self.name, type(session).__name__.removesuffix("Session"))
                await self._save(session.first)
                # Connected once the connection holds for a moment or hands something over: one
                # that greets and hangs up is a failure, backed off, not a success every time.
                pending = asyncio.ensure_future(session.next())
                done, _ = await asyncio.wait({pending}, timeout=self.stable_seconds)
                if not done:
                    return
            batch_of, pending = pending or asyncio.ensure_future(session.next()), None
            try:
                batch = await batch_of
            except BaseException:
                closing, session = session, None
                await closing.close()
                raise
            await self._save(batch)

        try:
            await receiver.run(step)
        finally:
            if pending is not None:
                pending.cancel()
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
        # The session's timeouts bound the connect, not the answer: Timeout does. (asyncio.timeout, not
        # wait_for: 3.11's wait_for can swallow a cancellation that lands as the awaited call finishes.)
        try:
            async with asyncio.timeout(self.timeout):
                ws = await self._http().ws_connect(
                    self.url + "/api/websocket", heartbeat=PING_SECONDS, max_msg_size=self.max_answer,
                    timeout=aiohttp.ClientWSTimeout(ws_close=self.timeout), autoping=True,
                )  # fmt: skip
        except aiohttp.WSServerHandshakeError as exc:
            # a failed handshake keeps no body, and only echo's body tells a 400 "missing key" from another 400
            said = await self._body_of("/api/websocket") if exc.status == 400 else exc.message
            if exc.status == 200:  # answered, but not upgraded (a proxy without WebSocket)
                raise NotServed(f"200 {exc.message}") from None
            raise answer_error("websocket", exc.status, said) from None
        stream: StreamSession | None = None
        first: list[Any] = []
        try:
            async with asyncio.timeout(self.timeout):
                greeting = await ws.receive()
            if greeting.type != aiohttp.WSMsgType.TEXT or not is_greeting(greeting.data):
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
            async with self._http().get(
                self.url + path, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as answer:
                return (await read_at_most(answer.content, 512)).decode("utf-8", "replace")
        except (aiohttp.ClientError, TimeoutError, OSError):
            return ""

    async def _open_stream(self) -> StreamSession:
        async with asyncio.timeout(self.timeout):  # the answer's head in Timeout; then the stream may be silent
            answer = await self._http().get(
                self.url + "/api/stream",
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_connect=self.timeout),
            )
        try:
            if answer.status != 200:
                async with asyncio.timeout(self.timeout):
                    head = await read_at_most(answer.content, 512)
                raise answer_error("stream", answer.status, head.decode("utf-8", "replace"))
            keepalive(answer)
            session = StreamSession(answer, self.max_answer)
            async with asyncio.timeout(self.timeout):
                line = await session.line()
            if not is_greeting(line):
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
            self.url + "/api/messages", allow_redirects=False, timeout=aiohttp.ClientTimeout(total=self.timeout)
        ) as answer:
            body = await read_at_most(answer.content, self.max_answer + 1)
            if answer.status != 200:
                raise answer_error("/api/messages", answer.status, body[:512].decode("utf-8", "replace"))
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
    async def _save(self, batch: list[Any]) -> None:
        """Commit ``batch`` after what a failed commit left: Matterbridge handed
        it over once (the stream dequeued it), so a commit Redis refused is
        tried again, by this receive loop's next step or by the next loop the
        runner starts (the adapter keeps it), not dropped."""
        self.unsaved = self.unsaved + batch
        await self._commit(self.unsaved)
        self.unsaved = []

    async def _commit(self, batch: list[Any]) -> None:
        """Publish what is new in ``batch`` with its digests, in one fenced script."""
        digests: dict[str, None] = {}
        events = []
        for raw in batch:
            if isinstance(raw, Malformed):
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
