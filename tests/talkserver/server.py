"""The fake Talk server: one aiohttp app over one ``TalkState``, plus the
Python API tests drive it with.

``TalkServer`` runs in the caller's event loop (adapter tests in-process);
``ThreadedTalkServer`` runs one in a thread of its own, for tests that block
(a daemon in a child process, ``tests.helpers.wait_for``).

Routes live in modules by area (``bot_api`` now; chat, WebDAV and shares for
the polling-user adapter later) and all change state through ``Chat`` so the
same webhooks fire whichever way a message arrives.

Fault injection (not Talk behaviour, named as such): ``fail_next`` answers
the next bot requests with a status (a proxy's 502, a 5xx); ``stall_next``
stores the next bot message and then never answers (the window between
Talk's 201 and the bridge's delivered-marker); ``fail_room`` answers every bot
request for one room with a status until ``heal_room`` (a room whose backend
is down while the others work).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tests.talkserver import bot_api
from tests.talkserver.chat import Chat
from tests.talkserver.state import OWNER, Actor, Bot, Message, Room, TalkState
from tests.talkserver.webhooks import WebhookSender


class TalkServer:
    def __init__(self, version: int = 21, bruteforce_delay_scale: float = 1.0) -> None:
        self.state = TalkState(version)
        self.sender = WebhookSender(self.state)
        self.chat = Chat(self.state, self.sender)
        self.bruteforce_delay_scale = bruteforce_delay_scale
        self._faults: list[tuple[int, dict[str, str]]] = []
        self._failing_rooms: dict[str, int] = {}  # token -> status every bot request there gets
        self._stalls = 0
        self._stalled = asyncio.Event()  # set when a stalled request is holding
        self._release: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    # lifecycle -------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 << 20)
        app.add_routes(bot_api.routes(self))
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
        if self._release is not None:
            self._release.set()
        await self.sender.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # faults ------------------------------------------------------------------------
    def fail_next(self, status: int, count: int = 1, headers: dict[str, str] | None = None) -> None:
        self._faults.extend([(status, headers or {})] * count)

    def fail_room(self, token: str, status: int = 503) -> None:
        """Fault injection: answer every bot request for ``token`` with ``status``."""
        self._failing_rooms[token] = status

    def heal_room(self, token: str) -> None:
        self._failing_rooms.pop(token, None)

    def take_fault(self, request: web.Request) -> web.Response | None:
        status = self._failing_rooms.get(request.match_info.get("token", ""))
        if status is not None:
            return web.Response(status=status, text=f"injected fault {status} for this room")
        if not self._faults:
            return None
        status, headers = self._faults.pop(0)
        return web.Response(status=status, text=f"injected fault {status}", headers=headers)

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
    def add_user(self, user_id: str, display_name: str | None = None) -> Actor:
        return self.state.add_user(user_id, display_name)

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
