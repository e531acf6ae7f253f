"""One Matterbridge ``api`` account: bridge/api/api.go @ e68ddcf5 (line
numbers are that file's), served by aiohttp.

- ``New`` (l.36-96): the ring gets ``SetCapacity(Buffer)`` only when Buffer is
  not 0 (l.67-70); KeyAuth on every route only when Token is set (l.71-75);
  RemoteNickFormat defaults to ``{NICK}`` (l.77-81, done in gateway.py);
  routes l.83-87.
- echo v4.10.2 (go.mod at e68ddcf5): the router answers 404 ``Not Found``
  and 405 ``Method Not Allowed`` (with ``Allow``), the middleware runs for
  those too (echo.go ``ServeHTTP`` applies ``e.middleware`` to whatever
  handler ``Find`` gave), OPTIONS on a known path is 204 with ``Allow``
  (router.go ``optionsMethodHandler``); errors are ``{"message": ...}``
  (echo.go ``DefaultHTTPErrorHandler``; no body at all for HEAD), an error that is not an HTTPError is 500
  ``Internal Server Error``; ``c.JSON`` indents when the query has
  ``pretty``. middleware/key_auth.go ``KeyAuthWithConfig`` with
  extractor.go ``valuesFromHeader`` (prefix ``Bearer `` compared without
  case): no Authorization header -> 400 ``missing key in request header``,
  one that does not start with the scheme -> 400 ``invalid key in the
  request header``, a wrong key -> 401 ``Unauthorized``.
- ``Send`` (l.110-126): ``msg_delete`` dropped; else Enqueue and Broadcast.
- ``handlePostMessage`` (l.132-176), ``handleMessages`` (l.178-184: the ring
  is replaced by a zero Ring, so it has the default capacity afterwards,
  whatever Buffer says), ``handleStream`` (l.193-217), websocket (l.43-65, l.219-245,
  and melody.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tests.mbserver.gojson import FILE_FIELDS, FileInfo, GoError, Message, decode_message, indent, marshal, now_ns
from tests.mbserver.melody import Melody
from tests.mbserver.ring import Ring

JSON_UTF8 = "application/json; charset=UTF-8"  # echo.MIMEApplicationJSONCharsetUTF8
ROUTES = {"/api/health": "GET", "/api/messages": "GET", "/api/stream": "GET", "/api/websocket": "GET",
          "/api/message": "POST"}  # fmt: skip
STREAM_PERIOD = 0.1  # handleStream: time.Sleep(100 * time.Millisecond)


def echo_error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=marshal({"message": message}) + b"\n", content_type=None,
                        headers={"Content-Type": JSON_UTF8})  # fmt: skip


STATUS_TEXT = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
               415: "Unsupported Media Type", 500: "Internal Server Error"}  # fmt: skip


class ApiBridge:
    """The api bridge of one account; ``remote`` is ``b.Remote <- msg``."""

    def __init__(self, account: str, settings: dict[str, Any], remote: Callable[[Message], Awaitable[None]],
                 ping_period: float, pong_wait: float) -> None:  # fmt: skip
        self.account = account
        self.token = str(settings.get("Token", ""))
        self.buffer = int(settings.get("Buffer", 0))
        host, _, port = str(settings["BindAddress"]).rpartition(":")
        self.host, self.port = host or "0.0.0.0", int(port)
        self.remote = remote
        self.messages = self._new_ring()
        self.closing = False
        self.streams = 0  # /api/stream handlers still looping (a client gone is noticed at the next iteration)
        self.melody = Melody(self._ws_message, ping_period=ping_period, pong_wait=pong_wait)
        self._runner: web.AppRunner | None = None

    def _new_ring(self) -> Ring:
        ring = Ring()
        if self.buffer != 0:  # api.go New l.67-70
            ring.set_capacity(self.buffer)
        return ring

    async def start(self) -> None:
        """A (re)start: the ring is new and empty, as a restarted Matterbridge's is."""
        self.messages = self._new_ring()
        self.closing = False
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._serve)
        # stopping is Matterbridge going away: its streams and websockets end with it, nobody waits for them
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        self.closing = True
        self.melody.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # Send (api.go l.110-126) --------------------------------------------------------------------------------------
    def send(self, msg: Message) -> str:
        if msg.event == "msg_delete":  # config.EventMsgDelete
            return ""
        self.messages.enqueue(msg)
        self.melody.broadcast(marshal(msg))
        return ""

    # echo: router, middleware, error handler ------------------------------------------------------------------------
    async def _serve(self, request: web.Request) -> web.StreamResponse:
        response = await self._route(request)
        if request.method == "HEAD" and response.status >= 400:  # DefaultHTTPErrorHandler: c.NoContent for HEAD
            allow = response.headers.get("Allow")
            return web.Response(status=response.status, headers={"Allow": allow} if allow else None)
        return response

    async def _route(self, request: web.Request) -> web.StreamResponse:
        method = ROUTES.get(request.path)
        if self.token:
            refusal = self._key_auth(request)
            if refusal is not None:
                return refusal
        if method is None:
            return echo_error(404, "Not Found")
        if request.method != method:
            if request.method == "OPTIONS":  # echo 4.10's router: 204 with the allowed methods
                return web.Response(status=204, headers={"Allow": f"OPTIONS, {method}"})
            response = echo_error(405, "Method Not Allowed")
            response.headers["Allow"] = f"OPTIONS, {method}"
            return response
        try:
            handler = {"/api/health": self._health, "/api/messages": self._messages, "/api/stream": self._stream,
                       "/api/websocket": self._websocket, "/api/message": self._post}[request.path]  # fmt: skip
            return await handler(request)
        except GoError as exc:
            return echo_error(exc.status, exc.message)

    def _key_auth(self, request: web.Request) -> web.Response | None:
        """middleware/key_auth.go KeyAuthWithConfig + extractor.go valuesFromHeader."""
        values = request.headers.getall("Authorization", [])
        if not values:
            return echo_error(400, "missing key in request header")
        keys = []
        for i, value in enumerate(values):
            if len(value) > 7 and value[:7].lower() == "bearer ":
                keys.append(value[7:])
                if i >= 19:  # extractorLimit
                    break
        if not keys:
            return echo_error(400, "invalid key in the request header")
        if any(key == self.token for key in keys):  # the validator: key == b.GetString("Token")
            return None
        return echo_error(401, "Unauthorized")

    # routes -----------------------------------------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:  # l.128-130: c.String(200, "OK")
        return web.Response(body=b"OK", headers={"Content-Type": "text/plain; charset=UTF-8"})

    async def _messages(self, request: web.Request) -> web.Response:
        """l.178-184: JSONPretty(200, b.Messages.Values(), " "), then a zero Ring."""
        body = indent(marshal(self.messages.values()), " ") + b"\n"
        self.messages = Ring()
        return web.Response(body=body, headers={"Content-Type": JSON_UTF8})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """l.193-217: Content-Type application/json, 200, the greeting as a JSON
        line, then per 100 ms one Dequeue written as a JSON line. Go's select
        takes the cancelled request context over ``default``: a client gone
        before an iteration dequeues nothing; one that goes while a message is
        written loses it (the write fails or lands in a dead socket)."""
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(marshal(greeting()) + b"\n")
        self.streams += 1
        try:
            while True:
                transport = request.transport
                if transport is None or transport.is_closing() or self.closing:
                    return response  # case <-c.Request().Context().Done(): return nil
                msg = self.messages.dequeue()
                if msg is not None:
                    try:
                        await response.write(marshal(msg) + b"\n")
                    except (ConnectionResetError, RuntimeError):
                        return response
                await asyncio.sleep(STREAM_PERIOD)
        finally:
            self.streams -= 1

    async def _websocket(self, request: web.Request) -> web.StreamResponse:  # handleWebsocket l.237-245
        return await self.melody.handle_request(request, marshal(greeting()))

    def _ws_message(self, data: str, session: Any) -> Awaitable[None] | None:
        """HandleMessage (l.43-51) and handleWebsocketMessage (l.219-235): a
        frame that json.Unmarshal refuses is logged and dropped; else the fixed
        fields, BroadcastOthers, and b.Remote (no Extra.file decoding here)."""
        try:
            message = decode_message(data.encode("utf-8", "surrogatepass"), stream=False)
        except GoError:
            return None
        fix(message, self.account)
        self.melody.broadcast(marshal(message), skip=session)
        return self.remote(message)

    async def _post(self, request: web.Request) -> web.Response:
        """handlePostMessage l.132-176 (Bind l.134, Remote l.174, JSON l.175)."""
        message = await self._bind(request)
        fix(message, self.account)
        files = (message.Extra or {}).get("file") or []
        for i, item in enumerate(files):
            assert message.Extra is not None
            message.Extra["file"][i] = decode_file(item)  # type: ignore[index]
        await self.remote(message)
        body = marshal(message)
        if "pretty" in request.query:  # c.JSON: ?pretty indents with two spaces
            body = indent(body, "  ")
        return web.Response(body=body + b"\n", headers={"Content-Type": JSON_UTF8})

    async def _bind(self, request: web.Request) -> Message:
        """echo bind.go DefaultBinder.Bind -> BindBody (v4.10): no body (Content-Length
        0) binds nothing; Content-Type by prefix, as sent: JSON through a
        json.Decoder; a form is parsed (its errors are 400: url.ParseQuery's
        first) but config.Message
        has no ``form`` tags, and v4.10's bindData binds only tagged fields:
        nothing is bound; anything else is 415."""
        message = Message()
        if request.content_length == 0 or (request.content_length is None and not request.body_exists):
            return message
        ctype = request.headers.get("Content-Type", "")
        raw = await request.read()
        if ctype.startswith("application/json"):
            return decode_message(raw, message)
        if ctype.startswith("application/x-www-form-urlencoded"):
            if len(raw) > 10 << 20:  # net/http parsePostForm: maxFormSize
                raise GoError(400, "http: POST too large")
            error = query_error(raw.decode("latin-1")) or query_error(request.query_string)
            if error is not None:  # Request.ParseForm: the body's error, else the URL query's
                raise GoError(400, error)
            return message
        if ctype.startswith("multipart/form-data"):
            if "boundary=" not in ctype:
                raise GoError(400, "no multipart boundary param in Content-Type")
            return message
        raise GoError(415, "Unsupported Media Type")


def _unescape_error(text: str) -> str | None:
    """net/url unescape (encodeQueryComponent): every % needs two hex digits."""
    i = text.find("%")
    while i != -1:
        if len(text) < i + 3 or not all(c in "0123456789abcdefABCDEF" for c in text[i + 1 : i + 3]):
            bad = text[i : i + 3]
            return f'invalid URL escape "{bad}"'
        i = text.find("%", i + 3)
    return None


def query_error(query: str) -> str | None:
    """net/url parseQuery (Go 1.17+): a ``;`` anywhere in a pair sets the
    semicolon error (over any other); else the first bad escape."""
    pairs = query.split("&")
    if any(";" in pair for pair in pairs):
        return "invalid semicolon separator in query"
    for pair in pairs:
        key, _, value = pair.partition("=")
        error = _unescape_error(key) or _unescape_error(value)
        if error is not None:
            return error
    return None


def greeting() -> Message:
    """getGreeting l.186-191."""
    return Message(event="api_connected", timestamp=now_ns())


def fix(message: Message, account: str) -> None:
    """ "these values are fixed" (l.137-142 and l.220-224)."""
    message.channel = "api"
    message.protocol = "api"
    message.account = account
    message.id = ""
    message.timestamp = now_ns()


def _go_value(value: Any) -> str:
    return str(value).replace("'", "")


def decode_file(item: Any) -> FileInfo:
    """One Extra.file entry (l.150-172): not an object -> 500 "invalid format
    for extra"; mapstructure.Decode into FileInfo (keys without regard to
    case; errors collected, and all of them ignored when any says "got
    string", which a string Data always does); Data must be a string, else
    500 "invalid format for data"; base64.StdEncoding (newlines skipped,
    padding required): an error is returned bare, so echo answers 500
    Internal Server Error."""
    if not isinstance(item, dict):
        raise GoError(500, "invalid format for extra")
    info = FileInfo()
    errors: list[str] = []
    for name in FILE_FIELDS:
        key = name if name in item else next((k for k in item if k.lower() == name.lower()), None)
        if key is None or item[key] is None:
            continue
        value = item[key]
        if name == "Data":
            if not isinstance(value, list):
                kind = {str: "string", bool: "bool", float: "float64", dict: "map"}.get(type(value), "map")
                errors.append(f"'Data': source data must be an array or slice, got {kind}")
                continue
            for j, byte in enumerate(value):  # decodeSlice -> decodeUint per element; nil elements skipped
                if byte is None:
                    continue
                if not isinstance(byte, float) or isinstance(byte, bool):
                    errors.append(f"'Data[{j}]' expected type 'uint8', got unconvertible type, value: '{byte}'")
                elif byte < 0:
                    errors.append(f"cannot parse 'Data[{j}]', {byte:f} overflows uint")
            continue
        if name == "Size":
            if isinstance(value, float):
                info.Size = int(value)
            else:
                errors.append(f"'Size' expected type 'int64', got unconvertible type, value: '{_go_value(value)}'")
        elif name == "Avatar":
            if isinstance(value, bool):
                info.Avatar = value
            else:
                errors.append(f"'Avatar' expected type 'bool', got unconvertible type, value: '{_go_value(value)}'")
        elif isinstance(value, str):
            setattr(info, name, value)
        else:
            errors.append(f"'{name}' expected type 'string', got unconvertible type, value: '{_go_value(value)}'")
    if errors and not any("got string" in error for error in errors):
        raise GoError(500, "Internal Server Error")
    data = next((item[k] for k in item if k == "Data"), None)  # fm["Data"].(string): the exact key
    if not isinstance(data, str):
        raise GoError(500, "invalid format for data")
    try:
        info.Data = base64.b64decode(data.replace("\r", "").replace("\n", ""), validate=True)
    except (binascii.Error, ValueError):
        raise GoError(500, "Internal Server Error") from None
    return info
