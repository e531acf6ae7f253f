"""Sending: messages (Markdown as HTML), replies, edits, redactions,
reactions and files, each request's transaction id derived from the
delivery's key; a homeserver away holds the delivery instead of spending
its attempts.

A mixin of ``Matrix`` (adapters/matrix/adapter.py), which holds the state."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import io
import mimetypes
from datetime import timedelta
from typing import Any

from nio import (
    EncryptionError,
    ErrorResponse,
    LocalProtocolError,
    MatrixRoom,
    RoomSendResponse,
    SendRetryError,
    UploadResponse,
)

from adapters.matrix.common import REACTIONS_TTL, Unavailable, check_response, describe, txn_id
from adapters.matrix.convert import markdown_to_html
from adapters.matrix.media import image_size, msgtype_for
from adapters.matrix.parse import HTML
from bridge.adapter import PermanentError, RateLimited, TransientError
from bridge.events import Attachment, Delivery, EventKind


class Sending:
    """``Matrix``'s deliveries."""

    # sending -----------------------------------------------------------------------------
    async def send(self, delivery: Delivery) -> str | None:
        """One delivery. While the homeserver is away (a restart) it waits
        for it — the sync loop notices its return; at least one try per
        RetryMaxSeconds — rather than spend the core's delivery attempts and
        dead-letter messages an outage should only delay."""
        while True:
            try:
                return await self._send(delivery)
            except Unavailable as exc:
                if exc.retry_after is not None:
                    raise RateLimited(str(exc), exc.retry_after) from None
                if not exc.unreachable:
                    raise TransientError(str(exc)) from None
                self._reachable.clear()
                self.ctx.log.warning("%s: %s; the delivery waits for the homeserver", self.name, exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.retry_max):
                        await self._reachable.wait()
                await self.ctx.check_fence()  # waited: still the account's owner?

    async def _send(self, delivery: Delivery) -> str | None:
        room = await self._room_id(delivery.channel)
        if self.encryption:
            await self._ensure_crypto()  # never a plaintext send into an encrypted room for want of keys
            await self._known_room(room)
        elif room in self.encrypted:
            raise PermanentError(f"room {delivery.channel} is end-to-end encrypted: talkbridge does not send there")
        kind = delivery.event.kind
        if kind == EventKind.EDIT:
            return await self._edit(room, delivery)
        if kind == EventKind.DELETE:
            return await self._redact(room, delivery, delivery.target_id or "", "0")
        if kind in (EventKind.REACTION, EventKind.UNREACTION):
            return await self._react(room, delivery)
        if kind in (EventKind.JOIN, EventKind.LEAVE, EventKind.OTHER):
            return await self._post(room, delivery, notice=True)
        return await self._post(room, delivery)

    async def _known_room(self, room_id: str) -> None:
        """nio encrypts only into a room it knows (from a sync): after a
        restart a quiet room is not among them yet. Its encryption comes
        from the crypto store's list, else from the room's state."""
        client = self._client()
        if room_id in client.rooms:
            return
        encrypted = room_id in client.encrypted_rooms
        if not encrypted:
            try:
                await self._call(f"encryption of {room_id}",
                                 lambda: client.room_get_state_event(room_id, "m.room.encryption"))  # fmt: skip
                encrypted = True
            except PermanentError:
                encrypted = False  # M_NOT_FOUND: not encrypted
        if room_id not in client.rooms:
            client.rooms[room_id] = MatrixRoom(room_id, client.user_id, encrypted)

    async def _rotate_as_the_room_says(self, room_id: str) -> None:
        """The room's ``m.room.encryption`` ``rotation_period_ms``/``_msgs`` on
        our outbound Megolm session (nio's own limits are a week and 100
        messages, whatever the room says); read once per room and process."""
        client = self._client()
        session = client.olm.outbound_group_sessions.get(room_id) if client.olm is not None else None
        if session is None:
            return
        if room_id not in self.rotation:
            self.rotation[room_id] = (None, None)
            try:
                resp = await self._call(f"encryption of {room_id}",
                                        lambda: client.room_get_state_event(room_id, "m.room.encryption"))  # fmt: skip
            except PermanentError:
                return
            content = getattr(resp, "content", None)
            self.rotation[room_id] = rotation_of(content if isinstance(content, dict) else {})
        ms, msgs = self.rotation[room_id]
        if ms is not None:
            session.max_age = min(session.max_age, timedelta(milliseconds=ms))
        if msgs is not None:
            session.max_messages = min(session.max_messages, msgs)

    def _content(self, delivery: Delivery, text: str, notice: bool = False) -> dict[str, Any]:
        event = delivery.event
        body = delivery.username + text
        msgtype = "m.emote" if event.action else "m.notice" if notice else "m.text"
        content: dict[str, Any] = {"msgtype": msgtype, "body": body}
        if not self.html_disable:
            formatted = markdown_to_html(text)
            if formatted is not None:
                content["format"] = HTML
                content["formatted_body"] = html.escape(delivery.username, quote=False) + formatted
        return content

    async def _room_send(self, room: str, etype: str, content: dict[str, Any], txn: str) -> str:
        client = self._client()
        if self.encryption and self.blacklist:
            known = client.rooms.get(room)
            if known is not None and known.encrypted and not known.members_synced:
                # what nio's room_send would do, here: its new devices are blacklisted before it shares a key
                await self._call(f"members of {room}", lambda: client.joined_members(room))
                if client.should_query_keys:
                    await self._call("keys query", client.keys_query)
            self._blacklist_devices()
        try:
            resp = await self._call(
                f"send to {room}",
                lambda: client.room_send(room, etype, content, tx_id=txn, ignore_unverified_devices=True),
            )
        except (LocalProtocolError, SendRetryError, EncryptionError) as exc:  # nio could not encrypt (yet)
            raise Unavailable(f"send to {room}: {type(exc).__name__}: {exc}") from None
        if not isinstance(resp, RoomSendResponse):
            raise Unavailable(f"send to {room}: {describe(resp)}")
        if self.encryption:
            await self._rotate_as_the_room_says(room)
            await self._save_crypto()  # a room key shared: new Olm sessions
        return resp.event_id

    async def _post(self, room: str, delivery: Delivery, notice: bool = False) -> str | None:
        text = delivery.text
        files: list[tuple[Attachment, bytes]] = []
        for att in delivery.event.attachments:
            data = _decoded(att)
            if data is not None:
                files.append((att, data))
            else:
                line = f"{att.name}: {att.url}" if att.url else f"[file {att.name}]"
                text += ("\n" if text.strip() else "") + line
        first: str | None = None
        relates = {"m.in_reply_to": {"event_id": delivery.reply_to}} if delivery.reply_to else None
        if text.strip() or not files:
            content = self._content(delivery, text, notice)
            if relates:
                content["m.relates_to"] = relates
            first = await self._room_send(room, "m.room.message", content, txn_id(delivery.key, 0))
        for i, (att, data) in enumerate(files, start=1):
            caption = None if first is not None else delivery.username.strip() or None
            event_id = await self._send_file(room, delivery, i, att, data, caption, relates if first is None else None)
            first = first or event_id
        return first

    async def _send_file(
        self, room: str, delivery: Delivery, part: int, att: Attachment, data: bytes, caption: str | None,
        relates: dict[str, Any] | None,
    ) -> str:  # fmt: skip
        client = self._client()
        name = att.name or "file"
        mime = att.mime or "application/octet-stream"
        if mime == "application/octet-stream":  # an api client's file: its name says more
            mime = mimetypes.guess_type(name, strict=False)[0] or mime
        known = client.rooms.get(room)
        encrypt = self.encryption and known is not None and known.encrypted  # its key goes in the event (`file`)
        resp = await self._call(
            f"upload {name}",
            lambda: client.upload(io.BytesIO(data), content_type="application/octet-stream" if encrypt else mime,
                                  filename=name, filesize=len(data), encrypt=encrypt),
        )  # fmt: skip
        upload = resp[0] if isinstance(resp, tuple) else resp
        keys = resp[1] if isinstance(resp, tuple) else None
        check_response(upload, f"upload {name}")
        if not isinstance(upload, UploadResponse):
            raise Unavailable(f"upload {name}: {describe(upload)}")
        msgtype = msgtype_for(mime)
        info: dict[str, Any] = {"mimetype": mime, "size": len(data)}
        if msgtype == "m.image":
            size = image_size(data)
            if size is not None:
                info["w"], info["h"] = size
        content: dict[str, Any] = {"msgtype": msgtype, "body": name, "filename": name, "url": upload.content_uri,
                                   "info": info}  # fmt: skip
        if encrypt and keys:
            content["file"] = {"url": content.pop("url"), **keys}
        if caption:
            content["body"] = f"{caption} {name}"
        if relates:
            content["m.relates_to"] = relates
        return await self._room_send(room, "m.room.message", content, txn_id(delivery.key, part))

    async def _edit(self, room: str, delivery: Delivery) -> str | None:
        target = delivery.target_id or ""
        if not target.startswith("$"):
            raise PermanentError(f"edit needs a Matrix event id (got {target!r})")
        new = self._content(delivery, delivery.text)
        content = dict(new)
        content["body"] = "* " + new["body"]
        if "formatted_body" in new:
            content["formatted_body"] = "* " + new["formatted_body"]
        content["m.new_content"] = new
        content["m.relates_to"] = {"rel_type": "m.replace", "event_id": target}
        await self._room_send(room, "m.room.message", content, txn_id(delivery.key, 0))
        return None

    async def _redact(self, room: str, delivery: Delivery, target: str, part: str) -> str | None:
        if not target.startswith("$"):
            raise PermanentError(f"redaction needs a Matrix event id (got {target!r})")
        client = self._client()
        resp = await self._call(
            f"redact in {room}", lambda: client.room_redact(room, target, tx_id=txn_id(delivery.key, part))
        )
        if isinstance(resp, ErrorResponse):
            raise Unavailable(f"redact in {room}: {describe(resp)}")
        return None

    async def _react(self, room: str, delivery: Delivery) -> str | None:
        target, key = delivery.target_id or "", delivery.event.reaction or ""
        if not target.startswith("$") or not key:
            raise PermanentError(f"reaction needs an emoji and a Matrix event id (got {target!r})")
        field = f"{room}\x1f{target}\x1f{key}"
        if delivery.event.kind == EventKind.UNREACTION:
            raw = await self.ctx.redis.hget(self.sent_reactions_key, field)
            if raw is None:
                self.ctx.metrics.skipped.labels(self.name, "unreaction_unknown").inc()
                return None
            await self._redact(room, delivery, raw.decode(), "0")
            await self.ctx.redis.hdel(self.sent_reactions_key, field)
            return None
        content = {"m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": key}}
        try:
            event_id = await self._room_send(room, "m.reaction", content, txn_id(delivery.key, 0))
        except PermanentError as exc:
            if "M_DUPLICATE_ANNOTATION" in str(exc):
                return None  # the bridge already reacted with this emoji
            raise
        pipe = self.ctx.redis.pipeline(transaction=False)
        pipe.hset(self.sent_reactions_key, field, event_id)
        pipe.expire(self.sent_reactions_key, REACTIONS_TTL)
        await pipe.execute()
        return None


def rotation_of(content: dict[str, Any]) -> tuple[int | None, int | None]:
    """(rotation_period_ms, rotation_period_msgs) of an ``m.room.encryption`` content, where valid."""
    ms, msgs = content.get("rotation_period_ms"), content.get("rotation_period_msgs")
    ok = [v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None for v in (ms, msgs)]
    return ok[0], ok[1]


def _decoded(att: Attachment) -> bytes | None:
    if not att.data_b64:
        return None
    try:
        return base64.b64decode(att.data_b64, validate=True)
    except ValueError:
        return None
