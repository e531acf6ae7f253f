"""olahol/melody v1.1.2 as api.go uses it (vendor/github.com/olahol/melody
@ e68ddcf5), over aiohttp's WebSocket.

- config.go ``newConfig``: WriteWait 10 s, PongWait 60 s, PingPeriod 54 s
  (PongWait * 9 / 10), MaxMessageSize 512 bytes, MessageBufferSize 256.
- melody.go ``HandleRequestWithKeys``: gorilla's ``Upgrade`` (v1.5.0; its
  refusals are ``http.Error(w, "Bad Request", 400)`` with
  ``Sec-Websocket-Version: 13``), register with the hub, the connect handler
  (api.go writes the greeting), the write pump, then the read pump until it
  ends. ``Broadcast`` writes to every session, ``BroadcastOthers`` to all
  but one.
- session.go: ``writeMessage`` drops a message when the session's buffer
  (256) is full; ``writePump`` writes queued messages and pings every
  PingPeriod; ``readPump`` sets the read limit (a frame over 512 bytes:
  gorilla sends close 1009 and the session ends), a read deadline of
  PongWait extended only by a pong (a client that answers no ping is cut
  off, without a close frame), text frames to HandleMessage; binary frames
  go to HandleMessageBinary, which api.go never sets: ignored.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable

from aiohttp import WSMsgType, web

WRITE_WAIT = 10.0
PONG_WAIT = 60.0
PING_PERIOD = PONG_WAIT * 9 / 10
MAX_MESSAGE_SIZE = 512
MESSAGE_BUFFER_SIZE = 256

Handler = Callable[[str, "Session"], Awaitable[None] | None]


def _tokens(request: web.Request, name: str) -> list[str]:
    """gorilla tokenListContainsValue's view of a header: comma-separated tokens."""
    return [t.strip().lower() for value in request.headers.getall(name, []) for t in value.split(",")]


def upgrade_refusal(request: web.Request) -> str | None:
    """gorilla/websocket v1.5.0 server.go ``Upgrader.Upgrade``'s checks, in order."""
    if "upgrade" not in _tokens(request, "Connection"):
        return "websocket: the client is not using the websocket protocol: 'upgrade' token not found in 'Connection' header"  # noqa: E501
    if "websocket" not in _tokens(request, "Upgrade"):
        return (
            "websocket: the client is not using the websocket protocol: 'websocket' token not found in 'Upgrade' header"
        )
    if "13" not in _tokens(request, "Sec-Websocket-Version"):
        return "websocket: unsupported version: 13 not found in 'Sec-Websocket-Version' header"
    key = request.headers.get("Sec-Websocket-Key", "")
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        return "websocket: not a websocket handshake: 'Sec-WebSocket-Key' header must be Base64 encoded value of 16-byte in length"  # noqa: E501
    return None


class Session:
    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.ws = ws
        self.request = request
        self.output: asyncio.Queue[str] = asyncio.Queue(MESSAGE_BUFFER_SIZE)
        self.open = True

    def write(self, data: bytes) -> None:
        """session.go writeMessage: into the buffer, or dropped when it is full."""
        if not self.open:
            return
        with contextlib.suppress(asyncio.QueueFull):
            self.output.put_nowait(data.decode())

    def cut(self) -> None:
        """conn.Close() without a close frame."""
        self.open = False
        transport = self.request.transport
        if transport is not None:
            transport.close()


class Melody:
    def __init__(self, on_message: Handler, ping_period: float = PING_PERIOD, pong_wait: float = PONG_WAIT) -> None:
        self.on_message = on_message
        self.ping_period = ping_period
        self.pong_wait = pong_wait
        self.sessions: dict[Session, None] = {}  # the hub, in the order sessions came

    def broadcast(self, data: bytes, skip: Session | None = None) -> None:
        """Broadcast, or BroadcastOthers when ``skip`` is given (hub.go run)."""
        for session in list(self.sessions):
            if session is not skip:
                session.write(data)

    def close(self) -> None:
        """The process ends: every connection is cut."""
        for session in list(self.sessions):
            session.cut()

    async def handle_request(self, request: web.Request, greeting: bytes) -> web.StreamResponse:
        refusal = upgrade_refusal(request)
        if refusal is not None:
            return web.Response(status=400, text="Bad Request\n", headers={"Sec-Websocket-Version": "13",
                                "X-Content-Type-Options": "nosniff"})  # fmt: skip
        ws = web.WebSocketResponse(autoping=False, max_msg_size=MAX_MESSAGE_SIZE)
        await ws.prepare(request)
        session = Session(ws, request)
        self.sessions[session] = None  # m.hub.register <- session
        session.write(greeting)  # HandleConnect in api.go: the greeting first
        writer = asyncio.create_task(self._write_pump(session))
        try:
            await self._read_pump(session)
        finally:
            self.sessions.pop(session, None)
            session.open = False
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
        return ws

    async def _write_pump(self, session: Session) -> None:
        next_ping = time.monotonic() + self.ping_period
        try:
            while session.open:
                try:
                    async with asyncio.timeout(max(0.0, next_ping - time.monotonic())):
                        data = await session.output.get()
                except TimeoutError:
                    next_ping = time.monotonic() + self.ping_period
                    async with asyncio.timeout(WRITE_WAIT):
                        await session.ws.ping()
                    continue
                async with asyncio.timeout(WRITE_WAIT):
                    await session.ws.send_str(data)
        except (ConnectionError, TimeoutError, RuntimeError):
            session.cut()

    async def _read_pump(self, session: Session) -> None:
        ws = session.ws
        deadline = time.monotonic() + self.pong_wait
        while True:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    msg = await ws.receive()
            except TimeoutError:  # the read deadline passed: gorilla's read fails, melody closes the conn
                session.cut()
                return
            if msg.type is WSMsgType.TEXT:
                result = self.on_message(msg.data, session)
                if inspect.isawaitable(result):
                    await result
            elif msg.type is WSMsgType.PING:  # gorilla's default ping handler answers
                await ws.pong(msg.data)
            elif msg.type is WSMsgType.PONG:
                deadline = time.monotonic() + self.pong_wait
            elif msg.type is WSMsgType.BINARY:
                continue  # messageHandlerBinary: api.go sets none
            else:  # close, error (a frame past MaxMessageSize: aiohttp sent close 1009), closed
                return
