"""Every HTTP listener the daemon opens, built in one place.

The shared server (webhooks, ``/metrics``, ``/healthz``, ``/readyz``) and
each ``api`` account's own server are ``Listener``\\ s: the same defences
against slow, idle and malformed clients everywhere, set in ``[http]``.

**Phases and their limits.** A connection is always in one phase:

- *head*: from its first moment — or, kept alive, from its first byte after a
  response — until the request line and headers are parsed. Limit:
  ``RequestTimeoutSeconds``; a client that spoke gets ``408``, then the
  connection is closed. Slowloris clients live here.
- *body*: from then until the body is complete. Limit:
  ``RequestTimeoutSeconds`` again; a handler still reading the body gets
  ``BodyTimeout`` (answered ``408``) and the connection is closed — cut off
  if the handler has not answered a second later.
- *handling*: everything has arrived and the handler runs: no limit here (a
  slow Redis is not the client's doing, and ``/api/stream`` lives here).
- *idle*: kept alive between requests. Limit: ``IdleTimeoutSeconds``.

A sweeper per listener walks the phases' queues (each ordered by deadline,
the limits being uniform) and closes what expired, so no request pays for a
timer of its own.

**Connection cap** (``MaxConnections`` per listener). A connection beyond the
cap closes the connection that has spent longest in the *head* phase (one
that has not completed a request: stalled, slow, or connected and silent),
else the longest *idle* kept-alive one; only when every connection is inside
a request is the new one refused (closed at once). Refusing new connections
at the cap would let whoever filled it first — typically a client holding
half-sent requests — lock everyone else out until the head timeout; evicting
the oldest incomplete one instead means that holding the listener costs more
than ``MaxConnections`` fresh connections per head timeout, while a genuine
client finishes its head within milliseconds and is never the oldest. Work
in progress is never interrupted. What was closed is summed up in one INFO
line at most once a minute per listener.

**Errors.** A request aiohttp's parser refuses (bad request line, bad
header, over-long line, broken framing) is answered ``400`` with a JSON
reason and logged as one line at INFO with the client's address (DEBUG for
non-HTTP traffic such as TLS sent to a plain port) — never aiohttp's ERROR
traceback. A handler that lets through a malformed body
(``RequestPayloadError``: broken chunking, bad ``Content-Encoding``) gets
``400``, a ``BodyTimeout`` ``408``, a client gone mid-request a DEBUG line,
Redis unreachable ``503``. Anything else is a bug and stays aiohttp's ``500``
with its traceback.

**Server header.** Every answer of every listener says ``Server:
talkbridge`` — never aiohttp's default, which names the Python and aiohttp
versions to whoever asks: the handlers' answers (streams and WebSockets
too, set as they are prepared) and the listener's own refusals alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.http_exceptions import BadStatusLine, HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy
from redis.exceptions import RedisError

from bridge.config_keys import HttpSection

BACKLOG = 1024  # pending accepts the kernel queues (capped by net.core.somaxconn)
LINGER_MAX = 5.0  # seconds aiohttp drains an unread body after answering, before closing
SUMMARY_EVERY = 60.0  # seconds between a listener's INFO lines about closed connections
BODY_GRACE = 1.0  # seconds a handler told of a body timeout has to answer before the close
REASON_MAX = 200  # characters of a parser's reason kept in the log line and the answer
SERVER_NAME = "talkbridge"  # every answer's Server header: no version for a stranger to look up

_STATUS_PREFIX = re.compile(r"^\d{3}, message: ")
_HEAD, _BODY, _GRACE, _HANDLING, _IDLE = "head", "body", "grace", "handling", "idle"

try:  # aiohttp >= 3.10: what non-HTTP traffic (TLS to a plain port) raises
    from aiohttp.http_exceptions import BadHttpMethod as _NotHttp
except ImportError:  # pragma: no cover - older aiohttp
    _NotHttp = BadStatusLine


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """``[http]`` RequestTimeoutSeconds, IdleTimeoutSeconds, MaxConnections."""

    request_timeout: float = 10.0
    idle_timeout: float = 75.0
    max_connections: int = 1000

    @classmethod
    def from_section(cls, http: HttpSection) -> ListenerLimits:
        return cls(float(http.request_timeout_seconds), float(http.idle_timeout_seconds), int(http.max_connections))


class BodyTimeout(Exception):
    """Raised into a handler's body read: the client did not send it in time."""


class Refused(Exception):
    """A request refused with a 4xx status and a reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes (chunked ones too).

    Raises ``Refused``: 413 over the limit, 400 when it is malformed (broken
    chunking, a ``Content-Encoding`` that does not decode), 408 when the
    client is too slow. A client that went away raises ``ConnectionError``
    (logged at DEBUG by the listener: there is nobody left to answer).
    """
    if request.content_length is not None and request.content_length > limit:
        raise Refused(413, f"body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:  # chunked, or decompressed beyond the limit
                raise Refused(413, f"body larger than {limit} bytes")
            chunks.append(chunk)
    except web.RequestPayloadError as exc:
        raise Refused(400, f"body is malformed: {_one_line(str(exc))}") from None
    except BodyTimeout as exc:
        raise Refused(408, str(exc)) from None
    return b"".join(chunks)


def _one_line(text: str) -> str:
    """A reason fit for one log line and a JSON answer (no surrogates, bounded)."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    line = _STATUS_PREFIX.sub("", " ".join(text.split()))  # aiohttp's "400, message: ..."
    return line if len(line) <= REASON_MAX else line[: REASON_MAX - 1] + "…"


def _json_refusal(status: int, reason: str) -> web.Response:
    resp = web.Response(status=status, body=orjson.dumps({"error": reason}), content_type="application/json")
    resp.force_close()
    return resp


async def _name_server(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: what a handler prepares itself (a stream, a WebSocket) too."""
    response.headers[hdrs.SERVER] = SERVER_NAME


def _timeout_answer(reason: str) -> bytes:
    body = orjson.dumps({"error": reason})
    head = (
        "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class _Guard:
    """One listener's connections by phase, its cap and its sweeper."""

    def __init__(self, name: str, limits: ListenerLimits, log: logging.Logger) -> None:
        self.name = name
        self.limits = limits
        self.log = log
        self.live: set[_Connection] = set()
        # phase queues: connection -> deadline, oldest first
        self.heads: OrderedDict[_Connection, float] = OrderedDict()
        self.bodies: OrderedDict[_Connection, float] = OrderedDict()
        self.graces: OrderedDict[_Connection, float] = OrderedDict()  # told of a body timeout, to answer it
        self.idles: OrderedDict[_Connection, float] = OrderedDict()
        self.closed: dict[str, int] = {}  # why -> count since the last summary line
        self._summary_at: float | None = None
        self._loop = asyncio.get_running_loop()

    # phase changes (the hot path: dictionary operations only) ------------------------
    def _leave(self, conn: _Connection) -> None:
        phase = conn.tb_phase
        if phase is _HEAD:
            self.heads.pop(conn, None)
        elif phase is _BODY:
            self.bodies.pop(conn, None)
        elif phase is _IDLE:
            self.idles.pop(conn, None)
        elif phase is _GRACE:
            self.graces.pop(conn, None)

    def opened(self, conn: _Connection) -> None:
        self.live.add(conn)
        conn.tb_phase = _HEAD
        self.heads[conn] = self._loop.time() + self.limits.request_timeout
        if len(self.live) > self.limits.max_connections:
            self._make_room(conn)

    def head_started(self, conn: _Connection) -> None:
        self._leave(conn)
        conn.tb_phase = _HEAD
        self.heads[conn] = self._loop.time() + self.limits.request_timeout

    def head_done(self, conn: _Connection, payload: Any) -> None:
        self._leave(conn)
        if payload.is_eof():
            conn.tb_phase = _HANDLING
        else:
            conn.tb_phase = _BODY
            conn.tb_payload = payload
            self.bodies[conn] = self._loop.time() + self.limits.request_timeout

    def answered(self, conn: _Connection) -> None:
        self._leave(conn)
        conn.tb_payload = None
        conn.tb_spoke = False
        if conn in self.live:
            conn.tb_phase = _IDLE
            self.idles[conn] = self._loop.time() + self.limits.idle_timeout

    def gone(self, conn: _Connection) -> None:
        self._leave(conn)
        conn.tb_phase = _HANDLING
        conn.tb_payload = None
        self.live.discard(conn)

    # the cap ---------------------------------------------------------------------------
    def _make_room(self, new: _Connection) -> None:
        for queue, why in ((self.heads, "incomplete, at the cap"), (self.idles, "idle, at the cap")):
            victim = next(iter(queue), None)
            if victim is not None and victim is not new:
                self._close(victim, why)
                return
        self._close(new, "refused, every connection busy")

    def _close(self, conn: _Connection, why: str, answer: bytes | None = None) -> None:
        self.gone(conn)
        self.closed[why] = self.closed.get(why, 0) + 1
        self.log.debug("http %s: closing a connection from %s (%s)", self.name, conn.peer(), why)
        if answer is not None and conn.transport is not None:
            with contextlib.suppress(Exception):
                conn.transport.write(answer)
        conn.force_close()

    # the sweeper -----------------------------------------------------------------------
    def sweep(self) -> None:
        now = self._loop.time()
        limit = self.limits.request_timeout
        while self.heads:
            conn, deadline = next(iter(self.heads.items()))
            if deadline > now:
                break
            reason = f"request head not received within {limit:g} s"
            self._close(conn, "head timeout", _timeout_answer(reason) if conn.tb_spoke else None)
        while self.bodies:
            conn, deadline = next(iter(self.bodies.items()))
            if deadline > now:
                break
            payload = conn.tb_payload
            self._leave(conn)
            if payload is None or payload.is_eof():
                conn.tb_phase = _HANDLING  # all in: the handler's time is its own
            else:
                payload.set_exception(BodyTimeout(f"request body not received within {limit:g} s"))
                conn.tb_phase = _GRACE
                self.graces[conn] = now + BODY_GRACE
        while self.graces:
            conn, deadline = next(iter(self.graces.items()))
            if deadline > now:
                break
            self._close(conn, "body timeout")  # the handler did not answer the timeout: cut it off
        while self.idles:
            conn, deadline = next(iter(self.idles.items()))
            if deadline > now:
                break
            self._close(conn, "idle timeout")
        self._summarize(now)

    def _summarize(self, now: float) -> None:
        if not self.closed or (self._summary_at is not None and now - self._summary_at < SUMMARY_EVERY):
            return
        counts = ", ".join(f"{count} {why}" for why, count in sorted(self.closed.items()))
        self.log.info(
            "http %s: closed connections (%s); open now %d of at most %d",
            self.name, counts, len(self.live), self.limits.max_connections,
        )  # fmt: skip
        self.closed.clear()
        self._summary_at = now

    async def run(self) -> None:
        tick = max(0.05, min(1.0, self.limits.request_timeout / 4, self.limits.idle_timeout / 4))
        while True:
            await asyncio.sleep(tick)
            try:
                self.sweep()
            except Exception:  # a bug here must not leave the listener unguarded
                self.log.exception("http %s: connection sweep failed", self.name)


class _Connection(web.RequestHandler):
    """aiohttp's protocol, reporting its phases to the listener's guard."""

    __slots__ = ("tb_guard", "tb_payload", "tb_phase", "tb_spoke")

    def __init__(self, manager: _Server, guard: _Guard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.tb_guard = guard
        self.tb_phase = _HANDLING
        self.tb_payload: Any = None
        self.tb_spoke = False  # bytes arrived in this head phase

    def peer(self) -> str:
        transport = self.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            return f"{peer[0]}:{peer[1]}"
        return str(peer) if peer else "unknown"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.transport is not None:  # not refused at the cap
            self.tb_guard.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.tb_guard.gone(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data:
            if self.tb_phase == _IDLE:
                self.tb_guard.head_started(self)
            if self.tb_phase == _HEAD:
                self.tb_spoke = True
        super().data_received(data)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # every answer not prepared yet, the parser's and handle_error's too (no app signal runs for those)
        if isinstance(resp, web.StreamResponse) and not resp.prepared:
            resp.headers[hdrs.SERVER] = SERVER_NAME
        return await super().finish_response(request, resp, start_time)

    def log_access(self, request: web.BaseRequest, response: web.StreamResponse, time: float | None) -> None:
        # aiohttp calls this once each response is written (access log or not)
        super().log_access(request, response, time)
        self.tb_guard.answered(self)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # aiohttp reports here, with a traceback, a body that failed after the
        # handler answered (while it drains the rest): the client's doing.
        exc = kw.get("exc_info")
        if isinstance(exc, web.RequestPayloadError | BodyTimeout | ConnectionError):
            guard = self.tb_guard
            guard.log.debug("http %s: request from %s ended early: %s", guard.name, self.peer(), _one_line(str(exc)))
            return
        super().log_exception(*args, **kw)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        guard = self.tb_guard
        if isinstance(exc, HttpProcessingError):  # aiohttp's parser refused the request
            reason = _one_line(exc.message or str(exc)) or "malformed request"
            level = logging.DEBUG if isinstance(exc, _NotHttp) else logging.INFO
            guard.log.log(level, "http %s: malformed request from %s refused: %s", guard.name, self.peer(), reason)
            answer = _json_refusal(status if 400 <= status < 500 else 400, f"malformed request: {reason}")
        elif isinstance(exc, web.RequestPayloadError):
            reason = _one_line(str(exc))
            guard.log.info("http %s: malformed body from %s refused: %s", guard.name, self.peer(), reason)
            answer = _json_refusal(400, f"body is malformed: {reason}")
        elif isinstance(exc, BodyTimeout):
            guard.log.debug("http %s: %s (%s)", guard.name, exc, self.peer())
            answer = _json_refusal(408, str(exc))
        elif isinstance(exc, ConnectionError):
            guard.log.debug("http %s: client %s went away mid-request: %s", guard.name, self.peer(), exc)
            answer = _json_refusal(400, "connection lost")
        elif isinstance(exc, RedisError):
            guard.log.error("http %s: cannot store (%s: %s)", guard.name, type(exc).__name__, exc)
            answer = _json_refusal(503, "message queue unavailable, retry later")
        else:
            return super().handle_error(request, status, exc, message)  # a bug: 500, with its traceback
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already under way; cannot send the error")
        return answer


class _Server(web.Server):
    """aiohttp's server with guarded connections (built from the app's own)."""

    def __init__(self, base: web.Server, guard: _Guard, handler_kwargs: dict[str, Any]) -> None:
        super().__init__(
            base.request_handler, request_factory=self._request, handler_cancellation=base.handler_cancellation
        )
        self._base_factory = base.request_factory
        self._guard = guard
        self._handler_kwargs = handler_kwargs

    def _request(self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
        if isinstance(protocol, _Connection):
            self._guard.head_done(protocol, payload)
        expect = message.headers.get(hdrs.EXPECT)
        if expect is not None and not expect.isascii():
            # aiohttp answers an unknown expectation with 417 and the value in
            # its text, which fails (500) on bytes that are not UTF-8
            headers = CIMultiDict(message.headers)
            headers[hdrs.EXPECT] = expect.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
            message = message._replace(headers=CIMultiDictProxy(headers))
        return self._base_factory(message, payload, protocol, writer, task)

    def __call__(self) -> _Connection:
        return _Connection(self, self._guard, loop=asyncio.get_running_loop(), **self._handler_kwargs)


class _Runner(web.AppRunner):
    def __init__(self, app: web.Application, guard: _Guard, handler_kwargs: dict[str, Any]) -> None:
        super().__init__(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        self._guard = guard
        self._handler_kwargs = handler_kwargs

    async def _make_server(self) -> web.Server:
        return _Server(await super()._make_server(), self._guard, self._handler_kwargs)


class Listener:
    """One guarded HTTP listener serving one aiohttp application."""

    def __init__(
        self, app: web.Application, name: str, limits: ListenerLimits, log: logging.Logger | None = None
    ) -> None:
        self.app = app
        if _name_server not in app.on_response_prepare:
            app.on_response_prepare.append(_name_server)
        self.name = name
        self.limits = limits
        self.log = log or logging.getLogger("talkbridge.http")
        self._guard: _Guard | None = None
        self._runner: _Runner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.port: int | None = None

    @property
    def open_connections(self) -> int:
        return len(self._guard.live) if self._guard is not None else 0

    async def start(self, host: str, port: int) -> None:
        guard = _Guard(self.name, self.limits, self.log)
        handler_kwargs: dict[str, Any] = {
            "access_log": None,
            # ours closes idle connections first; aiohttp's own timer stays a backstop
            "keepalive_timeout": max(self.limits.idle_timeout, self.limits.request_timeout) + 1.0,
            "lingering_time": min(LINGER_MAX, self.limits.request_timeout),
        }
        runner = _Runner(self.app, guard, handler_kwargs)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_address=True, backlog=BACKLOG)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._guard, self._runner = guard, runner
        self._sweeper = asyncio.create_task(guard.run(), name=f"http-sweeper:{self.name}")
        bound = [addr for addr in runner.addresses if isinstance(addr, tuple)]  # the port when 0 was asked
        self.port = bound[0][1] if bound else port

    async def cleanup(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
