"""What every Nextcloud Talk adapter needs, whichever way it talks to Talk
(the bot's signed webhooks and replies, a user account's chat API): the OCS
constants, Talk's rich-object strings, message splitting, ``referenceId``,
message-content parsing and ``Retry-After``.

Nothing here does I/O or knows an account: pure functions over Talk's
formats, so an adapter module imports them and stays readable on its own.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

from bridge.events import Attachment

OCS_API = "/ocs/v2.php/apps/spreed/api/v1"  # Talk's chat and bot API base, under the Nextcloud URL
# Every OCS request: without OCS-APIRequest Nextcloud answers 412 (its CSRF
# check); without Accept it answers XML.
OCS_HEADERS = {"OCS-APIRequest": "true", "Accept": "application/json"}
MAX_REFERENCE_ID = 64  # Talk's comments.reference_id column
MAX_CHAT_LENGTH = 32000  # spreed.config.chat.max-length unless the server says otherwise
# Nextcloud's brute-force Throttler (Throttler::MAX_DELAY): after refused
# requests from an IP (8 of them reach it), Talk sleeps up to this long before
# handling *any* request of the protected action from that IP, and as long
# again after a refused one, before answering.
BRUTEFORCE_MAX_DELAY = 25.0
# PHP's trim() without a character list: Talk trims messages with it, so a
# message of only non-breaking spaces is not empty for Talk.
PHP_TRIM_CHARS = " \t\n\r\0\x0b"
MENTION_TYPES = ("user", "guest", "email", "group", "user-group", "circle", "call", "federated_user", "highlight")
_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_\-]+)\}")


class BadContent(ValueError):
    """A message's content is not the ``{message, parameters}`` Talk sends."""


def php_trim(text: str) -> str:
    """``trim($text)`` as Talk applies it to messages (not ``str.strip``, which
    also removes non-breaking and other Unicode spaces)."""
    return text.strip(PHP_TRIM_CHARS)


def reference_id(key: str, part: int = 0) -> str:
    """Talk ``referenceId`` for one posted message: 64 hex chars, the same
    for every redelivery of the same copy (and chunk)."""
    return hashlib.sha256(f"{key}#{part}".encode()).hexdigest()


def render(message: str, parameters: Any) -> tuple[str, list[Attachment]]:
    """Talk's rich-object string -> plain text (and the files it names).

    ``parameters`` is ``[]`` when empty (PHP), an object otherwise.
    """
    params = parameters if isinstance(parameters, dict) else {}
    files: list[Attachment] = []

    def one(m: re.Match[str]) -> str:
        obj = params.get(m.group(1))
        if not isinstance(obj, dict):
            return m.group(0)  # not a parameter: literal braces in the text
        kind = obj.get("type")
        name = str(obj.get("name") or obj.get("id") or "")
        if kind == "file":
            size = obj.get("size")
            files.append(
                Attachment(
                    name=name or "file",
                    mime=str(obj.get("mimetype") or "application/octet-stream"),
                    size=_size(size),
                    url=str(obj["link"]) if obj.get("link") else None,
                )
            )
            return name
        if kind in MENTION_TYPES:
            return "@" + name if m.group(1).startswith("mention") else name
        return name or m.group(0)

    return _PLACEHOLDER.sub(one, message), files


def _size(value: Any) -> int | None:
    """A file parameter's size: an integer, or its ASCII digits (not "²", not 5,000 of them)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and 0 < len(value) <= 18 and value.isascii() and value.isdigit():
        return int(value)
    return None


def split_message(text: str, limit: int) -> list[str]:
    """Pieces of at most ``limit`` characters (code points, as Talk's
    mb_strlen counts), cut at a line break or space where one is near."""
    out: list[str] = []
    rest = text
    while len(rest) > limit:
        cut = rest.rfind("\n", limit // 2, limit + 1)
        if cut <= 0:
            cut = rest.rfind(" ", limit // 2, limit + 1)
        if cut <= 0:
            cut = limit
        piece, rest = rest[:cut], rest[cut:]
        if php_trim(piece):  # what Talk would refuse as empty; a piece of NBSPs it posts
            out.append(piece)
        rest = rest.lstrip("\n ") if cut < limit or rest[:1] in ("\n", " ") else rest
    if php_trim(rest):
        out.append(rest)
    return out


def parse_content(raw: Any) -> tuple[str, dict[str, Any] | list[Any]]:
    """A message's ``content`` as the bot webhooks carry it — a JSON string
    ``{"message": …, "parameters": …}`` — as (message, parameters).

    ``parameters`` is ``[]`` when empty (PHP), an object otherwise. Raises
    ``BadContent`` naming what is wrong.
    """
    if not isinstance(raw, str):
        raise BadContent("object.content must be a JSON string")
    try:
        content = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadContent("object.content is not JSON") from None
    if not isinstance(content, dict) or not isinstance(content.get("message"), str):
        raise BadContent("object.content must hold {message, parameters}")
    parameters = content.get("parameters", [])
    if not isinstance(parameters, dict | list):
        raise BadContent("object.content.parameters must be an object or []")
    return content["message"], parameters


def is_message_id(value: Any) -> bool:
    """A Talk message id: an integer, or its ASCII digits as a string (not "²")."""
    if isinstance(value, str):
        return 0 < len(value) <= 20 and value.isascii() and value.isdigit()
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
