"""The fake Talk server: one aiohttp app over one ``TalkState``, plus the
Python API tests drive it with.

``TalkServer`` runs in the caller's event loop (adapter tests in-process);
``ThreadedTalkServer`` runs one in a thread of its own, for tests that block
(a daemon in a child process, ``tests.helpers.wait_for``).

Routes live in modules by area (``bot_api`` for bots, ``chat_api`` for users
and guests, ``files`` for WebDAV and shares) and all change state through
``Chat`` so the same webhooks fire whichever way a message arrives.

Authentication (``authenticate``): Basic auth with a user's app password; a
wrong or revoked one is 401 on every route (Nextcloud >= 22, server#26572)
and a brute-force attempt (action ``login``) — throttled like the bot API's.
Without Basic auth a request is anonymous with a PHP session cookie (a guest
of public rooms), created on first use.

Fault injection (not Talk behaviour, named as such): ``fail_next`` answers
the next bot requests with a status (a proxy's 502, a 5xx), ``fail_chat_next``
the next user (chat, reaction, DAV, share) requests; ``stall_next`` stores
the next bot or user chat message and then never answers (the window between
Talk's 201 and the bridge's delivered-marker); ``fail_room`` answers every
request for one room with a status (and headers) until ``heal_room`` (a room
whose backend is down while the others work).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.talkserver import bot_api, chat_api, files
from tests.talkserver.chat import Chat
from tests.talkserver.ocs import BruteForce, client_ip, ocs_response
from tests.talkserver.state import OWNER, Actor, Bot, BotRequest, Message, Room, TalkState
from tests.talkserver.webhooks import WebhookSender


@dataclass
class Session:
    """A PHP session (the cookie): its CSRF token and the Talk sessions of its guests."""

    id: str
    request_token: str
    rooms: dict[str, str] = field(default_factory=dict)  # token -> the guest attendee's ref
    talk_sessions: dict[str, str] = field(default_factory=dict)  # token -> Talk session id


@dataclass
class Who:
    user: str | None = None
    session: Session | None = None
    new_cookie: str | None = None  # set on the answer: a session created by this request


class TalkServer:
    def __init__(self, version: int = 21, bruteforce_delay_scale: float = 1.0) -> None:
        self.state = TalkState(version)
        self.sender = WebhookSender(self.state)
        self.chat = Chat(self.state, self.sender)
        self.bruteforce_delay_scale = bruteforce_delay_scale
        self._faults: list[tuple[int, dict[str, str]]] = []
        self._chat_faults: list[tuple[int, dict[str, str], str | None, bytes | None, str]] = []
        self._failing_rooms: dict[str, tuple[int, dict[str, str]]] = {}  # token -> what every request there gets
        self.maintenance = False  # occ maintenance:mode --on (set_maintenance)
        self.sessions: dict[str, Session] = {}
        self.login_bruteforce = BruteForce(self.state, "login", bruteforce_delay_scale)
        self.files = files.Files(self)
        self.chat_api = chat_api.ChatApi(self)
        self.user_requests: list[BotRequest] = []  # every request to the user-facing routes
        self._stalls = 0
        self._stalled = asyncio.Event()  # set when a stalled request is holding
        self._release: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    # lifecycle -------------------------------------------------------------------
    def app(self) -> web.Application:
        @web.middleware
        async def maintenance_mode(request: web.Request, handler: Any) -> web.StreamResponse:
            if not self.maintenance:
                return await handler(request)
            return self._maintenance_answer(request)

        app = web.Application(client_max_size=16 << 20, middlewares=[maintenance_mode])
        app.add_routes(bot_api.routes(self))
        app.add_routes(chat_api.routes(self.chat_api))
        app.add_routes(files.routes(self.files))
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> TalkServer:
        self._release = asyncio.Event()
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        return self

    async def stop(self) -> None:
        self.chat_api.close()
        if self._release is not None:
            self._release.set()
        await self.sender.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # faults ------------------------------------------------------------------------
    def set_maintenance(self, on: bool) -> None:
        """Nextcloud's maintenance mode (``occ maintenance:mode --on``, and
        during an upgrade): every request is answered 503 before routing,
        CSRF checks or authentication, and nothing else happens."""
        self.maintenance = on

    def _maintenance_answer(self, request: web.Request) -> web.Response:
        if request.path.startswith("/ocs/"):
            # ocs/v1.php (v2.php includes it): http_response_code(503), the
            # header, and an OCS Result(null, 503, 'Service unavailable') in
            # the format asked for; no Retry-After
            resp = ocs_response(request, 503, [], "Service unavailable")
            resp.headers["X-Nextcloud-Maintenance-Mode"] = "1"
            return resp
        # lib/base.php checkMaintenanceMode(): the maintenance page, with Retry-After
        return web.Response(
            status=503,
            text="<!DOCTYPE html><html><body><h2>Maintenance mode</h2>"
            "<p>This Nextcloud instance is currently in maintenance mode.</p></body></html>",
            content_type="text/html",
            headers={"X-Nextcloud-Maintenance-Mode": "1", "Retry-After": "120"},
        )

    def fail_next(self, status: int, count: int = 1, headers: dict[str, str] | None = None) -> None:
        self._faults.extend([(status, headers or {})] * count)

    def fail_chat_next(
        self,
        status: int,
        count: int = 1,
        headers: dict[str, str] | None = None,
        method: str | None = None,
        body: bytes | None = None,
        path: str = "",
    ) -> None:
        """Fault injection: the next ``count`` user requests (of ``method``, and
        whose path ends with ``path``, if given) get ``status`` (and ``body``: a
        broken or hostile answer)."""
        self._chat_faults.extend([(status, headers or {}, method, body, path)] * count)

    def fail_room(self, token: str, status: int = 503, headers: dict[str, str] | None = None) -> None:
        """Fault injection: answer every request for ``token`` with ``status``."""
        self._failing_rooms[token] = (status, headers or {})

    def heal_room(self, token: str) -> None:
        self._failing_rooms.pop(token, None)

    def take_fault(self, request: web.Request) -> web.Response | None:
        failing = self._failing_rooms.get(request.match_info.get("token", ""))
        if failing is not None:
            status, headers = failing
            return web.Response(status=status, text=f"injected fault {status} for this room", headers=headers)
        if "/bot/" not in request.path:
            for i, (status, headers, method, body, path) in enumerate(self._chat_faults):
                if (method is None or method == request.method) and request.path.endswith(path):
                    del self._chat_faults[i]
                    text = f"injected fault {status}".encode() if body is None else body
                    return web.Response(status=status, body=text, headers=headers)
            return None
        if not self._faults:
            return None
        status, headers = self._faults.pop(0)
        return web.Response(status=status, text=f"injected fault {status}", headers=headers)

    # users, sessions, authentication ---------------------------------------------
    COOKIE = "ocnc3xampl3"  # Nextcloud names its session cookie after the instance id

    def log_request(self, request: web.Request, body: bytes) -> BotRequest:
        log = BotRequest(request.method, request.path_qs, client_ip(request), dict(request.headers), body)
        self.user_requests.append(log)
        return log

    async def authenticate(self, request: web.Request) -> Who | web.Response:
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("basic "):
            try:
                user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
            blocked = await self.login_bruteforce.before(request)
            if blocked is not None:
                return blocked
            known = self.state.users.get(user)
            if known is not None and password in known.passwords:
                return Who(user=user)
            refused = ocs_response(request, 401, None, "Current user is not logged in")
            return await self.login_bruteforce.throttled(request, refused)
        sid = request.cookies.get(self.COOKIE)
        session = self.sessions.get(sid) if sid else None
        if session is None:
            session = Session(secrets.token_urlsafe(24), secrets.token_urlsafe(48) + ":" + secrets.token_urlsafe(24))
            self.sessions[session.id] = session
            return Who(session=session, new_cookie=session.id)
        return Who(session=session)

    def new_talk_session(self) -> str:
        return secrets.token_urlsafe(192)[:255]

    def new_guest(self) -> Actor:
        return Actor("guests", hashlib.sha1(secrets.token_bytes(16)).hexdigest(), "", 4)

    async def after_chat_message(self, msg: Message) -> None:
        await self.after_bot_message(msg)

    def stall_next(self, count: int = 1) -> None:
        self._stalls += count

    async def wait_stalled(self) -> None:
        await self._stalled.wait()

    async def after_bot_message(self, msg: Message) -> None:
        if self._stalls > 0:
            self._stalls -= 1
            self._stalled.set()
            assert self._release is not None
            await self._release.wait()  # stored, never answered (until stop)

    # the Python API ----------------------------------------------------------------
    def add_user(self, user_id: str, display_name: str | None = None, password: str | None = None) -> Actor:
        actor = self.state.add_user(user_id, display_name)
        if password is not None:
            self.state.users[user_id].passwords.add(password)
        return actor

    def revoke_password(self, user_id: str, password: str) -> None:
        self.state.users[user_id].passwords.discard(password)

    def grant_password(self, user_id: str, password: str) -> None:
        """The password works (again): an account re-enabled, a login password set back."""
        self.state.users[user_id].passwords.add(password)

    def make_public(self, token: str) -> None:
        self.state.rooms[token].public = True

    def set_read_only(self, token: str, on: bool) -> None:
        """A moderator locks the conversation (RoomController::setReadOnly): posting answers 403."""
        self.state.rooms[token].read_only = on

    def set_lobby(self, token: str, on: bool) -> None:
        """The lobby for non-moderators (RoomController::setLobby): their chat answers 412."""
        self.state.rooms[token].lobby = on

    def ban(self, token: str, actor: Actor, banned: bool = True) -> None:
        """BanController::ban (Talk 20, ``ban-v1``): every request of the actor there answers 403."""
        refs = self.state.rooms[token].banned
        if banned:
            refs.add(actor.ref)
        else:
            refs.discard(actor.ref)

    def allow_chat(self, token: str, actor: Actor, allowed: bool) -> None:
        """The attendee's PERMISSIONS_CHAT (RoomController::setAttendeePermissions): without it posting answers 403."""
        refs = self.state.rooms[token].chat_denied
        if allowed:
            refs.discard(actor.ref)
        else:
            refs.add(actor.ref)

    def expire_guest_sessions(self) -> None:
        """Every PHP session ends, and the guests they held leave their rooms (as Talk's cleanup does)."""
        for session in self.sessions.values():
            for token, ref in session.rooms.items():
                self.state.rooms[token].participants.pop(ref, None)
        self.sessions.clear()

    def age(self, message_id: int, seconds: float) -> None:
        """Make a message ``seconds`` older (for the edit and delete windows)."""
        self.state.messages[message_id].created -= seconds

    def join_room(self, token: str, actor: Actor, participant_type: int = 3) -> Actor:
        return self.state.join(token, actor, participant_type)

    def leave_room(self, token: str, actor: Actor) -> None:
        self.state.rooms[token].participants.pop(actor.ref, None)

    async def edit(self, token: str, actor: Actor, message_id: int, text: str) -> Message:
        return await self.chat.edit_message(token, actor, self.state.messages[message_id], text)

    async def delete(self, token: str, actor: Actor, message_id: int) -> Message:
        return await self.chat.delete_message(token, actor, self.state.messages[message_id])

    async def post_file(
        self,
        token: str,
        actor: Actor,
        name: str,
        data: bytes,
        caption: str = "",
        voice: bool = False,
        reply_to: int | None = None,
    ) -> Message:
        """A user uploads ``Talk/NAME`` and shares it into the room, as Talk's web client does."""
        self.files.mkdirs(actor.id, "Talk")
        self.files.put(actor.id, f"Talk/{name}", data)
        meta: dict[str, Any] = {"messageType": "voice-message" if voice else "comment"}
        if caption:
            meta["caption"] = caption
        if reply_to:
            meta["replyTo"] = reply_to
        return await self.files.share(actor, f"Talk/{name}", token, meta)

    def file_of(self, msg: Message, reader: str) -> bytes | None:
        if msg.share is None:
            return None
        return self.files.read(reader, msg.share.mounts.get(reader, msg.share.path))

    def chat_requests(self, path_part: str = "", method: str | None = None) -> list[Any]:
        return [r for r in self.user_requests if path_part in r.path and (method is None or r.method == method)]

    def guest(self, name: str, session: str = "s1") -> Actor:
        import hashlib

        return Actor("guests", hashlib.sha1(session.encode()).hexdigest(), name, 4)

    def create_room(self, name: str, token: str | None = None, members: tuple[Actor, ...] = (), **kw: Any) -> Room:
        room = self.state.create_room(name, token, **kw)
        for i, actor in enumerate(members):
            self.state.join(room.token, actor, OWNER if i == 0 else 3)
        return room

    def install_bot(
        self, name: str, secret: str, url: str, features: tuple[str, ...] = ("webhook", "response", "reaction")
    ) -> Bot:
        return self.state.install_bot(name, secret, url, features)

    async def enable_bot(self, bot: Bot, token: str) -> bool:
        return await self.chat.enable_bot(bot, token)

    async def disable_bot(self, bot: Bot, token: str) -> None:
        await self.chat.disable_bot(bot, token)

    async def post(self, token: str, actor: Actor, text: str, reply_to: int | None = None) -> Message:
        """A participant writes in the room: stored, then webhooks (awaited, as the sender waits)."""
        room = self.state.rooms[token]
        if actor.ref not in room.participants:
            self.state.join(token, actor)
        parent = self.state.parent_in_room(token, reply_to) if reply_to is not None else None
        return await self.chat.send_message(token, actor, text, parent)

    async def react(self, token: str, actor: Actor, message_id: int, emoji: str) -> Message:
        return await self.chat.add_reaction(token, actor, message_id, emoji)

    async def unreact(self, token: str, actor: Actor, message_id: int, emoji: str) -> Message:
        return await self.chat.remove_reaction(token, actor, message_id, emoji)

    def messages(self, token: str, include_system: bool = False) -> list[Message]:
        return [m for m in self.state.room_messages(token) if include_system or m.message_type != "system"]

    def bot_messages(self, token: str, bot: Bot) -> list[Message]:
        return [m for m in self.messages(token) if m.actor.ref == bot.actor.ref]

    def requests(self, path_part: str = "", method: str | None = None) -> list[Any]:
        return [r for r in self.state.bot_requests if path_part in r.path and (method is None or r.method == method)]

    def reset_bruteforce(self, ip: str) -> None:
        self.state.reset_bruteforce(ip)


class ThreadedTalkServer:
    """A ``TalkServer`` on its own loop in a thread; every attribute of the
    inner server is reachable through ``call`` (coroutines are awaited
    there) or, for plain reads, ``state``."""

    def __init__(self, **kw: Any) -> None:
        self._kw = kw
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="talkserver", daemon=True)
        self.server: TalkServer | None = None

    def start(self) -> ThreadedTalkServer:
        self._thread.start()

        async def boot() -> TalkServer:
            return await TalkServer(**self._kw).start()

        self.server = asyncio.run_coroutine_threadsafe(boot(), self._loop).result(10)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    @property
    def state(self) -> TalkState:
        assert self.server is not None
        return self.server.state

    def call(self, name: str, *args: Any, timeout: float = 30, **kw: Any) -> Any:
        assert self.server is not None
        fn: Callable[..., Any] = getattr(self.server, name)

        async def run() -> Any:
            result = fn(*args, **kw)
            return await result if inspect.isawaitable(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
