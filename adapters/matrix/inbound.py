"""A Matrix event to talkbridge events: the sender's name, reactions and
their redactions, edits, emotes and notices, encrypted events (decrypted by
nio as it reads the sync; those whose key has not arrived wait for it,
crypto.py; with ``Encryption = false`` relayed as a notice), files fetched
through the authenticated media API.

A mixin of ``Matrix`` (adapters/matrix/adapter.py), which holds the state."""

from __future__ import annotations

import base64
import contextlib
import time
from typing import Any
from urllib.parse import quote

import orjson
from nio import EncryptionError
from nio.crypto.attachments import decrypt_attachment

from adapters.matrix.common import MEDIA_API, TRANSPORT_ERRORS, Unavailable, event_id
from adapters.matrix.parse import BAD_FILE_NOTE, UNDECRYPTABLE_NOTE, Incoming, Media, Skip, parse_event
from bridge.events import Attachment, Event, EventKind


class Inbound:
    """``Matrix``'s events from what a sync carries."""

    def _display(self, room_id: str, sender: str) -> str:
        name = sender[1:]
        if not self.use_username and self.client is not None:
            room = self.client.rooms.get(room_id)
            user = room.users.get(sender) if room is not None else None
            display = getattr(user, "display_name", None) if user is not None else None
            if isinstance(display, str) and display.strip():
                name = display.strip()[:255]
        if self.no_suffix and ":" in name:
            name = name.split(":", 1)[0]
        return name

    async def _undecrypted(self, local_reactions: dict[str, tuple[str, str]]) -> list[Event]:
        """The waiting encrypted events whose key arrived, and (as notices)
        those that waited ``UndecryptableSeconds`` in vain."""
        done, expired = self.crypto.retry(self._client(), self.undecryptable_after)
        events: list[Event] = []
        for pending in done:
            self.ctx.log.info("%s: room %s: event %s decrypted after its key arrived", self.name, pending.channel,
                              pending.source.get("event_id"))  # fmt: skip
            events.extend(await self._events(pending.channel, pending.room_id, pending.source, local_reactions))
        for pending in expired:
            events.extend(await self._events(pending.channel, pending.room_id, pending.source, local_reactions,
                                             give_up=True))  # fmt: skip
        return events

    async def _events(
        self, channel: str, room_id: str, source: Any, local_reactions: dict[str, tuple[str, str]],
        give_up: bool = False,
    ) -> list[Event]:  # fmt: skip
        parsed = parse_event(source, self.user_id, keep_quoted=self.keep_quoted, decrypt_files=self.encryption)
        if isinstance(parsed, Skip):
            if parsed.bad:
                eid = source.get("event_id") if isinstance(source, dict) else None
                self.ctx.log.warning("%s: room %s: event %.80r not relayed: %s", self.name, channel, eid, parsed.reason)
                self.ctx.metrics.skipped.labels(self.name, "bad_event").inc()
            return []
        p: Incoming = parsed
        if p.encrypted and self.encryption and not give_up and source.get("type") == "m.room.encrypted":
            unsigned = source.get("unsigned")
            if isinstance(unsigned, dict) and "redacted_because" in unsigned:
                return []  # redacted before we saw it: nothing left to decrypt or relay
            self.crypto.wait(p.event_id, room_id, channel, source)  # its key may come with a later sync
            self.ctx.log.info("%s: room %s: event %s from %s waits for its room key", self.name, channel, p.event_id,
                              p.sender)  # fmt: skip
            return []
        name = self._display(room_id, p.sender)
        base: dict[str, Any] = {
            "account": self.name, "channel": channel, "sender_id": p.sender, "sender_name": name,
            "origin": [f"{self.name}/{channel}"], "timestamp": p.timestamp or time.time(),
            "id": event_id(self.name, room_id, p.event_id),
        }  # fmt: skip
        if p.kind == EventKind.REACTION:
            local_reactions[p.event_id] = (p.target_id or "", p.reaction or "")
            return [Event(kind=EventKind.REACTION, target_id=p.target_id, reaction=p.reaction, **base)]
        if p.kind == EventKind.DELETE:
            target = p.target_id or ""
            reacted = local_reactions.get(target)
            if reacted is None:
                raw = await self.ctx.redis.hget(self.reactions_key, target)
                if raw:
                    with contextlib.suppress(ValueError, TypeError):
                        t, k = orjson.loads(raw)
                        reacted = (str(t), str(k))
            if reacted is not None:
                return [Event(kind=EventKind.UNREACTION, target_id=reacted[0], reaction=reacted[1], **base)]
            return [Event(kind=EventKind.DELETE, target_id=target, **base)]
        if p.kind == EventKind.EDIT:
            return [Event(kind=EventKind.EDIT, text=p.text, target_id=p.target_id, **base)]
        event = Event(kind=EventKind.MESSAGE, text=p.text, native_id=p.event_id, reply_to=p.reply_to, **base)
        if p.msgtype == "m.emote":
            event.action = True
        if p.encrypted and self.encryption:
            event.text = UNDECRYPTABLE_NOTE
            self.ctx.metrics.skipped.labels(self.name, "undecryptable").inc()
            self.ctx.log.error("%s: room %s: encrypted event %s from %s could not be decrypted: relayed as a notice",
                               self.name, channel, p.event_id, p.sender)  # fmt: skip
        elif p.encrypted:
            self.ctx.metrics.skipped.labels(self.name, "encrypted").inc()
            self.ctx.log.error("%s: room %s: encrypted event %s from %s relayed as a notice (not decrypted)",
                               self.name, channel, p.event_id, p.sender)  # fmt: skip
            if room_id not in self.encrypted:
                self.encrypted.add(room_id)
                await self._encrypted_room(room_id)
        if p.media is not None:
            att = await self._download(p.media)
            if att is None:
                event.text = BAD_FILE_NOTE.format(name=p.media.name)
                self.ctx.metrics.skipped.labels(self.name, "encrypted_file_refused").inc()
            else:
                event.attachments.append(att)
        return [event]

    async def _download(self, media: Media) -> Attachment | None:
        """The file through the authenticated media API, within
        MediaDownloadSize; an encrypted one decrypted, its hash checked
        first (None: refused — never a corrupted file)."""
        att = Attachment(name=media.name, mime=media.mime, size=media.size)
        if media.size is not None and media.size > self.max_file:
            self.ctx.log.info("%s: file %s (%d bytes) is over MediaDownloadSize: not fetched", self.name, media.name,
                              media.size)  # fmt: skip
            return att
        if self.media is None or self.client is None:
            return att
        url = f"{self.server}{MEDIA_API}/download/{quote(media.server)}/{quote(media.media_id)}"
        headers = {"Authorization": f"Bearer {self.client.access_token}"}
        try:
            async with self.media.get(url, headers=headers, params={"allow_redirect": "true"}) as answer:
                if answer.status != 200:
                    self.ctx.log.warning("%s: could not fetch %s (%s): %d", self.name, media.name, media.mxc,
                                         answer.status)  # fmt: skip
                    return att
                data = bytearray()
                async for chunk in answer.content.iter_chunked(65536):
                    data += chunk
                    if len(data) > self.max_file:
                        self.ctx.log.info("%s: file %s is over MediaDownloadSize: not fetched", self.name, media.name)
                        return att
        except TRANSPORT_ERRORS as exc:
            raise Unavailable(f"download {media.mxc}: {exc}") from None
        if media.secret is not None:
            try:
                data = bytearray(decrypt_attachment(bytes(data), media.secret.key, media.secret.sha256,
                                                    media.secret.iv))  # fmt: skip
            except (EncryptionError, ValueError, TypeError) as exc:  # the hash first: a mismatch decrypts nothing
                self.ctx.log.error("%s: encrypted file %s (%s) refused: %s", self.name, media.name, media.mxc, exc)
                return None
        att.data_b64 = base64.b64encode(bytes(data)).decode()
        att.size = len(data)
        return att
