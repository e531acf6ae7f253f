"""Matterbridge's messages and talkbridge's events, both ways, for the
client adapter (adapters/matterbridge/adapter.py). Pure functions.

Inbound, a message is what Matterbridge 1.26's api bridge hands its clients
(bridge/api/api.go ``Send``: the ``config.Message`` the gateway routed to the
api account, marshalled by encoding/json): ``text``, ``channel`` (the
*origin* channel: gateway.go ``SendMessage`` "for api we need originchannel
as channel"), ``username`` (already formatted with the api account's
``RemoteNickFormat``, ``{NICK}`` unless set), ``userid``, ``avatar``,
``account`` and ``protocol`` of the source bridge, ``event``, ``gateway``,
``parent_id``, ``timestamp`` (the router's ``time.Now()``, nanoseconds),
``id`` (always "" for an api destination: api ``Send`` returns no ids) and
``Extra`` (files under ``file``).

Outbound, a delivery becomes the body of ``POST /api/message``
(api.go ``handlePostMessage``: Matterbridge overwrites ``channel``,
``protocol``, ``account``, ``id`` and ``timestamp`` itself, and keeps
``Extra`` as it is, which is where talkbridge's mark rides).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from adapters.api.encoding import (
    API_CONNECTED,
    EVENT_ACTION,
    EVENT_DELETE,
    EVENT_JOIN_LEAVE,
    FILE_FIELDS,
    MESSAGE_FIELDS,
    go_fields,
)
from bridge.events import Attachment, Delivery, Event, EventKind

PARENT_NOT_FOUND = "msg-parent-not-found"  # bridge/config/config.go ParentIDNotFound
MARK_KEY = "talkbridge"  # Extra.talkbridge = [mark]: a post of ours (config.Message.Extra is map[string][]interface{})
# Events that carry nothing a room should see: the greeting, typing, and
# Matterbridge's internal ones (config.go Event*); msg_delete never reaches an
# api client in 1.26 (api.go Send drops it) and has no id to act on anyway.
SKIPPED_EVENTS = frozenset(
    {
        API_CONNECTED, "user_typing", EVENT_DELETE, "file_delete", "avatar_download", "failure",
        "rejoin_channels", "get_channel_members", "new_users", "api_error",
    }
)  # fmt: skip
SYNTHETIC_PREFIX = "tb-"  # the id talkbridge records for a post Matterbridge gave none


class BadMessage(ValueError):
    """A message that is not Matterbridge's: not an object, a field of the wrong type."""


@dataclass(slots=True)
class Received:
    """One message Matterbridge handed over: the event to publish (None:
    nothing to relay, ``skip`` says why) and its ``digest``, the identity by
    which a message handed over again is recognised."""

    digest: str
    event: Event | None
    skip: str = ""


def digest_of(raw: dict[str, Any]) -> str:
    """The message's identity: a hash of all of it, keys sorted. The websocket
    (``json.Marshal``) and ``/api/messages`` (``JSONPretty``) write the same
    ``config.Message`` with the same values, so the same message gives the same
    digest whichever way it came; two messages differ at least in the router's
    nanosecond timestamp. BadMessage: JSON too deep to write again."""
    try:
        canonical = orjson.dumps(raw, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (254 levels; it reads 1024)
        raise BadMessage("nested too deep") from None
    return hashlib.sha256(canonical).hexdigest()[:32]


def parse_json(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadMessage(f"not JSON: {exc}") from None


def received(raw: Any, *, account: str, gateways: frozenset[str], mark: str, max_file: int) -> Received:
    """One message of Matterbridge's as the event it becomes; raise BadMessage.

    ``gateways``: the Matterbridge gateways this account bridges (a message
    of another is not ours to relay); ``mark``: this account's mark (a
    message that carries it is our own post come back); ``max_file``: the
    largest file kept (``MediaDownloadSize``; a larger one becomes a line of
    text naming it)."""
    if not isinstance(raw, dict):
        raise BadMessage("a message must be a JSON object")
    msg = go_fields(raw, MESSAGE_FIELDS)
    fields: dict[str, str] = {}
    for key in MESSAGE_FIELDS:
        if key == "Extra":
            continue
        value = msg.get(key, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise BadMessage(f"{key} must be a string")
        fields[key] = value
    digest = digest_of(raw)
    extra = msg.get("Extra")
    if extra is not None and not isinstance(extra, dict):
        raise BadMessage("Extra must be an object")
    extra = extra or {}
    name = fields["event"]
    if name in SKIPPED_EVENTS:
        return Received(digest, None, f"event {name}")
    marks = extra.get(MARK_KEY)
    if isinstance(marks, list) and mark in marks:
        return Received(digest, None, "own post")
    gateway = fields["gateway"]
    if gateway not in gateways:
        return Received(digest, None, "gateway not bridged")
    attachments, notes = files_of(extra.get("file"), max_file)
    text = fields["text"]
    if notes:
        text = "\n".join([text, *notes]) if text else "\n".join(notes)
    if name in ("", EVENT_ACTION):
        kind = EventKind.MESSAGE
        if not text and not attachments:
            return Received(digest, None, "empty")
    elif name == EVENT_JOIN_LEAVE:
        kind = EventKind.JOIN
    else:
        kind = EventKind.OTHER
    event = Event(
        kind=kind,
        account=account,
        channel=gateway,
        sender_id=fields["userid"],
        sender_name=fields["username"],
        text=text,
        native_id=fields["id"] or "mb-" + digest[:16],
        attachments=attachments,
        avatar=fields["avatar"] or None,
        origin=[f"{account}/{gateway}"],
    )
    parent = fields["parent_id"]
    if kind == EventKind.MESSAGE and parent and parent != PARENT_NOT_FOUND:
        event.reply_to = parent
    if name == EVENT_ACTION:
        event.action = True
    elif kind == EventKind.OTHER:
        event.event_name = name
    if "." in fields["account"]:  # "irc.libera": the network the message was written on
        event.relayed_from = fields["account"]
    return Received(digest, event)


def files_of(raw: Any, max_file: int) -> tuple[list[Attachment], list[str]]:
    """``Extra.file`` as attachments, and a line of text for each file that
    cannot travel (too large, no data, data that is not base64): its name and
    URL where it has one. A name is made safe (no path, never empty): the
    message is not lost for a file's name."""
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        raise BadMessage("Extra.file must be a list")
    out: list[Attachment] = []
    notes: list[str] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise BadMessage(f"Extra.file[{i}] must be an object")
        f = go_fields(item, FILE_FIELDS)
        name, data, url, comment = f.get("Name"), f.get("Data"), f.get("URL"), f.get("Comment")
        name = safe_file_name(name if isinstance(name, str) else "")
        url = url if isinstance(url, str) and url else None
        comment = comment if isinstance(comment, str) and comment else None
        size = None
        if isinstance(data, str) and data:
            try:
                size = len(base64.b64decode(data, validate=True))
            except (binascii.Error, ValueError):
                size = None
        if size is None or size > max_file:
            notes.append(f"{name}: {url}" if url else f"[file {name}]")
            continue
        out.append(Attachment(name=name, size=size, url=url, data_b64=data, caption=comment))
    return out, notes


def safe_file_name(name: str) -> str:
    """The last part of a path, without control characters; "file" if nothing is left."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable()).strip()
    return name if name and name not in (".", "..") else "file"


@dataclass(frozen=True, slots=True)
class Formats:
    """What becomes of what Matterbridge's api cannot carry (account keys):
    an edit, a reaction or a deletion is posted as a new message made from its
    format, or dropped where the format is empty."""

    edit: str = "{TEXT} (edited)"
    reaction: str = ""
    delete: str = ""


def post_body(delivery: Delivery, mark: str, formats: Formats) -> dict[str, Any] | None:
    """The ``POST /api/message`` body for a delivery, or None when it is
    dropped (see ``Formats``; a reaction withdrawn is always dropped)."""
    event = delivery.event
    text = delivery.text
    name = ""
    kind = event.kind
    if kind == EventKind.EDIT:
        if not formats.edit:
            return None
        text = formats.edit.replace("{TEXT}", delivery.text)
    elif kind == EventKind.REACTION:
        if not formats.reaction:
            return None
        text = formats.reaction.replace("{EMOJI}", event.reaction or "")
    elif kind == EventKind.DELETE:
        if not formats.delete:
            return None
        text = formats.delete
    elif kind in (EventKind.JOIN, EventKind.LEAVE):
        name = EVENT_JOIN_LEAVE
    elif kind != EventKind.MESSAGE:
        return None  # withdrawn reactions, events Matterbridge has no name for
    elif event.action:
        name = EVENT_ACTION
    files: list[dict[str, str]] = []
    lines: list[str] = []
    if kind == EventKind.MESSAGE:
        for att in event.attachments:
            if att.data_b64:
                files.append({"Name": att.name, "Data": att.data_b64, "Comment": att.caption or ""})
            else:  # nothing to upload (too large to fetch): name it, as the other adapters do
                lines.append(f"{att.name}: {att.url}" if att.url else f"[file {att.name}]")
    if lines:
        text = "\n".join([text, *lines]) if text.strip() else "\n".join(lines)
    if not text and not files:
        return None
    extra: dict[str, list[Any]] = {MARK_KEY: [mark]}
    if files:
        extra["file"] = files  # type: ignore[assignment]
    return {
        "text": text,
        "username": delivery.username,
        "userid": event.sender_id,
        "avatar": delivery.avatar or event.avatar or "",
        "gateway": delivery.channel,
        "event": name,
        "parent_id": (delivery.reply_to or "") if kind == EventKind.MESSAGE else "",
        "Extra": extra,
    }


def synthetic_id(delivery: Delivery) -> str:
    """The id recorded for a post (Matterbridge answers with none): the same
    for every attempt of one delivery, so replies to it find one copy."""
    return SYNTHETIC_PREFIX + hashlib.sha256(delivery.key.encode()).hexdigest()[:16]
