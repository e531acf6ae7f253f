"""The Matterbridge api adapter: its account's options and checks, the
listener and its routes, the Token check, and ``POST /api/message``. What a
message is lives in adapters/api/messages.py (read as Go reads it,
adapters/api/encoding.py), the buffer in adapters/api/buffer.py, its readers
in adapters/api/streams.py: MatterbridgeAPI mixes them in.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import orjson
from aiohttp import WSCloseCode, web
from redis.exceptions import RedisError

from adapters.api.buffer import _DELIVER_MANY, ApiBuffer
from adapters.api.encoding import (
    API_CHANNEL,
    MESSAGE_FIELDS,
    BadRequest,
    _form_encoding,
    _form_fields,
    _shown,
    go_fields,
)
from adapters.api.messages import ApiMessages
from adapters.api.streams import WS_CLOSE_SECONDS, ApiStreams
from bridge.adapter import Adapter, AdapterContext, AdapterTraits, Option
from bridge.addresses import is_loopback, parse_hostport
from bridge.config import AccountConfig
from bridge.listener import Listener, ListenerLimits, Refused, read_body

DEFAULT_BUFFER = 1000  # Buffer = 0 means this (api.go leaves its ring at its default for 0)
WRITE_TIMEOUT = 5.0  # seconds a client may take nothing written to it (WriteTimeoutSeconds)
MAX_STREAMS_PER_CLIENT = 16  # open /api/stream + /api/websocket per client address (MaxStreamsPerClient)


class MatterbridgeAPI(ApiStreams, ApiBuffer, ApiMessages, Adapter):
    protocol = "api"
    options: ClassVar[dict[str, Option]] = {
        "BindAddress": Option(str, required=True, help="HOST:PORT to listen on"),
        "Token": Option(str, secret=True, default=""),
        "Buffer": Option(int, default=DEFAULT_BUFFER, min=0, help="0: the default"),
        "MaxStreamsPerClient": Option(
            int, default=MAX_STREAMS_PER_CLIENT, min=0, help="open /api/stream and /api/websocket per address; 0: any"
        ),
        "WriteTimeoutSeconds": Option(
            (int, float), default=WRITE_TIMEOUT, above=0, help="a client that takes nothing for this long is cut off"
        ),
    }
    traits = AdapterTraits(batch_send=True, records_delivery=True, fixed_channel=API_CHANNEL, relays_other_events=True)

    def __init__(self, ctx: AdapterContext) -> None:
        super().__init__(ctx)
        acct = ctx.account
        self.name = acct.name
        self.token: str = acct.get("Token", "")
        self.buffer_size: int = acct.get("Buffer", DEFAULT_BUFFER) or DEFAULT_BUFFER
        self.max_file = int(acct.get("MediaDownloadSize", 1_000_000))
        self.buffer_key = ctx.key("apibuf")  # in the slot of the account's fence and id map (one script writes them)
        self.max_streams: int = acct.get("MaxStreamsPerClient", MAX_STREAMS_PER_CLIENT)
        self.write_timeout = float(acct.get("WriteTimeoutSeconds", WRITE_TIMEOUT))
        self._deliver_many = ctx.redis.register_script(_DELIVER_MANY)
        self._runner: Listener | None = None
        self._events_in = ctx.metrics.events_in.labels(acct.name)
        self._changed = asyncio.Event()  # set (and replaced) when rows arrive or are let go
        self._claim_lock = asyncio.Lock()  # one claim at a time: a Redis read, never a client's write
        self._claimed: set[bytes] = set()  # entry ids a reader is writing to its client
        self._streams: dict[str, int] = {}  # open streams and sockets by client address
        self._sockets: set[web.WebSocketResponse] = set()  # open /api/websocket connections

    @classmethod
    def check_account(cls, account: AccountConfig) -> list[str]:
        problems = []
        bind = account.get("BindAddress")
        if bind and parse_hostport(bind) is None:
            problems.append(f'{account.name}.BindAddress: "{bind}" is not HOST:PORT')
        return problems

    @classmethod
    def warn_account(cls, account: AccountConfig) -> list[str]:
        hostport = parse_hostport(account.get("BindAddress") or "")
        if hostport is None or account.get("Token", "") or is_loopback(hostport[0]):
            return []
        return [
            f'{account.name}.Token: empty, and BindAddress "{account.get("BindAddress")}" is reachable from other '
            "hosts: anyone who reaches it can read the buffer and post into the gateways; set a Token"
        ]

    # lifecycle -----------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.ctx.max_body)
        app.add_routes(
            [
                web.get("/api/health", self._authorized(self.health)),
                web.get("/api/messages", self._authorized(self.messages)),
                web.get("/api/stream", self._authorized(self.stream)),
                web.post("/api/message", self._authorized(self.post_message)),
                web.get("/api/websocket", self._authorized(self.websocket)),
            ]
        )
        return app

    async def connect(self) -> None:
        host, port = parse_hostport(self.ctx.account.get("BindAddress"))  # type: ignore[misc]
        listener = Listener(self.app(), self.name, self.ctx.http_limits or ListenerLimits(), self.ctx.log)
        await listener.start(host, port)
        self._runner = listener
        self.ctx.log.info("%s: listening on %s:%d", self.name, host, port)

    async def disconnect(self) -> None:
        sockets, self._sockets = list(self._sockets), set()
        for ws in sockets:  # 1001: the server is going away; a client reconnects (to the next owner)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(WS_CLOSE_SECONDS):
                    await ws.close(code=WSCloseCode.GOING_AWAY, message=b"talkbridge is stopping this account here")
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # auth ----------------------------------------------------------------------
    Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

    def _authorized(self, handler: Handler) -> Handler:
        """The Bearer check on every route (a wrapper, not an aiohttp
        middleware: cheaper on the hot POST path)."""

        async def checked(request: web.Request) -> web.StreamResponse:
            refusal = self._refusal(request)
            return refusal if refusal is not None else await handler(request)

        return checked

    def _refusal(self, request: web.Request) -> web.Response | None:
        """The answer to a request without the account's Token (None: let it
        through). Refusals are counted, and logged in summary — the first at
        once, then one line a minute (bridge/rejections.py): a client with a
        stale token shows up in the log, a flood does not fill it."""
        if self.token:
            header = request.headers.get("Authorization", "")
            if not header.startswith("Bearer ") or not header[7:]:
                # Matterbridge (echo KeyAuth) answers 400 for a missing key
                self.ctx.metrics.rejected.labels(self.name, "missing_token").inc()
                self.ctx.rejections.note(
                    self.name, "api request", "missing_token", "no Authorization: Bearer", request.remote
                )
                return web.json_response({"message": "missing key in request header"}, status=400)
            # a header's bytes that are not UTF-8 arrive as surrogates: compare bytes as sent
            if not hmac.compare_digest(header[7:].encode("utf-8", "surrogateescape"), self.token.encode()):
                self.ctx.metrics.rejected.labels(self.name, "bad_token").inc()
                self.ctx.rejections.note(
                    self.name, "api request", "bad_token", "the bearer token is not the account's Token", request.remote
                )
                return web.json_response({"message": "Unauthorized"}, status=401)
        return None

    # routes --------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def post_message(self, request: web.Request) -> web.Response:
        try:
            body = await self._read_body(request)
            event, reply = self.event_from_post(body)
            try:  # before publishing: what cannot be answered is not accepted
                answer = orjson.dumps(reply)
            except orjson.JSONEncodeError as exc:
                raise BadRequest(400, f"Extra cannot be echoed back: {exc}") from None
        except BadRequest as exc:
            self.ctx.metrics.rejected.labels(self.name, str(exc.status)).inc()
            return web.json_response({"message": exc.reason}, status=exc.status)
        if event is not None:  # None: accepted, and nothing would reach anyone
            try:
                await self.ctx.publish(event)
            except (RedisError, OSError) as exc:
                self.ctx.log.error("%s: cannot queue a message: %s", self.name, exc)
                return web.json_response({"message": self._unavailable(exc, "api")}, status=503)
            self._events_in.inc()
        return web.Response(body=answer, content_type="application/json")

    async def _read_body(self, request: web.Request) -> dict[str, Any]:
        """The POSTed message as a dict: JSON (always UTF-8), or a form post
        in UTF-8 (or the ASCII/Latin-1/Windows-1252 its charset names)."""
        ctype = request.content_type
        form = ctype == "application/x-www-form-urlencoded"
        if not form and ctype not in ("application/json", "application/octet-stream", ""):
            raise BadRequest(415, f"Content-Type {_shown(ctype)} is not supported; send application/json")
        encoding = _form_encoding(request.charset) if form else "utf-8"
        try:
            raw = await read_body(request, self.ctx.max_body)
        except Refused as exc:
            raise BadRequest(exc.status, exc.reason) from None
        if form:
            return go_fields(_form_fields(raw, encoding), MESSAGE_FIELDS)
        try:
            body = orjson.loads(raw)  # refuses text that is not UTF-8, lone surrogates, NaN, nesting past 1,024
        except orjson.JSONDecodeError as exc:
            raise BadRequest(400, f"body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "body must be a JSON object")
        return go_fields(body, MESSAGE_FIELDS)
