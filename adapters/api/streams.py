"""The api adapter's readers: ``/api/messages``, ``/api/stream`` and
``/api/websocket``, the per-client stream slots, and the stalled-client
handling that cuts off a client taking nothing written to it. A mixin of
MatterbridgeAPI (adapters/api/adapter.py); the rows come from its buffer
(adapters/api/buffer.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web
from redis.exceptions import RedisError

from adapters.api.buffer import unavailable
from adapters.api.encoding import API_CONNECTED, API_ERROR, BadRequest, _go_time, ws_message
from bridge.adapter import AdapterContext
from bridge.addresses import client_key
from bridge.events import Event

STREAM_PAGE = 100
WS_PING_SECONDS = 54.0  # api.go pingPeriod (pongWait 60 s * 9 / 10)
WS_CLOSE_SECONDS = 5.0  # a client's close handshake, at shutdown
WAKE_SECONDS = 5.0  # a waiting reader looks at the buffer at least this often
GONE_CHECK_SECONDS = 1.0  # ...and whether its client is still there this often


class ClientStalled(Exception):
    """A client took nothing written to it for WriteTimeoutSeconds."""


class ApiStreams:
    name: str
    ctx: AdapterContext
    write_timeout: float
    max_streams: int
    _changed: asyncio.Event
    _streams: dict[str, int]
    _sockets: set[web.WebSocketResponse]
    _events_in: Any
    event_from_post: Callable[[dict[str, Any]], tuple[Event | None, dict[str, Any]]]  # adapters/api/messages.py
    _claim: Callable[[int | None], Awaitable[list[Any]]]  # adapters/api/buffer.py
    _let_go: Callable[[Sequence[bytes]], None]
    _taken: Callable[[Sequence[bytes]], Awaitable[None]]
    _unavailable: Callable[[BaseException, str], str]

    async def _next_change(self, request: web.Request, changed: asyncio.Event) -> None:
        """Until rows arrive or are let go after ``changed`` was current, or a
        while (a safety net for a change this process did not see). Raises
        ConnectionResetError once the client has gone: its slot is freed
        within a second, not at the next message."""
        for _ in range(round(WAKE_SECONDS / GONE_CHECK_SECONDS)):
            if _gone(request):
                raise ConnectionResetError("the client went away")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GONE_CHECK_SECONDS):
                    await changed.wait()
                    return

    async def _write_rows(self, request: web.Request, rows: list[Any], write: Callable[[], Awaitable[Any]]) -> bool:
        """Claimed ``rows`` to the client by ``write``: True once its socket
        took every byte, and the rows are deleted; False when the client went
        away or stalled (then disconnected), the rows let go for another
        reader. Cancelled (the daemon stopping), the rows are let go too."""
        ids = [row[0] for row in rows]

        async def write_all() -> None:
            await write()
            await _flushed(request)

        try:
            await self._unless_stalled(request, write_all())
        except ClientStalled:
            self._let_go(ids)
            self.ctx.log.info(
                "%s: a client at %s took nothing for %g s: disconnected; its %d messages stay in the buffer",
                self.name, request.remote, self.write_timeout, len(rows),
            )  # fmt: skip
            self.ctx.metrics.rejected.labels(self.name, "stalled").inc()
            _hang_up(request)
            return False
        except ConnectionError:  # the client went away (aiohttp raises ConnectionResetError subclasses)
            self._let_go(ids)
            return False
        except BaseException:
            self._let_go(ids)
            raise
        await self._taken(ids)
        return True

    async def _unless_stalled(self, request: web.Request, writing: Awaitable[None]) -> None:
        """Await ``writing`` (writes to the client) while the client takes what
        is written: raise ClientStalled (``writing`` cancelled) when the
        connection's buffer has not changed over ``WriteTimeoutSeconds``. A
        slow client that keeps taking something keeps its connection; one that
        takes nothing is cut off within twice that time. One timer per write,
        no task: this is every page's path."""
        loop = asyncio.get_running_loop()
        before = _buffered(request)

        def look() -> None:
            nonlocal before, timer
            now = _buffered(request)
            if now == before:
                deadline.reschedule(loop.time())  # expire now: ``writing`` is cancelled
            else:
                before = now
                timer = loop.call_later(self.write_timeout, look)

        try:
            async with asyncio.timeout(None) as deadline:
                timer = loop.call_later(self.write_timeout, look)
                try:
                    await writing
                finally:
                    timer.cancel()
        except TimeoutError:
            if deadline.expired():
                raise ClientStalled from None
            raise

    def _stream_slot(self, request: web.Request) -> str | web.Response:
        """A slot for one more open stream from this client, or the 429 refusing it."""
        client = client_key(request.remote)
        open_now = self._streams.get(client, 0)
        if self.max_streams and open_now >= self.max_streams:
            self.ctx.metrics.rejected.labels(self.name, "429").inc()
            reason = (
                f"{open_now} streams are open from this address, the most MaxStreamsPerClient allows; "
                "close one or retry later"
            )
            return web.json_response({"message": reason}, status=429, headers={"Retry-After": "5"})
        self._streams[client] = open_now + 1
        return client

    def _stream_closed(self, client: str) -> None:
        left = self._streams.get(client, 1) - 1
        if left > 0:
            self._streams[client] = left
        else:
            self._streams.pop(client, None)

    # routes that read ------------------------------------------------------------------
    async def messages(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/messages``: every buffered row no stream holds, deleted
        only once the answer was written to a connected client."""
        if _gone(request):  # waited for Redis or the loop past its client's patience: take nothing
            return web.Response(status=400, text="connection lost")
        try:
            rows = await self._claim(None)
        except (RedisError, OSError) as exc:
            self.ctx.log.warning("%s: cannot read the buffer: %s", self.name, exc)
            return web.json_response({"message": unavailable(exc)}, status=503)
        body = b"[" + b",".join(_payload(row) for row in rows) + b"]"
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(body)  # a cut-off answer is visibly incomplete: its rows stay

        async def answer() -> None:
            _flush_each_write(request)
            await resp.prepare(request)
            await resp.write(body)
            await resp.write_eof()

        try:
            await self._write_rows(request, rows, answer)  # not written: the rows stay, the connection closed
        except (RedisError, OSError) as exc:  # the delete after writing failed: the rows stay, sent again
            self.ctx.log.warning("%s: cannot delete what /api/messages answered: %s", self.name, exc)
        return resp

    async def stream(self, request: web.Request) -> web.StreamResponse:
        slot = self._stream_slot(request)
        if isinstance(slot, web.Response):
            return slot
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            _flush_each_write(request)
            greet = {"event": API_CONNECTED, "timestamp": _go_time(datetime.now(UTC).timestamp())}
            async with asyncio.timeout(self.write_timeout):
                await resp.prepare(request)
                await resp.write(orjson.dumps(greet) + b"\n")
            await self._stream_buffer(request, resp)
        except (ConnectionError, TimeoutError):  # the client went away, or never took its greeting
            _hang_up(request)
        except (RedisError, OSError) as exc:
            # Redis went away (an outage, or the daemon stopping under a
            # connected reader): end this response; the client reconnects.
            self.ctx.log.warning("%s: /api/stream ended: %s", self.name, exc)
        finally:
            self._stream_closed(slot)
        return resp

    async def _stream_buffer(self, request: web.Request, resp: web.StreamResponse) -> None:
        while True:
            changed = self._changed
            rows = await self._claim(STREAM_PAGE)
            if rows:
                data = b"".join(_payload(row) + b"\n" for row in rows)
                if not await self._write_rows(request, rows, functools.partial(resp.write, data)):
                    return  # gone, or cut off: what it did not take stays in the buffer
            if len(rows) < STREAM_PAGE:
                await self._next_change(request, changed)

    # WebSocket ---------------------------------------------------------------------
    async def websocket(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/websocket``, as Matterbridge serves it (bridge/api/api.go
        ``handleWebsocket``, ``readPump``, ``writePump``): after the upgrade,
        a greeting (``{"event":"api_connected"}``), then every buffered and
        every new message as one JSON text frame each; every frame the client
        sends is a message into the gateway, read as ``POST /api/message``
        reads its body (text or binary frames, JSON). Pings every 54 s.

        Where Matterbridge closes the connection on a frame it cannot read,
        a frame refused here (not JSON, not an object, an unknown gateway…)
        is answered with ``{"event": "api_error", "status": 400, "text":
        reason}`` and nothing is published; the connection stays open. A
        frame over ``[http] MaxBodyBytes`` closes it with 1009 (message too
        big): its rest is never read. Like ``/api/stream``, a message is
        taken from the buffer once written to this connection (several
        readers share the buffer; Matterbridge copies each message to all)."""
        ws = web.WebSocketResponse(heartbeat=WS_PING_SECONDS, max_msg_size=self.ctx.max_body)
        if not ws.can_prepare(request).ok:
            self.ctx.metrics.rejected.labels(self.name, "400").inc()
            reason = "/api/websocket needs a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)"
            return web.json_response({"message": reason}, status=400)
        slot = self._stream_slot(request)
        if isinstance(slot, web.Response):
            return slot
        sending = asyncio.Lock()  # frames from the reader (errors) and the writer, one at a time
        greet = {"event": API_CONNECTED, "timestamp": _go_time(datetime.now(UTC).timestamp())}
        writer: asyncio.Task[None] | None = None
        try:
            _flush_each_write(request)
            async with asyncio.timeout(self.write_timeout):
                await ws.prepare(request)
                self._sockets.add(ws)
                await ws.send_str(orjson.dumps(greet).decode())
            writer = asyncio.create_task(self._ws_writer(request, ws, sending), name=f"websocket:{self.name}")
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    await self._ws_frame(request, ws, sending, msg.data)
        except (ConnectionError, TimeoutError):  # the client went away, or never took its greeting
            _hang_up(request)
        finally:
            if writer is not None:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            self._sockets.discard(ws)
            self._stream_closed(slot)
        return ws

    async def _ws_frame(
        self, request: web.Request, ws: web.WebSocketResponse, sending: asyncio.Lock, data: str | bytes
    ) -> None:
        """One frame from the client: publish it, or answer why not."""
        try:
            event, _reply = self.event_from_post(ws_message(data))
        except BadRequest as exc:
            self.ctx.metrics.rejected.labels(self.name, str(exc.status)).inc()
            await self._ws_send(request, ws, sending, {"event": API_ERROR, "status": exc.status, "text": exc.reason})
            return
        if event is None:  # accepted, and it reaches nobody (a deletion of no message)
            return
        try:
            await self.ctx.publish(event)
        except (RedisError, OSError) as exc:
            self.ctx.log.error("%s: cannot queue a message: %s", self.name, exc)
            refusal = {"event": API_ERROR, "status": 503, "text": self._unavailable(exc, "api")}
            await self._ws_send(request, ws, sending, refusal)
            return
        self._events_in.inc()

    async def _ws_send(
        self, request: web.Request, ws: web.WebSocketResponse, sending: asyncio.Lock, message: dict[str, Any]
    ) -> None:
        """An answer to a client's frame. A client that sends and never reads
        takes nothing for ``WriteTimeoutSeconds``: cut off."""

        async def send() -> None:
            async with sending:
                await ws.send_str(orjson.dumps(message).decode())

        try:
            await self._unless_stalled(request, send())
        except ClientStalled:
            _hang_up(request)
            raise ConnectionResetError("the client took nothing written to it") from None

    async def _ws_writer(self, request: web.Request, ws: web.WebSocketResponse, sending: asyncio.Lock) -> None:
        """The buffer to the client, as ``/api/stream`` writes it; a client too
        slow to take a page is disconnected (``_write_rows``)."""

        async def send(rows: list[Any]) -> None:
            async with sending:
                for row in rows:
                    await ws.send_str(_payload(row).decode())

        try:
            while not ws.closed:
                changed = self._changed
                rows = await self._claim(STREAM_PAGE)
                if rows and not await self._write_rows(request, rows, functools.partial(send, rows)):
                    return  # disconnected: the handler's read of the socket ends
                if len(rows) < STREAM_PAGE:
                    await self._next_change(request, changed)
        except ConnectionError:  # the client went away
            pass
        except (RedisError, OSError) as exc:
            # Redis away (an outage, the daemon stopping): close; the client reconnects
            self.ctx.log.warning("%s: /api/websocket ended: %s", self.name, exc)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(WS_CLOSE_SECONDS):
                    await ws.close(
                        code=WSCloseCode.TRY_AGAIN_LATER, message=b"message queue unavailable, reconnect later"
                    )


def _gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _flush_each_write(request: web.BaseRequest) -> None:
    """Have the connection report paused writing while anything written is
    still in its buffer (not just past 64 KiB), so ``_flushed`` waits until
    the kernel has taken every byte."""
    transport = request.transport
    if transport is not None:
        transport.set_write_buffer_limits(high=0, low=0)


async def _flushed(request: web.BaseRequest) -> None:
    """Until the connection's socket has taken everything written to it
    (``_flush_each_write`` first); unbounded here (``_unless_stalled`` bounds
    it). Raises ConnectionResetError when the connection closed first: what
    it held was not written."""
    if _gone(request):
        raise ConnectionResetError("the client went away")
    if _buffered(request) == 0:
        return
    protocol = request.protocol
    await protocol._drain_helper()  # aiohttp's wait for resume_writing, as its own writers use it
    if protocol.writing_paused:  # woken by the connection closing, not by an empty buffer
        raise ConnectionResetError("the client went away")


def _buffered(request: web.BaseRequest) -> int:
    """Bytes written to a connection that its socket has not taken yet."""
    transport = request.transport
    return transport.get_write_buffer_size() if transport is not None else 0


def _hang_up(request: web.BaseRequest) -> None:
    """Close a client's connection at once, what it did not take discarded."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def _payload(row: Any) -> bytes:
    _entry_id, fields = row
    if isinstance(fields, dict):
        return fields[b"d"]
    flat = list(fields)  # raw script reply: [field, value, ...]
    return flat[flat.index(b"d") + 1]
