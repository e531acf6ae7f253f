"""Matterbridge's ``api`` protocol: ``[api.NAME]`` with ``BindAddress``,
``Token``, ``Buffer``, compatible with Matterbridge's HTTP API.

- ``GET /api/health``   -> ``OK``
- ``GET /api/messages`` -> JSON array of buffered messages; drains the buffer
- ``GET /api/stream``   -> one JSON object per line, first ``{"event":"api_connected"}``
- ``POST /api/message`` -> publish a message into its gateway
- ``GET /api/websocket`` -> both ways over a WebSocket (``websocket`` below)

Where Matterbridge fails its users we do better: the buffer is a Redis stream
(it survives restarts); a POST naming an unknown gateway gets 400 with the
reason instead of a silent 200; edits (``id`` of an earlier message, as the
POST answer gave it), deletions (``event: "msg_delete"``), replies
(``parent_id``) and reactions (``event: "reaction_add"`` /
``"reaction_remove"``, emoji in ``text``, target in ``parent_id``) are carried.
Outbound, a message whose ``id`` a client has seen before replaces it.

Otherwise a POST is read as Matterbridge's (bridge/api/api.go
``handlePostMessage``, Go's encoding/json into config.Message): keys match
without regard to case, the channel is always ``api``, and an event we have
no kind for (``topic_change``, ``user_typing``, a client's own) is accepted
and routed as Matterbridge routes it (bridge/router.py).

**Readers share the buffer; none can hold it.** Every reader
(``/api/messages``, ``/api/stream``, ``/api/websocket``) takes the oldest
rows no other reader holds: it *claims* a page (a Redis read and a note in
this process, under a lock held for that read only), writes it to its client
outside any lock, and only then deletes it from Redis. A page counts as
written once the connection's socket has taken all of it (the transport's
buffer is empty). A client that takes nothing of it for
``WriteTimeoutSeconds`` is disconnected (within twice that time; a slow one
that keeps taking keeps its connection), and its page, like that of a
client gone meanwhile, goes back to the buffer, where it never left:
released, the rows are again the oldest unclaimed ones, and the next reader
takes them. So nothing
is lost and nothing is taken by two readers; each reader gets the rows in
the buffer's order, except that rows let go by a reader that stalled reach
the next reader after what it took meanwhile (a live reader does not wait
for a stalled one). What a connection's socket has taken counts as
delivered: bytes a client never read from its kernel's buffers are lost
with it, as with any TCP server. ``/api/messages`` answers with a
``Content-Length``: a cut-off answer is an incomplete one, and its rows stay.

**Per-client limits.** One client address (an IPv6 one by its /64) keeps
at most ``MaxStreamsPerClient`` ``/api/stream`` and ``/api/websocket``
connections open; more are answered ``429``. Behind a reverse proxy every
client has the proxy's address: raise the limit (0: none) there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import contextlib
import functools
import hmac
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, ClassVar
from urllib.parse import parse_qsl

import orjson
from aiohttp import WSCloseCode, WSMsgType, web
from redis.exceptions import RedisError, ResponseError

from bridge.adapter import Adapter, AdapterContext, AdapterTraits, Option
from bridge.addresses import client_key, is_loopback, parse_hostport
from bridge.config import AccountConfig
from bridge.events import Attachment, Delivery, Event, EventKind
from bridge.idmap import FENCED, LUA_LIB, Fenced
from bridge.listener import Listener, ListenerLimits, Refused, read_body

API_CHANNEL = "api"  # every api account's one channel (gateway.go mapChannelConfig, api.go handlePostMessage)
DEFAULT_BUFFER = 1000  # Buffer = 0 means this (api.go leaves its ring at its default for 0)
API_CONNECTED = "api_connected"
EVENT_DELETE = "msg_delete"
EVENT_ACTION = "user_action"
EVENT_JOIN_LEAVE = "join_leave"
EVENT_REACTION_ADD = "reaction_add"
EVENT_REACTION_REMOVE = "reaction_remove"
STREAM_PAGE = 100
API_ERROR = "api_error"  # a WebSocket frame we refused: {"event": "api_error", "status": 400, "text": reason}
WS_PING_SECONDS = 54.0  # api.go pingPeriod (pongWait 60 s * 9 / 10)
WS_CLOSE_SECONDS = 5.0  # a client's close handshake, at shutdown
WRITE_TIMEOUT = 5.0  # seconds a client may take nothing written to it (WriteTimeoutSeconds)
MAX_STREAMS_PER_CLIENT = 16  # open /api/stream + /api/websocket per client address (MaxStreamsPerClient)
WAKE_SECONDS = 5.0  # a waiting reader looks at the buffer at least this often
GONE_CHECK_SECONDS = 1.0  # ...and whether its client is still there this often

# Deliver into the buffer exactly once, under the lease's fence: each
# delivery's map fields (which are also its delivered-marker, bridge.idmap)
# and its buffer entry are written together, so a redelivery after a crash
# finds the marker and adds nothing, and a stale owner adds nothing at all.
# KEYS: fence, buffer. ARGV: token, maxlen, room, the id map's header, then
# per delivery: marker bucket, marker field, payload, native id, n, then n
# (bucket, field, value) map items. Returns {native ids..., entries pushed
# out of a full buffer}.
_DELIVER_MANY = (
    LUA_LIB
    + r"""
if tb_fenced(KEYS[1], ARGV[1]) then return redis.error_reply('FENCED lease token is stale') end
local maxlen, room = tonumber(ARGV[2]), ARGV[3]
local gen_size, keep, buckets, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local marker_gens = tonumber(ARGV[8])
local out, items = {}, {}
local before = redis.call('XLEN', KEYS[2])
local added = 0
local this_call = {}  -- markers written by this call: the map gets them only at the end
local at = 9
while at <= #ARGV do
  local count = tonumber(ARGV[at + 4])
  local marker = ARGV[at] .. '\31' .. ARGV[at + 1]
  local done = this_call[marker] or tb_find(room, gen_size, marker_gens, ARGV[at], ARGV[at + 1])
  if done then
    out[#out + 1] = done
  else
    redis.call('XADD', KEYS[2], 'MAXLEN', maxlen, '*', 'd', ARGV[at + 2])
    for j = at + 5, at + 4 + 3 * count do items[#items + 1] = ARGV[j] end
    out[#out + 1] = ARGV[at + 3]
    this_call[marker] = ARGV[at + 7]  -- what tb_find will answer: the marker item's value
    added = added + 1
  end
  at = at + 5 + 3 * count
end
if added > 0 then tb_put(room, gen_size, keep, buckets, ttl, added, items, 1, #items / 3) end
local dropped = before + added - maxlen
if dropped < 0 then dropped = 0 end
out[#out + 1] = dropped
return out
"""
)


class ClientStalled(Exception):
    """A client took nothing written to it for WriteTimeoutSeconds."""


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _go_time(ts: float) -> str:
    """RFC 3339 with nanoseconds, as Go's time.Time marshals."""
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond:06d}000Z"


# config.Message's JSON names; Go's encoding/json matches a key to them
# without regard to case (Extra has no tag: its field name)
MESSAGE_FIELDS = (
    "text", "channel", "username", "userid", "avatar", "account", "event", "protocol", "gateway", "parent_id",
    "timestamp", "id", "Extra",
)  # fmt: skip
FILE_FIELDS = ("Name", "Data", "Comment", "URL", "Size", "Avatar", "SHA", "NativeID")  # config.FileInfo
_ASCII_FOLD = {**{c: c + 32 for c in range(65, 91)}, 0x212A: "k", 0x17F: "s"}


def go_fold(key: str) -> str:
    """A key as Go's encoding/json (and mapstructure) compares it to a field
    name: ASCII letters without case, and the Kelvin sign and long s, which
    fold to k and s."""
    return key.translate(_ASCII_FOLD)


@functools.cache
def _fields_by_key(names: tuple[str, ...]) -> Mapping[str, str]:
    """Field name by folded key, and by its exact spelling (the common case,
    found without folding). Built once per field list: this is the POST path."""
    table = {go_fold(name): name for name in names}
    table.update({name: name for name in names})
    return MappingProxyType(table)


def go_fields(body: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The body's values by field name, keys matched as Go matches them; of
    several keys for one field the last wins, as Go assigns each in turn.
    Keys that name no field are left out (Go ignores them)."""
    by_key = _fields_by_key(tuple(names))
    out: dict[str, Any] = {}
    for key, value in body.items():
        name = by_key.get(key)
        if name is None:
            name = by_key.get(go_fold(key))
        if name is not None:
            out.pop(name, None)  # the last key for a field wins
            out[name] = value
    return out


class MatterbridgeAPI(Adapter):
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
        self.buffer_key = f"{ctx.key_prefix}:apibuf:{{{acct.name}}}"  # tagged like delivered keys
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
                return web.json_response({"message": "message queue unavailable, retry later"}, status=503)
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

    def event_from_post(self, body: dict[str, Any]) -> tuple[Event | None, dict[str, Any]]:
        """Validate a POSTed Matterbridge message (its keys as ``go_fields``
        gives them); raise BadRequest. The event is None for a POST that is
        accepted but reaches nobody (a deletion of no message)."""
        fields: dict[str, str] = {}
        for key in MESSAGE_FIELDS:
            if key == "Extra":
                continue
            value = body.get(key, "")
            if value is None:  # Go leaves a field alone for null
                value = ""
            if not isinstance(value, str):
                raise BadRequest(400, f"{key} must be a string")
            fields[key] = value
        gateway = self._gateway(fields["gateway"])
        channel = API_CHANNEL  # api.go handlePostMessage: "these values are fixed"
        extra = body.get("Extra")
        attachments = self._files(extra)
        kind_of = {
            "": EventKind.EDIT if fields["id"] else EventKind.MESSAGE,
            EVENT_ACTION: EventKind.EDIT if fields["id"] else EventKind.MESSAGE,
            EVENT_DELETE: EventKind.DELETE,
            EVENT_REACTION_ADD: EventKind.REACTION,
            EVENT_REACTION_REMOVE: EventKind.UNREACTION,
            EVENT_JOIN_LEAVE: EventKind.JOIN,
        }
        kind = kind_of.get(fields["event"], EventKind.OTHER)
        native_id = os.urandom(8).hex()  # 64 random bits: unique enough per room, compact in the id map
        event = Event(
            kind=kind,
            account=self.name,
            channel=channel,
            sender_id=fields["userid"],
            sender_name=fields["username"],
            text=fields["text"],
            avatar=fields["avatar"] or None,
            gateway=gateway,
            attachments=attachments,
            origin=[f"{self.name}/{channel}"],
        )
        reaches_nobody = False
        if kind == EventKind.MESSAGE:
            if not fields["text"] and not attachments:
                raise BadRequest(400, "text is empty and there is no file")
            event.native_id = native_id
            event.reply_to = fields["parent_id"] or None
            if fields["event"] == EVENT_ACTION:
                event.extra["action"] = True
        elif kind == EventKind.EDIT:
            if not fields["text"]:
                raise BadRequest(400, "an edit needs text")
            event.target_id = fields["id"]
            native_id = fields["id"]
        elif kind == EventKind.DELETE:
            # Without an id there is nothing to delete: every Matterbridge
            # bridge drops such a deletion (its api bridge drops them all)
            event.target_id = fields["id"]
            native_id = fields["id"]
            reaches_nobody = not fields["id"]
        elif kind in (EventKind.REACTION, EventKind.UNREACTION):
            if not fields["parent_id"] or not fields["text"]:
                raise BadRequest(400, f"{fields['event']} needs parent_id (the message) and text (the emoji)")
            if len(fields["text"]) > 64:
                raise BadRequest(400, "a reaction is one emoji")
            event.target_id = fields["parent_id"]
            event.reaction = fields["text"]
            event.text = ""
            native_id = ""
        elif kind == EventKind.OTHER:
            event.extra["event"] = fields["event"]
            native_id = ""  # nothing to edit or delete later
        reply = {
            "text": fields["text"],
            "channel": API_CHANNEL,
            "username": fields["username"],
            "userid": fields["userid"],
            "avatar": fields["avatar"],
            "account": self.name,
            "event": fields["event"],
            "protocol": "api",
            "gateway": gateway,
            "parent_id": fields["parent_id"],
            "timestamp": _go_time(event.timestamp),
            "id": native_id,  # Matterbridge answers ""; ours lets a client edit later
            "Extra": extra if isinstance(extra, dict) else None,
        }
        return (None if reaches_nobody else event), reply

    def _gateway(self, name: str) -> str:
        sends = self.ctx.sends_into
        if name:
            if name not in sends:
                known = ", ".join(sorted(sends)) or "none"
                raise BadRequest(400, f'unknown gateway "{name}" for {self.name} (it sends into: {known})')
            return name
        if len(sends) == 1:
            return next(iter(sends))
        raise BadRequest(400, f"gateway is required ({self.name} sends into: {', '.join(sorted(sends)) or 'none'})")

    def _files(self, extra: Any) -> list[Attachment]:
        if extra is None:
            return []
        if not isinstance(extra, dict):
            raise BadRequest(400, "Extra must be an object")
        for key, value in extra.items():  # config.Message.Extra is map[string][]interface{}
            if value is not None and not isinstance(value, list):
                raise BadRequest(400, f"Extra.{_shown(key)} must be a list")
        files = extra.get("file") or []  # a map key: exact, as in Go
        out = []
        for i, raw in enumerate(files):
            if not isinstance(raw, dict):
                raise BadRequest(400, f"Extra.file[{i}] must be an object")
            item = go_fields(raw, FILE_FIELDS)  # mapstructure matches names without regard to case
            name = item.get("Name")
            if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
                raise BadRequest(400, f"Extra.file[{i}].Name must be a file name")
            data = item.get("Data")
            url = item.get("URL")
            if data is not None:
                if not isinstance(data, str):
                    raise BadRequest(400, f"Extra.file[{i}].Data must be base64")
                try:
                    size = len(base64.b64decode(data, validate=True))
                except (binascii.Error, ValueError):
                    raise BadRequest(400, f"Extra.file[{i}].Data is not valid base64") from None
                if size > self.max_file:
                    raise BadRequest(413, f"Extra.file[{i}] is {size} bytes; MediaDownloadSize is {self.max_file}")
            elif not isinstance(url, str) or not url:
                raise BadRequest(400, f"Extra.file[{i}] needs Data or URL")
            else:
                size = item.get("Size") if isinstance(item.get("Size"), int) else None
            comment = item.get("Comment")
            out.append(
                Attachment(
                    name=name,
                    size=size,
                    url=url if isinstance(url, str) and url else None,
                    data_b64=data,
                    caption=comment if isinstance(comment, str) and comment else None,
                )
            )
        return out

    # outbound ------------------------------------------------------------------
    def message_for(self, delivery: Delivery, native_id: str) -> dict[str, Any]:
        event = delivery.event
        msg: dict[str, Any] = {
            "text": delivery.text,
            "channel": event.channel,  # Matterbridge gives api clients the origin channel
            "username": delivery.username,
            "userid": event.sender_id,
            "avatar": delivery.avatar or event.avatar or "",  # the router's IconURL when the event has none
            "account": event.account,
            "event": "",
            "protocol": event.protocol,
            "gateway": delivery.gateway,
            "parent_id": delivery.reply_to or "",
            "timestamp": _go_time(event.timestamp),
            "id": native_id,
            "Extra": None,
        }
        if event.kind == EventKind.DELETE:
            msg["event"], msg["id"], msg["text"] = EVENT_DELETE, delivery.target_id, ""
        elif event.kind == EventKind.EDIT:
            msg["id"] = delivery.target_id
        elif event.kind in (EventKind.REACTION, EventKind.UNREACTION):
            msg["event"] = EVENT_REACTION_ADD if event.kind == EventKind.REACTION else EVENT_REACTION_REMOVE
            msg["text"], msg["parent_id"], msg["id"] = event.reaction or "", delivery.target_id, ""
        elif event.kind in (EventKind.JOIN, EventKind.LEAVE):
            msg["event"] = EVENT_JOIN_LEAVE
        elif event.kind == EventKind.OTHER:
            msg["event"], msg["id"] = str(event.extra.get("event", "")), ""
        elif event.extra.get("action"):
            msg["event"] = EVENT_ACTION
        if event.attachments:
            msg["Extra"] = {
                "file": [
                    {
                        "Name": a.name,
                        "Data": a.data_b64,
                        "Comment": a.caption or "",
                        "URL": a.url or "",
                        "Size": a.size or 0,
                        "Avatar": False,
                        "SHA": "",
                    }
                    for a in event.attachments
                ]
            }
        return msg

    async def send(self, delivery: Delivery) -> str | None:
        [native_id] = await self.send_batch([delivery])
        return native_id

    async def send_batch(self, deliveries: Sequence[Delivery]) -> list[str | None]:
        idmap = self.ctx.idmap
        assert idmap is not None, "the api adapter records its deliveries in the id map"
        fence = self.ctx.fence()
        keys = [fence.key if fence else f"{self.ctx.key_prefix}:fence:none", self.buffer_key]
        # an api account has one channel: every delivery here is to one room
        room = idmap.room(self.name, deliveries[0].channel)
        assert all(d.channel == deliveries[0].channel for d in deliveries)
        args: list[Any] = [fence.token if fence else "", self.buffer_size, room, *idmap.header()]
        for delivery in deliveries:
            # 8 random bytes: unique per room, and a compact map entry
            native_id = os.urandom(8).hex() if delivery.event.kind == EventKind.MESSAGE else ""
            items = idmap.record_items(delivery, native_id or None)
            marker_bucket, marker_field, _ = items[0]  # the first item is the delivered-marker
            args += [marker_bucket, marker_field, orjson.dumps(self.message_for(delivery, native_id))]
            args += [native_id, len(items)]
            for item in items:
                args.extend(item)
        try:
            *stored, dropped = await self._deliver_many(keys=keys, args=args)
        except ResponseError as exc:
            if str(exc).startswith(FENCED):
                raise Fenced(str(exc)) from None
            raise
        if int(dropped):
            self.ctx.metrics.api_buffer_dropped.labels(self.name).inc(int(dropped))
        self._wake_readers()
        return [(s.decode() if isinstance(s, bytes) else s) or None for s in stored]

    # reading the buffer --------------------------------------------------------------
    def _wake_readers(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

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

    async def _claim(self, count: int | None) -> list[Any]:
        """The oldest rows no other reader holds, at most ``count`` (None: all
        of them), now held by the caller until ``_taken`` or ``_let_go``."""
        async with self._claim_lock:  # held for this read only, never across a client's write
            held = self._claimed
            if count is None:
                rows = await self.ctx.redis.xrange(self.buffer_key, min="-", max="+")
            else:  # held rows are the oldest, mostly: skip past them
                rows = await self.ctx.redis.xrange(self.buffer_key, min="-", max="+", count=count + len(held))
            page = [row for row in rows if row[0] not in held][:count]
            held.update(row[0] for row in page)
        return page

    def _let_go(self, ids: Sequence[bytes]) -> None:
        """Claimed rows not written: the next reader takes them (they never left the buffer)."""
        self._claimed.difference_update(ids)
        self._wake_readers()

    async def _taken(self, ids: Sequence[bytes]) -> None:
        """Written rows: deleted, and only then released (released at once, a
        reader could take them again before the delete). The delete runs to its
        end even if this handler is cancelled (the daemon stopping)."""
        if not ids:  # an empty answer (a poll of an empty buffer): nothing to delete, and XDEL needs an id
            return
        deletion = asyncio.ensure_future(self.ctx.redis.xdel(self.buffer_key, *ids))
        deletion.add_done_callback(lambda _done: self._claimed.difference_update(ids))
        await asyncio.shield(deletion)

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
            return web.json_response({"message": "message queue unavailable, retry later"}, status=503)
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
            refusal = {"event": API_ERROR, "status": 503, "text": "message queue unavailable, retry later"}
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


def ws_message(data: str | bytes) -> dict[str, Any]:
    """A WebSocket frame as the message it carries (its keys as ``go_fields``
    gives them); raise BadRequest. A binary frame is read as JSON too (Go's
    ``ReadJSON`` reads either kind)."""
    try:
        body = orjson.loads(data)  # refuses text that is not UTF-8, lone surrogates, NaN, nesting past 1,024
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, f"frame is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "a frame must be a JSON object (one message)")
    return go_fields(body, MESSAGE_FIELDS)


FORM_CHARSETS = ("utf-8", "ascii", "iso8859-1", "cp1252")  # codecs' names for them
FORM_MAX_FIELDS = 100


def _shown(value: str, limit: int = 80) -> str:
    """A client's value in a reason: printable and bounded."""
    text = value.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return text if len(text) <= limit else text[:limit] + "…"


def _form_encoding(charset: str | None) -> str:
    if not charset:
        return "utf-8"
    try:
        name = codecs.lookup(charset).name
    except (LookupError, ValueError, TypeError):
        name = ""
    if name not in FORM_CHARSETS:
        raise BadRequest(415, f"charset {_shown(charset)} is not supported; send UTF-8")
    return name


def _form_fields(raw: bytes, encoding: str) -> dict[str, str]:
    """A form post's fields; the last of a repeated name wins."""
    try:
        text = raw.decode(encoding)
        pairs = parse_qsl(
            text, keep_blank_values=True, encoding=encoding, errors="strict", max_num_fields=FORM_MAX_FIELDS
        )
    except UnicodeDecodeError:
        raise BadRequest(400, f"form body is not valid {encoding.upper()}") from None
    except ValueError:  # more fields than any message has
        raise BadRequest(400, f"form body has more than {FORM_MAX_FIELDS} fields") from None
    return dict(pairs)


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
