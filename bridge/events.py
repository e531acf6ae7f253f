"""The normalized event every adapter publishes and every adapter delivers.

An inbound ``Event`` is what an adapter saw on its network, in network-neutral
terms. The router turns one inbound event into one ``Delivery`` per
destination channel; the destination's adapter receives the ``Delivery``.

The wire form is compact JSON (one stream field), versioned so a rolling
upgrade can tell old entries from new ones.

What an event says beyond its kind (docs/architecture.md)
----------------------------------------------------------

The dataclass fields below are the contract every adapter reads. Two more
meanings cross from one adapter to others, and are typed properties here:

- ``Event.action`` (wire: ``extra["action"]``, ``ACTION``): a ``/me``
  action. Written by the api (``user_action``) and Matrix (``m.emote``),
  read by both when they send.
- ``Event.event_name`` (wire: ``extra["event"]``, ``EVENT_NAME``): for
  ``EventKind.OTHER``, the name of the event talkbridge has no kind for
  (an api client's ``topic_change``, ``user_typing`` or custom one).
  Written by the api, read by the router and the api.
- ``Event.relayed_from`` (wire: ``extra["from"]``, ``RELAYED_FROM``): the
  account, on a bridge talkbridge is a client of, where the message was
  written (``irc.libera`` for a message a Matterbridge relayed from IRC).
  Written by the matterbridge adapter, read by the router for
  ``RemoteNickFormat``'s ``{PROTOCOL}`` and ``{BRIDGE}``.

They live in ``extra`` under those keys (``ACTION``, ``EVENT_NAME``, ``RELAYED_FROM``), where
the properties read and write them: the wire form is the one every version
so far wrote, so entries already in the streams decode with the
same meaning and a daemon of an older version reads what this one writes.

Every other ``extra`` key is private to the part that both writes and reads
it, and named there: ``worker`` (workers/results.py ``WORKER_MARK``: the
feature whose job wrote the event; no feature answers another's answer) and
``talkMessageType`` (adapters/nctalk/common.py ``TALK_MESSAGE_TYPE``: a
Talk message's type, so a voice message copied into Talk stays one). The
core passes ``extra`` on untouched and reads nothing else from it.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import orjson

WIRE_VERSION = 1
# The keys of ``Event.extra`` that carry the typed properties (module docstring)
ACTION = "action"
EVENT_NAME = "event"
RELAYED_FROM = "from"


class EventKind(StrEnum):
    MESSAGE = "message"
    EDIT = "edit"
    DELETE = "delete"
    REACTION = "reaction"  # ``reaction`` holds the emoji, ``target_id`` the message
    UNREACTION = "unreaction"
    JOIN = "join"
    LEAVE = "leave"
    # An event talkbridge has no kind of its own for, passed on by name in
    # ``Event.event_name``: an api client's topic_change, user_typing or custom
    # ones, which Matterbridge relays (bridge/router.py decides where to).
    OTHER = "other"


class WireError(ValueError):
    """A stream entry that is not a valid event (corrupt or from the future)."""


@dataclass(slots=True)
class Attachment:
    name: str
    mime: str = "application/octet-stream"
    size: int | None = None
    url: str | None = None  # where the receiving adapter can fetch it
    data_b64: str | None = None  # small inline payloads (Matterbridge API files)
    caption: str | None = None


@dataclass(slots=True)
class Event:
    kind: EventKind
    account: str  # source account, "protocol.name"
    channel: str  # source channel (room token, room id, "api")
    sender_id: str = ""
    sender_name: str = ""
    text: str = ""
    native_id: str | None = None  # the source network's id for this message
    reply_to: str | None = None  # native id (in the source channel) replied to
    target_id: str | None = None  # edit/delete/reaction: native id concerned
    reaction: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    gateway: str | None = None  # restrict routing to one gateway (api POSTs)
    avatar: str | None = None
    origin: list[str] = field(default_factory=list)  # "account/channel" trail
    extra: dict[str, Any] = field(default_factory=dict)  # see the module docstring: what may be in it
    id: str = field(default_factory=lambda: os.urandom(16).hex())
    timestamp: float = field(default_factory=time.time)

    @property
    def action(self) -> bool:
        """A ``/me`` action (the api's ``user_action``, Matrix's ``m.emote``)."""
        return bool(self.extra.get(ACTION))

    @action.setter
    def action(self, value: bool) -> None:
        if value:
            self.extra[ACTION] = True
        else:
            self.extra.pop(ACTION, None)

    @property
    def event_name(self) -> str:
        """``EventKind.OTHER``: which event (``topic_change``, ``user_typing``, a custom one); else ""."""
        name = self.extra.get(EVENT_NAME)
        return "" if name is None else str(name)

    @event_name.setter
    def event_name(self, value: str) -> None:
        if value:
            self.extra[EVENT_NAME] = value
        else:
            self.extra.pop(EVENT_NAME, None)

    @property
    def relayed_from(self) -> str:
        """The account ("protocol.name") on a bridge we are a client of where
        the message was written (a Matterbridge's ``irc.libera``); else ""."""
        value = self.extra.get(RELAYED_FROM)
        return "" if value is None else str(value)

    @relayed_from.setter
    def relayed_from(self, value: str) -> None:
        if value:
            self.extra[RELAYED_FROM] = value
        else:
            self.extra.pop(RELAYED_FROM, None)

    @property
    def protocol(self) -> str:
        return self.account.split(".", 1)[0]

    @property
    def bridge_name(self) -> str:
        return self.account.split(".", 1)[1] if "." in self.account else self.account

    def to_dict(self) -> dict[str, Any]:
        # By hand, not dataclasses.asdict: this runs for every event and every
        # delivery, and asdict's deep copy was a fifth of the daemon's CPU.
        data: dict[str, Any] = {"kind": self.kind.value}
        for name in _EVENT_FIELDS:
            value = getattr(self, name)
            if value not in (None, [], {}, ""):  # drop empty optionals: entries stay small
                data[name] = value
        if self.attachments:
            data["attachments"] = [{k: v for k, v in asdict(a).items() if v is not None} for a in self.attachments]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        try:
            fields = dict(data)
            fields["kind"] = EventKind(fields["kind"])
            fields["attachments"] = [Attachment(**a) for a in fields.get("attachments", [])]
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"not an event: {exc}") from exc


_EVENT_FIELDS = tuple(f for f in Event.__dataclass_fields__ if f not in ("kind", "attachments"))


@dataclass(slots=True)
class Delivery:
    """One event, routed to one destination channel, ready for its adapter."""

    event: Event
    account: str  # destination account
    channel: str  # destination channel
    gateway: str
    username: str  # RemoteNickFormat, rendered for this destination
    text: str  # after the source account's ReplaceMessages
    # Filled at delivery time from the id map (the original may have been
    # delivered moments before, by this same ordered stream):
    reply_to: str | None = None  # native id in the destination
    target_id: str | None = None  # native id in the destination
    # The destination's IconURL when the event brings no avatar of its own;
    # None: the event's avatar stands.
    avatar: str | None = None

    @property
    def key(self) -> str:
        """Idempotency key: the same for every redelivery of this copy."""
        return f"{self.event.id}:{self.account}:{self.channel}"

    def to_wire(self) -> bytes:
        body = {
            "v": WIRE_VERSION,
            "e": self.event.to_dict(),
            "a": self.account,
            "c": self.channel,
            "g": self.gateway,
            "u": self.username,
            "t": self.text,
        }
        if self.avatar is not None:  # rare: only destinations with an IconURL
            body["av"] = self.avatar
        return orjson.dumps(body)

    @classmethod
    def from_wire(cls, raw: bytes | str) -> Delivery:
        body = _load(raw)
        try:
            return cls(
                event=Event.from_dict(body["e"]),
                account=body["a"],
                channel=body["c"],
                gateway=body["g"],
                username=body["u"],
                text=body["t"],
                avatar=body.get("av"),
            )
        except KeyError as exc:
            raise WireError(f"delivery lacks {exc}") from exc


def event_to_wire(event: Event) -> bytes:
    return orjson.dumps({"v": WIRE_VERSION, "e": event.to_dict()})


def event_from_wire(raw: bytes | str) -> Event:
    body = _load(raw)
    if "e" not in body:
        raise WireError("entry has no event")
    return Event.from_dict(body["e"])


def _load(raw: bytes | str) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise WireError(f"not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise WireError("entry is not an object")
    if body.get("v") != WIRE_VERSION:
        raise WireError(f"unknown wire version {body.get('v')!r}")
    return body
