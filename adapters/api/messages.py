"""The api adapter's messages and the bridge's events, both ways: a posted
Matterbridge message (as adapters/api/encoding.py reads it) validated into
an Event and the answer echoing it, and a delivery as the message a client
reads. A mixin of MatterbridgeAPI (adapters/api/adapter.py): it needs the
account's ``name``, ``ctx`` and ``max_file``.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any

from adapters.api.encoding import (
    API_CHANNEL,
    EVENT_ACTION,
    EVENT_DELETE,
    EVENT_JOIN_LEAVE,
    EVENT_REACTION_ADD,
    EVENT_REACTION_REMOVE,
    FILE_FIELDS,
    MESSAGE_FIELDS,
    BadRequest,
    _go_time,
    _shown,
    go_fields,
)
from bridge.adapter import AdapterContext
from bridge.events import Attachment, Delivery, Event, EventKind


class ApiMessages:
    name: str
    ctx: AdapterContext
    max_file: int

    def event_from_post(self, body: dict[str, Any]) -> tuple[Event | None, dict[str, Any]]:
        """Validate a POSTed Matterbridge message (its keys as ``go_fields``
        gives them); raise BadRequest. The event is None for a POST that is
        accepted but reaches nobody (a deletion of no message)."""
        fields: dict[str, str] = {}
        for key in MESSAGE_FIELDS:
            if key == "Extra":
                continue
            value = body.get(key, "")
            if value is None:  # Go leaves a field alone for null
                value = ""
            if not isinstance(value, str):
                raise BadRequest(400, f"{key} must be a string")
            fields[key] = value
        gateway = self._gateway(fields["gateway"])
        channel = API_CHANNEL  # api.go handlePostMessage: "these values are fixed"
        extra = body.get("Extra")
        attachments = self._files(extra)
        kind_of = {
            "": EventKind.EDIT if fields["id"] else EventKind.MESSAGE,
            EVENT_ACTION: EventKind.EDIT if fields["id"] else EventKind.MESSAGE,
            EVENT_DELETE: EventKind.DELETE,
            EVENT_REACTION_ADD: EventKind.REACTION,
            EVENT_REACTION_REMOVE: EventKind.UNREACTION,
            EVENT_JOIN_LEAVE: EventKind.JOIN,
        }
        kind = kind_of.get(fields["event"], EventKind.OTHER)
        native_id = os.urandom(8).hex()  # 64 random bits: unique enough per room, compact in the id map
        event = Event(
            kind=kind,
            account=self.name,
            channel=channel,
            sender_id=fields["userid"],
            sender_name=fields["username"],
            text=fields["text"],
            avatar=fields["avatar"] or None,
            gateway=gateway,
            attachments=attachments,
            origin=[f"{self.name}/{channel}"],
        )
        reaches_nobody = False
        if kind == EventKind.MESSAGE:
            if not fields["text"] and not attachments:
                raise BadRequest(400, "text is empty and there is no file")
            event.native_id = native_id
            event.reply_to = fields["parent_id"] or None
            if fields["event"] == EVENT_ACTION:
                event.action = True
        elif kind == EventKind.EDIT:
            if not fields["text"]:
                raise BadRequest(400, "an edit needs text")
            event.target_id = fields["id"]
            native_id = fields["id"]
        elif kind == EventKind.DELETE:
            # Without an id there is nothing to delete: every Matterbridge
            # bridge drops such a deletion (its api bridge drops them all)
            event.target_id = fields["id"]
            native_id = fields["id"]
            reaches_nobody = not fields["id"]
        elif kind in (EventKind.REACTION, EventKind.UNREACTION):
            if not fields["parent_id"] or not fields["text"]:
                raise BadRequest(400, f"{fields['event']} needs parent_id (the message) and text (the emoji)")
            if len(fields["text"]) > 64:
                raise BadRequest(400, "a reaction is one emoji")
            event.target_id = fields["parent_id"]
            event.reaction = fields["text"]
            event.text = ""
            native_id = ""
        elif kind == EventKind.OTHER:
            event.event_name = fields["event"]
            native_id = ""  # nothing to edit or delete later
        reply = {
            "text": fields["text"],
            "channel": API_CHANNEL,
            "username": fields["username"],
            "userid": fields["userid"],
            "avatar": fields["avatar"],
            "account": self.name,
            "event": fields["event"],
            "protocol": "api",
            "gateway": gateway,
            "parent_id": fields["parent_id"],
            "timestamp": _go_time(event.timestamp),
            "id": native_id,  # Matterbridge answers ""; ours lets a client edit later
            "Extra": extra if isinstance(extra, dict) else None,
        }
        return (None if reaches_nobody else event), reply

    def _gateway(self, name: str) -> str:
        sends = self.ctx.sends_into
        if name:
            if name not in sends:
                known = ", ".join(sorted(sends)) or "none"
                raise BadRequest(400, f'unknown gateway "{name}" for {self.name} (it sends into: {known})')
            return name
        if len(sends) == 1:
            return next(iter(sends))
        raise BadRequest(400, f"gateway is required ({self.name} sends into: {', '.join(sorted(sends)) or 'none'})")

    def _files(self, extra: Any) -> list[Attachment]:
        if extra is None:
            return []
        if not isinstance(extra, dict):
            raise BadRequest(400, "Extra must be an object")
        for key, value in extra.items():  # config.Message.Extra is map[string][]interface{}
            if value is not None and not isinstance(value, list):
                raise BadRequest(400, f"Extra.{_shown(key)} must be a list")
        files = extra.get("file") or []  # a map key: exact, as in Go
        out = []
        for i, raw in enumerate(files):
            if not isinstance(raw, dict):
                raise BadRequest(400, f"Extra.file[{i}] must be an object")
            item = go_fields(raw, FILE_FIELDS)  # mapstructure matches names without regard to case
            name = item.get("Name")
            if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
                raise BadRequest(400, f"Extra.file[{i}].Name must be a file name")
            data = item.get("Data")
            url = item.get("URL")
            if data is not None:
                if not isinstance(data, str):
                    raise BadRequest(400, f"Extra.file[{i}].Data must be base64")
                try:
                    size = len(base64.b64decode(data, validate=True))
                except (binascii.Error, ValueError):
                    raise BadRequest(400, f"Extra.file[{i}].Data is not valid base64") from None
                if size > self.max_file:
                    raise BadRequest(413, f"Extra.file[{i}] is {size} bytes; MediaDownloadSize is {self.max_file}")
            elif not isinstance(url, str) or not url:
                raise BadRequest(400, f"Extra.file[{i}] needs Data or URL")
            else:
                size = item.get("Size") if isinstance(item.get("Size"), int) else None
            comment = item.get("Comment")
            out.append(
                Attachment(
                    name=name,
                    size=size,
                    url=url if isinstance(url, str) and url else None,
                    data_b64=data,
                    caption=comment if isinstance(comment, str) and comment else None,
                )
            )
        return out

    # outbound ------------------------------------------------------------------
    def message_for(self, delivery: Delivery, native_id: str) -> dict[str, Any]:
        event = delivery.event
        # where the message was written: a Matterbridge's IRC message is irc.libera's, as there
        written_on = event.relayed_from or event.account
        msg: dict[str, Any] = {
            "text": delivery.text,
            "channel": event.channel,  # Matterbridge gives api clients the origin channel
            "username": delivery.username,
            "userid": event.sender_id,
            "avatar": delivery.avatar or event.avatar or "",  # the router's IconURL when the event has none
            "account": written_on,
            "event": "",
            "protocol": written_on.partition(".")[0],
            "gateway": delivery.gateway,
            "parent_id": delivery.reply_to or "",
            "timestamp": _go_time(event.timestamp),
            "id": native_id,
            "Extra": None,
        }
        if event.kind == EventKind.DELETE:
            msg["event"], msg["id"], msg["text"] = EVENT_DELETE, delivery.target_id, ""
        elif event.kind == EventKind.EDIT:
            msg["id"] = delivery.target_id
        elif event.kind in (EventKind.REACTION, EventKind.UNREACTION):
            msg["event"] = EVENT_REACTION_ADD if event.kind == EventKind.REACTION else EVENT_REACTION_REMOVE
            msg["text"], msg["parent_id"], msg["id"] = event.reaction or "", delivery.target_id, ""
        elif event.kind in (EventKind.JOIN, EventKind.LEAVE):
            msg["event"] = EVENT_JOIN_LEAVE
        elif event.kind == EventKind.OTHER:
            msg["event"], msg["id"] = event.event_name, ""
        elif event.action:
            msg["event"] = EVENT_ACTION
        if event.attachments:
            msg["Extra"] = {
                "file": [
                    {
                        "Name": a.name,
                        "Data": a.data_b64,
                        "Comment": a.caption or "",
                        "URL": a.url or "",
                        "Size": a.size or 0,
                        "Avatar": False,
                        "SHA": "",
                    }
                    for a in event.attachments
                ]
            }
        return msg
