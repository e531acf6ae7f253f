"""Matterbridge's messages as Go reads and writes them, for the api adapter
(adapters/api/adapter.py): the keys of a posted message matched to
``config.Message``'s fields as Go's encoding/json matches them, timestamps
as Go marshals them, form posts in the charsets a client may name, and
WebSocket frames. Pure functions; BadRequest carries the 4xx and its reason.
"""

from __future__ import annotations

import codecs
import functools
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl

import orjson

API_CHANNEL = "api"  # every api account's one channel (gateway.go mapChannelConfig, api.go handlePostMessage)
API_CONNECTED = "api_connected"
EVENT_DELETE = "msg_delete"
EVENT_ACTION = "user_action"
EVENT_JOIN_LEAVE = "join_leave"
EVENT_REACTION_ADD = "reaction_add"
EVENT_REACTION_REMOVE = "reaction_remove"
API_ERROR = "api_error"  # a WebSocket frame we refused: {"event": "api_error", "status": 400, "text": reason}


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _go_time(ts: float) -> str:
    """RFC 3339 with nanoseconds, as Go's time.Time marshals."""
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond:06d}000Z"


# config.Message's JSON names; Go's encoding/json matches a key to them
# without regard to case (Extra has no tag: its field name)
MESSAGE_FIELDS = (
    "text", "channel", "username", "userid", "avatar", "account", "event", "protocol", "gateway", "parent_id",
    "timestamp", "id", "Extra",
)  # fmt: skip
FILE_FIELDS = ("Name", "Data", "Comment", "URL", "Size", "Avatar", "SHA", "NativeID")  # config.FileInfo
_ASCII_FOLD = {**{c: c + 32 for c in range(65, 91)}, 0x212A: "k", 0x17F: "s"}


def go_fold(key: str) -> str:
    """A key as Go's encoding/json (and mapstructure) compares it to a field
    name: ASCII letters without case, and the Kelvin sign and long s, which
    fold to k and s."""
    return key.translate(_ASCII_FOLD)


@functools.cache
def _fields_by_key(names: tuple[str, ...]) -> Mapping[str, str]:
    """Field name by folded key, and by its exact spelling (the common case,
    found without folding). Built once per field list: this is the POST path."""
    table = {go_fold(name): name for name in names}
    table.update({name: name for name in names})
    return MappingProxyType(table)


def go_fields(body: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The body's values by field name, keys matched as Go matches them; of
    several keys for one field the last wins, as Go assigns each in turn.
    Keys that name no field are left out (Go ignores them)."""
    by_key = _fields_by_key(tuple(names))
    out: dict[str, Any] = {}
    for key, value in body.items():
        name = by_key.get(key)
        if name is None:
            name = by_key.get(go_fold(key))
        if name is not None:
            out.pop(name, None)  # the last key for a field wins
            out[name] = value
    return out


def ws_message(data: str | bytes) -> dict[str, Any]:
    """A WebSocket frame as the message it carries (its keys as ``go_fields``
    gives them); raise BadRequest. A binary frame is read as JSON too (Go's
    ``ReadJSON`` reads either kind)."""
    try:
        body = orjson.loads(data)  # refuses text that is not UTF-8, lone surrogates, NaN, nesting past 1,024
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, f"frame is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "a frame must be a JSON object (one message)")
    return go_fields(body, MESSAGE_FIELDS)


FORM_CHARSETS = ("utf-8", "ascii", "iso8859-1", "cp1252")  # codecs' names for them
FORM_MAX_FIELDS = 100


def _shown(value: str, limit: int = 80) -> str:
    """A client's value in a reason: printable and bounded."""
    text = value.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return text if len(text) <= limit else text[:limit] + "…"


def _form_encoding(charset: str | None) -> str:
    if not charset:
        return "utf-8"
    try:
        name = codecs.lookup(charset).name
    except (LookupError, ValueError, TypeError):
        name = ""
    if name not in FORM_CHARSETS:
        raise BadRequest(415, f"charset {_shown(charset)} is not supported; send UTF-8")
    return name


def _form_fields(raw: bytes, encoding: str) -> dict[str, str]:
    """A form post's fields; the last of a repeated name wins."""
    try:
        text = raw.decode(encoding)
        pairs = parse_qsl(
            text, keep_blank_values=True, encoding=encoding, errors="strict", max_num_fields=FORM_MAX_FIELDS
        )
    except UnicodeDecodeError:
        raise BadRequest(400, f"form body is not valid {encoding.upper()}") from None
    except ValueError:  # more fields than any message has
        raise BadRequest(400, f"form body has more than {FORM_MAX_FIELDS} fields") from None
    return dict(pairs)
