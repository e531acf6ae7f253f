"""What the modules of adapters/nctalk/ share: the protocol's constants, the
failures a room or the account raises, and the names and ids they make."""

from __future__ import annotations

import hashlib
import unicodedata

from adapters.talk.chat import GROUP, PUBLIC
from adapters.talk.common import OCS_API
from bridge.events import EventKind

PROTOCOL = "nctalk"
CHAT_API = OCS_API + "/chat"
REACTION_API = OCS_API + "/reaction"
EDIT_MARK = " (edited)"  # a visible edit where Talk cannot edit
DELETE_NOTE = "(deleted their message)"
REACTIONS_TTL = 7 * 86400  # how long who-reacted-with-what is remembered (for revocations)
RECENT_WINDOW = 200  # messages looked at for a referenceId (Talk's largest page)
ATTEMPTED_KEEP = 4096  # delivery keys remembered as attempted in this process
THROTTLE_SLACK = 55.0  # seconds Nextcloud's brute-force throttle may add to an answer (2 x 25 s, and some)
# Event.extra: a Talk message's messageType, read back when a copy goes into
# Talk (by any nctalk account), so a voice message stays one; private to nctalk.
TALK_MESSAGE_TYPE = "talkMessageType"
WILDCARD = "*"  # a gateway channel: every group and public conversation the account is in
FOLLOWED_TYPES = frozenset({GROUP, PUBLIC})  # not one-to-one (private), changelog or note-to-self
JOIN_PART = {"user_added": EventKind.JOIN, "user_removed": EventKind.LEAVE,
             "federated_user_added": EventKind.JOIN, "federated_user_removed": EventKind.LEAVE}  # fmt: skip


class RoomFailure(Exception):
    """One room cannot be polled or posted to now: retried, never given up."""

    def __init__(self, what: str, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(what)
        self.retry_after = retry_after
        self.status = status


class Refused(Exception):
    """Talk refused the account's credentials (401)."""


def event_id(*parts: object) -> str:
    """A stable event id per Talk message (and reaction): a page published
    again (a stale owner) yields the same ids, so deliveries dedupe."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32]


def safe_name(name: str) -> str:
    """A file name WebDAV and Talk accept: no path, no control characters."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C").strip()
    if base in ("", ".", "..") or (base.startswith(".") and set(base) == {"."}):
        base = "file"
    return base[:200]
