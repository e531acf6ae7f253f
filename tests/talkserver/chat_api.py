"""What a Talk *user* (or guest) calls: the chat, reactions, capabilities and
the public-room join — lib/Controller/ChatController.php, ReactionController,
RoomController::joinRoom, Model/Message::toArray (Talk 19 to 22).

- ``GET chat/{token}``: ``lookIntoFuture=1`` waits (``timeout``, at most 30
  s) for messages after ``lastKnownMessageId`` and answers 200 with them in
  ascending order (at most ``limit``, 100 by default, 200 at most) and
  ``X-Chat-Last-Given``, or **304 with no body and no X-Chat headers**;
  ``lookIntoFuture=0`` is the history before it, newest first.
  ``messageParameters`` is ``[]`` when empty, an object otherwise; a reply
  carries its ``parent`` (without the parent's own parent).
- ``POST chat/{token}``: ``message`` (trimmed, not empty), ``replyTo``,
  ``referenceId``, ``silent``, ``actorDisplayName`` (guests only: it renames
  the guest, so *all* its messages show the new name) -> 201 with the message.
- ``PUT``/``DELETE chat/{token}/{id}``: own message (or a moderator); edits
  from Talk 19 within 24 h, deletions within 6 h before Talk 19 (unlimited
  from 19); 200, or 202 when a bot is in the room; the answer is the system
  message with the message as ``parent``.
- ``POST``/``DELETE``/``GET reaction/{token}/{id}``.
- Not a participant, or no such room: 404 (``RequireParticipant``).
- Routes as appinfo/routes/routes{Chat,Reaction,Room}Controller.php (and the
  ``#[ApiRoute]`` attributes that replaced them) serve them: chat and
  reactions on ``v1`` only, the room list and ``participants/active`` on
  ``v4`` only; ``token`` must match ``[a-z0-9]{4,30}``. Anything else is the
  router's 404, before any controller.
- ``GET chat/{token}`` without ``lookIntoFuture``: ``receiveMessages(int
  $lookIntoFuture, …)`` has no default, so the Dispatcher
  (AppFramework/Http/Dispatcher::executeController) passes null and PHP
  throws a TypeError: a 500, after the middleware's checks.
- The InjectionMiddleware checks (lib/Middleware/InjectionMiddleware.php,
  ``afterException``): a banned actor (``BanService::throwIfActorIsBanned``,
  ForbiddenException) -> 403 on every room route; the lobby on and the
  participant no moderator (``#[RequireModeratorOrNoLobby]``, LobbyException)
  -> 412, reading included; and for what writes (``sendMessage``, edits,
  deletions, reactions): no chat permission (``#[RequirePermission(CHAT)]``,
  PermissionsException) -> 403, a read-only room
  (``#[RequireReadWriteConversation]``, ReadOnlyException) -> 403. Reading a
  read-only room works. The OCS body is empty (``OCSException('')``), so a
  client cannot tell these 403s apart.
- Basic auth with a wrong or revoked app password: 401 on every route
  (Nextcloud >= 22) and a brute-force attempt for the IP (``login``).
- ``GET v4/room`` (RoomController::getRooms): the user's conversations
  (token, type, names, the user's participantType…), 401 for a guest; the
  room list's own fields beyond those are left out.
- ``GET /call/{token}`` of a public room: the page with ``data-requesttoken``
  and a session cookie; ``POST v4/room/{token}/participants/active`` joins
  the session as a guest (a new ``guests`` attendee per session).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tests.talkserver.chat import ChatError, php_trim, valid_emoji
from tests.talkserver.ocs import csrf_ok, ocs_response, params, php_bool, php_int, php_string
from tests.talkserver.state import GUEST, MODERATOR, OWNER, Actor, Message, Room

if TYPE_CHECKING:
    from tests.talkserver.server import TalkServer, Who

API = "/ocs/v2.php/apps/spreed/api/{apiVersion}"
TOKEN = re.compile(r"[a-z0-9]{4,30}")  # the routes' requirements
CHAT = API + "/chat/{token}"
REACTION = API + "/reaction/{token}/{messageId:[0-9]+}"
MAX_TIMEOUT = 30  # ChatController: timeout = min(30, timeout)
MAX_LIMIT = 200
EDIT_WINDOW = 24 * 3600
DELETE_WINDOW = 6 * 3600  # before delete-messages-unlimited (Talk 19)

# spreed capabilities by the release that added them (docs/capabilities.md);
# only the ones a chat client looks at, plus enough of the rest to be real.
FEATURES_BY_VERSION = {
    17: ["audio", "video", "chat-v2", "conversation-v4", "system-messages", "chat-replies", "chat-reference-id",
         "delete-messages", "rich-object-sharing", "reactions", "rich-object-delete", "silent-send",
         "voice-message-sharing", "chat-get-context", "chat-keep-notifications", "message-expiration",
         "talk-polls", "markdown-messages", "bots-v1"],
    18: ["media-caption", "session-state", "note-to-self"],
    19: ["delete-messages-unlimited", "edit-messages", "silent-send-state", "chat-read-last", "federation-v1"],
    20: ["ban-v1", "mention-permissions", "edit-messages-note-to-self"],
    21: ["conversation-creation-password"],
    22: ["threads"],
}  # fmt: skip


def features(version: int) -> list[str]:
    return [f for v, names in sorted(FEATURES_BY_VERSION.items()) if v <= version for f in names]


class ChatApi:
    def __init__(self, server: TalkServer) -> None:
        self.server = server
        self.state = server.state
        self.chat = server.chat
        self._waiters: dict[str, set[asyncio.Event]] = {}  # token -> its held long polls
        self.closing = False  # the server stops: held polls answer now
        self.state.on_message.append(self._wake)

    def close(self) -> None:
        self.closing = True
        self._wake(None)

    def _wake(self, msg: Message | None) -> None:
        """A message wakes the polls held on its room (None: every held poll)."""
        rooms = self._waiters.values() if msg is None else [self._waiters.get(msg.token, set())]
        for waiters in rooms:
            for event in waiters:
                event.set()

    def held_polls(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    def held_rooms(self) -> int:
        """Rooms with a long poll held now (bench/poll_rooms.py waits for all of them)."""
        return sum(1 for w in self._waiters.values() if w)

    # plumbing ------------------------------------------------------------------------
    def wrap(self, handler: Any, ocs: bool = True, version: str | None = None) -> Any:
        """``version``: the one API version Talk serves the route on."""

        async def run(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            log = self.server.log_request(request, body)
            token = request.match_info.get("token")
            if request.match_info.get("apiVersion", version) != version or (
                ocs and token is not None and not TOKEN.fullmatch(token)
            ):
                resp: web.StreamResponse = web.Response(status=404, text="route not found")  # the router
            elif ocs and not csrf_ok(request):
                resp = ocs_response(request, 412, None, "CSRF check failed")
            else:
                fault = self.server.take_fault(request)
                if fault is not None:
                    resp = fault
                else:
                    who = await self.server.authenticate(request)
                    resp = who if isinstance(who, web.Response) else await handler(request, who)
                    if not isinstance(who, web.Response) and who.new_cookie:
                        resp.set_cookie(self.server.COOKIE, who.new_cookie, path="/", httponly=True)
            log.status = resp.status
            return resp

        return run

    def participant(self, who: Who, token: str) -> Actor | None:
        room = self.state.rooms.get(token)
        if room is None:
            return None
        if who.user is not None:
            return room.participants.get(f"users/{who.user}")
        if who.session is not None:
            ref = who.session.rooms.get(token)
            return room.participants.get(ref) if ref else None
        return None

    def refused(self, request: web.Request, token: str, me: Actor, write: bool) -> web.Response | None:
        """What InjectionMiddleware answers before the controller runs (see the
        module's docstring); None: the participant may go on."""
        room: Room = self.state.rooms[token]
        if me.ref in room.banned:
            return ocs_response(request, 403)
        if room.lobby and me.participant_type not in (OWNER, MODERATOR):
            return ocs_response(request, 412)
        if write and (me.ref in room.chat_denied or room.read_only):
            return ocs_response(request, 403)
        return None

    def message_json(self, msg: Message, viewer: Actor, with_parent: bool = True) -> dict[str, Any]:
        room = self.state.rooms[msg.token]
        author = room.participants.get(msg.actor.ref, msg.actor)
        if msg.actor.type == "users" and msg.actor.id in self.state.users:
            name = self.state.users[msg.actor.id].display_name
        else:
            name = author.display_name  # guests: the attendee's name now, for every message
        system = msg.message_type == "system"
        message, parameters = msg.message, msg.parameters
        if msg.share is not None and msg.message_type == "comment":
            reader = viewer.id if viewer.type == "users" else msg.share.owner
            parameters = {"actor": {"type": "user", "id": msg.actor.id, "name": name},
                          "file": self.server.files.parameter(msg.share, reader)}  # fmt: skip
        kind = "system" if system else (msg.meta_type or msg.message_type)
        data: dict[str, Any] = {
            "id": msg.id,
            "token": msg.token,
            "actorType": msg.actor.type,
            "actorId": msg.actor.id,
            "actorDisplayName": name,
            "timestamp": msg.timestamp,
            "message": message,
            "messageParameters": parameters if parameters else [],
            "systemMessage": msg.system_message if system else "",
            "messageType": kind,
            "isReplyable": msg.replyable and msg.actor.type in ("users", "guests", "bots", "federated_users"),
            "referenceId": msg.reference_id or "",
            "reactions": {emoji: len(who) for emoji, who in msg.reactions.items()},
            "expirationTimestamp": 0,
            "markdown": not system,
        }
        if self.state.version >= 22:
            data["threadId"] = msg.id
        if msg.edited_by is not None and self.state.version >= 19:
            data["lastEditActorType"] = msg.edited_by.type
            data["lastEditActorId"] = msg.edited_by.id
            data["lastEditActorDisplayName"] = msg.edited_by.display_name
            data["lastEditTimestamp"] = msg.edited_at
        if msg.message_type == "comment_deleted":
            data["deleted"] = True
        if msg.silent and self.state.version >= 19:
            data["silent"] = True
        if with_parent and msg.parent_id is not None:
            parent = self.state.messages.get(msg.parent_id)
            data["parent"] = (
                self.message_json(parent, viewer, with_parent=False)
                if parent is not None
                else {"id": msg.parent_id, "deleted": True}
            )
        return data

    def _room_msgs(self, token: str) -> list[Message]:
        return self.state.room_messages(token)

    # capabilities ------------------------------------------------------------------
    async def capabilities(self, request: web.Request, who: Who) -> web.Response:
        spreed = {
            "features": features(self.state.version),
            "config": {
                "attachments": {"allowed": who.user is not None, "folder": "/Talk"},
                "chat": {"max-length": self.state.max_chat_length, "read-privacy": 0},
                "conversations": {"can-create": who.user is not None},
            },
            "version": f"{self.state.version}.0.3",
        }
        return ocs_response(
            request, 200, {"version": {"major": self.state.version + 10}, "capabilities": {"spreed": spreed}}
        )

    # chat --------------------------------------------------------------------------
    async def receive(self, request: web.Request, who: Who) -> web.Response:
        token = request.match_info["token"]
        me = self.participant(who, token)
        if me is None:
            return ocs_response(request, 404)
        if (denied := self.refused(request, token, me, write=False)) is not None:
            return denied
        p = await params(request)
        if "lookIntoFuture" not in p:  # no default in receiveMessages(int $lookIntoFuture, …)
            return web.Response(
                status=500, text="TypeError: receiveMessages(): Argument #1 ($lookIntoFuture) must be of type int"
            )
        future = php_int(p["lookIntoFuture"])
        limit = min(MAX_LIMIT, php_int(p.get("limit", 100)))
        last = php_int(p.get("lastKnownMessageId", 0))
        timeout = min(MAX_TIMEOUT, php_int(p.get("timeout", 30)))
        include = php_int(p.get("includeLastKnown", 0)) == 1

        def select() -> list[Message]:
            msgs = self._room_msgs(token)
            if future:
                out = [m for m in msgs if m.id > last or (include and m.id == last)]
            else:
                out = [m for m in reversed(msgs) if last == 0 or m.id < last or (include and m.id == last)]
            return out[:limit] if limit > 0 else out

        found = select()
        if future and not found and timeout > 0:
            deadline = time.monotonic() + timeout
            while not found and not self.closing and (left := deadline - time.monotonic()) > 0:
                event = asyncio.Event()
                held = self._waiters.setdefault(token, set())
                held.add(event)
                try:
                    await asyncio.wait_for(event.wait(), left)
                except TimeoutError:
                    pass
                finally:
                    held.discard(event)
                if self.participant(who, token) is None:
                    return ocs_response(request, 404)
                found = select()
        if not found:
            return web.Response(status=304)  # no body, no X-Chat headers
        data = [self.message_json(m, me) for m in found]
        resp = ocs_response(request, 200, data)
        resp.headers["X-Chat-Last-Given"] = str(found[-1].id)
        return resp

    async def send(self, request: web.Request, who: Who) -> web.Response:
        token = request.match_info["token"]
        p = await params(request)
        message = php_string(p.get("message"))
        if message is None:
            return web.Response(
                status=500, text="TypeError: sendMessage(): Argument #1 ($message) must be of type string"
            )
        me = self.participant(who, token)
        if me is None:
            return ocs_response(request, 404)
        if (denied := self.refused(request, token, me, write=True)) is not None:
            return denied
        if php_trim(message) == "":
            return ocs_response(request, 400, {"error": "message"})
        name = php_string(p.get("actorDisplayName", "")) or ""
        if me.type == "guests" and name:
            me.display_name = name  # GuestManager::updateName: the attendee, so every message of it
        reply_to = php_int(p.get("replyTo", 0))
        parent = None
        if reply_to:
            parent = self.state.parent_in_room(token, reply_to)
            if parent is None or not parent.replyable:
                return ocs_response(request, 400, {"error": "reply-to"})
        try:
            msg = await self.chat.send_message(
                token, me, message, parent, php_string(p.get("referenceId", "")) or "", php_bool(p.get("silent", False))
            )
        except ChatError as exc:
            return ocs_response(request, 413 if exc.kind == "too_long" else 400, {"error": "message"})
        await self.server.after_chat_message(msg)
        return ocs_response(request, 201, self.message_json(msg, me))

    def _own_or_moderator(self, me: Actor, msg: Message) -> bool:
        return msg.actor.ref == me.ref or me.participant_type in (OWNER, MODERATOR)

    async def edit(self, request: web.Request, who: Who) -> web.Response:
        if self.state.version < 19:
            return web.Response(status=404, text="route not found")  # no PUT route before edit-messages
        token, message_id = request.match_info["token"], int(request.match_info["messageId"])
        me = self.participant(who, token)
        if me is None:
            return ocs_response(request, 404)
        if (denied := self.refused(request, token, me, write=True)) is not None:
            return denied
        p = await params(request)
        text = php_string(p.get("message"))
        if text is None:
            return web.Response(
                status=500, text="TypeError: editMessage(): Argument #2 ($message) must be of type string"
            )
        msg = self.state.messages.get(message_id)
        if msg is None or msg.token != token:
            return ocs_response(request, 404, {"error": "message"})
        if not self._own_or_moderator(me, msg):
            return ocs_response(request, 403, {"error": "permission"})
        if msg.message_type != "comment":
            return ocs_response(request, 405, {"error": "message"})
        if time.time() - msg.created > EDIT_WINDOW:
            return ocs_response(request, 400, {"error": "age"})
        try:
            system = await self.chat.edit_message(token, me, msg, text)
        except ChatError as exc:
            return ocs_response(request, 413 if exc.kind == "too_long" else 400, {"error": "message"})
        return self._changed(request, token, system, me)

    async def delete(self, request: web.Request, who: Who) -> web.Response:
        token, message_id = request.match_info["token"], int(request.match_info["messageId"])
        me = self.participant(who, token)
        if me is None:
            return ocs_response(request, 404)
        if (denied := self.refused(request, token, me, write=True)) is not None:
            return denied
        msg = self.state.messages.get(message_id)
        if msg is None or msg.token != token:
            return ocs_response(request, 404, {"error": "message"})
        if not self._own_or_moderator(me, msg):
            return ocs_response(request, 403, {"error": "permission"})
        if msg.message_type != "comment":
            return ocs_response(request, 405, {"error": "message"})
        if self.state.version < 19 and time.time() - msg.created > DELETE_WINDOW:
            return ocs_response(request, 400, {"error": "age"})
        system = await self.chat.delete_message(token, me, msg)
        return self._changed(request, token, system, me)

    def _changed(self, request: web.Request, token: str, system: Message, me: Actor) -> web.Response:
        data = self.message_json(system, me)  # its parent is the message as it is now
        bots = self.state.bots_for_token(token, 1)
        return ocs_response(request, 202 if bots else 200, data)

    # reactions -----------------------------------------------------------------------
    def _reactions(self, msg: Message) -> dict[str, list[dict[str, Any]]] | list[Any]:
        room = self.state.rooms[msg.token]
        out: dict[str, list[dict[str, Any]]] = {}
        for emoji, refs in msg.reactions.items():
            for ref in refs:
                actor = room.participants.get(ref)
                kind, _, aid = ref.partition("/")
                out.setdefault(emoji, []).append(
                    {"actorDisplayName": actor.display_name if actor else "", "actorType": kind, "actorId": aid,
                     "timestamp": msg.timestamp}
                )  # fmt: skip
        return out or []

    async def reaction(self, request: web.Request, who: Who) -> web.Response:
        token, message_id = request.match_info["token"], int(request.match_info["messageId"])
        me = self.participant(who, token)
        if me is None:
            return ocs_response(request, 404)
        if (denied := self.refused(request, token, me, write=request.method != "GET")) is not None:
            return denied
        p = await params(request)
        msg = self.state.messages.get(message_id)
        if request.method == "GET":
            if msg is None or msg.token != token:
                return ocs_response(request, 404)
            return ocs_response(request, 200, self._reactions(msg))
        emoji = php_string(p.get("reaction"))
        if emoji is None:
            return web.Response(status=500, text="TypeError: Argument #2 ($reaction) must be of type string")
        try:
            if request.method == "POST":
                if not valid_emoji(emoji):
                    return ocs_response(request, 400)
                await self.chat.add_reaction(token, me, message_id, emoji)
                status = 201
            else:
                await self.chat.remove_reaction(token, me, message_id, emoji)
                status = 200
        except ChatError as exc:
            status = {"not_found": 404, "exists": 200}.get(exc.kind, 400)
            if status != 200:
                return ocs_response(request, status)
        target = self.state.messages[message_id]
        return ocs_response(request, status, self._reactions(target))

    # guests ------------------------------------------------------------------------
    async def call_page(self, request: web.Request, who: Who) -> web.Response:
        room = self.state.rooms.get(request.match_info["token"])
        if room is None or not room.public:
            if who.user is None:
                raise web.HTTPSeeOther("/login")
            return web.Response(status=404, text="Conversation not found")
        assert who.session is not None
        html = (
            '<!DOCTYPE html>\n<html class="ng-csp" data-placeholder-focus="false" lang="en">\n'
            f'<head data-user="" data-user-displayname="" data-requesttoken="{who.session.request_token}">\n'
            f'<title>{room.name} - Talk - Nextcloud</title>\n</head><body id="body-public"></body></html>\n'
        )
        return web.Response(text=html, content_type="text/html")

    async def join(self, request: web.Request, who: Who) -> web.Response:
        token = request.match_info["token"]
        room = self.state.rooms.get(token)
        if room is None:
            return ocs_response(request, 404)
        if who.user is not None:
            me = room.participants.get(f"users/{who.user}")
            if me is None and not room.public:
                return ocs_response(request, 404)
            if me is None:
                me = self.state.join(token, Actor("users", who.user, self.state.users[who.user].display_name))
            session_id = self.server.new_talk_session()
        else:
            if not room.public or who.session is None:
                return ocs_response(request, 404)
            ref = who.session.rooms.get(token)
            me = room.participants.get(ref) if ref else None
            if me is None:
                me = self.state.join(token, self.server.new_guest(), GUEST)
                who.session.rooms[token] = me.ref
            session_id = who.session.talk_sessions.setdefault(token, self.server.new_talk_session())
        return ocs_response(
            request,
            200,
            {"token": token, "type": 3 if room.public else room.type, "name": room.name, "displayName": room.name,
             "actorType": me.type, "actorId": me.id, "participantType": me.participant_type,
             "sessionId": session_id, "callFlag": 0, "lastMessage": []},
        )  # fmt: skip

    async def rooms(self, request: web.Request, who: Who) -> web.Response:
        """The user's conversations (a guest is not logged in: 401)."""
        if who.user is None:
            return ocs_response(request, 401, None, "Current user is not logged in")
        me = f"users/{who.user}"
        out = []
        for i, room in enumerate(self.state.rooms.values(), start=1):
            actor = room.participants.get(me)
            if actor is None:
                continue
            msgs = self._room_msgs(room.token)
            out.append({
                "id": i, "token": room.token, "type": 3 if room.public else room.type, "name": room.name,
                "displayName": room.name, "description": "", "participantType": actor.participant_type,
                "actorType": actor.type, "actorId": actor.id, "readOnly": int(room.read_only), "hasPassword": False,
                "lastActivity": msgs[-1].timestamp if msgs else 0, "unreadMessages": 0,
                "remoteServer": "" if not room.federated else "https://remote.example",
            })  # fmt: skip
        resp = ocs_response(request, 200, out)
        resp.headers["X-Nextcloud-Talk-Modified-Before"] = str(int(time.time()))
        return resp


def routes(api: ChatApi) -> list[web.RouteDef]:
    return [
        web.get("/ocs/v2.php/cloud/capabilities", api.wrap(api.capabilities)),
        web.get(CHAT, api.wrap(api.receive, version="v1")),
        web.post(CHAT, api.wrap(api.send, version="v1")),
        web.put(CHAT + "/{messageId:[0-9]+}", api.wrap(api.edit, version="v1")),
        web.delete(CHAT + "/{messageId:[0-9]+}", api.wrap(api.delete, version="v1")),
        web.get(REACTION, api.wrap(api.reaction, version="v1")),
        web.post(REACTION, api.wrap(api.reaction, version="v1")),
        web.delete(REACTION, api.wrap(api.reaction, version="v1")),
        web.get(API + "/room", api.wrap(api.rooms, version="v4")),
        web.post(API + "/room/{token}/participants/active", api.wrap(api.join, version="v4")),
        web.get("/call/{token}", api.wrap(api.call_page, ocs=False)),
        web.get("/index.php/call/{token}", api.wrap(api.call_page, ocs=False)),
    ]
