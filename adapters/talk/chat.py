"""Talk's chat API as a user (or guest) sees it: pure parsing of its answers.

Everything here turns bytes Talk sent into checked Python values, or raises
``BadAnswer`` naming what is wrong — nothing does I/O, so the parsers are
property-tested on their own (tests/test_nctalk_parse.py). Modelled on
spreed's ``Model/Message::toArray`` and ``ChatController`` (Talk 19 to 22;
``threadId`` and friends from Talk 22 are read past, not needed).

- An OCS answer is ``{"ocs": {"meta": {…}, "data": …}}``.
- A message: ``id`` (int), ``actorType``, ``actorId``, ``actorDisplayName``,
  ``timestamp``, ``message`` (with ``{placeholders}``), ``messageParameters``
  (``[]`` when empty, an object otherwise), ``systemMessage`` (``""`` for a
  comment), ``messageType`` (``comment``, ``comment_deleted``, ``system``,
  ``command``, ``voice-message``, ``record-audio``, ``record-video``),
  ``referenceId`` (a string), ``parent`` (the full parent, or
  ``{"id", "deleted": true}``).
- Reactions are system messages ``reaction`` (the emoji as ``message``) and
  ``reaction_revoked`` (no emoji: Talk's own clients reload the message's
  reactions); edits and deletions are ``message_edited`` / ``message_deleted``
  whose ``parent`` is the message as it is now.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

# Message types that carry something a person wrote (a file share is a
# ``comment``, or one of the recording kinds, with a ``file`` parameter).
WRITTEN_TYPES = frozenset({"comment", "voice-message", "record-audio", "record-video"})
MAX_ID = (1 << 63) - 1  # a PHP int; JSON numbers past it are not message ids
MAX_PAGE = 200  # ChatController: limit = min(200, limit)


class BadAnswer(ValueError):
    """An answer that is not what Talk sends: nothing of it is used."""


@dataclass(frozen=True, slots=True)
class Parent:
    id: int
    deleted: bool = False
    message: str = ""
    parameters: dict[str, Any] | list[Any] = field(default_factory=list)
    message_type: str = ""
    actor_type: str = ""
    actor_id: str = ""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    id: int
    actor_type: str
    actor_id: str
    actor_name: str
    timestamp: int
    message: str
    parameters: dict[str, Any] | list[Any]
    system: str  # systemMessage: "" for what a person wrote
    message_type: str
    reference_id: str = ""
    parent: Parent | None = None

    @property
    def actor(self) -> str:
        return f"{self.actor_type}/{self.actor_id}"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What ``GET /ocs/v2.php/cloud/capabilities`` says of Talk."""

    features: frozenset[str] = frozenset()
    max_length: int = 32000
    version: str = ""

    def has(self, feature: str) -> bool:
        return feature in self.features


def ocs_data(body: bytes) -> Any:
    """The ``data`` of an OCS JSON answer."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadAnswer(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("ocs"), dict) or "data" not in doc["ocs"]:
        raise BadAnswer("not an OCS answer ({ocs: {meta, data}})")
    return doc["ocs"]["data"]


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise BadAnswer(f"{what} is not a non-negative integer")
    return value


def _str(obj: dict[str, Any], key: str, what: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise BadAnswer(f"{what}.{key} is not a string")
    return value


def _params(obj: dict[str, Any], what: str) -> dict[str, Any] | list[Any]:
    value = obj.get("messageParameters", [])
    if isinstance(value, list):
        if value:  # PHP sends [] for an empty array and an object for anything else
            raise BadAnswer(f"{what}.messageParameters is a non-empty list")
        return []
    if not isinstance(value, dict):
        raise BadAnswer(f"{what}.messageParameters is neither an object nor []")
    for key, param in value.items():
        if not isinstance(param, dict):
            raise BadAnswer(f"{what}.messageParameters.{key} is not an object")
    return value


def parse_parent(raw: Any, what: str) -> Parent:
    if not isinstance(raw, dict):
        raise BadAnswer(f"{what} is not an object")
    pid = _int(raw.get("id"), f"{what}.id")
    if raw.get("deleted") is True and "message" not in raw:
        return Parent(pid, deleted=True)
    return Parent(
        pid,
        deleted=raw.get("deleted") is True or raw.get("messageType") == "comment_deleted",
        message=_str(raw, "message", what),
        parameters=_params(raw, what),
        message_type=_str(raw, "messageType", what, "comment"),
        actor_type=_str(raw, "actorType", what, ""),
        actor_id=_str(raw, "actorId", what, ""),
    )


def parse_message(raw: Any, what: str = "message") -> ChatMessage:
    if not isinstance(raw, dict):
        raise BadAnswer(f"{what} is not an object")
    parent = raw.get("parent")
    timestamp = raw.get("timestamp", 0)
    return ChatMessage(
        id=_int(raw.get("id"), f"{what}.id"),
        actor_type=_str(raw, "actorType", what),
        actor_id=_str(raw, "actorId", what),
        actor_name=_str(raw, "actorDisplayName", what, ""),
        timestamp=_int(timestamp, f"{what}.timestamp"),
        message=_str(raw, "message", what),
        parameters=_params(raw, what),
        system=_str(raw, "systemMessage", what, ""),
        message_type=_str(raw, "messageType", what, "comment"),
        reference_id=_str(raw, "referenceId", what, "") if raw.get("referenceId") is not None else "",
        parent=parse_parent(parent, f"{what}.parent") if parent is not None else None,
    )


def parse_page(body: bytes) -> list[ChatMessage]:
    """A ``GET chat/{token}`` answer of 200: its messages, every one checked
    (one that is not a message refuses the whole page: the cursor must not
    pass a message that was never understood)."""
    data = ocs_data(body)
    if not isinstance(data, list):
        raise BadAnswer("ocs.data is not a list of messages")
    if len(data) > MAX_PAGE:
        raise BadAnswer(f"{len(data)} messages in one page; Talk sends at most {MAX_PAGE}")
    return [parse_message(item, f"ocs.data[{i}]") for i, item in enumerate(data)]


def last_given(header: str | None) -> int | None:
    """``X-Chat-Last-Given``: the cursor for the next request (it may name a
    message the reader does not see, and must be used nevertheless)."""
    if header is None:
        return None
    text = header.strip()
    # message ids start at 1: a 0 would send the next poll back to the room's first message
    if not (0 < len(text) <= 19 and text.isascii() and text.isdigit()) or int(text) == 0:
        raise BadAnswer(f"X-Chat-Last-Given {header[:40]!r} is not a message id")
    return int(text)


def parse_capabilities(body: bytes) -> Capabilities:
    data = ocs_data(body)
    caps = data.get("capabilities") if isinstance(data, dict) else None
    spreed = caps.get("spreed") if isinstance(caps, dict) else None
    if not isinstance(spreed, dict):
        raise BadAnswer("no spreed capabilities: is Talk installed and enabled?")
    features = spreed.get("features", [])
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise BadAnswer("spreed.features is not a list of strings")
    max_length = 32000
    config = spreed.get("config")
    chat = config.get("chat") if isinstance(config, dict) else None
    if isinstance(chat, dict) and "max-length" in chat:
        value = chat["max-length"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadAnswer("spreed.config.chat.max-length is not a positive integer")
        max_length = value
    version = spreed.get("version", "")
    return Capabilities(frozenset(features), max_length, version if isinstance(version, str) else "")


def parse_reactions(body: bytes) -> dict[str, set[str]]:
    """``GET reaction/{token}/{id}``: emoji -> the actors ("type/id") who reacted."""
    data = ocs_data(body)
    if isinstance(data, list) and not data:
        return {}
    if not isinstance(data, dict):
        raise BadAnswer("reactions are not an object")
    out: dict[str, set[str]] = {}
    for emoji, actors in data.items():
        if not isinstance(actors, list):
            raise BadAnswer(f"reactions[{emoji!r}] is not a list")
        who = out.setdefault(emoji, set())
        for actor in actors:
            if not isinstance(actor, dict):
                raise BadAnswer(f"reactions[{emoji!r}] has an entry that is not an object")
            who.add(f"{_str(actor, 'actorType', 'reaction')}/{_str(actor, 'actorId', 'reaction')}")
    return out


# Conversation types (spreed docs/constants.md)
ONE_TO_ONE, GROUP, PUBLIC, CHANGELOG, FORMER_ONE_TO_ONE, NOTE_TO_SELF = 1, 2, 3, 4, 5, 6
MAX_ROOMS = 10_000  # conversations in one room list: past it the answer is not believed
MAX_TOKEN = 64  # a room token (Talk makes 8 characters; federated ones are the remote's)


@dataclass(frozen=True, slots=True)
class Conversation:
    """One entry of ``GET v4/room``: a conversation the user is in."""

    token: str
    type: int
    name: str = ""


def parse_rooms(body: bytes) -> list[Conversation]:
    """``GET /ocs/v2.php/apps/spreed/api/v4/room``: the user's conversations
    (only ``token``, ``type`` and the name are read; every entry checked)."""
    data = ocs_data(body)
    if not isinstance(data, list):
        raise BadAnswer("ocs.data is not a list of conversations")
    if len(data) > MAX_ROOMS:
        raise BadAnswer(f"{len(data)} conversations; more than {MAX_ROOMS} is not believed")
    out = []
    for i, item in enumerate(data):
        what = f"ocs.data[{i}]"
        if not isinstance(item, dict):
            raise BadAnswer(f"{what} is not an object")
        token = _str(item, "token", what)
        if not 0 < len(token) <= MAX_TOKEN or not token.isprintable():
            raise BadAnswer(f"{what}.token is not a room token")
        name = item.get("displayName") or item.get("name") or ""
        out.append(Conversation(token, _int(item.get("type"), f"{what}.type"), name if isinstance(name, str) else ""))
    return out
