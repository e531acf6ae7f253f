"""The management page: an aiohttp application on its own listener.

Server-rendered with Jinja2 (autoescaping on), live through server-sent
events (``GET /events``: the dashboard's tables as HTML fragments, sent when
they change), with its CSS and JavaScript served from ``static/`` — no
build step, no CDN: it works offline.

Every request must name one of the page's host names (``[admin] Hosts``,
any port) in ``Host``, or gets a 421 before anything else: a page of
another site whose name was made to resolve to this address (DNS
rebinding) reaches the listener but not the page. Pages and actions (every
one behind a session but the login form and the static files; every POST
checks the session's CSRF token and, when the browser sends one, that the
``Origin`` is the ``Host``):

- ``GET /`` the dashboard; ``GET /events`` its live updates;
- ``POST /accounts/NAME/pause|resume|restart`` (bridge/control.py);
- ``GET /dead-letters`` (newest first, by account, paged),
  ``GET /dead-letters/ID``, ``POST /dead-letters/replay|discard``;
- ``GET /logs`` the WARN+ records of every instance, filtered;
- ``GET|POST /login``, ``POST /logout``.

Bad input gets a 4xx with the reason and changes nothing. Every answer
carries a strict Content-Security-Policy (scripts and styles from this
origin only, no framing) and ``Cache-Control: no-store``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jinja2
import orjson
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge import control
from bridge.addresses import parse_host_name, parse_hostport
from bridge.admin import fleet
from bridge.admin.auth import LOGIN_COOKIE, SESSION_COOKIE, Auth, AuthSettings, LoginRefused, Session
from bridge.bus import bus_for
from bridge.config import Config
from bridge.config_keys import AdminSection
from bridge.metrics import Metrics
from bridge.rejections import RejectionLog

HERE = Path(__file__).resolve().parent
MAX_BODY = 64 * 1024  # forms here are small: a page of dead-letter ids at most
MAX_FIELDS = 500
MAX_IDS = 200  # dead letters one replay or discard may name
PAGE_SIZE = 50
LOG_PAGE_SIZE = 100
KEEPALIVE_SECONDS = 15.0  # an SSE comment line this often keeps proxies from closing the stream
LOGIN_FORM_SECONDS = 3600  # the login form's one-time token
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
LEVEL_CHOICES = ("WARNING", "ERROR", "CRITICAL")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")

if hasattr(web, "RequestKey"):  # aiohttp >= 3.12: typed keys
    SESSION = web.RequestKey("session", Session)
    FORM = web.RequestKey("form", dict)
else:  # pragma: no cover
    SESSION, FORM = "session", "form"  # type: ignore[assignment]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    """Input refused with a 4xx and the reason; nothing was changed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class SnapshotCache:
    """One fleet snapshot shared by every page load and live stream within
    ``max_age`` seconds: however many browsers are open, Redis sees one
    reader."""

    def __init__(self, load: Callable[[], Awaitable[fleet.Snapshot]], max_age: float) -> None:
        self.load = load
        self.max_age = max_age
        self._value: fleet.Snapshot | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> fleet.Snapshot:
        async with self._lock:
            if self._value is None or time.monotonic() - self._at >= self.max_age:
                self._value = await self.load()
                self._at = time.monotonic()
            return self._value

    def invalidate(self) -> None:
        self._value = None


class AdminApp:
    """The page's state: passed in, never global."""

    def __init__(
        self,
        config: Config,
        redis: Redis,
        log: logging.Logger | None = None,
        rejections: RejectionLog | None = None,
        metrics: Metrics | None = None,
        queue: Redis | None = None,
    ) -> None:
        section = config.admin
        self.config = config
        self.redis = redis
        self.queue = queue  # the job queue's own Redis, when it has one; None: ``redis``
        self.log = log or logging.getLogger("talkbridge.admin")
        # refused logins: summed up in the log (whoever reaches the form can send thousands), counted in metrics
        self.rejections = rejections or RejectionLog(self.log)
        self.metrics = metrics
        self.bus = bus_for(config, redis)
        self.auth = Auth(redis, self.bus.prefix, AuthSettings.from_section(section))
        self.hosts = allowed_hosts(section)
        self.refresh = float(section.refresh_seconds)
        self.tally = fleet.DeadLetterTally(redis, self.bus.dlq)
        self.snapshots = SnapshotCache(self._snapshot, max_age=self.refresh / 2)
        self.closing = asyncio.Event()
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,  # templates ship with the package: no stat per render
        )
        self.templates.filters.update(ago=_ago, duration=_duration, utc=_utc, short=_short)
        self.templates.globals.update(levels=LEVEL_CHOICES)

    async def _snapshot(self) -> fleet.Snapshot:
        return await fleet.snapshot(self.redis, self.bus, self.config, self.tally, queue=self.queue)

    # rendering ----------------------------------------------------------------------------
    def render(self, name: str, status: int = 200, **context: Any) -> web.Response:
        context = {"session": None, "flash": "", "path": "", **context}
        html = self.templates.get_template(name).render(**context)
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")

    async def page(self, request: web.Request, name: str, **context: Any) -> web.Response:
        session: Session = request[SESSION]
        flash = await self.auth.take_flash(session)
        return self.render(name, session=session, flash=flash, path=request.path, **context)

    def fragments(self, snap: fleet.Snapshot, session: Session) -> dict[str, str]:
        """The dashboard's live parts, rendered as on the page."""
        return {
            part: self.templates.get_template(f"_{part}.html").render(snap=snap, session=session)
            for part in ("summary", "alerts", "accounts", "instances", "workers", "warnings")
        }

    def build(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._headers, self._host, self._guard])
        app.add_routes(
            [
                web.get("/", self.dashboard),
                web.get("/events", self.events),
                web.get("/login", self.login_form),
                web.post("/login", self.login),
                web.post("/logout", self.logout),
                web.post("/accounts/{name}/{action}", self.account_action),
                web.get("/dead-letters", self.dead_letters),
                web.get("/dead-letters/{id}", self.dead_letter),
                web.post("/dead-letters/{action}", self.dead_letter_action),
                web.get("/logs", self.logs),
                web.get("/favicon.ico", self.favicon),
                web.static("/static", HERE / "static", append_version=False),
            ]
        )
        app.on_shutdown.append(self._shutdown)
        return app

    async def _shutdown(self, app: web.Application) -> None:
        self.closing.set()  # live streams end now, not at the runner's timeout

    # middlewares -----------------------------------------------------------------------------
    @web.middleware
    async def _headers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except BadRequest as exc:
            response = self._refusal(request, exc.status, exc.reason)
        except web.HTTPException as exc:
            if exc.status >= 400 and exc.status not in (405,):
                response = self._refusal(request, exc.status, exc.reason)
            else:
                for name, value in SECURITY_HEADERS.items():
                    exc.headers.setdefault(name, value)
                raise
        except (RedisError, OSError) as exc:
            self.log.warning("admin: Redis unavailable: %s", exc)
            response = self._refusal(request, 503, "Redis is unavailable; try again shortly")
        if not response.prepared:
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
        return response

    def _refusal(self, request: web.Request, status: int, reason: str) -> web.Response:
        if "text/html" in request.headers.get("Accept", ""):
            response = self.render("error.html", status=status, reason=reason, code=status,
                                   session=request.get(SESSION))  # fmt: skip
        else:
            response = web.Response(text=reason + "\n", status=status, content_type="text/plain")
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
        return response

    @web.middleware
    async def _host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Only this page's names, before anything else (static files too)."""
        if host_name(request.headers.get("Host", "")) not in self.hosts:
            raise BadRequest(421, "this page does not answer to that host name: list it in [admin] Hosts")
        return await handler(request)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """No page without a session; no POST without its CSRF token."""
        path = request.path
        if path in ("/login", "/favicon.ico") or path.startswith("/static/"):
            return await handler(request)
        session = await self.auth.session(request.cookies.get(SESSION_COOKIE))
        if session is None:
            if request.method == "GET" and path != "/events":
                raise web.HTTPSeeOther(_login_url(path, request.query_string))
            raise BadRequest(401, "log in first")
        request[SESSION] = session
        if request.method == "POST":
            _check_origin(request)
            form = await read_form(request)
            given = request.headers.get("X-CSRF-Token") or _one(form, "csrf")
            if not session.csrf_ok(given):
                raise BadRequest(403, "missing or wrong CSRF token: nothing was changed (reload the page)")
            request[FORM] = form
        return await handler(request)

    # login ------------------------------------------------------------------------------------
    async def login_form(self, request: web.Request, error: str = "", status: int = 200) -> web.Response:
        # Reused while the cookie lives: a second form (another tab, a
        # favicon's redirect here) must not invalidate the first one.
        token = request.cookies.get(LOGIN_COOKIE, "")
        if not (20 <= len(token) <= 64 and token.replace("-", "").replace("_", "").isalnum()):
            token = secrets.token_urlsafe(24)
        response = self.render(
            "login.html", status=status, error=error, login_token=token, next=_local(request.query.get("next", "/"))
        )
        self._cookie(response, LOGIN_COOKIE, token, LOGIN_FORM_SECONDS)
        return response

    async def login(self, request: web.Request) -> web.StreamResponse:
        _check_origin(request)
        form = await read_form(request)
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        given = _one(form, "login_token") or ""
        if not cookie or not secrets.compare_digest(cookie.encode(errors="replace"), given.encode(errors="replace")):
            return await self.login_form(request, "the login form expired: try again", status=403)
        user, password = _one(form, "user") or "", _one(form, "password") or ""
        client = request.remote or "unknown"
        try:
            token = await self.auth.login(client, user, password)
        except LoginRefused as exc:
            cause = "locked_out" if exc.status == 429 else "bad_password"
            self.rejections.note("admin", "login", cause, exc.reason, client)
            if self.metrics is not None:
                self.metrics.rejected.labels("admin", cause).inc()
            response = await self.login_form(request, exc.reason, status=exc.status)
            if exc.retry_after:
                response.headers["Retry-After"] = str(exc.retry_after)
            return response
        self.log.info("admin: %s logged in from %s", user, client)
        response = _see_other(_local(_one(form, "next") or "/"))
        self._cookie(response, SESSION_COOKIE, token, self.auth.settings.session_seconds)
        response.del_cookie(LOGIN_COOKIE, path="/")
        return response

    def _cookie(self, response: web.StreamResponse, name: str, value: str, seconds: float) -> None:
        response.set_cookie(
            name, value, max_age=int(seconds), path="/", httponly=True, samesite="Strict",
            secure=self.auth.settings.secure_cookie,
        )  # fmt: skip

    async def logout(self, request: web.Request) -> web.StreamResponse:
        await self.auth.logout(request[SESSION])
        response = _see_other("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    async def favicon(self, request: web.Request) -> web.Response:
        return web.Response(status=204)  # none: browsers ask anyway

    # the dashboard ------------------------------------------------------------------------------
    async def dashboard(self, request: web.Request) -> web.Response:
        snap = await self.snapshots.get()
        return await self.page(request, "dashboard.html", snap=snap, refresh=self.refresh)

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: ``snapshot`` (the live parts, JSON of HTML
        fragments) whenever they change, a comment line now and then, and
        ``logout`` when the session ends."""
        session: Session = request[SESSION]
        if request.method == "HEAD":  # nothing would ever be written: answer the head only
            return web.Response(headers={"Content-Type": "text/event-stream", **SECURITY_HEADERS})
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no", **SECURITY_HEADERS}
        )
        await response.prepare(request)
        await response.write(f"retry: {int(self.refresh * 1000)}\n\n".encode())
        last: dict[str, str] | None = None
        quiet_since = time.monotonic()
        try:
            while not self.closing.is_set():
                if await self.auth.session(request.cookies.get(SESSION_COOKIE)) is None:
                    await response.write(b"event: logout\ndata: {}\n\n")
                    break
                parts = self.fragments(await self.snapshots.get(), session)
                if parts != last:
                    await response.write(b"event: snapshot\ndata: " + orjson.dumps(parts) + b"\n\n")
                    last, quiet_since = parts, time.monotonic()
                elif time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
                    await response.write(b": keepalive\n\n")
                    quiet_since = time.monotonic()
                try:
                    async with asyncio.timeout(self.refresh):
                        await self.closing.wait()
                except TimeoutError:
                    pass
        except (ConnectionResetError, RedisError, OSError):
            pass  # the browser left, or Redis did: the browser reconnects (retry:)
        return response

    async def account_action(self, request: web.Request) -> web.StreamResponse:
        name, action = request.match_info["name"], request.match_info["action"]
        if name not in self.config.accounts:
            raise BadRequest(404, f"no account {name!r} in the config")
        session: Session = request[SESSION]
        prefix = self.bus.prefix
        if action == "pause":
            changed = await control.pause(self.redis, prefix, name, session.user)
            message = f"{name} paused: what it receives is stored, nothing is relayed until you resume"
            message = message if changed else f"{name} was paused already"
        elif action == "resume":
            changed = await control.resume(self.redis, prefix, name)
            message = f"{name} resumed" if changed else f"{name} was not paused"
        elif action == "restart":
            await control.restart(self.redis, prefix, name)
            message = f"{name}: its owner restarts the connection"
        else:
            raise BadRequest(404, f"no action {action!r} (pause, resume or restart)")
        self.log.warning("admin: %s: %s by %s", name, action, session.user)
        self.snapshots.invalidate()
        return await self._done(request, message)

    async def _done(self, request: web.Request, message: str) -> web.StreamResponse:
        if request.headers.get("X-CSRF-Token"):  # a script's request: it shows the answer itself
            return web.json_response({"message": message})
        await self.auth.flash(request[SESSION], message)
        return _see_other(_local(_one(request[FORM], "next") or "/"))

    # dead letters -------------------------------------------------------------------------------
    async def dead_letters(self, request: web.Request) -> web.Response:
        account = request.query.get("account", "")
        if account and account not in self.config.accounts:
            raise BadRequest(404, f"no account {account!r} in the config")
        before = request.query.get("before") or None
        if before is not None and not fleet.valid_entry_id(before):
            raise BadRequest(400, "before: not a stream entry id")
        streams = fleet.streams_of(self.bus, account) if account else ()
        page = await fleet.dead_letter_page(self.bus, before=before, streams=streams, limit=PAGE_SIZE)
        total = (await self.snapshots.get()).dead_letters
        return await self.page(
            request, "dead_letters.html", page=page, account=account, accounts=list(self.config.accounts),
            total=total, before=before,
        )  # fmt: skip

    async def dead_letter(self, request: web.Request) -> web.Response:
        letter_id = request.match_info["id"]
        if not fleet.valid_entry_id(letter_id):
            raise BadRequest(400, "not a dead letter id")
        letter = await fleet.dead_letter(self.bus, letter_id)
        if letter is None:
            raise BadRequest(404, f"no dead letter {letter_id} (replayed or discarded already?)")
        return await self.page(request, "dead_letter.html", letter=letter, payload=fleet.payload_text(letter.payload))

    async def dead_letter_action(self, request: web.Request) -> web.StreamResponse:
        action = request.match_info["action"]
        if action not in ("replay", "discard"):
            raise BadRequest(404, f"no action {action!r} (replay or discard)")
        ids = request[FORM].get("id", [])
        if not ids:
            raise BadRequest(400, "id: choose at least one dead letter")
        if len(ids) > MAX_IDS:
            raise BadRequest(400, f"id: at most {MAX_IDS} at a time")
        bad = next((one for one in ids if not fleet.valid_entry_id(one)), None)
        if bad is not None:
            raise BadRequest(400, f"id: {bad[:50]!r} is not a dead letter id")
        user = request[SESSION].user
        if action == "replay":
            letters = [letter for one in ids if (letter := await fleet.dead_letter(self.bus, one)) is not None]
            count = await fleet.replay(self.bus, [letter.id for letter in letters])
            message = f"replayed {count} dead letter(s)"
        else:
            letters = await fleet.discard(self.bus, ids)
            count = len(letters)
            message = f"discarded {count} dead letter(s)"
        self.tally.forget(letters[:count])
        self.snapshots.invalidate()
        self.log.warning("admin: %s by %s (%s)", message, user, ", ".join(ids[:10]))
        return await self._done(request, message)

    # logs -------------------------------------------------------------------------------------
    async def logs(self, request: web.Request) -> web.Response:
        q = request.query
        level = (q.get("level") or "WARNING").upper()
        if level not in LEVEL_CHOICES:
            raise BadRequest(400, f"level: one of {', '.join(LEVEL_CHOICES)}")
        account, instance = q.get("account", ""), q.get("instance", "")
        if account and account not in self.config.accounts:
            raise BadRequest(404, f"no account {account!r} in the config")
        if len(instance) > 200:
            raise BadRequest(400, "instance: too long")
        before = q.get("before") or None
        if before is not None and not fleet.valid_entry_id(before):
            raise BadRequest(400, "before: not a stream entry id")
        page = await fleet.log_page(
            self.redis, self.bus.prefix, min_level=level, account=account, instance=instance, before=before,
            limit=LOG_PAGE_SIZE,
        )  # fmt: skip
        snap = await self.snapshots.get()
        return await self.page(
            request, "logs.html", page=page, level=level, account=account, instance=instance, before=before,
            accounts=list(self.config.accounts), instances=[i.id for i in snap.instances],
        )  # fmt: skip


# input ------------------------------------------------------------------------------------------
async def read_form(request: web.Request) -> dict[str, list[str]]:
    """A urlencoded form (the only kind these pages send), strictly: UTF-8,
    at most ``MAX_FIELDS`` fields, ``MAX_BODY`` bytes (aiohttp answers 413)."""
    kind = request.content_type
    if request.can_read_body and kind not in ("application/x-www-form-urlencoded", "application/octet-stream"):
        raise BadRequest(415, "send the form urlencoded (application/x-www-form-urlencoded)")
    body = await request.read()
    try:
        pairs = urllib.parse.parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FIELDS, errors="strict"
        )
    except UnicodeDecodeError:
        raise BadRequest(400, "the form is not UTF-8") from None
    except ValueError as exc:
        raise BadRequest(400, f"bad form: {exc}") from None
    form: dict[str, list[str]] = {}
    for key, value in pairs:
        form.setdefault(key, []).append(value)
    return form


def _one(form: dict[str, list[str]], key: str) -> str | None:
    values = form.get(key)
    return values[0] if values else None


def _check_origin(request: web.Request) -> None:
    """A browser names the site a POST came from; it must be this one (the
    host only: behind a TLS proxy the scheme seen here differs)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return  # not a browser, or an old one: the CSRF token still decides
    try:
        netloc = urllib.parse.urlsplit(origin).netloc
    except ValueError:
        netloc = None
    if netloc != request.host:
        raise BadRequest(403, "the request came from another site: nothing was changed")


def allowed_hosts(admin: AdminSection) -> frozenset[str]:
    """``[admin] Hosts``, normalized; by default the BindAddress's host (not
    a wildcard one) and the local names."""
    if admin.hosts:
        return frozenset(name for one in admin.hosts if (name := parse_host_name(one)) is not None)
    bound = parse_hostport(admin.bind_address or "")
    names = {parse_host_name(bound[0])} if bound and bound[0] not in ("0.0.0.0", "::", "") else set()
    return frozenset(name for name in names | set(LOCAL_HOSTS) if name is not None)


def host_name(header: str) -> str | None:
    """The name in a ``Host`` header (``name``, ``name:port``, ``[v6]:port``),
    normalized as ``parse_host_name`` does; None when it is not one."""
    if header.startswith("["):
        name, bracket, rest = header[1:].partition("]")
        colon, port = rest[:1], rest[1:]
        if not bracket or (rest and colon != ":") or ":" not in name:
            return None
    else:
        name, colon, port = header.partition(":")
    if port and not (port.isdigit() and port.isascii()):  # the port may be empty (RFC 3986), never another thing
        return None
    return parse_host_name(name)


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _local(target: str) -> str:
    """A redirect target on this site only (no //host, no scheme)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target or any(ord(c) < 32 for c in target):
        return "/"
    return target[:2000]


def _login_url(path: str, query: str) -> str:
    where = path + ("?" + query if query else "")
    return "/login" if where == "/" else "/login?" + urllib.parse.urlencode({"next": _local(where)})


# template filters ---------------------------------------------------------------------------------
def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 or seconds == 0 else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"
    return f"{seconds // 86400:.0f} d {seconds % 86400 // 3600:.0f} h"


def _ago(ts: float | None) -> str:
    return "–" if not ts else _duration(time.time() - float(ts)) + " ago"


def _utc(ts: float | None) -> str:
    return "–" if not ts else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(ts))) + "Z"


def _short(text: str, length: int = 120) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= length else text[: length - 1] + "…"


def build_admin_app(
    config: Config,
    redis: Redis,
    log: logging.Logger | None = None,
    rejections: RejectionLog | None = None,
    metrics: Metrics | None = None,
    queue: Redis | None = None,
) -> web.Application:
    return AdminApp(config, redis, log, rejections, metrics, queue).build()
