"""One Talk message -> events: text and files, edits, deletions, reactions
(a revoked one found by comparing with the reactions remembered), joins
and parts.

A mixin of ``TalkUser`` (adapters/nctalk/adapter.py), which holds the state."""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson

from adapters.nctalk.common import JOIN_PART, REACTION_API, REACTIONS_TTL, TALK_MESSAGE_TYPE, event_id
from adapters.talk.chat import WRITTEN_TYPES, BadAnswer, ChatMessage, parse_reactions
from adapters.talk.client import dav_path, path_token
from adapters.talk.common import render
from bridge.events import Attachment, Event, EventKind


class Inbound:
    """``TalkUser``'s reading of one Talk message."""

    # one Talk message -> events ------------------------------------------------------
    def _base(self, token: str, msg: ChatMessage) -> dict[str, Any]:
        name = msg.actor_name
        if msg.actor_type in ("guests", "emails"):
            name = name + self.guest_suffix if name else "Guest"
        return {
            "account": self.name,
            "channel": token,
            "sender_id": msg.actor,
            "sender_name": name or msg.actor_id,
            "origin": [f"{self.name}/{token}"],
            "timestamp": float(msg.timestamp) or time.time(),
        }

    async def _events(self, token: str, msg: ChatMessage) -> list[Event]:
        if msg.actor in self._own:
            return []  # ours: never relayed back
        base = self._base(token, msg)
        parent = msg.parent
        if msg.system == "" and msg.message_type in WRITTEN_TYPES:
            text, files = await self._content(msg.message, msg.parameters)
            event = Event(
                kind=EventKind.MESSAGE, text=text, native_id=str(msg.id), attachments=files,
                id=event_id(self.name, token, msg.id), **base,
            )  # fmt: skip
            if msg.message_type != "comment":
                event.extra[TALK_MESSAGE_TYPE] = msg.message_type  # a voice message stays one
            if parent is not None:
                event.reply_to = str(parent.id)
            return [event]
        if parent is None:
            return self._join_part(token, msg, base)
        target = str(parent.id)
        if msg.system == "message_edited" and not parent.deleted:
            text, _files = render(parent.message, parent.parameters)
            if parent.message.strip() == "{file}":
                return []  # a file whose caption was removed: nothing to say elsewhere
            return [Event(kind=EventKind.EDIT, text=text, target_id=target,
                          id=event_id(self.name, token, msg.id), **base)]  # fmt: skip
        if msg.system == "message_deleted":
            return [Event(kind=EventKind.DELETE, target_id=target, id=event_id(self.name, token, msg.id), **base)]
        if msg.system == "reaction" and msg.message:
            await self._remember_reaction(token, target, msg.actor, msg.message, add=True)
            return [Event(kind=EventKind.REACTION, target_id=target, reaction=msg.message,
                          id=event_id(self.name, token, msg.id), **base)]  # fmt: skip
        if msg.system == "reaction_revoked":
            gone = await self._revoked(token, target, msg.actor)
            return [
                Event(
                    kind=EventKind.UNREACTION,
                    target_id=target,
                    reaction=emoji,
                    id=event_id(self.name, token, msg.id, emoji),
                    **base,
                )
                for emoji in gone
            ]
        return []

    def _join_part(self, token: str, msg: ChatMessage, base: dict[str, Any]) -> list[Event]:
        kind = JOIN_PART.get(msg.system)
        if kind is None:
            return []  # other system messages (calls, renames, polls…) are not bridged
        text, _ = render(msg.message, msg.parameters)
        return [Event(kind=kind, text=text, id=event_id(self.name, token, msg.id), **base)]

    async def _content(self, message: str, parameters: Any) -> tuple[str, list[Attachment]]:
        """The text, and the files a message shares (fetched within MediaDownloadSize)."""
        text, _ = render(message, parameters)
        params = parameters if isinstance(parameters, dict) else {}
        out: list[Attachment] = []
        for key, obj in params.items():
            if obj.get("type") != "file":
                continue
            if message.strip() == "{" + key + "}":
                text = ""  # only the file, no caption
            out.append(await self._attachment(obj))
        return text, out

    async def _attachment(self, obj: dict[str, Any]) -> Attachment:
        _text, [att] = render("{f}", {"f": obj})
        path = obj.get("path")
        if self.guest or not isinstance(path, str) or not path:
            return att  # a guest has no WebDAV: the link only
        if att.size is not None and att.size > self.max_file:
            self.ctx.log.info("%s: file %s (%d bytes) is over MediaDownloadSize; sent as a link", self.name,
                              att.name, att.size)  # fmt: skip
            return att
        try:
            answer = await self._client().call("GET", dav_path(self.login, path), limit=self.max_file,
                                               headers={"Accept": "*/*"})  # fmt: skip
        except BadAnswer:
            self.ctx.log.info("%s: file %s is over MediaDownloadSize; sent as a link", self.name, att.name)
            return att
        if answer.status != 200:
            self.ctx.log.warning("%s: could not fetch file %s (WebDAV %d); sent as a link", self.name, att.name,
                                 answer.status)  # fmt: skip
            return att
        att.data_b64 = base64.b64encode(answer.body).decode()
        att.size = len(answer.body)
        return att

    # Reactions: Talk's "reaction_revoked" does not say which emoji. Who
    # reacted with what is remembered (7 days) and compared with the
    # message's reactions now, as Talk's own clients reload them.
    def _reactions_key(self, token: str) -> str:
        return self.ctx.key("reactions", token)

    async def _remember_reaction(self, token: str, target: str, actor: str, emoji: str, add: bool) -> None:
        key, field = self._reactions_key(token), f"{target}\x1f{actor}"
        raw = await self.ctx.redis.hget(key, field)
        emojis = set(orjson.loads(raw)) if raw else set()
        emojis = emojis | {emoji} if add else emojis - {emoji}
        pipe = self.ctx.redis.pipeline(transaction=False)
        if emojis:
            pipe.hset(key, field, orjson.dumps(sorted(emojis)))
        else:
            pipe.hdel(key, field)
        pipe.expire(key, REACTIONS_TTL)
        await pipe.execute()

    async def _revoked(self, token: str, target: str, actor: str) -> list[str]:
        raw = await self.ctx.redis.hget(self._reactions_key(token), f"{target}\x1f{actor}")
        had = set(orjson.loads(raw)) if raw else set()
        if not had:
            return []
        answer = await self._room_call(token, "GET", f"{REACTION_API}/{path_token(token)}/{target}")
        if answer.status == 404:
            now: set[str] = set()
        elif answer.status == 200:
            now = {emoji for emoji, who in parse_reactions(answer.body).items() if actor in who}
        else:
            raise self._room_failure(token, "reactions of", answer)
        gone = sorted(had - now)
        for emoji in gone:
            await self._remember_reaction(token, target, actor, emoji, add=False)
        return gone
