"""Everything the fake Talk server knows, in one place.

Routes (bot API now; chat, WebDAV and shares later) read and change this
state; the Python API for tests drives it directly. Modelled on Talk 21
(Nextcloud 31) for bots, with ``version=19`` giving the Talk 19 / Nextcloud
29 webhook shape observed on real servers (no ``inReplyTo``, no
``talkParticipantType``, no reaction hooks).
"""

from __future__ import annotations

import hashlib
import secrets
import string
import time
from dataclasses import dataclass, field
from typing import Any

# lib/Model/Bot.php
FEATURE_WEBHOOK = 1
FEATURE_RESPONSE = 2
FEATURE_EVENT = 4
FEATURE_REACTION = 8
FEATURES = {
    "webhook": FEATURE_WEBHOOK,
    "response": FEATURE_RESPONSE,
    "event": FEATURE_EVENT,
    "reaction": FEATURE_REACTION,
}
STATE_DISABLED, STATE_ENABLED, STATE_NO_SETUP = 0, 1, 2

MAX_CHAT_LENGTH = 32000  # ChatManager::MAX_CHAT_LENGTH, capability spreed.config.chat.max-length
MAX_REFERENCE_ID = 64  # oc_comments.reference_id is varchar(64)

# lib/Model/Attendee.php participant types
OWNER, MODERATOR, USER, GUEST = 1, 2, 3, 4


@dataclass
class User:
    id: str
    display_name: str
    passwords: set[str] = field(default_factory=set)  # app passwords (Basic auth)


@dataclass
class Actor:
    type: str  # users, guests, federated_users, bots
    id: str
    display_name: str
    participant_type: int = USER

    @property
    def ref(self) -> str:
        return f"{self.type}/{self.id}"


@dataclass
class Bot:
    id: int
    name: str
    secret: str
    url: str
    features: int
    state: int = STATE_ENABLED
    description: str = ""
    error_count: int = 0
    last_error: str = ""

    @property
    def url_hash(self) -> str:
        return hashlib.sha1(self.url.encode()).hexdigest()

    @property
    def actor(self) -> Actor:
        return Actor("bots", f"bot-{self.url_hash}", f"{self.name} (Bot)", 0)


@dataclass
class Message:
    id: int
    token: str
    actor: Actor
    message: str  # with {placeholders}
    parameters: dict[str, Any] | list[Any]  # [] when empty, as PHP sends it
    timestamp: int
    message_type: str = "comment"  # comment | system | comment_deleted | command
    system_message: str = ""
    reference_id: str | None = None
    parent_id: int | None = None
    silent: bool = False
    # emoji -> [actor ref, ...] in the order they reacted
    reactions: dict[str, list[str]] = field(default_factory=dict)
    created: float = field(default_factory=time.time)  # edit and delete windows are measured from here
    edited_by: Actor | None = None
    edited_at: int = 0
    share: Any = None  # a file share (tests.talkserver.files.Share): the message renders its file parameter
    meta_type: str = ""  # talkMetaData messageType of a share ("voice-message"…); "" for a comment

    @property
    def replyable(self) -> bool:
        return self.message_type == "comment"


@dataclass
class Room:
    token: str
    name: str
    type: int = 2  # group
    federated: bool = False
    public: bool = False  # type 3: guests may join through the room's link
    participants: dict[str, Actor] = field(default_factory=dict)  # actor ref -> actor
    bots: set[int] = field(default_factory=set)  # bot ids enabled here
    # What Talk's InjectionMiddleware checks before a user's chat route (see
    # chat_api.ChatApi.refused): readOnly (Room::READ_ONLY), the lobby
    # (Webinary::LOBBY_NON_MODERATORS), bans (BanService) and the attendee's
    # chat permission (Attendee::PERMISSIONS_CHAT), kept per room by actor ref.
    read_only: bool = False
    lobby: bool = False
    banned: set[str] = field(default_factory=set)
    chat_denied: set[str] = field(default_factory=set)


@dataclass
class WebhookCall:
    """One webhook Talk sent: what went out and what came back."""

    bot_id: int
    url: str
    headers: dict[str, str]
    body: bytes
    status: int | None  # None: no answer (error / timeout)
    error: str = ""


@dataclass
class BotRequest:
    """One request a bot made to the bot API."""

    method: str
    path: str
    ip: str
    headers: dict[str, str]
    body: bytes
    status: int = 0
    at: float = field(default_factory=time.time)  # when the server received it


class TalkState:
    def __init__(self, version: int = 21, base_url: str = "http://localhost/") -> None:
        self.version = version
        self.base_url = base_url  # X-Nextcloud-Talk-Backend: overwrite.cli.url + '/'
        self.users: dict[str, User] = {}
        self.rooms: dict[str, Room] = {}
        self.bots: dict[int, Bot] = {}
        self.messages: dict[int, Message] = {}
        self._room_ids: dict[str, list[int]] = {}  # token -> its message ids, ascending
        self._next_message = 1
        self._next_bot = 1
        # brute force: (ip, action) -> attempt timestamps
        self.bruteforce: dict[tuple[str, str], list[float]] = {}
        self.webhook_calls: list[WebhookCall] = []
        self.max_chat_length = MAX_CHAT_LENGTH  # capability spreed.config.chat.max-length
        # called with each message stored (the chat long-poll wakes on it)
        self.on_message: list[Any] = []
        self.bot_requests: list[BotRequest] = []
        # Before Talk 22.0.x (spreed#16889) Like/Undo hooks named the message
        # author as actor; "reactor" is the fixed, documented behaviour.
        self.reaction_actor = "reactor"

    # users and rooms ------------------------------------------------------------
    def add_user(self, user_id: str, display_name: str | None = None) -> Actor:
        user = self.users.get(user_id)
        if user is None:
            user = self.users[user_id] = User(user_id, display_name or user_id)
        elif display_name:
            user.display_name = display_name
        return Actor("users", user_id, user.display_name)

    def create_room(self, name: str, token: str | None = None, federated: bool = False, type: int = 2) -> Room:
        """``type``: Talk's conversation type (1 one-to-one, 2 group, 4 changelog, 6 note to self)."""
        token = token or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        room = Room(token, name, type=type, federated=federated)
        self.rooms[token] = room
        return room

    def join(self, token: str, actor: Actor, participant_type: int = USER) -> Actor:
        actor.participant_type = participant_type
        self.rooms[token].participants[actor.ref] = actor
        return actor

    # bots -----------------------------------------------------------------------
    def install_bot(self, name: str, secret: str, url: str, features: tuple[str, ...]) -> Bot:
        """``occ talk:bot:install`` with its validation (BotService::validateBotParameters)."""
        if not 1 <= len(name.encode()) <= 64:
            raise ValueError("The provided name is too short or too long (min. 1 char, max. 64 chars)")
        if not 40 <= len(secret.encode()) <= 128:
            raise ValueError("The provided secret is too short (min. 40 chars, max. 128 chars)")
        if not url.startswith(("http://", "https://")) or len(url) > 4000:
            raise ValueError("The provided URL is not a valid URL")
        if any(b.url == url for b in self.bots.values()):
            raise ValueError("Bot with the same URL is already registered")
        flags = 0
        for f in features:
            if f == "reaction" and self.version < 21:
                raise ValueError('Invalid feature "reaction"')
            flags |= FEATURES[f]
        bot = Bot(self._next_bot, name, secret, url, flags)
        self.bots[bot.id] = bot
        self._next_bot += 1
        return bot

    def bots_for_token(self, token: str, feature: int | None) -> list[Bot]:
        """BotService::getBotsForToken: enabled in the room, feature present."""
        room = self.rooms.get(token)
        if room is None:
            return []
        out = []
        for bot_id in sorted(room.bots):
            bot = self.bots.get(bot_id)
            if bot is None or bot.state != STATE_ENABLED:
                continue
            if feature and not bot.features & feature:
                continue
            out.append(bot)
        return out

    # messages -------------------------------------------------------------------
    def add_message(
        self, token: str, actor: Actor, message: str, parameters: dict[str, Any] | list[Any], **kw: Any
    ) -> Message:
        msg = Message(self._next_message, token, actor, message, parameters or [], int(time.time()), **kw)
        self.messages[msg.id] = msg
        self._room_ids.setdefault(token, []).append(msg.id)
        self._next_message += 1
        for listener in self.on_message:
            listener(msg)
        return msg

    def room_messages(self, token: str) -> list[Message]:
        """The room's messages in id order (an index per room: 500 rooms polled
        at once must not each scan every message; one dropped from
        ``messages`` — bench/soak.py keeps memory flat so — is gone here too)."""
        ids = self._room_ids.get(token, [])
        out = [self.messages[i] for i in ids if i in self.messages]
        if len(out) < len(ids):
            self._room_ids[token] = [m.id for m in out]
        return out

    def parent_in_room(self, token: str, message_id: int) -> Message | None:
        """ChatManager::getParentComment: only a message of the same room."""
        msg = self.messages.get(message_id)
        return msg if msg is not None and msg.token == token else None

    # brute force (OC\Security\Bruteforce\Throttler) ----------------------------
    MAX_ATTEMPTS = 10
    MAX_DELAY = 25.0

    def attempts(self, ip: str, action: str, max_age: float) -> int:
        now = time.time()
        return sum(1 for t in self.bruteforce.get((ip, action), []) if now - t < max_age)

    def register_attempt(self, ip: str, action: str) -> None:
        self.bruteforce.setdefault((ip, action), []).append(time.time())

    def delay(self, ip: str, action: str) -> float:
        n = self.attempts(ip, action, 12 * 3600)
        if n == 0:
            return 0.0
        if n > self.MAX_ATTEMPTS:
            return self.MAX_DELAY
        return min(0.1 * 2**n, self.MAX_DELAY)

    def blocked(self, ip: str, action: str) -> bool:
        return self.delay(ip, action) == self.MAX_DELAY and self.attempts(ip, action, 1800) > self.MAX_ATTEMPTS

    def reset_bruteforce(self, ip: str) -> None:
        """``occ security:bruteforce:reset IP``."""
        for key in [k for k in self.bruteforce if k[0] == ip]:
            del self.bruteforce[key]
