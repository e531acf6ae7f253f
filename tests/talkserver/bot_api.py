"""``/ocs/v2.php/apps/spreed/api/v1/bot/…`` — lib/Controller/BotController.php.

- ``getBotFromHeaders``: random missing or shorter than 32 -> 400; signature
  missing -> 400; then every bot enabled in the room with the ``response``
  feature is tried: ``hash_hmac('sha256', $random . $message, $secret)``
  (the *message text* or the *reaction*, never the body). None matches ->
  401, throttled (brute-force attempt). A room that does not exist has no
  bots, so it answers 401 as well.
- ``sendMessage``: empty message (after PHP's ``trim``) -> 400 before anything else;
  ``replyTo`` not a message of this room (or a system message) -> 400; too
  long -> 413; otherwise 201 with ``data: null`` — the id is never returned.
- ``react``: 201 created, 200 already there, 404 no such message, 400 not
  possible. ``deleteReaction``: 200, 404 no such message or reaction.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from tests.talkserver.chat import ChatError, php_trim
from tests.talkserver.ocs import BruteForce, client_ip, csrf_ok, ocs_response, params, php_bool, php_int, php_string
from tests.talkserver.state import FEATURE_RESPONSE, Bot, BotRequest

if TYPE_CHECKING:
    from tests.talkserver.server import TalkServer

BASE = "/ocs/v2.php/apps/spreed/api/{apiVersion}/bot/{token}"
TOKEN = re.compile(r"[a-z0-9]{4,30}")  # routes.php requirements


class BadBot(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def routes(server: TalkServer) -> list[web.RouteDef]:
    api = BotApi(server)
    return [
        web.post(BASE + "/message", api.wrap(api.send_message)),
        web.post(BASE + "/reaction/{messageId}", api.wrap(api.react)),
        web.delete(BASE + "/reaction/{messageId}", api.wrap(api.delete_reaction)),
    ]


class BotApi:
    def __init__(self, server: TalkServer) -> None:
        self.server = server
        self.state = server.state
        self.chat = server.chat
        self.bruteforce = BruteForce(server.state, "bot", server.bruteforce_delay_scale)

    def wrap(
        self, handler: Callable[[web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def run(request: web.Request) -> web.Response:
            body = await request.read()
            log = BotRequest(request.method, request.path, client_ip(request), dict(request.headers), body)
            self.state.bot_requests.append(log)
            if (
                request.match_info["apiVersion"] != "v1"
                or not TOKEN.fullmatch(request.match_info["token"])
                or not request.match_info.get("messageId", "0").isdigit()
            ):
                resp = web.Response(status=404, text="route not found")  # the router, before any controller
            elif not csrf_ok(request):
                resp = ocs_response(request, 412, None, "CSRF check failed")
            else:
                fault = self.server.take_fault(request)
                resp = fault if fault is not None else await self._protected(request, handler)
            log.status = resp.status
            return resp

        return run

    async def _protected(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.Response]]
    ) -> web.Response:
        blocked = await self.bruteforce.before(request)
        if blocked is not None:
            return blocked
        try:
            return await handler(request)
        except BadBot as exc:
            resp = ocs_response(request, exc.status)
            if exc.status == 401:
                return await self.bruteforce.throttled(request, resp)
            return resp

    def bot_from_headers(self, request: web.Request, token: str, signed: str) -> Bot:
        random = request.headers.get("X-Nextcloud-Talk-Bot-Random", "")
        if not random or len(random) < 32:
            raise BadBot(400)
        checksum = request.headers.get("X-Nextcloud-Talk-Bot-Signature", "")
        if not checksum:
            raise BadBot(400)
        for bot in self.state.bots_for_token(token, FEATURE_RESPONSE):
            digest = hmac.new(bot.secret.encode(), (random + signed).encode(), hashlib.sha256).hexdigest()
            if hmac.compare_digest(digest, checksum.lower()):
                return bot
        raise BadBot(401)

    async def send_message(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        p = await params(request)
        message = php_string(p.get("message"))
        if message is None:
            return web.Response(
                status=500, text="TypeError: sendMessage(): Argument #2 ($message) must be of type string"
            )
        if php_trim(message) == "":  # BotController: trim($message) === ''
            return ocs_response(request, 400)
        bot = self.bot_from_headers(request, token, message)
        reply_to = php_int(p.get("replyTo", 0))
        parent = None
        if reply_to != 0:
            parent = self.state.parent_in_room(token, reply_to)
            if parent is None or not parent.replyable:
                return ocs_response(request, 400)
        reference_id = php_string(p.get("referenceId", "")) or ""
        try:
            msg = await self.chat.send_message(
                token, bot.actor, message, parent, reference_id, php_bool(p.get("silent", False)), by_bot=True
            )
        except ChatError as exc:
            return ocs_response(request, 413 if exc.kind == "too_long" else 400)
        await self.server.after_bot_message(msg)
        return ocs_response(request, 201)

    async def react(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        message_id = int(request.match_info["messageId"])
        p = await params(request)
        reaction = php_string(p.get("reaction"))
        if reaction is None:
            return web.Response(status=500, text="TypeError: react(): Argument #3 ($reaction) must be of type string")
        bot = self.bot_from_headers(request, token, reaction)
        try:
            await self.chat.add_reaction(token, bot.actor, message_id, reaction)
        except ChatError as exc:
            status = {"not_found": 404, "exists": 200}.get(exc.kind, 400)
            return ocs_response(request, status)
        return ocs_response(request, 201)

    async def delete_reaction(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        message_id = int(request.match_info["messageId"])
        p = await params(request)
        reaction = php_string(p.get("reaction"))
        if reaction is None:
            return web.Response(
                status=500, text="TypeError: deleteReaction(): Argument #3 ($reaction) must be of type string"
            )
        bot = self.bot_from_headers(request, token, reaction)
        try:
            await self.chat.remove_reaction(token, bot.actor, message_id, reaction)
        except ChatError as exc:
            return ocs_response(request, 404 if exc.kind in ("not_found", "not_supported") else 400)
        return ocs_response(request, 200)
