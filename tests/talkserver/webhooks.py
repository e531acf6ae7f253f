"""Webhooks as Talk sends them (lib/Service/BotService.php, ActivityPubHelper.php).

Bodies are PHP ``json_encode`` output (``\\/`` and ``\\uXXXX``), signed as
``hash_hmac('sha256', $random . $jsonBody, $secret)`` with a 64-character
random from ``ISecureRandom::generate(64)`` (letters, digits, ``+`` and
``/``). Key order follows the PHP arrays, so the bytes match too.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import string
from typing import Any

import aiohttp

from tests.talkserver.phpjson import php_json_encode
from tests.talkserver.state import Actor, Bot, Message, Room, TalkState, WebhookCall

RANDOM_CHARS = string.ascii_letters + string.digits + "+/"
WEBHOOK_TIMEOUT = 5.0  # BotService: 'timeout' => 5
# Comment::getMentions (simplified to plain and quoted user ids)
MENTION = re.compile(r"\B(?<![^a-z0-9_\-@\.\'\s])@(\"[a-z0-9_\-@\.\' ]+\"|[a-z0-9_\-@\.\']+)", re.IGNORECASE)


def talk_random() -> str:
    return "".join(secrets.choice(RANDOM_CHARS) for _ in range(64))


def signature(secret: str, random: str, body: bytes) -> str:
    return hmac.new(secret.encode(), random.encode() + body, hashlib.sha256).hexdigest()


def parse_mentions(state: TalkState, text: str) -> tuple[str, dict[str, Any] | list[Any]]:
    """What MessageParser does to a user's comment: known ``@user`` ->
    ``{mention-userN}`` with a rich-object parameter."""
    params: dict[str, Any] = {}
    seen: dict[str, str] = {}

    def one(m: re.Match[str]) -> str:
        uid = m.group(1).strip('"')
        user = state.users.get(uid)
        if user is None:
            return m.group(0)
        if uid not in seen:
            key = f"mention-user{len(seen) + 1}"
            seen[uid] = key
            params[key] = {"type": "user", "id": uid, "name": user.display_name, "mention-id": uid}
        return "{" + seen[uid] + "}"

    out = MENTION.sub(one, text)
    return out, (params or [])


# ActivityPubHelper -------------------------------------------------------------
def application(bot: Bot) -> dict[str, Any]:
    return {"type": "Application", "id": f"bots/bot-{bot.url_hash}", "name": bot.name}


def collection(room: Room) -> dict[str, Any]:
    return {"type": "Collection", "id": room.token, "name": room.name}


def person_from_attendee(state: TalkState, actor: Actor) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "Person", "id": actor.ref, "name": actor.display_name}
    if state.version >= 21:
        out["talkParticipantType"] = str(actor.participant_type)
    return out


def person(actor: Actor) -> dict[str, Any]:
    return {"type": "Person", "id": actor.ref, "name": actor.display_name}


def note(msg: Message, name: str, in_reply_to: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "Note",
        "id": str(msg.id),  # IComment::getId() is a string
        "name": name,
        "content": php_json_encode({"message": msg.message, "parameters": msg.parameters}),
        "mediaType": "text/markdown",
    }
    if in_reply_to is not None:
        out["inReplyTo"] = in_reply_to
    return out


def create_payload(state: TalkState, room: Room, msg: Message) -> dict[str, Any]:
    in_reply_to = None
    if state.version >= 21 and msg.parent_id is not None:
        parent = state.messages[msg.parent_id]
        in_reply_to = {"type": "Note", "actor": person(parent.actor), "object": note(parent, "message")}
    return {
        "type": "Create",
        "actor": person_from_attendee(state, msg.actor),
        "object": note(msg, "message", in_reply_to),
        "target": collection(room),
    }


def activity_payload(room: Room, msg: Message) -> dict[str, Any]:
    return {
        "type": "Activity",
        "actor": person(msg.actor),
        "object": note(msg, msg.system_message),
        "target": collection(room),
    }


def like_payload(state: TalkState, room: Room, msg: Message, reactor: Actor, emoji: str) -> dict[str, Any]:
    actor = reactor if state.reaction_actor == "reactor" else msg.actor
    return {
        "type": "Like",
        "actor": person(actor),
        "object": note(msg, "message" if msg.message_type == "comment" else msg.system_message),
        "target": collection(room),
        "content": emoji,
    }


def undo_payload(state: TalkState, room: Room, msg: Message, reactor: Actor, emoji: str) -> dict[str, Any]:
    actor = reactor if state.reaction_actor == "reactor" else msg.actor
    return {
        "type": "Undo",
        "actor": person(actor),
        "object": {
            "type": "Like",
            "actor": person(actor),
            "object": note(msg, "message" if msg.message_type == "comment" else msg.system_message),
            "target": collection(room),
            "content": emoji,
        },
        "target": collection(room),
    }


def join_payload(room: Room, bot: Bot, kind: str) -> dict[str, Any]:
    return {"type": kind, "actor": application(bot), "object": collection(room)}


class WebhookSender:
    def __init__(self, state: TalkState) -> None:
        self.state = state
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, bots: list[Bot], payload: dict[str, Any]) -> list[WebhookCall]:
        """BotService::invokeBots: one encoded body, one request per bot; the
        sender's own request waits for all of them."""
        if not bots:
            return []
        body = php_json_encode(payload).encode()
        return list(await asyncio.gather(*(self._one(bot, body) for bot in bots)))

    async def _one(self, bot: Bot, body: bytes) -> WebhookCall:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        random = talk_random()
        headers = {
            "Content-Type": "application/json",
            "X-Nextcloud-Talk-Random": random,
            "X-Nextcloud-Talk-Signature": signature(bot.secret, random, body),
            "X-Nextcloud-Talk-Backend": self.state.base_url.rstrip("/") + "/",
            "OCS-APIRequest": "true",
        }
        call = WebhookCall(bot.id, bot.url, headers, body, None)
        try:
            async with self._session.post(
                bot.url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT)
            ) as resp:
                await resp.read()
                call.status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            call.error = f"{type(exc).__name__}: {exc}"
        if call.status not in (200, 202):  # only counted; Talk never disables or retries
            bot.error_count += 1
            bot.last_error = call.error or f"UnexpectedStatusCode: {call.status}"
        self.state.webhook_calls.append(call)
        return call
