"""Sending: posts (text in pieces, files over WebDAV shared into the room),
edits, deletions and reactions, each copy's id recorded, a retry finding
what Talk already stored by its ``referenceId``.

A mixin of ``TalkUser`` (adapters/nctalk/adapter.py), which holds the state."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from typing import Any

import orjson

from adapters.nctalk.common import (
    ATTEMPTED_KEEP,
    CHAT_API,
    DELETE_NOTE,
    EDIT_MARK,
    REACTION_API,
    RECENT_WINDOW,
    TALK_MESSAGE_TYPE,
    Refused,
    RoomFailure,
    safe_name,
)
from adapters.talk.chat import BadAnswer, parse_message, parse_page
from adapters.talk.client import SHARES, Answer, Unreachable, dav_path, path_token
from adapters.talk.common import php_trim, reference_id, split_message
from bridge.adapter import UNAVAILABLE_STATUSES, PermanentError, RateLimited, ServerUnavailable, TransientError
from bridge.events import Attachment, Delivery, EventKind


class Sending:
    """``TalkUser``'s deliveries to Talk."""

    # sending ---------------------------------------------------------------------------
    async def send(self, delivery: Delivery) -> str | None:
        """One delivery. While Talk refuses the credentials it waits for the
        probe that passes (no request of its own), then goes on."""
        while True:
            if self._refused is not None:
                await self._await_accepted()
                await self.ctx.check_fence()  # waited long: still the account's owner?
            try:
                return await self._send(delivery)
            except Refused as exc:
                await self._refuse(str(exc))

    async def _send(self, delivery: Delivery) -> str | None:
        kind = delivery.event.kind
        try:
            if kind == EventKind.EDIT:
                return await self._edit(delivery)
            if kind == EventKind.DELETE:
                return await self._delete(delivery)
            if kind in (EventKind.REACTION, EventKind.UNREACTION):
                return await self._react(delivery)
            return await self._post(delivery)
        except RoomFailure as exc:
            if exc.retry_after is not None:
                raise RateLimited(str(exc), exc.retry_after) from None
            if exc.status in UNAVAILABLE_STATUSES:  # a proxy before a Talk that is down, maintenance mode
                raise ServerUnavailable(str(exc)) from None
            raise TransientError(str(exc)) from None
        except Unreachable as exc:
            if exc.connecting:  # no connection: Talk never saw the request
                raise ServerUnavailable(str(exc)) from None
            raise TransientError(str(exc)) from None
        except BadAnswer as exc:
            raise TransientError(f"Talk's answer was not understood: {exc}") from None

    def _nick_and_text(self, delivery: Delivery, text: str) -> tuple[str, str | None]:
        """The text to post and the actorDisplayName (guests; Talk ignores it for users)."""
        nick = php_trim(delivery.username) or delivery.event.sender_name
        if self.separate_name:
            return text, nick
        return delivery.username + text, nick if self.guest else None

    def _check(self, token: str, what: str, answer: Answer, ok: Sequence[int]) -> None:
        if answer.status in ok:
            return
        if answer.status in (403, 404, 412, 429) or answer.status >= 500:
            raise self._room_failure(token, what, answer)
        raise PermanentError(f"{what} in room {token}: Talk answered {answer.status}: {answer.body[:200]!r}")

    def _first_attempt(self, delivery: Delivery) -> bool:
        """False when this copy may already be in the room: a retry here, or
        the first delivery to the room since (re)connecting — the one a crash
        or a takeover may have cut between Talk's 201 and the record."""
        key = delivery.key
        fresh = delivery.channel in self._sent_since_connect and key not in self._attempted
        self._sent_since_connect.add(delivery.channel)
        self._attempted[key] = None
        if len(self._attempted) > ATTEMPTED_KEEP:
            self._attempted.popitem(last=False)
        return fresh

    async def _recent_references(self, token: str, wanted: set[str]) -> dict[str, int]:
        """Our messages among the room's newest ones carrying these referenceIds."""
        params = {"lookIntoFuture": 0, "limit": RECENT_WINDOW, "setReadMarker": 0, "markNotificationsAsRead": 0}
        answer = await self._room_call(token, "GET", f"{CHAT_API}/{path_token(token)}", params=params)
        if answer.status == 304:
            return {}
        self._check(token, "look up", answer, (200,))
        return {
            m.reference_id: m.id
            for m in parse_page(answer.body)
            if m.reference_id in wanted and m.actor in self._own and m.system == ""
        }

    async def _post(self, delivery: Delivery) -> str | None:
        token = delivery.channel
        event = delivery.event
        text = delivery.text
        files: list[tuple[Attachment, bytes]] = []
        for att in event.attachments:
            data = self._decoded(att)
            if data is not None and not self.guest:
                files.append((att, data))
            else:  # cannot upload it: name and link, as a line of text
                line = f"{att.name}: {att.url}" if att.url else f"[file {att.name}]"
                text += ("\n" if text.strip() else "") + line
        body, display = self._nick_and_text(delivery, text)
        limit = self.caps.max_length
        caption = body if files and php_trim(body) and len(body) <= limit else None
        parts: list[tuple[str, Any]] = []
        if files and caption is None and php_trim(text):
            parts += [("text", piece) for piece in split_message(body, limit)]
        elif not files:
            parts += [("text", piece) for piece in split_message(body, limit)]
        for i, (att, data) in enumerate(files):
            parts.append(("file", (att, data, caption if i == 0 else None)))
        if not parts:
            return None
        refs = [reference_id(delivery.key, i) for i in range(len(parts))]
        done = {} if self._first_attempt(delivery) else await self._recent_references(token, set(refs))
        reply = int(delivery.reply_to) if delivery.reply_to and delivery.reply_to.isdigit() else 0
        first: int | None = None
        for i, (kind, part) in enumerate(parts):
            ref = refs[i]
            if ref in done:
                posted = done[ref]
            elif kind == "text":
                posted = await self._post_text(token, part, ref, reply if i == 0 else 0, display)
            else:
                att, data, cap = part
                posted = await self._post_file(delivery, i, att, data, cap, ref, reply if i == 0 else 0, display)
            first = posted if first is None else first
        return str(first) if first is not None else None

    @staticmethod
    def _decoded(att: Attachment) -> bytes | None:
        if not att.data_b64:
            return None
        try:
            return base64.b64decode(att.data_b64, validate=True)
        except (binascii.Error, ValueError):
            return None

    async def _post_text(self, token: str, text: str, ref: str, reply: int, display: str | None) -> int:
        body: dict[str, Any] = {"message": text, "referenceId": ref}
        if reply:
            body["replyTo"] = reply
        if display:
            body["actorDisplayName"] = display
        path = f"{CHAT_API}/{path_token(token)}"
        answer = await self._room_call(token, "POST", path, json=body)
        if answer.status == 400 and reply:  # the message replied to is gone: post it unthreaded
            del body["replyTo"]
            answer = await self._room_call(token, "POST", path, json=body)
        self._check(token, "post", answer, (201,))
        return parse_message(answer.data(), "the posted message").id

    async def _post_file(
        self, delivery: Delivery, part: int, att: Attachment, data: bytes, caption: str | None, ref: str,
        reply: int, display: str | None,
    ) -> int:  # fmt: skip
        """WebDAV upload into Talk/ (a folder per copy: same name, no clash,
        the same path again on a retry), then a share into the room."""
        token = delivery.channel
        client = self._client()
        folder = "Talk/talkbridge-" + hashlib.sha256(f"{delivery.key}#{part}".encode()).hexdigest()[:16]
        name = safe_name(att.name)
        for path in ("Talk", folder):
            answer = await client.call("MKCOL", dav_path(self.login, path))
            if answer.status == 401:
                raise Refused(f"WebDAV: Talk answered 401 for {self.login}")
            if answer.status not in (201, 405):
                self._check(token, f"create folder {path}", answer, (201, 405))
        answer = await client.call(
            "PUT", dav_path(self.login, f"{folder}/{name}"), content=data,
            headers={"Content-Type": att.mime or "application/octet-stream"},
        )  # fmt: skip
        if answer.status == 401:
            raise Refused(f"WebDAV: Talk answered 401 for {self.login}")
        self._check(token, f"upload {name}", answer, (201, 204))
        meta: dict[str, Any] = {"messageType": delivery.event.extra.get(TALK_MESSAGE_TYPE, "comment")}
        if meta["messageType"] not in ("comment", "voice-message", "record-audio", "record-video"):
            meta["messageType"] = "comment"
        if caption and self.caps.has("media-caption"):
            meta["caption"] = caption
        if reply:
            meta["replyTo"] = reply
        form = {"shareType": "10", "shareWith": token, "path": f"/{folder}/{name}", "referenceId": ref,
                "talkMetaData": orjson.dumps(meta).decode()}  # fmt: skip
        answer = await self._room_call(token, "POST", SHARES, data=form)
        if answer.status != 403:  # 403: already shared with this room (a retry): find it below
            self._check(token, f"share {name}", answer, (200,))
        found = await self._recent_references(token, {ref})
        if ref not in found:
            raise TransientError(f"shared {name} into room {token}, but its message is not among the newest")
        if caption and not self.caps.has("media-caption") and php_trim(caption):
            await self._post_text(token, caption, reference_id(delivery.key, 1000 + part), 0, display)
        return found[ref]

    async def _edit(self, delivery: Delivery) -> str | None:
        token, target = delivery.channel, delivery.target_id or ""
        if not target.isdigit():
            raise PermanentError(f"edit needs a Talk message id (got {target!r})")
        text, display = self._nick_and_text(delivery, delivery.text)
        text = (split_message(text, self.caps.max_length) or [text])[0]
        if self.caps.has("edit-messages"):
            answer = await self._room_call(
                token, "PUT", f"{CHAT_API}/{path_token(token)}/{target}", json={"message": text}
            )
            if answer.status in (200, 202):
                return None
            if answer.status == 404:
                self.ctx.metrics.skipped.labels(self.name, "edit_target_gone").inc()
                return None
            if answer.status not in (400, 403, 405):
                self._check(token, "edit", answer, (200, 202))
        # Talk cannot edit it (before Talk 19, or past its 24 h): say it visibly
        note, _ = self._nick_and_text(delivery, delivery.text + EDIT_MARK)
        await self._fallback(delivery, note, int(target), display)
        return None

    async def _delete(self, delivery: Delivery) -> str | None:
        token, target = delivery.channel, delivery.target_id or ""
        if not target.isdigit():
            raise PermanentError(f"deletion needs a Talk message id (got {target!r})")
        answer = await self._room_call(token, "DELETE", f"{CHAT_API}/{path_token(token)}/{target}")
        if answer.status in (200, 202, 404):
            return None
        if answer.status not in (400, 403, 405):
            self._check(token, "delete", answer, (200, 202))
        note, display = self._nick_and_text(delivery, DELETE_NOTE)
        await self._fallback(delivery, note, int(target), display)
        return None

    async def _fallback(self, delivery: Delivery, text: str, target: int, display: str | None) -> None:
        ref = reference_id(delivery.key, 0)
        done = {} if self._first_attempt(delivery) else await self._recent_references(delivery.channel, {ref})
        if ref not in done:
            await self._post_text(delivery.channel, split_message(text, self.caps.max_length)[0], ref, target, display)

    async def _react(self, delivery: Delivery) -> str | None:
        token, target = delivery.channel, delivery.target_id or ""
        emoji = delivery.event.reaction or ""
        if not emoji or not target.isdigit():
            raise PermanentError(f"reaction needs an emoji and a Talk message id (got {target!r})")
        add = delivery.event.kind == EventKind.REACTION
        path = f"{REACTION_API}/{path_token(token)}/{target}"
        answer = await self._room_call(token, "POST" if add else "DELETE", path, json={"reaction": emoji})
        if answer.status in (200, 201) or (answer.status == 404 and not add):
            return None
        if answer.status == 404:
            self.ctx.metrics.skipped.labels(self.name, "reaction_target_gone").inc()
            return None
        self._check(token, "react", answer, (200, 201))
        return None
